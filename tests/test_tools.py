"""Callees: the calculator refuses eval tricks, the Python runner contains hostile code, the HTTP
agent types its failures, simulated agents are plausible, pools randomize."""
import http.server
import json
import os
import random
import re
import threading
import time
import warnings

import pytest

from baselines import LEVEL_WORDS, rank_for, read_pool
from env import EnvConfig, Episode, call_callee, system_prompt
from tasks import Subtask, Task, world_for_split
from tools import (EXEC_ERR, OK, TIMEOUT, PROJECT_ROOT, CalcError, HttpAgent, Pool, PoolError, PythonRunner,
                   SimAgent, calculate, load_pool, plausible_wrong, read_pool_spec)


@pytest.mark.parametrize("expr, value", [("17*23", "391"), ("max(3, 9) - 2", "7"), ("7/2", "3.5"),
                                         ("-(2+3)*4", "-20"), ("1320 < 1362", "yes"), ("2**10", "1024")])
def test_calculator(expr, value):
    assert calculate(expr) == value


@pytest.mark.parametrize("expr", ["__import__('os').system('true')", "open('x')", "().__class__",
                                  "10**10**10", "9**9**9", "1/0", "[1]*10", "'a'*3", "x", "lambda: 1",
                                  "max(key=1)", "(" * 5000 + "1" + ")" * 5000, "1e308*10"])
def test_calculator_refuses(expr):
    with pytest.raises(CalcError):
        calculate(expr)


RUNNER = PythonRunner("py", "tool", "runner", 0.0, 0.3, cpu_seconds=1, memory_mb=200, wall_seconds=3)


def test_python_runner_ok():
    assert RUNNER.run("12 * 7 + 3", random.Random(0), 5).text == "87"
    r = RUNNER.run("import os\nprint(len(os.listdir('.')))", random.Random(0), 5)
    assert r.status == OK and r.text == "0"       # an empty private temp dir


@pytest.mark.parametrize("code", [
    "while True: pass",
    "x = 0\nwhile True: x += 1",
])
def test_python_runner_infinite_loop(code):
    r = RUNNER.run(code, random.Random(0), 5)
    assert r.status == TIMEOUT and r.latency < 5


def test_python_runner_memory_bomb():
    r = RUNNER.run("x = bytearray(10**10)", random.Random(0), 5)
    assert r.status == EXEC_ERR and "MemoryError" in r.text
    r = RUNNER.run("x = []\nwhile True: x.append(' ' * 10**6)", random.Random(0), 5)
    assert r.status in (EXEC_ERR, TIMEOUT)


@pytest.mark.parametrize("code", [
    f"print(open({os.path.join(PROJECT_ROOT, 'tools.py')!r}).read())",
    f"print(open({os.path.join(PROJECT_ROOT, 'README.md')!r}).read())",
    f"import os; print(os.listdir({PROJECT_ROOT!r}))",
    f"import os; os.chdir({PROJECT_ROOT!r}); print(open('env.py').read())",
    "import subprocess; subprocess.run(['cat', '/etc/hostname'])",
    "import os; os.system('true')",
    "import socket; socket.socket().connect(('127.0.0.1', 1))",
])
def test_python_runner_blocks_files_and_processes(code):
    r = RUNNER.run(code, random.Random(0), 5)
    assert r.status == EXEC_ERR and "PermissionError" in r.text, r


def test_python_runner_writes_stay_inside():
    # the sandbox's /tmp is its own: the write succeeds there and never reaches the host's /tmp
    RUNNER.run("open('/tmp/pyrun-escape-test', 'w').write('x')", random.Random(0), 5)
    assert not os.path.exists("/tmp/pyrun-escape-test")


def test_python_runner_output_is_bounded():
    r = RUNNER.run("while True: print('x' * 1000)", random.Random(0), 5)
    assert r.status in (EXEC_ERR, TIMEOUT) and len(r.text) <= RUNNER.output_chars


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        task = body["messages"][-1]["content"]
        if task == "slow":
            threading.Event().wait(2)
        if task == "error":
            self.send_response(500)
            self.end_headers()
            return
        reply = b"not json" if task == "junk" else json.dumps(
            {"choices": [{"message": {"content": f" echo: {task} "}}]}).encode()
        try:
            self.send_response(200)
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)
        except (BrokenPipeError, ConnectionResetError):
            pass  # "slow": the client gave up (TIMEOUT); no traceback printed after the test

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/v1"
    srv.shutdown()
    srv.server_close()


def test_http_agent(server):
    agent = HttpAgent("remote", "agent", "remote model", 0.01, 1.0, url=server, model="m")
    rng = random.Random(0)
    assert (agent.run("hi", rng, 5).status, agent.run("hi", rng, 5).text) == (OK, "echo: hi")
    assert agent.run("error", rng, 5).status == EXEC_ERR
    assert agent.run("junk", rng, 5).status == EXEC_ERR
    assert agent.run("slow", rng, 0.3).status == TIMEOUT
    dead = HttpAgent("dead", "agent", "x", 0.0, 1.0, url="http://127.0.0.1:9/v1")
    # a refused connection raises inside the callee; the executor's one guard types it
    assert call_callee(dead, ["hi"], [rng], 1)[0].status == EXEC_ERR


def test_sim_agent_accuracy_and_plausible_errors():
    world = world_for_split("train")
    city = world.entities["city"][0]
    agent = SimAgent("s", "agent", "x", 0.01, 1.0, world=world, skills={"lookup": 0.7, "math": 1.0},
                     exec_err_rate=0.0, timeout_rate=0.0)
    answers = [agent.run(f"population of {city}", random.Random(i), 100).text for i in range(400)]
    gold = str(world.fact("population", city))
    assert 0.6 < answers.count(gold) / 400 < 0.8
    wrong = [int(a) for a in answers if a != gold]
    assert all(abs(w - int(gold)) <= 0.3 * int(gold) + 1 for w in wrong)
    assert agent.run("2 + 2", random.Random(0), 100).text == "4"
    rng = random.Random(0)
    assert plausible_wrong(world.entities["city"][1], world, rng) in world.entities["city"]
    assert plausible_wrong("yes", world, rng) == "no"


def test_pools_randomize_and_read_back():
    world = world_for_split("train")
    a, b = (load_pool("seen", world, random.Random(s)) for s in (0, 1))
    assert [c.name for c in a.callees] != [c.name for c in b.callees]
    for name in ("seen", "unseen-a", "unseen-b"):
        pool = load_pool(name, world, random.Random(0))
        infos = read_pool(system_prompt(pool, EnvConfig()))
        assert [i.name for i in infos] == [c.name for c in pool.callees]
        # the callee the description reading ranks first is truly the most accurate one
        for skill in ("lookup", "math", "text"):
            best = pool.get(rank_for(skill, infos)[0].name)
            true_acc = lambda c: 1.0 if c.kind == "tool" else c.skills.get(skill, 0)
            assert true_acc(best) >= max(true_acc(c) for c in pool.callees
                                         if c.kind == "agent" or pool.get(c.name) is best) - 0.05


def _family_words(spec) -> set[str]:
    """Every word a family or pool can put into a prompt (its comment cannot)."""
    if isinstance(spec, str):
        return set(re.findall(r"[a-z]+", spec.lower()))
    if isinstance(spec, dict):
        return set().union(*(_family_words(v) for k, v in spec.items() if k != "comment"))
    if isinstance(spec, list):
        return set().union(*(_family_words(v) for v in spec))
    return set()


def test_the_wide_family_reads_as_drawn_and_keeps_the_unseen_wording_unseen():
    family = read_pool_spec("train-wide")
    bands = [(threshold, words if isinstance(words, list) else [words]) for threshold, words in family["levels"]]
    tool_skill = {"KnowledgeBase": "lookup", "Calculator": "math", "TextTool": "text"}
    present = {name: 0 for name in tool_skill}
    profiles = family["agents"]["profiles"]
    off_profile = levels_seen = 0
    draws = 600
    for seed in range(draws):
        pool = load_pool(family, None, random.Random(seed))
        infos = {i.name: i for i in read_pool(system_prompt(pool, EnvConfig()))}
        for callee in pool.callees:
            read = infos[callee.name].skills
            if callee.kind == "tool":
                present[type(callee).__name__] += 1
                assert read == {tool_skill[type(callee).__name__]: 1.0}, callee.describe()
                continue
            for skill, accuracy in callee.skills.items():
                # the level word printed is one of the band's synonyms, and the oracle reads the band
                words = next(words for threshold, words in bands if accuracy >= threshold)
                assert read[skill] in {LEVEL_WORDS[w] for w in words}, (callee.describe(), skill, accuracy)
            levels_seen += 1
            off_profile += all(any(abs(callee.skills[k] - p[k]) > 0.031 for k in p) for p in profiles)
    # every tool kind is left out of some draws and kept in most; some agents follow no profile
    for name, count in present.items():
        assert draws * 0.6 < count < draws, name
    assert off_profile > levels_seen * 0.2
    # no word the unseen pools introduce (beyond the base family's) enters the wide family
    unseen = _family_words(read_pool_spec("unseen-a")) | _family_words(read_pool_spec("unseen-b"))
    assert not (_family_words(family) & (unseen - _family_words(read_pool_spec("seen"))))


# ---------------------------------------------------------------- a server that serves one request at a time

SERVICE = 0.4       # seconds the one-at-a-time server takes per request
CONTEXT_ERROR = ("This model's maximum context length is 2048 tokens. However, you requested 4524 tokens "
                 "(4268 in the messages, 256 in the completion). Please reduce the length of the messages or completion.")


class _OneAtATime(http.server.BaseHTTPRequestHandler):
    """Like a llama.cpp server with one slot: requests wait in the listen queue."""
    closed_after: list = []          # seconds from a "hold" request's arrival to the client closing

    def _send(self, status, body: bytes, content_type="application/json"):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path == "/v1/models":
            return self._send(200, json.dumps({"object": "list", "data": [{"id": "smollm2-135m"}]}).encode())
        self._send(404, b"not found", "text/plain")

    def do_POST(self):
        task = json.loads(self.rfile.read(int(self.headers["Content-Length"])))["messages"][-1]["content"]
        if task == "hold":           # never answers; notes when the client closes the connection
            arrived = time.monotonic()
            self.connection.settimeout(5)
            try:
                if self.connection.recv(1) == b"":
                    self.closed_after.append(time.monotonic() - arrived)
            except OSError:
                pass
            return
        if task == "too long":
            return self._send(400, json.dumps({"error": {"message": CONTEXT_ERROR, "type": "invalid_request_error"}}).encode())
        if task == "noise":
            return self._send(502, b"<html>\x00\x1b[31m" + b"upstream \xff died " * 200 + b"</html>", "text/html")
        time.sleep(SERVICE)
        self._send(200, json.dumps({"choices": [{"message": {"content": task.upper()}}]}).encode())

    def log_message(self, *args):
        pass


@pytest.fixture
def one_at_a_time():
    srv = http.server.HTTPServer(("127.0.0.1", 0), _OneAtATime)    # not threading: one request at a time
    srv.timeout = 0.1
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}/v1"
    srv.shutdown()
    srv.server_close()
    thread.join(5)


@pytest.mark.parametrize("concurrency", [0, 1])
def test_parallel_calls_queue_on_a_one_at_a_time_server(one_at_a_time, concurrency):
    # 0: the pool line does not know, the server's listen queue holds the second call;
    # 1: the executor holds it. Either way: one call takes SERVICE, the other 2 * SERVICE from
    # the same start, and the round's critical path is the second one's end. Each call's clock
    # starts in its own thread, so the second may start a few ms after the first is served.
    agent = HttpAgent("llama", "agent", "one slot", 0.01, SERVICE, url=one_at_a_time, model="m",
                      concurrency=concurrency)
    ep = Episode(Task("q", "A", [Subtask(1, "text", "a", "A")], "t", 1, 1, 1), Pool("p", [agent]),
                 EnvConfig(call_timeout=5))
    ep.step('<call id="1" to="llama">a</call><call id="2" to="llama">b</call>')
    first, second = sorted(ep.rounds[0].results, key=lambda r: r.latency)
    assert {first.text, second.text} == {"A", "B"} and first.start == second.start == 0
    assert SERVICE <= first.latency < SERVICE + 0.3
    assert 2 * SERVICE - 0.05 <= second.latency < 2 * SERVICE + 0.4
    assert ep.rounds[0].elapsed == second.end == second.latency


def test_a_timed_out_http_call_closes_its_connection(one_at_a_time):
    _OneAtATime.closed_after.clear()
    agent = HttpAgent("llama", "agent", "one slot", 0.01, 1.0, url=one_at_a_time)
    assert agent.run("hold", random.Random(0), 0.5).status == TIMEOUT
    deadline = time.monotonic() + 3
    while not _OneAtATime.closed_after and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(_OneAtATime.closed_after) == 1 and _OneAtATime.closed_after[0] < 0.5 + 0.3
    # the server is free again: the next call is served at once
    assert agent.run("x", random.Random(0), 5).text == "X"


def test_http_error_bodies_are_kept_short_and_printable(one_at_a_time):
    agent = HttpAgent("llama", "agent", "one slot", 0.01, 1.0, url=one_at_a_time)
    r = agent.run("too long", random.Random(0), 5)
    assert r.status == EXEC_ERR and r.text == "HTTP 400 Bad Request: " + CONTEXT_ERROR
    r = agent.run("noise", random.Random(0), 5)
    assert r.status == EXEC_ERR and r.text.startswith("HTTP 502 Bad Gateway: <html>??[31mupstream \ufffd died")
    assert len(r.text) <= 320 and r.text.isprintable() and r.text.endswith("...")


def test_pool_load_warns_about_a_model_the_server_does_not_list(one_at_a_time):
    def load(model):
        spec = {"name": "p", "callees": [{"type": "http", "name": "llama", "kind": "agent", "description": "x",
                                          "cost": 0.0, "latency": 1.0, "url": one_at_a_time, "model": model}]}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            load_pool(spec, None)
        return [str(w.message) for w in caught]
    assert load("smollm2-135m") == []
    (message,) = load("smollm2-13m")
    assert "'smollm2-135m'" not in message and "smollm2-135m" in message and "'smollm2-13m'" in message
    assert "\n" not in message
    # a server that cannot list its models (here: nothing listens) gets no warning
    spec = {"name": "p", "callees": [{"type": "http", "name": "dead", "kind": "agent", "description": "x",
                                      "cost": 0.0, "latency": 1.0, "url": "http://127.0.0.1:9/v1", "model": "m"}]}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_pool(spec, None)


def test_concurrency_on_pool_lines_and_in_the_family():
    world = world_for_split("train")
    spec = {"name": "p", "callees": [
        {"type": "calc", "name": "c", "kind": "tool", "description": "calculator", "cost": 0.0, "latency": 0.1},
        {"type": "sim_agent", "name": "s", "kind": "agent", "description": "x", "cost": 0.0, "latency": 1.0,
         "concurrency": 2}]}
    pool = load_pool(spec, world)
    lines = system_prompt(pool, EnvConfig()).splitlines()[-2:]
    assert lines == ['- "c" | tool | calculator | 0.0000 | 0.10s',
                     '- "s" | agent | x | 0.0000 | 1.00s | concurrency 2']
    assert [(i.name, i.concurrency) for i in read_pool("\n".join(lines))] == [("c", 0), ("s", 2)]
    for bad in (-1, 1.5, "2", True, None):
        spec["callees"][1]["concurrency"] = bad
        with pytest.raises(PoolError, match="callee 's' \\(sim_agent\\): concurrency must be a whole number"):
            load_pool(spec, world)
    # the family draws concurrency after everything else: without the choices, the same draw
    family = json.load(open(os.path.join(PROJECT_ROOT, "pools", "train.json")))
    plain = json.loads(json.dumps(family))
    plain["agents"].pop("concurrency")
    for tool in plain["tools"]:
        tool.pop("concurrency", None)
    limited = 0
    for seed in range(40):
        a = load_pool(family, world, random.Random(seed))
        b = load_pool(plain, world, random.Random(seed))
        assert [c.describe().split(" | concurrency")[0] for c in a.callees] == [c.describe() for c in b.callees]
        assert all(c.concurrency == 0 for c in b.callees)
        assert all(c.concurrency in family["agents"]["concurrency"] for c in a.callees if c.kind == "agent")
        limited += sum(c.concurrency == 1 for c in a.callees if c.kind == "agent")
    assert limited > 10
