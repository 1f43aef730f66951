"""Callees: the calculator refuses eval tricks, the Python runner contains hostile code, the HTTP
agent types its failures, simulated agents are plausible, pools randomize."""
import http.server
import json
import os
import random
import threading

import pytest

from baselines import rank_for, read_pool
from env import EnvConfig, call_callee, system_prompt
from tasks import world_for_split
from tools import (EXEC_ERR, OK, TIMEOUT, PROJECT_ROOT, CalcError, HttpAgent, PythonRunner, SimAgent,
                   calculate, load_pool, plausible_wrong)


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
