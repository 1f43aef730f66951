"""Hostile callees: every call comes back with a typed status by its deadline, through
`Episode.step`, and leaves no thread behind. An HTTP server on 127.0.0.1 misbehaves in one way
per path; the calculator and a simulated agent get inputs whose cost or type explodes; and
callees that raise, return junk or ignore their deadline meet the executor's one guard."""
import json
import socket
import struct
import sys
import threading
import time
from dataclasses import dataclass

import pytest

from env import EnvConfig, Episode
from tasks import Subtask, Task
from tools import (EXEC_ERR, OK, TIMEOUT, CalcError, Calculator, Callee, HttpAgent, Pool, Reply, SimAgent,
                   calculate)

TASK = Task("q?", "1", [Subtask(1, "math", "1", "1")], "test", 1, 1, 1)
CALL_TIMEOUT = 1.0


def _response(status: bytes, body: bytes, extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 " + status + b"\r\nContent-Length: %d\r\n" % len(body) + extra + b"\r\n" + body


_GOOD = json.dumps({"choices": [{"message": {"content": " fine "}}]}).encode()


def _drip(conn, stop):
    head = b"HTTP/1.1 200 OK\r\n" + b"X-Drip: yes\r\n" * 1000
    for i in range(len(head)):
        conn.sendall(head[i:i + 1])
        if stop.wait(0.2):
            return


def _reset(conn, stop):
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))   # close -> RST


def _big(with_length):
    def send(conn, stop):
        length = b"Content-Length: %d\r\n" % (10 << 20) if with_length else b""
        conn.sendall(b"HTTP/1.1 200 OK\r\n" + length + b"\r\n")
        for _ in range(160):
            conn.sendall(b"x" * (64 << 10))
    return send


HANDLERS = {
    "ok": lambda c, stop: c.sendall(_response(b"200 OK", _GOOD)),
    "chunked_ok": lambda c, stop: c.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                                            + b"%x\r\n" % len(_GOOD) + _GOOD + b"\r\n0\r\n\r\n"),
    "status_500": lambda c, stop: c.sendall(_response(b"500 Internal Server Error", b"oops")),
    "malformed_json": lambda c, stop: c.sendall(_response(b"200 OK", b'{"choices": [{"mess')),
    "garbage_status": lambda c, stop: c.sendall(b"SPAM 9000 \x00\xff\r\n\r\nhello"),
    "many_headers": lambda c, stop: c.sendall(_response(b"200 OK", _GOOD, b"X-A: b\r\n" * 150)),
    "truncated_chunked": lambda c, stop: c.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                                                   b"40\r\n" + _GOOD[:20]),
    "nested_json": lambda c, stop: c.sendall(_response(b"200 OK", b"[" * 100000 + b"]" * 100000)),
    "body_10mb": _big(with_length=True),
    "body_10mb_unsized": _big(with_length=False),
    "invalid_utf8": lambda c, stop: c.sendall(_response(b"200 OK", b'{"choices": [{"message": {"content": "ok \xff\xfe"}}]}')),
    "reset": _reset,
    "slow": lambda c, stop: stop.wait(3 * CALL_TIMEOUT) or c.sendall(_response(b"200 OK", _GOOD)),
    "drip": _drip,
}

EXPECTED = {"ok": OK, "chunked_ok": OK, "status_500": EXEC_ERR, "malformed_json": EXEC_ERR,
            "garbage_status": EXEC_ERR, "many_headers": EXEC_ERR, "truncated_chunked": EXEC_ERR,
            "nested_json": EXEC_ERR, "body_10mb": EXEC_ERR, "body_10mb_unsized": EXEC_ERR,
            "invalid_utf8": OK, "reset": EXEC_ERR, "slow": TIMEOUT, "drip": TIMEOUT}


@pytest.fixture(scope="module")
def server():
    """One listener on 127.0.0.1; each connection gets the handler named by the request path's
    first part. Every thread is named "hostile-..." (so the leak check can tell them apart),
    and all of them stop by themselves: on stop, or after 30 s."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.1)
    stop, end = threading.Event(), time.monotonic() + 30

    def handle(conn):
        with conn:
            try:
                conn.settimeout(5)
                data = b""
                while b"\r\n\r\n" not in data and len(data) < 65536:
                    chunk = conn.recv(4096)
                    if not chunk:
                        return
                    data += chunk
                head, _, body = data.partition(b"\r\n\r\n")
                length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
                while len(body) < length:     # read it all: unread input would turn close into RST
                    body += conn.recv(4096)
                HANDLERS[head.split(b" ")[1].split(b"/")[1].decode()](conn, stop)
            except OSError:
                pass                          # the client gave up: it is allowed to

    def serve():
        while not stop.is_set() and time.monotonic() < end:
            try:
                conn, _ = listener.accept()
            except socket.timeout:
                continue
            threading.Thread(target=handle, args=(conn,), name="hostile-conn", daemon=True).start()
    thread = threading.Thread(target=serve, name="hostile-server", daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    stop.set()
    thread.join()
    listener.close()


def _new_threads(before: set, window: float = 0.5) -> list:
    deadline = time.monotonic() + window
    while True:
        left = [t for t in threading.enumerate()
                if t not in before and t.is_alive() and not t.name.startswith("hostile")]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.02)


def _step(callee, task, call_timeout=CALL_TIMEOUT):
    episode = Episode(TASK, Pool("p", [callee]), EnvConfig(call_timeout=call_timeout))
    start = time.monotonic()
    episode.step(f'<call id="1" to="{callee.name}">{task}</call>')
    return episode.rounds[0].results[0], time.monotonic() - start


@pytest.mark.parametrize("name", list(HANDLERS))
def test_hostile_http_server(server, name):
    agent = HttpAgent("remote", "agent", "a remote model", 0.01, 1.0, url=f"{server}/{name}/v1", model="m")
    before = set(threading.enumerate())
    result, elapsed = _step(agent, "hello")
    assert result.status == EXPECTED[name], result
    assert elapsed < CALL_TIMEOUT + 1.0
    assert _new_threads(before) == []
    if name in ("ok", "chunked_ok"):
        assert result.text == "fine"
    if name == "invalid_utf8":
        assert result.text == "ok \ufffd\ufffd"
    if name.startswith("body_10mb"):
        assert "reply too large" in result.text


HOSTILE_MATH = ["(-1) ** 0.5", "((-1)**0.5) % 2", "(-1) ** 0.5 > 1", "round(1, -10**7)", "round(1, 10**9)",
                "10**10**10", "9**9**9", "2**100000", "(2**1000)**1000", "(" * 240 + "1" + ")" * 240, "1/0",
                "7 % 0", "0 ** -1", "max(1, (-8) ** (1/3))"]


@pytest.mark.parametrize("callee", [
    Calculator("calc", "tool", "arithmetic", 0.0, 0.01),
    SimAgent("sim", "agent", "a simulated model", 0.0, 0.1, skills={"math": 1.0}, exec_err_rate=0.0,
             timeout_rate=0.0),
], ids=["calc", "sim_agent"])
@pytest.mark.parametrize("expr", HOSTILE_MATH)
def test_hostile_math_is_refused_fast(callee, expr):
    result, elapsed = _step(callee, expr)
    assert result.status == EXEC_ERR and elapsed < 1.0, result


def test_deep_recursion_in_the_calculator_is_a_calc_error():
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(150)            # as if called from deep inside a larger program
    try:
        with pytest.raises(CalcError):
            calculate("-" * 400 + "1")
    finally:
        sys.setrecursionlimit(limit)


@dataclass
class Misbehaving(Callee):
    """Raises, returns junk, or ignores its deadline, depending on the task."""
    def run(self, task, rng, timeout):
        if task == "raise":
            raise RuntimeError("boom " + "x" * 500)
        if task == "junk":
            return "not a reply"
        if task == "nan":
            return Reply(OK, "x", float("nan"), 0.0)
        if task == "hang":
            time.sleep(3)
        return Reply("MAYBE", "x", 0.1, 0.0)


@dataclass
class RealMisbehaving(Misbehaving):
    virtual_clock = False


@dataclass
class BadBatcher(Misbehaving):
    batch = True

    def run_batch(self, tasks, rngs, timeout):
        return []                             # one reply short per call


@pytest.mark.parametrize("cls", [Misbehaving, RealMisbehaving, BadBatcher])
@pytest.mark.parametrize("task", ["raise", "junk", "nan", "unknown status"])
def test_the_executor_types_every_failure(cls, task):
    result, _ = _step(cls("bad", "tool", "x", 0.0, 0.1), task)
    assert result.status == EXEC_ERR and len(result.text) <= 200, result
    if task == "raise" and cls is not BadBatcher:
        assert result.text.startswith("RuntimeError: boom")


def test_the_executor_deadline_is_a_real_backstop():
    # a real callee that ignores its deadline: the step still returns by call_timeout + 1 s
    # (its thread is a daemon and ends by itself 3 s later; well-behaved callees leave none)
    result, elapsed = _step(RealMisbehaving("bad", "tool", "x", 0.0, 0.1), "hang", call_timeout=0.5)
    assert result.status == TIMEOUT and elapsed < 0.5 + 1.0


def test_a_hung_callee_with_one_slot_does_not_hold_the_step():
    # the first call hangs past its deadline and holds the callee's only slot; the second waits
    # for it, and both come back TIMEOUT by call_timeout + 1 s (the second never started: cost 0)
    callee = RealMisbehaving("bad", "tool", "x", 0.5, 0.1, concurrency=1)
    episode = Episode(TASK, Pool("p", [callee]), EnvConfig(call_timeout=0.5))
    start = time.monotonic()
    episode.step('<call id="1" to="bad">hang</call><call id="2" to="bad">hang</call>')
    elapsed = time.monotonic() - start
    assert [(r.status, r.cost) for r in episode.rounds[0].results] == [(TIMEOUT, 0.5), (TIMEOUT, 0.0)]
    assert elapsed < 0.5 + 1.0
