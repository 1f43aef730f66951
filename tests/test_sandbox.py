"""Escape attempts against the Python runner's OS sandbox (bubblewrap).

Each attack is sent as the task of a call, and each test checks that its EFFECT did not happen:
a canary's secret absent from the reply, a marker file absent, a listener that got nothing, a
victim process alive, no process of the call left on the host. Most attacks first switch off
the audit hook from inside (`UNHOOK`), which is possible from the same process, so that what is tested is
the operating system's isolation, not the hook.
"""
import ast
import os
import random
import secrets
import socket
import subprocess
import threading
import time

import pytest

import tools
from env import EnvConfig, Episode
from tasks import Subtask, Task
from tools import EXEC_ERR, OK, PROJECT_ROOT, TIMEOUT, Pool, PythonRunner

if tools.bwrap_path() is None and not os.environ.get("CI"):
    pytest.skip("bubblewrap is not installed (apt-get install bubblewrap)", allow_module_level=True)

RUNNER = PythonRunner("py", "tool", "runner", 0.0, 0.3, cpu_seconds=1, memory_mb=200, wall_seconds=3)

# empties the audit hook's deny-lists and protected roots, which live in the child's __main__
UNHOOK = ("import sys\nm = sys.modules['__main__']\n"
          "m.DENY.clear(); m.WRITES.clear(); m.READS.clear(); m.roots.clear(); m.tmp = '/'\n")


def run(code, runner=RUNNER, timeout=5):
    return runner.run(code, random.Random(0), timeout)


def processes_with(marker: str) -> list[int]:
    """Host pids whose command line holds `marker`."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if marker.encode() in f.read():
                    found.append(int(pid))
        except OSError:
            pass
    return found


def gone(marker: str, within: float = 2.0) -> bool:
    deadline = time.monotonic() + within
    while processes_with(marker):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@pytest.fixture
def canaries(tmp_path, monkeypatch):
    """A secret in a file in the project, in a file outside the sandbox and in our environment."""
    secret = "canary-" + secrets.token_hex(8)
    project_file = os.path.join(PROJECT_ROOT, f".canary-{secrets.token_hex(4)}")
    outside_file = tmp_path / "canary.txt"
    for path in (project_file, outside_file):
        with open(path, "w") as f:
            f.write(secret)
    monkeypatch.setenv("PARAMANAGER_TEST_SECRET", secret)
    try:
        yield secret, project_file, str(outside_file)
    finally:
        os.remove(project_file)


def test_stdlib_imports_work():
    r = run("import fractions, decimal, statistics, dataclasses, enum, typing, math, json, itertools\n"
            "@dataclasses.dataclass\nclass P:\n    x: fractions.Fraction\n"
            "class C(enum.Enum):\n    A = 1\n"
            "print(P(fractions.Fraction(1, 3) + 1).x, decimal.Decimal('0.1') * 3, statistics.mean([1, 2, 4]),"
            " C.A.name, math.comb(5, 2), json.dumps(list(itertools.islice(itertools.count(), 3))))")
    assert (r.status, r.text) == (OK, "4/3 0.3 2.3333333333333335 A 10 [0, 1, 2]")


def test_hook_tampering_gains_nothing(canaries, tmp_path):
    secret, project_file, outside_file = canaries
    marker = tmp_path / "written"
    r = run(UNHOOK + f"import os\nprint('system', os.system('touch {marker}'))\n"
            f"for p in [{project_file!r}, {outside_file!r}]:\n"
            "    try: print(open(p).read())\n    except OSError as e: print(type(e).__name__)\n"
            f"print(os.path.exists({PROJECT_ROOT!r}), sorted(os.listdir('/')))")
    assert r.status == OK, r
    assert "system 32512" in r.text       # the hook let os.system through: no shell exists inside
    assert secret not in r.text and not marker.exists()
    assert "False ['dev', 'lib', 'lib64', 'proc', 'root', 'tmp', 'usr']" in r.text   # no project, no /work


def test_private_spawn_primitives(tmp_path):
    marker, tag = tmp_path / "spawned", "spawn-" + secrets.token_hex(6)
    child = f"open({str(marker)!r}, 'w').write('x')"
    # _posixsubprocess raises no audit event: this runs with the hook intact
    r = run("import _posixsubprocess, os, sys\n"
            "r, w = os.pipe()\n"
            "for exe in [sys.executable, '/bin/sh', '/usr/bin/touch']:\n"
            "    try:\n"
            f"        pid = _posixsubprocess.fork_exec([exe, '-c', {child!r}, {tag!r}], [exe.encode()], True,"
            " (w,), None, None, -1, -1, -1, -1, -1, -1, r, w, True, False, -1, None, None, None, -1,"
            " None, False)\n"
            "        print(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))\n"
            "    except OSError as e: print(type(e).__name__)\n")
    # python ran (and failed to reach the marker's folder: exit 1); no shell, no touch inside (255)
    assert (r.status, r.text.split()[-3:]) == (OK, ["1", "255", "255"]), r
    r2 = run(UNHOOK + "import os, sys\n"
             f"os.posix_spawn(sys.executable, [sys.executable, '-c', {child!r}, {tag!r}], {{}})\n"
             f"print(os.system('touch {marker}'))\nos.wait()")
    assert r2.status == OK, r2
    assert not marker.exists() and gone(tag)


def test_dir_fd_symlinks_and_proc(canaries):
    secret, project_file, outside_file = canaries
    rel_project = os.path.relpath(project_file, "/")
    r = run(UNHOOK + "import os\nleaks = []\n"
            "def attempt(name, f):\n"
            "    try: leaks.append((name, f()))\n    except Exception as e: leaks.append((name, type(e).__name__))\n"
            "root = os.open('/', os.O_RDONLY | os.O_DIRECTORY)\n"
            f"attempt('dir_fd', lambda: os.read(os.open({rel_project!r}, os.O_RDONLY, dir_fd=root), 99))\n"
            f"os.symlink({project_file!r}, '/tmp/link'); os.symlink({outside_file!r}, '/tmp/link2')\n"
            "attempt('symlink', lambda: open('/tmp/link').read())\n"
            "attempt('symlink2', lambda: open('/tmp/link2').read())\n"
            f"for p in ['/proc/1/environ', '/proc/{os.getpid()}/environ', '/proc/{os.getppid()}/environ',"
            f" '/proc/self/environ', '/proc/1/root{project_file}', '/proc/self/root{outside_file}',"
            f" '/proc/{os.getpid()}/root{project_file}']:\n"
            "    attempt(p, lambda: open(p, 'rb').read())\n"
            "attempt('pids', lambda: sorted(int(p) for p in os.listdir('/proc') if p.isdigit()))\n"
            "print(leaks)")
    assert r.status == OK, r
    assert secret not in r.text
    pids = ast.literal_eval(r.text)[-1][1]
    assert max(pids) < 10 and os.getpid() not in pids      # its own PID namespace: a handful of pids


def test_signals_to_outside_processes():
    victim = subprocess.Popen(["sleep", "30"])
    try:
        r = run(UNHOOK + "import os, signal\n"
                "def attempt(f):\n    try: f(); print('sent')\n    except OSError as e: print(type(e).__name__)\n"
                f"attempt(lambda: os.kill({victim.pid}, signal.SIGKILL))\n"
                f"attempt(lambda: os.killpg({victim.pid}, signal.SIGKILL))\n"
                f"attempt(lambda: signal.pidfd_send_signal(os.pidfd_open({victim.pid}), signal.SIGKILL))\n"
                f"attempt(lambda: os.kill({os.getpid()}, signal.SIGKILL))\n")
        assert r.status == OK, r
        time.sleep(0.1)
        assert victim.poll() is None          # the victim is alive
    finally:
        victim.kill()
        victim.wait()


def test_no_network_even_to_localhost():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.settimeout(0.2)
    port, received, stop = listener.getsockname()[1], [], threading.Event()

    def accept():
        while not stop.is_set():
            try:
                received.append(listener.accept())
            except (socket.timeout, OSError):
                pass
    thread = threading.Thread(target=accept)
    thread.start()
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    udp.settimeout(0.1)
    try:
        r = run(UNHOOK + "import socket\n"
                "def attempt(f):\n    try: f(); print('sent')\n    except OSError as e: print(type(e).__name__)\n"
                f"attempt(lambda: socket.create_connection(('127.0.0.1', {port}), timeout=1))\n"
                f"attempt(lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'x', ('127.0.0.1', {udp.getsockname()[1]})))\n")
        assert r.status == OK, r
        with pytest.raises(socket.timeout):
            udp.recvfrom(16)
    finally:
        time.sleep(0.2)
        stop.set()
        thread.join()
        listener.close()
        udp.close()
    assert received == []                     # the listener heard nothing


def test_orphans_do_not_outlive_the_call(tmp_path):
    marker, tag = tmp_path / "late", "orphan-" + secrets.token_hex(6)
    late = f"import os, time\nos.setsid()\ntime.sleep(0.5)\nopen({str(marker)!r}, 'w').write('x')\ntime.sleep(30)"
    code = (UNHOOK + "import os, sys\n"
            "if os.fork() == 0:\n"
            "    if os.fork() == 0:\n"
            f"        os.execv(sys.executable, [sys.executable, '-c', {late!r}, {tag!r}])\n"
            "    os._exit(0)\n"
            "os.wait()\nprint('parent done')")
    r = run(code)
    assert (r.status, r.text) == (OK, "parent done")
    assert gone(tag)
    time.sleep(0.7)
    assert not marker.exists() and processes_with(tag) == []


def test_fork_bomb_is_capped_and_cleaned_up(tmp_path):
    tag = "bomb-" + secrets.token_hex(6)
    bomb = "import os\nwhile True:\n    try: os.fork()\n    except OSError: pass"
    runner = PythonRunner("py", "tool", "runner", 0.0, 0.3, cpu_seconds=1, memory_mb=200, wall_seconds=2,
                          max_processes=8)
    seen, stop = [0], threading.Event()

    def watch():
        while not stop.is_set():
            seen[0] = max(seen[0], len(processes_with(tag)))
            time.sleep(0.02)
    watcher = threading.Thread(target=watch)
    watcher.start()
    start = time.monotonic()
    try:
        r = run(UNHOOK + f"import os, sys\nos.execv(sys.executable, [sys.executable, '-c', {bomb!r}, {tag!r}])",
                runner)
    finally:
        stop.set()
        watcher.join()
    assert r.status in (TIMEOUT, EXEC_ERR) and time.monotonic() - start < 3.5
    assert 1 <= seen[0] <= 8                  # RLIMIT_NPROC held, as a non-root uid
    assert gone(tag)
    assert subprocess.run(["true"]).returncode == 0   # the host can still start processes


@pytest.mark.parametrize("code, statuses", [
    ("x = bytearray(10**10)", {EXEC_ERR}),
    ("x = []\nwhile True: x.append(' ' * 10**6)", {EXEC_ERR}),
    ("i = 0\nwhile True:\n    open(f'/tmp/f{i}', 'w').write('x' * 10**6); i += 1", {EXEC_ERR}),
    ("while True: pass", {TIMEOUT}),
    ("while True: print('x' * 1000)", {EXEC_ERR, TIMEOUT}),
])
def test_memory_cpu_and_output_floods(code, statuses):
    start = time.monotonic()
    r = run(UNHOOK + code)
    assert r.status in statuses and time.monotonic() - start < 3.5, r
    assert len(r.text) <= RUNNER.output_chars


def test_attacks_through_episode_step(canaries):
    secret, project_file, _ = canaries
    pool = Pool("p", [RUNNER])
    task = Task("q?", "1", [Subtask(1, "math", "1", "1")], "test", 1, 1, 1)
    episode = Episode(task, pool, EnvConfig(call_timeout=3))
    start = time.monotonic()
    episode.step(f'<call id="1" to="py">{UNHOOK}print(open({project_file!r}).read())</call>'
                 f'<call id="2" to="py">{UNHOOK}print(open("/proc/1/environ").read())</call>'
                 '<call id="3" to="py">while True: pass</call>')
    assert time.monotonic() - start < 4
    results = episode.rounds[0].results
    assert [r.status for r in results] == [EXEC_ERR, EXEC_ERR, TIMEOUT]
    assert all(secret not in r.text for r in results) and secret not in episode.messages[-1]["content"]


def test_without_bwrap_the_runner_refuses(monkeypatch, tmp_path):
    marker = tmp_path / "ran"
    monkeypatch.setattr(tools, "bwrap_path", lambda: None)
    r = run(f"open({str(marker)!r}, 'w').write('x')")
    assert r.status == EXEC_ERR and "apt-get install bubblewrap" in r.text
    assert not marker.exists()
    monkeypatch.setattr(tools, "_warned_no_bwrap", False)
    with pytest.warns(UserWarning, match="apt-get install bubblewrap"):
        tools.load_pool({"name": "p", "callees": [{"type": "python", "name": "py", "kind": "tool",
                                                   "description": "x", "cost": 0.0, "latency": 0.1}]}, None)
    weak = PythonRunner("py", "tool", "runner", 0.0, 0.3, allow_unsandboxed_python=True)
    assert run("print(6 * 7)", weak).text == "42"      # the explicit opt-in runs it, hook only


def test_sandbox_missing_in_ci_fails_loudly():
    if os.environ.get("CI"):
        assert tools.bwrap_path() is not None, "CI must install bubblewrap (.ci/run)"


def test_sandbox_works_from_a_venv_under_tmp(tmp_path_factory):
    """A venv under /tmp puts the interpreter's platstdlib there; the sandbox's private /tmp must
    not hide it. Through that venv: an OK call, and a read of a secret that lies in the host's
    /tmp beside the venv, which the sandbox must not show."""
    venv = tmp_path_factory.mktemp("venv")
    assert str(venv).startswith("/tmp/")
    subprocess.run([os.sys.executable, "-m", "venv", "--without-pip", "--system-site-packages", str(venv)],
                   check=True, timeout=120)
    secret = secrets.token_hex(16)
    (venv / "secret.txt").write_text(secret)
    spy_code = UNHOOK + f"print(open({str(venv / 'secret.txt')!r}).read())"
    probe = (
        "import json, random, sys\n"
        f"sys.path.insert(0, {PROJECT_ROOT!r})\n"
        "from tools import PythonRunner\n"
        "r = PythonRunner('py', 'tool', 'runner', 0.0, 0.3, cpu_seconds=1, memory_mb=200, wall_seconds=5)\n"
        "ok = r.run('import os; print(6 * 7, len(os.listdir(\\'.\\')))', random.Random(0), 10)\n"
        f"spy = r.run({spy_code!r}, random.Random(0), 10)\n"
        "print(json.dumps([ok.status, ok.text, spy.status, spy.text]))\n")
    out = subprocess.run([str(venv / "bin" / "python"), "-c", probe], capture_output=True, text=True,
                         timeout=120, cwd=str(venv))
    assert out.returncode == 0, out.stderr[-2000:]
    ok_status, ok_text, spy_status, spy_text = __import__("json").loads(out.stdout.splitlines()[-1])
    assert (ok_status, ok_text) == (OK, "42 0"), ok_text    # and an empty private /tmp
    assert secret not in spy_text and spy_status == EXEC_ERR, spy_text
