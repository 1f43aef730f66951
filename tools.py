"""Callees (tools and agents) behind one interface, and pools of them loaded from JSON.

Design choices, and why:
- One interface for every callee (Agent-as-Tool): a name, a kind ("tool" | "agent"), a one-line
  description, a cost per call and a typical latency; `run(task, rng, timeout) -> Reply` with a
  typed status (OK / EXEC_ERR / TIMEOUT), the text, the latency and the cost. The orchestrator
  sees every callee through the same description line, so routing is learned from text.
- Two clocks. Callees with `virtual_clock = True` return their latency as a number and never
  sleep: simulated agents draw it from a lognormal; the in-process tools (kb, calc, text) really
  compute their answer but stand in for remote services, so they are charged their declared
  service latency. The executor (env.py) turns these numbers into a critical path, so an episode
  of simulated calls takes well under a millisecond of real time. Callees with
  `virtual_clock = False` (Python runner, HTTP agent, the local LLM agent) take real time and
  report the measured wall time.
- Concurrency. A callee may serve only `concurrency` calls at once (0: no limit), as a model
  server with one slot does; the executor (env.py) queues the rest and charges the wait as
  latency. It is printed on the callee's pool line only when there is a limit, so pools without
  one read as before, and the training family draws it last, so every other draw is unchanged.
- Batching. A callee with `batch = True` gets the calls that become ready at the same moment in
  one `run_batch(tasks, rngs, timeout)` call: the executor groups calls with the same start time
  that are submitted within a few event-loop ticks of each other (all calls ready at the start of
  a turn; all dependents released by one batch). Two chains that reach the same start time
  through callees that finish at different loop steps may land in separate batches. This is the place for
  the local LLM agent that comes with the engine (policy.py): it answers N subtasks as N parallel
  branches of one shared prefix. To add it, subclass `Callee`, set `batch = True` and
  `virtual_clock = False`, implement `run_batch`, and pass its constructor to `load_pool` in
  `extra_types` (e.g. {"local_llm": LocalLLMAgent}); nothing else changes.
- Every call comes back typed by its deadline. A callee may raise: the executor (env.py,
  `call_callee`) is the one place that turns any exception into EXEC_ERR, so callees carry no
  catch-all of their own. Real callees hold the deadline over the whole call (the HTTP agent's
  own small client re-arms the socket timeout with the time left before every read; the Python
  runner kills its sandbox), so their thread ends by itself. The in-process tools, charged
  virtual time, refuse inputs whose real cost explodes (huge powers or round digits).
- Randomness comes in as an argument (`rng`), never from a global generator, so an episode is
  reproducible from its seed whatever order the calls finish in.
- Simulated agents know the world: they solve the task string exactly (with the same solvers the
  tools use) and then, with probability 1 - accuracy for the task's skill, corrupt the answer
  plausibly (a nearby number, another city's name, a flipped yes/no).
- The Python runner is isolated by the operating system, not by the interpreter: an audit hook
  lives in the same process as the code it watches, which can empty its deny-lists, and private
  primitives (_posixsubprocess) raise no audit event at all. So each call runs `python -I -S`
  under bubblewrap: new PID, network, IPC and UTS namespaces (no network at all, not even
  127.0.0.1; no other process visible, so nothing outside can be signalled or read through
  /proc); a filesystem holding only the interpreter, its standard library (site-packages hidden)
  and the system's shared libraries, read-only, plus an empty private tmpfs as working directory;
  a cleared environment (bwrap itself gets none either, so its /proc/1/environ holds nothing);
  --die-with-parent and --new-session. When the call ends or its wall-clock deadline passes, bwrap
  is killed; its init dies with it and the kernel kills the whole PID namespace, setsid()
  orphans included. Inside, rlimits bound memory (RLIMIT_AS), CPU, file size and the number of
  processes; output goes to a size-limited file, never an unbounded pipe. The kernel ignores
  RLIMIT_NPROC for uid 0, also for root mapped into a user namespace, so as root no user
  namespace is made and the child drops to a fresh unprivileged uid of its own before any user
  code runs. The old audit hook stays inside as a second layer. Without bwrap the runner refuses
  (EXEC_ERR saying how to install it; a warning when a pool builds it) unless the callee sets
  `allow_unsandboxed_python`, which runs the same child with the hook and rlimits only.
"""
import ast
import json
import math
import os
import random
import re
import secrets
import shutil
import signal
import site
import socket
import ssl
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.parse
import warnings
from dataclasses import MISSING, dataclass, field, fields
from typing import ClassVar

from tasks import KINDS, World, safe_json, text_op_result

OK, EXEC_ERR, TIMEOUT = "OK", "EXEC_ERR", "TIMEOUT"
PROJECT_ROOT = os.path.dirname(os.path.abspath(__file__))


@dataclass
class Reply:
    status: str      # OK | EXEC_ERR | TIMEOUT
    text: str
    latency: float   # seconds: virtual for virtual-clock callees, measured otherwise
    cost: float


@dataclass
class Callee:
    name: str
    kind: str            # "tool" | "agent"
    description: str
    cost: float          # per call
    latency: float       # typical seconds per call, as advertised
    concurrency: int = 0  # calls (a batch counts as one) served at once; the rest queue. 0: no limit
    virtual_clock: ClassVar[bool] = True
    batch: ClassVar[bool] = False

    def run(self, task: str, rng: random.Random, timeout: float) -> Reply:
        raise NotImplementedError

    def check(self) -> str | None:
        """A one-line warning about this callee's setup, or None; load_pool calls it once."""
        return None

    def run_batch(self, tasks: list[str], rngs: list[random.Random], timeout: float) -> list[Reply]:
        return [self.run(t, r, timeout) for t, r in zip(tasks, rngs)]

    def describe(self) -> str:
        """One line, the same format for tools and agents. The name is quoted as it is in a
        call's to="..." attribute: a byte-level BPE gives a word other tokens after a space than
        after a quote, and a model learns to route by copying the name token for token."""
        line = f'- "{self.name}" | {self.kind} | {self.description} | {self.cost:.4f} | {self.latency:.2f}s'
        return line + (f" | concurrency {self.concurrency}" if self.concurrency else "")


# ---------------------------------------------------------------- exact solvers

class CalcError(ValueError):
    pass


_BINOPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b,
           ast.Mult: lambda a, b: a * b, ast.Div: lambda a, b: a / b,
           ast.FloorDiv: lambda a, b: a // b, ast.Mod: lambda a, b: a % b}
_COMPARE = {ast.Gt: lambda a, b: a > b, ast.Lt: lambda a, b: a < b, ast.GtE: lambda a, b: a >= b,
            ast.LtE: lambda a, b: a <= b, ast.Eq: lambda a, b: a == b, ast.NotEq: lambda a, b: a != b}
_FUNCS = {"max": max, "min": min, "abs": abs, "round": round}
_MAX_DIGITS = 300


def calculate(expr: str) -> str:
    """Arithmetic by walking a whitelisted AST (never eval): numbers, + - * / // % **, unary -,
    max/min/abs/round, one comparison (-> "yes"/"no"). Raises CalcError on anything else,
    including results too large to be an honest arithmetic answer, complex results, and
    operations whose cost explodes (huge exponents, huge round digits), so that a call on the
    virtual clock never computes for long."""
    expr = expr.strip().replace("×", "*").replace("^", "**")
    if len(expr) > 500:
        raise CalcError("expression too long")
    try:
        tree = ast.parse(expr, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as e:
        raise CalcError(f"not an arithmetic expression: {type(e).__name__}")
    try:
        value = _calc_node(tree.body)
    except (ArithmeticError, TypeError, ValueError, RecursionError) as e:
        if isinstance(e, CalcError):
            raise
        raise CalcError(f"{type(e).__name__}: {e}"[:200])
    if isinstance(value, bool):
        return "yes" if value else "no"
    return format_number(value)


def _check_size(x):
    if not isinstance(x, (int, float)):      # e.g. (-1) ** 0.5 is complex
        raise CalcError("the result is not a real number")
    if isinstance(x, float) and not math.isfinite(x):
        raise CalcError("result is not finite")
    if abs(x) >= 10 ** _MAX_DIGITS:
        raise CalcError("number too large")
    return x


def _calc_node(node):
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return _check_size(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        v = _calc_node(node.operand)
        return -v if isinstance(node.op, ast.USub) else v
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Pow):
        a, b = _calc_node(node.left), _calc_node(node.right)
        # bound the size before computing, so 10**10**10 is refused rather than computed
        if abs(b) > 1000 or (abs(a) > 1 and b * math.log10(abs(a)) > _MAX_DIGITS):
            raise CalcError("power too large")
        return _check_size(a ** b)
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        a, b = _calc_node(node.left), _calc_node(node.right)
        return _check_size(_BINOPS[type(node.op)](a, b))
    if isinstance(node, ast.Compare) and len(node.ops) == 1 and type(node.ops[0]) in _COMPARE:
        return _COMPARE[type(node.ops[0])](_calc_node(node.left), _calc_node(node.comparators[0]))
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in _FUNCS
            and not node.keywords and 0 < len(node.args) <= 50):
        args = [_calc_node(a) for a in node.args]
        if node.func.id in ("abs",) and len(args) != 1:
            raise CalcError("abs takes one argument")
        if node.func.id == "round" and len(args) > 2:
            raise CalcError("round takes one or two arguments")
        # round(1, -10**7) would build 10**(10**7): bound the digits like every other size
        if node.func.id == "round" and len(args) == 2 and (type(args[1]) is not int or abs(args[1]) > _MAX_DIGITS):
            raise CalcError(f"round digits must be an integer within ±{_MAX_DIGITS}")
        return _check_size(_FUNCS[node.func.id](*args))
    raise CalcError(f"unsupported syntax: {type(node).__name__}")


def format_number(x) -> str:
    """Integers print as integers (also integral floats); other floats with up to 6 decimals."""
    if isinstance(x, float) and x.is_integer():
        return str(int(x))
    if isinstance(x, float):
        return f"{x:.6f}".rstrip("0").rstrip(".")
    return str(x)


_TEXT_PATTERNS = [("first3", re.compile(r"first 3 letters of (.+)", re.I | re.S)),
                  ("reverse", re.compile(r"reverse (.+)", re.I | re.S)),
                  ("upper", re.compile(r"uppercase (.+)", re.I | re.S)),
                  ("letters", re.compile(r"letters in (.+)", re.I | re.S)),
                  ("join", re.compile(r"join (.+?) and (.+)", re.I | re.S))]


def text_operation(task: str) -> str | None:
    """The string operations of the task world, or None if the task is not one of them."""
    task = task.strip()
    if len(task) > 1000:
        return None
    for op, pattern in _TEXT_PATTERNS:
        m = pattern.fullmatch(task)
        if m:
            return text_op_result(op, [g.strip() for g in m.groups()])
    return None


def solve(task: str, world: World | None) -> tuple[str, str] | None:
    """(skill, exact answer) for a task string of the task world, or None."""
    if world is not None:
        fact = world.lookup(task)
        if fact is not None:
            return "lookup", fact
    text = text_operation(task)
    if text is not None:
        return "text", text
    try:
        return "math", calculate(task)
    except CalcError:
        return None


# ---------------------------------------------------------------- tools

@dataclass
class KnowledgeBase(Callee):
    world: World | None = None

    def run(self, task, rng, timeout):
        fact = self.world.lookup(task) if self.world else None
        if fact is None:
            return Reply(EXEC_ERR, f"no fact matches {task[:80]!r}", self.latency, self.cost)
        return Reply(OK, fact, self.latency, self.cost)


@dataclass
class Calculator(Callee):
    def run(self, task, rng, timeout):
        try:
            return Reply(OK, calculate(task), self.latency, self.cost)
        except CalcError as e:
            return Reply(EXEC_ERR, str(e), self.latency, self.cost)


@dataclass
class TextTool(Callee):
    def run(self, task, rng, timeout):
        result = text_operation(task)
        if result is None:
            return Reply(EXEC_ERR, "not a text operation (reverse X, uppercase X, letters in X, "
                                   "first 3 letters of X, join X and Y)", self.latency, self.cost)
        return Reply(OK, result, self.latency, self.cost)


# The child's first code: limits, then (as root) the drop to the call's own uid, then the audit
# hook, then the user's code (read from stdin). Limits are set before the drop: root may set any
# hard limit, and the unprivileged user can never raise it again.
_PYTHON_PRELUDE = r"""
import ast, json, os, resource, sys, traceback
tmp, roots, mem, cpu, fsize, nproc, uid = json.loads(sys.argv[1])
resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))
resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
if uid:
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
src = sys.stdin.read()
_realpath, _fsdecode = os.path.realpath, os.fsdecode
DENY = {"subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork",
        "os.forkpty", "os.kill", "os.killpg", "socket.connect", "socket.bind", "socket.__new__",
        "ctypes.dlopen", "ctypes.dlsym", "ctypes.cdata", "sys.addaudithook",
        "resource.setrlimit", "os.putenv", "os.chroot"}
WRITES = {"os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.chmod", "os.chown",
          "os.symlink", "os.link", "os.truncate", "os.utime", "shutil.rmtree", "shutil.move",
          "shutil.copyfile", "os.chflags", "os.setxattr", "os.removexattr"}
READS = {"os.listdir", "os.scandir", "os.chdir", "glob.glob", "os.walk", "pathlib.Path.glob"}
def _inside(p, base):
    return p == base or p.startswith(base.rstrip(os.sep) + os.sep)
def _check(path, write):
    if isinstance(path, int) or path is None:
        return
    p = _realpath(_fsdecode(path))
    if any(_inside(p, r) for r in roots):
        raise PermissionError("access to the project's files is not allowed")
    if write and not _inside(p, tmp):
        raise PermissionError("writing is only allowed in the working directory")
def _hook(event, args):
    if event in DENY:
        raise PermissionError(f"{event} is not allowed")
    if event == "open":
        path, mode, flags = args
        write = bool(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND))
        _check(path, write)
    elif event in WRITES or event in READS:
        for a in args:
            if isinstance(a, (str, bytes, os.PathLike)):
                _check(a, event in WRITES)
sys.addaudithook(_hook)
del resource
try:
    tree = ast.parse(src, "<task>")
    scope = {"__name__": "__main__"}
    if len(tree.body) == 1 and isinstance(tree.body[0], ast.Expr):  # REPL style: show the value
        value = eval(compile(ast.Expression(tree.body[0].value), "<task>", "eval"), scope)
        if value is not None:
            print(value)
    else:
        exec(compile(tree, "<task>", "exec"), scope)
except BaseException:
    traceback.print_exc(limit=2)
    sys.exit(1)
"""

BWRAP_MISSING = ("the Python runner needs bubblewrap (bwrap) for its sandbox and it is not "
                 "installed: apt-get install bubblewrap")
_warned_no_bwrap = False


def bwrap_path() -> str | None:
    return shutil.which("bwrap")


def _sandbox_command(bwrap: str, prelude_args: str, tmp_bytes: int) -> list[str]:
    """The bwrap command line that runs the prelude with only the interpreter, its standard
    library and the system's shared libraries visible, read-only.

    The private /tmp is mounted first and the read-only binds after it: bwrap applies its
    arguments in order, so an interpreter that lives under /tmp (a venv or pyenv there) is bound
    on top of the empty tmpfs instead of being hidden by it."""
    exe = os.path.realpath(sys.executable)
    # the base installation's paths: a venv's own folders hold only site-packages, which the
    # child (-I -S, the base interpreter) neither needs nor may see
    base = {"base": sys.base_prefix, "platbase": sys.base_exec_prefix,
            "installed_base": sys.base_prefix, "installed_platbase": sys.base_exec_prefix}
    paths = sysconfig.get_paths(vars=base)
    binds = [exe, paths["stdlib"], paths["platstdlib"]]
    libpython = os.path.join(sysconfig.get_config_var("LIBDIR") or "", sysconfig.get_config_var("INSTSONAME") or "")
    if os.path.isfile(libpython):
        binds.append(libpython)
    args = [bwrap, "--die-with-parent", "--new-session", "--clearenv", "--setenv", "LANG", "C.UTF-8"]
    if os.geteuid() == 0:
        # No user namespace: in one made by root the sandbox's uid would still be root to the
        # kernel, which ignores RLIMIT_NPROC for root. The prelude drops to its own uid instead,
        # with the only two capabilities it needs for that.
        args += ["--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
                 "--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    else:
        args += ["--unshare-all"]
    args += ["--proc", "/proc", "--dev", "/dev", "--perms", "1777", "--size", str(tmp_bytes), "--tmpfs", "/tmp"]
    for d in ("/usr/lib", "/usr/lib64", "/lib", "/lib64"):     # shared libraries (merged /usr or not)
        if os.path.islink(d):
            args += ["--symlink", os.readlink(d), d]
        elif os.path.isdir(d):
            binds.append(d)
    binds = [b for b in dict.fromkeys(binds) if os.path.exists(b)]
    for b in binds:
        args += ["--ro-bind", b, b]
    # third-party packages would be readable through the binds above: hide them under empty dirs
    for d in dict.fromkeys([paths["purelib"], paths["platlib"], *site.getsitepackages()]):
        if os.path.isdir(d) and any(_within(d, b) for b in binds):
            args += ["--tmpfs", d]
    # bwrap makes the folders above the binds (e.g. /root for a pyenv interpreter) private to
    # root; the dropped uid must be able to walk through them. /tmp keeps its sticky 1777.
    made = {a for b in binds for a in _ancestors(b) if not any(_within(a, c) for c in binds)} - {"/tmp"}
    for a in sorted(made):
        args += ["--chmod", "0755", a]
    return args + ["--chdir", "/tmp", exe, "-I", "-S", "-c", _PYTHON_PRELUDE, prelude_args]


def _within(path: str, base: str) -> bool:
    return path == base or path.startswith(base.rstrip("/") + "/")


def _ancestors(path: str) -> list[str]:
    parts = path.strip("/").split("/")[:-1]
    return ["/" + "/".join(parts[:i]) for i in range(1, len(parts) + 1)]


@dataclass
class PythonRunner(Callee):
    cpu_seconds: int = 2
    memory_mb: int = 256
    wall_seconds: float = 5.0
    output_chars: int = 2000
    max_processes: int = 16
    protected: list[str] = field(default_factory=lambda: [PROJECT_ROOT])
    allow_unsandboxed_python: bool = False   # weak mode without bwrap: audit hook and rlimits only
    virtual_clock: ClassVar[bool] = False

    def __post_init__(self):
        global _warned_no_bwrap
        if bwrap_path() is None and not _warned_no_bwrap:
            _warned_no_bwrap = True
            then = ("it runs code WITHOUT the sandbox (allow_unsandboxed_python)" if self.allow_unsandboxed_python
                    else "until then its calls fail with EXEC_ERR")
            warnings.warn(f"python callee {self.name!r}: {BWRAP_MISSING}; {then}")

    def run(self, task, rng, timeout):
        start = time.perf_counter()
        bwrap = bwrap_path()
        if bwrap is None and not self.allow_unsandboxed_python:
            return Reply(EXEC_ERR, BWRAP_MISSING, 0.0, self.cost)
        wall = max(0.1, min(timeout, self.wall_seconds))
        roots = [os.path.realpath(p) for p in self.protected]
        limits = [self.memory_mb << 20, self.cpu_seconds, 1 << 20, self.max_processes]
        with tempfile.TemporaryDirectory(prefix="pyrun-") as host_tmp, tempfile.TemporaryFile() as out:
            if bwrap:
                # a fresh uid per call: the process limit then counts this call's processes only
                uid = 100000 + secrets.randbelow(1 << 20) if os.geteuid() == 0 else 0
                cmd = _sandbox_command(bwrap, json.dumps(["/tmp", roots, *limits, uid]), 16 << 20)
            else:
                host_tmp = os.path.realpath(host_tmp)
                cmd = [sys.executable, "-I", "-S", "-c", _PYTHON_PRELUDE, json.dumps([host_tmp, roots, *limits, 0])]
            proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT,
                                    cwd=host_tmp, env={"LANG": "C.UTF-8"},
                                    start_new_session=True)
            try:
                proc.communicate(task.encode("utf-8", "replace"), timeout=wall)
                timed_out = False
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                # bwrap's init dies with it (--die-with-parent), and with the init its whole PID
                # namespace: every process the code started, setsid() or not
                _kill_group(proc)
            out.seek(0)
            text = out.read(self.output_chars * 4).decode("utf-8", "replace")[: self.output_chars].strip()
        latency = time.perf_counter() - start
        code = proc.returncode
        if bwrap and code > 128:     # bwrap reports a child killed by signal N as exit 128 + N
            code = 128 - code
        if timed_out or code == -signal.SIGXCPU:
            return Reply(TIMEOUT, "time limit exceeded", latency, self.cost)
        if code != 0:
            reason = text.splitlines()[-1] if text else f"exit status {code}"
            if code < 0:
                reason = f"killed by signal {signal.Signals(-code).name} (resource limit)"
            return Reply(EXEC_ERR, reason[:300], latency, self.cost)
        return Reply(OK, text, latency, self.cost)


def pool_needs_sandbox(pool) -> list[str]:
    """The pool's Python runners that cannot run: no bwrap here, and no unsandboxed opt-in."""
    if bwrap_path() is not None:
        return []
    return [c.name for c in pool.callees if isinstance(c, PythonRunner) and not c.allow_unsandboxed_python]


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


# ---------------------------------------------------------------- agents

@dataclass
class SimAgent(Callee):
    """A simulated LLM agent: exact solver + per-skill accuracy + plausible errors + failures."""
    world: World | None = None
    skills: dict[str, float] = field(default_factory=dict)   # skill -> accuracy in [0, 1]
    latency_sigma: float = 0.4       # lognormal spread; `latency` is the median
    exec_err_rate: float = 0.02
    timeout_rate: float = 0.02

    def run(self, task, rng, timeout):
        latency = self.latency * rng.lognormvariate(0.0, self.latency_sigma)
        r = rng.random()
        if r < self.timeout_rate or latency > timeout:
            return Reply(TIMEOUT, "", timeout, self.cost)
        if r < self.timeout_rate + self.exec_err_rate:
            return Reply(EXEC_ERR, "agent error: the model returned no usable answer", latency, self.cost)
        solved = solve(task, self.world)
        if solved is None:
            return Reply(EXEC_ERR, "agent could not understand the task", latency, self.cost)
        skill, answer = solved
        if rng.random() >= self.skills.get(skill, 0.0):
            answer = plausible_wrong(answer, self.world, rng)
        return Reply(OK, answer, latency, self.cost)


def plausible_wrong(answer: str, world: World | None, rng: random.Random) -> str:
    """A wrong answer of the same type: nearby number, same-type entity, flipped yes/no, typo."""
    if answer in ("yes", "no"):
        return "no" if answer == "yes" else "yes"
    try:
        value = int(answer)
    except ValueError:
        value = None
    if value is not None:
        delta = rng.randint(1, 30) if 900 <= value <= 2100 else max(1, round(abs(value) * rng.uniform(0.02, 0.3)))
        return str(value + rng.choice([-1, 1]) * delta)
    kind = world.entity_type(answer) if world else None
    if kind:
        return rng.choice([e for e in world.entities[kind] if e != answer])
    if len(answer) >= 2:
        i = rng.randrange(len(answer) - 1)
        swapped = answer[:i] + answer[i + 1] + answer[i] + answer[i + 2:]
        if swapped != answer:
            return swapped
    return answer + rng.choice("aeiou")


@dataclass
class HttpAgent(Callee):
    """Any OpenAI-compatible /v1/chat/completions endpoint, standard library only.

    The call's deadline bounds the whole request (connect, send, status, headers, body), not each
    socket read: a small HTTP/1.1 client sets the socket's timeout to the time left before every
    operation, so a server that drips one byte at a time cannot hold the call past its deadline,
    and the thread running the call ends by itself. At the deadline the connection is closed:
    that is all HTTP/1.1 offers to abandon a request, and whether the server then stops
    generating is up to the server (docs/real-agents.md); `max_tokens` bounds the work it may
    go on with. Replies are bounded (headers, body size) and a malformed one raises, which the
    executor turns into EXEC_ERR. A non-2xx reply's body is kept as a short printable excerpt
    in the EXEC_ERR text (its error message when it is OpenAI-style JSON): it is often the one
    thing a caller can act on ("maximum context length is 2048 tokens")."""
    url: str = "http://127.0.0.1:8000/v1"
    model: str = ""
    api_key_env: str = ""            # name of the environment variable holding the key, if any
    system_prompt: str = "Answer the task. Reply with the result only."
    max_tokens: int = 256
    virtual_clock: ClassVar[bool] = False

    def headers(self) -> dict:
        headers = {"Content-Type": "application/json"}
        if self.api_key_env and os.environ.get(self.api_key_env):
            headers["Authorization"] = "Bearer " + os.environ[self.api_key_env]
        return headers

    def run(self, task, rng, timeout):
        start = time.perf_counter()
        body = json.dumps({"model": self.model, "max_tokens": self.max_tokens, "temperature": 0,
                           "messages": [{"role": "system", "content": self.system_prompt},
                                        {"role": "user", "content": task}]}).encode()

        def reply(status, text):
            return Reply(status, text, time.perf_counter() - start, self.cost)
        try:
            status, reason, raw = http_request("POST", self.url.rstrip("/") + "/chat/completions", body,
                                               self.headers(), time.monotonic() + max(0.01, timeout))
        except TimeoutError:
            return reply(TIMEOUT, "")
        if status != 200:
            excerpt = error_excerpt(raw)
            return reply(EXEC_ERR, printable(f"HTTP {status} {reason}", 60) + (f": {excerpt}" if excerpt else ""))
        try:
            text = json.loads(raw.decode("utf-8", "replace"))["choices"][0]["message"]["content"]
            if not isinstance(text, str):
                raise TypeError
        except (ValueError, KeyError, IndexError, TypeError, RecursionError):  # deep nesting too
            return reply(EXEC_ERR, "bad JSON in the reply")
        return reply(OK, text.strip())

    def check(self, timeout: float = 2.0) -> str | None:
        """Servers answer with the model they have loaded whatever `model` says, so a typo in a
        pool file would go unnoticed: warn when GET /models lists models and not this one. A
        server that cannot list them (down, no such route, junk) gets no warning: its calls
        will say what is wrong."""
        if not self.model:
            return None
        try:
            status, _, raw = http_request("GET", self.url.rstrip("/") + "/models", None, self.headers(),
                                          time.monotonic() + timeout)
            listed = [m["id"] for m in json.loads(raw.decode("utf-8", "replace"))["data"]] if status == 200 else []
        except (OSError, ValueError, KeyError, TypeError, RecursionError):
            return None
        listed = [m for m in listed if isinstance(m, str)]
        if not listed or self.model in listed:
            return None
        return (f"http agent {self.name!r}: the server at {self.url} lists model(s) "
                f"{printable(', '.join(listed), 200)}, not {self.model!r}; it will answer with its own model")


ERROR_EXCERPT_CHARS = 240   # with the status line it stays under 320 characters of the state message


def printable(text: str, limit: int) -> str:
    """One line of at most `limit` characters: whitespace runs become a space, other
    unprintable characters (control characters, lone surrogates) '?', a cut ends in '...'."""
    text = "".join(ch if ch.isprintable() else "?" for ch in " ".join(text[:4 * limit].split()))
    return text if len(text) <= limit else text[:limit - 3] + "..."


def error_excerpt(raw: bytes, limit: int = ERROR_EXCERPT_CHARS) -> str:
    """What an error reply's body says, short and printable: the message of an OpenAI-style
    {"error": {"message": ...}} body (or of "error", "detail", "message" holding a string),
    otherwise the body's text."""
    text = raw[:1 << 16].decode("utf-8", "replace")
    try:
        found = json.loads(text)
        for _ in range(3):
            if isinstance(found, dict):
                found = next((found[k] for k in ("error", "message", "detail") if k in found), None)
        if isinstance(found, str) and found.strip():
            text = found
    except (ValueError, RecursionError):
        pass
    return printable(text, limit)


MAX_REPLY_BYTES = 1 << 20
_MAX_HEADERS, _MAX_LINE = 100, 8192


class HttpError(ValueError):
    pass


def http_request(method: str, url: str, body: bytes | None, headers: dict, deadline: float) -> tuple[int, str, bytes]:
    """Send one request and read the whole reply by `deadline` (time.monotonic()): (status,
    reason, body); the connection is closed on return and on every error, the deadline included.
    Raises TimeoutError past the deadline, HttpError for a malformed or oversized reply, OSError
    for network failures. Name resolution is the one step the deadline cannot interrupt (it is
    bounded by the system resolver's own timeout); numeric addresses skip it."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise HttpError(f"unsupported URL {url[:80]!r}")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    body = b"" if body is None else body
    head = [f"{method} {path} HTTP/1.1", f"Host: {parts.netloc}", f"Content-Length: {len(body)}",
            "Connection: close", *(f"{k}: {v}" for k, v in headers.items())]
    with socket.create_connection((parts.hostname, port), timeout=_left(deadline)) as raw_sock:
        sock = raw_sock
        if parts.scheme == "https":
            sock.settimeout(_left(deadline))
            sock = ssl.create_default_context().wrap_socket(raw_sock, server_hostname=parts.hostname)
        reader = _Reader(sock, deadline)
        sock.settimeout(_left(deadline))
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body)
        while True:
            status_line = reader.line()
            m = re.fullmatch(rb"HTTP/1\.[01] (\d{3})(?: (.*))?", status_line.rstrip(b"\r\n"))
            if not m:
                raise HttpError(f"garbage status line {status_line[:40]!r}")
            fields = reader.headers()
            if not 100 <= int(m.group(1)) < 200:       # skip "100 Continue" and the like
                break
        status, reason = int(m.group(1)), (m.group(2) or b"").decode("latin-1")
        if "chunked" in fields.get("transfer-encoding", "").lower():
            return status, reason, reader.chunked()
        if "content-length" in fields:
            length = fields["content-length"]
            if not length.isdigit():
                raise HttpError(f"bad Content-Length {length[:20]!r}")
            if int(length) > MAX_REPLY_BYTES:
                raise HttpError("reply too large")
            return status, reason, reader.exactly(int(length))
        return status, reason, reader.until_closed()


def _left(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("deadline passed")
    return left


class _Reader:
    """Buffered reads from a socket, each one bounded by the time left before the deadline."""

    def __init__(self, sock, deadline):
        self.sock, self.deadline, self.buf = sock, deadline, bytearray()

    def _fill(self) -> bool:
        self.sock.settimeout(_left(self.deadline))
        data = self.sock.recv(65536)
        self.buf += data
        return bool(data)

    def line(self) -> bytes:
        while (end := self.buf.find(b"\n")) < 0:
            if len(self.buf) > _MAX_LINE:
                raise HttpError("reply line too long")
            if not self._fill():
                raise HttpError("connection closed in the middle of the reply head")
        if end > _MAX_LINE:
            raise HttpError("reply line too long")
        line, self.buf = bytes(self.buf[:end + 1]), self.buf[end + 1:]
        return line

    def headers(self) -> dict[str, str]:
        fields = {}
        for _ in range(_MAX_HEADERS + 1):
            line = self.line().rstrip(b"\r\n")
            if not line:
                return fields
            name, sep, value = line.decode("latin-1").partition(":")
            if not sep:
                raise HttpError(f"malformed header {line[:40]!r}")
            fields[name.strip().lower()] = value.strip()
        raise HttpError(f"more than {_MAX_HEADERS} headers")

    def exactly(self, n: int) -> bytes:
        while len(self.buf) < n:
            if not self._fill():
                raise HttpError("connection closed before the reply ended")
        data, self.buf = bytes(self.buf[:n]), self.buf[n:]
        return data

    def until_closed(self) -> bytes:
        while self._fill():
            if len(self.buf) > MAX_REPLY_BYTES:
                raise HttpError("reply too large")
        return bytes(self.buf)

    def chunked(self) -> bytes:
        body = bytearray()
        while True:
            size = self.line().split(b";")[0].strip()
            if not re.fullmatch(rb"[0-9a-fA-F]{1,8}", size):
                raise HttpError(f"bad chunk size {size[:20]!r}")
            if int(size, 16) == 0:
                self.headers()                          # trailers, up to the final empty line
                return bytes(body)
            if len(body) + int(size, 16) > MAX_REPLY_BYTES:
                raise HttpError("reply too large")
            body += self.exactly(int(size, 16))
            if self.line().strip():
                raise HttpError("chunk not followed by CRLF")


# ---------------------------------------------------------------- pools



@dataclass
@dataclass
class LocalLLMAgent(Callee):
    """A checkpoint run by our engine (policy.py), answering a round's subtasks together.

    The calls that reach it at the same moment become parallel branches of ONE prefix: the
    system prompt is prefilled once, each task is appended to its own branch, and all branches
    decode in the same steps. The model loads on first use (torch is imported only then).
    Latency is the measured wall time of the batch.
    """
    checkpoint: str = ""
    system_prompt: str = "You are a helpful assistant. Answer with the result only, as briefly as possible."
    max_new_tokens: int = 64
    device: str = "cpu"
    policy: object = field(default=None, init=False, repr=False)  # loaded on the first batch
    virtual_clock: ClassVar[bool] = False
    batch: ClassVar[bool] = True

    def run(self, task, rng, timeout):
        return self.run_batch([task], [rng], timeout)[0]

    def run_batch(self, tasks, rngs, timeout):
        from policy import Policy  # deferred: pools without a local model never import torch
        if self.policy is None:
            self.policy = Policy.load(self.checkpoint, device=self.device)
        start = time.perf_counter()
        try:
            replies = self.policy.answer_batch(self.system_prompt, tasks, self.max_new_tokens)
        except Exception as e:  # a failing model is a failed call, not a crashed episode
            return [Reply(EXEC_ERR, f"{type(e).__name__}: {e}"[:200], time.perf_counter() - start, self.cost)
                    for _ in tasks]
        latency = time.perf_counter() - start
        status = TIMEOUT if latency > timeout else OK
        return [Reply(status, text.strip() if status == OK else "", latency, self.cost) for text in replies]


CALLEE_TYPES = {"kb": KnowledgeBase, "calc": Calculator, "text": TextTool, "python": PythonRunner,
                "sim_agent": SimAgent, "http": HttpAgent, "local_llm": LocalLLMAgent}
POOLS_DIR = os.path.join(PROJECT_ROOT, "pools")


@dataclass
class Pool:
    name: str
    callees: list[Callee]

    def get(self, name: str) -> Callee | None:
        return next((c for c in self.callees if c.name == name), None)

    def describe(self) -> str:
        return "\n".join(c.describe() for c in self.callees)


class PoolError(ValueError):
    """A pool that cannot be built, said in one line: which file, which callee, which field."""


def build_callee(spec: dict, world: World | None, extra_types: dict | None = None) -> Callee:
    types = {**CALLEE_TYPES, **(extra_types or {})}
    if not isinstance(spec, dict):
        raise PoolError(f"a callee is a JSON object with a type, a name and its fields; got {spec!r:.80}")
    spec = dict(spec)
    who, type_name = f"callee {spec.get('name', '(no name)')!r}", spec.pop("type", None)
    if type_name not in types:
        raise PoolError(f"{who}: unknown type {type_name!r}; valid types: {', '.join(types)}")
    cls = types[type_name]
    settable = {f.name: f for f in fields(cls) if f.init and f.name != "world"}  # the world is ours to give
    extra = [k for k in spec if k not in settable]
    missing = [k for k, f in settable.items()
               if k not in spec and f.default is MISSING and f.default_factory is MISSING]
    if extra or missing:
        what = "; ".join(s for s in (extra and f"unknown field(s) {', '.join(map(repr, extra))}",
                                     missing and f"missing field(s) {', '.join(map(repr, missing))}") if s)
        raise PoolError(f"{who} ({type_name}): {what}; its fields: {', '.join(settable)}")
    concurrency = spec.get("concurrency", 0)
    if type(concurrency) is not int or concurrency < 0:
        raise PoolError(f"{who} ({type_name}): concurrency must be a whole number >= 0 (0: no limit), "
                        f"not {concurrency!r:.20}")
    if any(f.name == "world" for f in fields(cls)):
        spec["world"] = world
    return cls(**spec)


def pool_names() -> list[str]:
    """Pools in pools/ by name ("seen" is the randomized training family, train.json)."""
    names = [f[:-5] for f in os.listdir(POOLS_DIR) if f.endswith(".json")]
    return sorted("seen" if n == "train" else n for n in names)


def read_pool_spec(name_or_path: str) -> dict:
    """A pool by file path, or by name in pools/ ("seen" is the randomized training family)."""
    path = name_or_path
    if not os.path.exists(path):
        if os.sep in path or "/" in path or path.endswith(".json"):
            raise PoolError(f"pool file {path} does not exist")
        path = os.path.join(POOLS_DIR, ("train" if name_or_path == "seen" else name_or_path) + ".json")
        if not os.path.isfile(path):
            raise PoolError(f"unknown pool {name_or_path!r}; pools: {', '.join(pool_names())}, or a pool JSON file")
    try:
        with open(path, encoding="utf-8") as f:
            spec = safe_json(json.load(f))     # its names and descriptions enter the prompt
    except json.JSONDecodeError as e:
        raise PoolError(f"{path}: not valid JSON: {e}") from None
    except RecursionError:
        raise PoolError(f"{path}: JSON nested too deeply") from None
    except (OSError, UnicodeDecodeError) as e:
        raise PoolError(f"{path}: cannot read it: {e}") from None
    if not isinstance(spec, dict):
        raise PoolError(f"{path}: a pool file holds one JSON object (name, callees), not a {type(spec).__name__}")
    return spec


def load_pool(spec: dict | str, world: World | None, rng: random.Random | None = None,
              extra_types: dict | None = None) -> Pool:
    """A fixed pool, or one draw from a family (needs rng: a new draw per episode). A bad spec
    is a PoolError naming the pool (its file when given by path), the callee and the field."""
    where = spec if isinstance(spec, str) else None
    spec = read_pool_spec(spec) if isinstance(spec, str) else spec
    where = where or f"pool {spec.get('name')!r}"
    if spec.get("family") and rng is None:
        raise ValueError(f"pool {spec.get('name')!r} is a randomized family: pass an rng")
    try:
        if spec.get("family"):
            try:
                spec = sample_family(spec, rng)
            except (KeyError, TypeError, ValueError, IndexError) as e:
                raise PoolError(f"malformed family: {type(e).__name__} {e}") from None
        callees = spec.get("callees")
        if not isinstance(callees, list) or not callees:
            raise PoolError("'callees' must be a non-empty list")
        pool = Pool(spec.get("name", "unnamed"), [build_callee(c, world, extra_types) for c in callees])
        names = [c.name for c in pool.callees]
        if len(set(names)) < len(names):
            raise PoolError(f"callee names repeat: {sorted(names)}")
    except PoolError as e:
        raise PoolError(f"{where}: {e}") from None
    for callee in pool.callees:
        if (warning := callee.check()) is not None:
            warnings.warn(f"{where}: {warning}")
    return pool


def level_word(accuracy: float, levels: list, rng: random.Random) -> str:
    """levels: [[min_accuracy, word or [synonyms]], ...] from best to worst; a synonym is drawn
    only where there is a list, so a family of single words draws as it always did."""
    word = next(word for threshold, word in levels if accuracy >= threshold)
    return rng.choice(word) if isinstance(word, list) else word


def sample_family(family: dict, rng: random.Random) -> dict:
    """One concrete pool spec from a family: names, costs, latencies, descriptions and agent
    skill profiles are all drawn at random, so only the description says what a callee is for.

    Optional fields widen a family, each drawn only where present (so a family without them
    draws exactly as before): a tool's "absent" (the chance it is left out of a draw, so its
    kind must go to agents), a list of synonyms in place of a level word, and the agents'
    "skill_range" with "skill_range_share" (the share of agents whose accuracy per kind is
    drawn uniformly from the range instead of from a profile)."""
    names = rng.sample(family["names"], len(family["tools"]) + family["agents"]["count"][1])
    callees, options = [], []    # options: each callee's concurrency choices
    for tool in family["tools"]:
        callee = {"type": tool["type"], "name": names.pop(), "kind": "tool",
                  "description": rng.choice(tool["descriptions"]),
                  "cost": round(rng.uniform(*tool["cost"]), 4),
                  "latency": round(rng.uniform(*tool["latency"]), 2)}
        if not ("absent" in tool and rng.random() < tool["absent"]):
            callees.append(callee)
            options.append(tool.get("concurrency", [0]))
    agents = family["agents"]
    for _ in range(rng.randint(*agents["count"])):
        if "skill_range" in agents and rng.random() < agents["skill_range_share"]:
            profile = {k: rng.uniform(*agents["skill_range"]) for k in KINDS}
        else:
            profile = rng.choice(agents["profiles"])
        skills = {k: min(0.99, max(0.3, acc + rng.uniform(-0.03, 0.03))) for k, acc in profile.items()}
        order = rng.sample(KINDS, len(KINDS))
        parts = [agents["skill_phrases"][rng.randrange(len(agents["skill_phrases"]))].format(
            level=level_word(skills[k], family["levels"], rng), skill=rng.choice(agents["skill_words"][k]))
            for k in order]
        description = rng.choice(agents["openers"]) + "; " + ", ".join(parts)
        callees.append({"type": "sim_agent", "name": names.pop(), "kind": "agent",
                        "description": description, "skills": skills,
                        "cost": round(rng.uniform(*agents["cost"]), 4),
                        "latency": round(rng.uniform(*agents["latency"]), 2),
                        "latency_sigma": agents["latency_sigma"],
                        "exec_err_rate": round(rng.uniform(*agents["exec_err_rate"]), 3),
                        "timeout_rate": round(rng.uniform(*agents["timeout_rate"]), 3)})
        options.append(agents.get("concurrency", [0]))
    # concurrency (how many calls a callee serves at once) is drawn last, after the shuffle, so
    # every other draw is the same as in a family without it
    drawn = list(zip(callees, options))
    rng.shuffle(drawn)
    for callee, choices in drawn:
        if choices != [0]:
            callee["concurrency"] = rng.choice(choices)
    return {"name": family["name"], "callees": [c for c, _ in drawn]}
