"""The orchestration environment: protocol parsing, async execution of a turn, state feedback,
episodes and rewards. It knows tasks and callees; it knows nothing about models or training.

The protocol. An assistant turn is text with tags:
    <think>short plan</think>                        optional, ignored by the environment
    <call id="1" to="kb">capital of Zarnia</call>    id: a new number (unique in the episode)
    <call id="2" to="kb">population of {1}</call>    {k} = the result of call k
    <answer>{2}</answer>                             ends the episode ({k} as in calls, or plain text)
A call waits only for the calls it references; everything else in the turn runs at once. {k}
may name an earlier call of the same turn (a dependency edge) or any call of an earlier round
(its result is pasted in; if it did not succeed, the call fails with EXEC_ERR). A reference to a
later call, to itself or to an unknown id is a PARSE_ERR, so a turn's graph is acyclic by
construction. The environment answers with one state message (role "user"):
    <state round="1" elapsed="0.42" cost="0.0030">
    <result id="1" status="OK" latency="0.21">Velora</result>
    </state>
Every body and attribute value in it is escaped by one function (`_xml`), so a state message is
well-formed XML whatever the policy or a callee wrote. Statuses: OK, PARSE_ERR (the action could
not be parsed; the text says why), EXEC_ERR (the callee failed, or a call it depends on did),
TIMEOUT (past the per-call deadline). The parser never raises:
every problem (malformed or nested tags, unknown callee, duplicate id, bad reference,
huge input, binary junk, <state>/<result> written by the policy) becomes a PARSE_ERR result;
non-space text outside the tags is counted. A turn holding <answer> ends the episode; calls in
that turn are not run and count as a parse error.

Time. A round's calls form a graph; call c starts when its dependencies end:
start(c) = max(end(d) for d in deps(c)), end(c) = start(c) + latency(c), and the round takes
max end(c) (its critical path). Latencies are virtual for simulated callees and measured for real
ones (tools.py). A callee with a `concurrency` limit serves that many calls (a batch counts as
one) at once; the rest queue, first ready first served, and start when a slot frees: on the
virtual clock by simulation (`_Slots`), for real callees behind a semaphore. A call's latency
is from its start (its dependencies' end) to its reply, so the wait is in it, in the critical
path, and counts against its deadline. `elapsed` is the sum over rounds: the episode's
critical-path latency (the policy's own thinking time is not counted). Budgets: `max_turns` assistant turns, `time_budget`
seconds of elapsed time, `call_timeout` per call; an exhausted budget ends the episode unanswered.
Every call goes through `call_callee`, which turns a callee's exception or malformed reply into
EXEC_ERR and passes every reply's text through `tasks.safe_text` (no lone surrogate, nothing XML
cannot carry); real callees run in daemon threads, and the step stops waiting for one at
call_timeout + BACKSTOP_GRACE even if it overruns its own deadline (TIMEOUT).

Rewards (every term reported on its own; weights are RewardConfig fields, hence flags):
    success     = w_success * [answer matches gold]          (numbers within answer_rel_tol,
                                                               text case/space-normalized)
    protocol    = - w_parse_error * min(parse_errors, parse_error_cap)
                  - w_no_answer   * [no parseable answer]
                  - w_outside     * turns_with_text_outside_tags
    redundancy  = - w_redundant * redundant_calls   (same callee + same resolved task as a call
                                                     that already came back OK, or as another
                                                     call of the same turn)
    diversity   = w_group_diversity * [success] * (1 - (m - 1) / (G - 1))     (group_rewards only:
                  G episodes of one prompt, m = how many of them share this episode's
                  decomposition, i.e. its multiset of task strings with {k} ids erased; 0 if G=1)
    rounds      = - w_extra_round * max(0, rounds - min_rounds)
    tokens      = - w_token * generated_tokens     (the caller passes token counts; default:
                                                    whitespace-separated pieces)
    cost        = - w_cost * total_cost
    latency     = - w_latency * elapsed
    reward      = sum of the terms above
"""
import asyncio
import html
import math
import random
import re
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace

from cli import field as flag
from tasks import Task, safe_text
from tools import EXEC_ERR, OK, TIMEOUT, Pool, Reply

PARSE_ERR = "PARSE_ERR"


# ---------------------------------------------------------------- configuration

@dataclass
class RewardConfig:
    w_success: float = flag(1.0, "reward for an answer that matches the gold answer", "reward")
    w_parse_error: float = flag(0.1, "penalty per PARSE_ERR", "reward")
    parse_error_cap: int = flag(10, "at most this many PARSE_ERRs are penalized", "reward")
    w_no_answer: float = flag(0.5, "penalty for ending without a parseable answer", "reward")
    w_outside: float = flag(0.05, "penalty per turn with text outside the protocol tags", "reward")
    w_redundant: float = flag(0.05, "penalty per redundant call", "reward")
    w_group_diversity: float = flag(0.05, "bonus for a successful decomposition unique in its group", "reward")
    w_extra_round: float = flag(0.05, "penalty per round beyond the task's min_rounds", "reward")
    w_token: float = flag(0.0005, "penalty per generated token", "reward")
    w_cost: float = flag(1.0, "penalty per unit of call cost", "reward")
    w_latency: float = flag(0.01, "penalty per second of critical-path latency", "reward")
    answer_rel_tol: float = flag(1e-6, "relative tolerance for numeric answers", "reward")


@dataclass
class EnvConfig:
    max_turns: int = flag(10, "assistant turns per episode", "environment")
    time_budget: float = flag(120.0, "seconds of critical-path time per episode", "environment")
    call_timeout: float = flag(10.0, "per-call deadline in seconds", "environment")
    max_calls_per_turn: int = flag(16, "calls beyond this in one turn are PARSE_ERR", "environment")
    max_turn_chars: int = flag(8000, "longer turns are cut here (and flagged)", "environment")
    max_task_chars: int = flag(1000, "longer call tasks are PARSE_ERR", "environment")
    failure_rate: float = flag(0.0, "injected: each call fails (half EXEC_ERR, half TIMEOUT) with this probability", "environment")
    last_turn_answers: bool = flag(True, "the protocol mask allows only an answer in the last of max_turns "
                                   "(a call there could never be answered)", "environment")


# ---------------------------------------------------------------- parsing

@dataclass
class Call:
    id: str
    to: str
    task: str                      # as written, with {k} references
    refs: list[str] = field(default_factory=list)
    error: str = ""                # non-empty: PARSE_ERR with this message


@dataclass
class ParsedTurn:
    calls: list[Call]
    answer: str | None
    errors: list[str]              # turn-level problems (no call id to attach them to)
    outside_chars: int


_TAG = re.compile(r"<(/?)([A-Za-z_][A-Za-z0-9_]{0,20})([^<>]{0,300})>")
_ATTR = re.compile(r'([A-Za-z_]+)\s*=\s*"([^"]*)"')
_REF = re.compile(r"\{(\d{1,6})\}")
_KNOWN = ("think", "call", "answer")
_ENV_ONLY = ("state", "result")


def _clip(s: str, n: int = 40) -> str:
    """A safe, short echo of user text inside an error message."""
    s = "".join(ch if ch.isprintable() else "?" for ch in s[:n])
    return s.replace("<", "(").replace(">", ")").replace('"', "'") + ("..." if len(s) >= n else "")


def parse_turn(text: str, max_chars: int = 8000) -> ParsedTurn:
    """Split one assistant turn into calls, an answer, errors and the amount of stray text.
    Never raises: every problem is reported in `errors` or in a call's `error`."""
    errors: list[str] = []
    if not isinstance(text, str):
        text = str(text)
    if len(text) > max_chars:
        errors.append(f"turn is {len(text)} characters; only the first {max_chars} were read")
        text = text[:max_chars]
    tags = [m for m in _TAG.finditer(text) if m.group(2) in _KNOWN + _ENV_ONLY]
    calls, answers, outside, pos, i = [], [], 0, 0, 0
    while i < len(tags):
        m = tags[i]
        outside += len("".join(text[pos:m.start()].split()))
        closing, name, attrs = m.group(1), m.group(2), m.group(3)
        if name in _ENV_ONLY:
            errors.append(f"the {name} tag is written by the environment, not by you")
            pos, i = m.end(), i + 1
            continue
        if closing:
            errors.append(f"stray closing {name} tag")
            pos, i = m.end(), i + 1
            continue
        # find the matching close; any other protocol tag before it means a nesting error
        j = i + 1
        while j < len(tags) and not (tags[j].group(1) and tags[j].group(2) == name):
            if tags[j].group(2) in _KNOWN and name != "think":
                break
            j += 1
        closed = j < len(tags) and tags[j].group(1) == "/" and tags[j].group(2) == name
        body = text[m.end():tags[j].start()] if closed else ""
        if name == "think":
            if not closed:
                errors.append("unclosed think tag")
        elif name == "answer":
            if not closed:
                errors.append("unclosed or nested answer tag")
            elif attrs.strip():
                errors.append("the answer tag takes no attributes")
            else:
                answers.append(body.strip())
        else:
            calls.append(_parse_call(attrs, body, closed))
        if closed:
            pos, i = tags[j].end(), j + 1
        else:
            pos, i = m.end(), i + 1
    outside += len("".join(text[pos:].split()))
    answer = None
    if len(answers) > 1:
        errors.append(f"{len(answers)} answer tags; only the first counts")
    if answers:
        answer = answers[0]
        if not answer:
            errors.append("empty answer")
            answer = None
    return ParsedTurn(calls, answer, errors, outside)


def _parse_call(attrs: str, body: str, closed: bool) -> Call:
    pairs = _ATTR.findall(attrs)
    values = dict(pairs)
    call = Call(id=_clip(values.get("id", "?"), 12), to=_clip(values.get("to", "?"), 40), task=body.strip())
    leftover = _ATTR.sub("", attrs).strip()
    if not closed:
        call.error = "unclosed or nested call tag"
    elif leftover or len(pairs) != len(values) or set(values) != {"id", "to"}:
        call.error = 'a call needs exactly id="N" and to="NAME"'
    elif not re.fullmatch(r"[1-9]\d{0,5}", values["id"]):
        call.error = f"call id {call.id!r} is not a positive number"
    elif not call.task:
        call.error = "empty task"
    call.refs = _REF.findall(body)
    return call


# ---------------------------------------------------------------- execution

@dataclass
class CallResult:
    id: str
    to: str
    task: str                      # resolved: references replaced by results
    status: str
    text: str
    latency: float
    cost: float
    start: float = 0.0             # within the round, on the critical-path clock
    end: float = 0.0
    raw_task: str = ""
    redundant: bool = False
    repeats_failure: bool = False  # same callee and task as an earlier call that ended EXEC_ERR on its own

    def key(self) -> tuple[str, str]:
        """What makes two calls the same call: the callee and the resolved task, case and spacing aside."""
        return self.to, " ".join(self.task.lower().split())


def validate(turn: ParsedTurn, pool: Pool, history: dict[str, CallResult], config: EnvConfig) -> list[CallResult | Call]:
    """Each call either stays a Call to run, or becomes a PARSE_ERR CallResult."""
    out, seen = [], set()
    for n, call in enumerate(turn.calls):
        error = call.error
        if not error and n >= config.max_calls_per_turn:
            error = f"too many calls in one turn (at most {config.max_calls_per_turn})"
        if not error and (call.id in seen or call.id in history):
            error = f"call id {call.id} is already used"
        if not error and pool.get(call.to) is None:
            error = f"unknown callee {call.to!r}; the pool has: " + ", ".join(c.name for c in pool.callees)
        if not error and len(call.task) > config.max_task_chars:
            error = f"task is longer than {config.max_task_chars} characters"
        for ref in call.refs:
            if error:
                break
            if ref == call.id:
                error = f"{{{ref}}} refers to the call itself"
            elif ref not in seen and ref not in history:
                later = any(c.id == ref for c in turn.calls[n + 1:])
                error = f"{{{ref}}} refers to a later call" if later else f"{{{ref}}} refers to no earlier call"
        seen.add(call.id)
        out.append(CallResult(call.id, call.to, call.task, PARSE_ERR, error, 0.0, 0.0, raw_task=call.task)
                   if error else call)
    return out


def call_callee(callee, tasks: list[str], rngs: list[random.Random], timeout: float) -> list[Reply]:
    """The one place every callee is called: one reply per task, always. An exception inside a
    callee, or a reply that is not a Reply with a known status, becomes EXEC_ERR with a short
    reason, so no callee can crash a step; callees need no try/except of their own for that.
    Every reply's text passes `safe_text` here: it is outside text (an HTTP agent's JSON may
    hold "\\ud800", a tool may echo its task), and it enters the prompt and later calls' tasks."""
    start = time.perf_counter()
    try:
        replies = (callee.run_batch(tasks, rngs, timeout) if callee.batch
                   else [callee.run(tasks[0], rngs[0], timeout)])
        if len(replies) != len(tasks) or not all(_well_formed(r) for r in replies):
            raise TypeError(f"the callee returned {len(replies)} malformed or missing replies for {len(tasks)} calls")
    except Exception as e:
        latency = callee.latency if callee.virtual_clock else time.perf_counter() - start
        replies = [Reply(EXEC_ERR, f"{type(e).__name__}: {e}"[:200], latency, callee.cost) for _ in tasks]
    return [replace(r, text=safe_text(r.text)) for r in replies]


def _well_formed(r) -> bool:
    return (isinstance(r, Reply) and r.status in (OK, EXEC_ERR, TIMEOUT) and isinstance(r.text, str)
            and isinstance(r.latency, (int, float)) and math.isfinite(r.latency) and r.latency >= 0)


BACKSTOP_GRACE = 0.5   # seconds a real callee may overrun its deadline before the executor stops waiting


async def _in_thread(fn, *args):
    """fn(*args) in a daemon thread of its own. Unlike asyncio.to_thread, asyncio.run does not
    wait for it at the end, so the executor's deadline bounds a step even if a callee overruns
    its own. That is only a backstop: real callees hold their deadline themselves (tools.py),
    so their thread has ended by then and nothing is left running. A callee that cannot stop
    (a local model mid-generation) is abandoned: its thread finishes in the background and its
    late result is dropped."""
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def deliver(result):
        if not future.done():
            future.set_result(result)

    def target():
        result = fn(*args)
        try:
            loop.call_soon_threadsafe(deliver, result)
        except RuntimeError:      # the step gave up on this call and its loop is closed
            pass
    threading.Thread(target=target, daemon=True, name=f"callee-{getattr(args[0], 'name', '')}").start()
    return await future


class _Slots:
    """One turn's queues for virtual-clock callees with a concurrency limit (a discrete-event
    simulation inside the event loop). A request (one call, or one batch) waits until one of
    its callee's slots frees: it starts at max(ready, earliest free slot), first come (earliest
    ready) first served, and its wait counts in its latency and against its deadline; one
    still waiting at the deadline is a TIMEOUT that never started (it costs nothing). A call
    that times out frees its slot at the deadline: the caller has given up.

    Calls are dispatched in the event loop's order, not in virtual-time order (a dependent
    written first may reach the queue before an independent call ready earlier), so the queue
    is served only when the loop has been quiet for a few ticks: by then every call that will
    be ready earlier is either queued or waits on a real call that started earlier, and the
    end of that real call wakes the queue again."""

    def __init__(self, loop, config: EnvConfig, busy):
        self.loop, self.config, self.busy = loop, config, busy
        self.waiting: list = []        # (ready, order, callee, tasks, rngs, futures)
        self.free_at: dict = {}        # callee name -> the times its slots free, within the round
        self.in_flight: list = []      # start times of the real calls running now
        self.activity = 0              # bumped by every dispatch and every real call's end
        self.arrivals = 0              # requests queued so far: equal ready times go first come, first served
        self.pumping = False

    def enqueue(self, callee, tasks, rngs, ready: float) -> list:
        futures = [self.loop.create_future() for _ in tasks]
        self.arrivals += 1
        self.waiting.append((ready, self.arrivals, callee, tasks, rngs, futures))
        self.wake()
        return futures

    def wake(self):
        if self.waiting and not self.pumping:
            self.pumping = True
            self.loop.call_soon(self.pump, self.activity, 0)

    def pump(self, seen, quiet):
        if self.activity != seen or quiet < 3 or self.busy():
            self.loop.call_soon(self.pump, self.activity, quiet + 1 if self.activity == seen else 0)
            return
        self.pumping = False
        request = min(self.waiting, key=lambda r: r[:2])
        if any(start < request[0] for start in self.in_flight):
            return                     # that call's end may release an earlier one; it wakes us
        self.waiting.remove(request)
        self.serve(*request)
        self.wake()

    def serve(self, ready, _, callee, tasks, rngs, futures):
        slots = self.free_at.setdefault(callee.name, [0.0] * callee.concurrency)
        slot = min(range(len(slots)), key=slots.__getitem__)
        begin = max(ready, slots[slot])
        waited, timeout = begin - ready, self.config.call_timeout
        if waited >= timeout:
            replies = [Reply(TIMEOUT, "", timeout, 0.0) for _ in tasks]
        else:
            replies = call_callee(callee, tasks, rngs, timeout - waited)
            slots[slot] = begin + max(min(r.latency, timeout - waited) for r in replies)
            replies = [Reply(r.status, r.text, waited + r.latency, r.cost) for r in replies]
        for future, reply in zip(futures, replies):
            future.set_result(reply)

    def real_started(self, start: float):
        self.in_flight.append(start)
        self.activity += 1

    def real_ended(self, start: float):
        self.in_flight.remove(start)
        self.activity += 1
        self.wake()


async def _execute(items: list, pool: Pool, history: dict[str, CallResult], seed: str,
                   config: EnvConfig) -> list[CallResult]:
    """Run one turn's calls as a dependency graph; returns results in the turn's order."""
    loop = asyncio.get_running_loop()
    done: dict[str, asyncio.Future] = {}
    batches: dict = {}            # (callee name, start time) -> list of pending requests
    pending: list = []            # running batches of real callees (kept so they are awaited)
    slots = _Slots(loop, config, busy=lambda: bool(batches))
    limits: dict = {}             # callee name -> semaphore, for real callees with a concurrency limit

    def settle(key, size, quiet):
        # wait until the batch stops growing for a few loop ticks: calls that reach the same
        # start time through different dependency chains wake up a tick or two apart
        if len(batches[key]) != size or quiet < 3:
            loop.call_soon(settle, key, len(batches[key]), 0 if len(batches[key]) != size else quiet + 1)
        else:
            flush(key)

    async def run_real(callee, tasks, rngs) -> list[Reply]:
        # a real callee with a limit: calls past it wait here, and the wait is in their latency
        # and deadline, as a server's own queue would be
        limit = limits.setdefault(callee.name, asyncio.Semaphore(callee.concurrency)) if callee.concurrency else None
        queued_at = time.perf_counter()
        try:
            if limit:
                await asyncio.wait_for(limit.acquire(), config.call_timeout)
        except asyncio.TimeoutError:
            return [Reply(TIMEOUT, "", config.call_timeout, 0.0) for _ in tasks]
        waited = time.perf_counter() - queued_at
        left = max(0.01, config.call_timeout - waited)
        try:
            replies = await asyncio.wait_for(_in_thread(call_callee, callee, tasks, rngs, left),
                                             left + BACKSTOP_GRACE)
        except asyncio.TimeoutError:
            replies = [Reply(TIMEOUT, "", left, callee.cost) for _ in tasks]
        finally:
            if limit:
                limit.release()
        return [Reply(r.status, r.text, waited + r.latency, r.cost) for r in replies]

    def flush(key):
        callee, requests = pool.get(key[0]), batches.pop(key)
        tasks, rngs = [r[0] for r in requests], [r[1] for r in requests]
        if callee.virtual_clock and callee.concurrency:
            for r, future in zip(requests, slots.enqueue(callee, tasks, rngs, key[1])):
                future.add_done_callback(lambda f, out=r[2]: out.set_result(f.result()))
            return
        if callee.virtual_clock:
            for r, reply in zip(requests, call_callee(callee, tasks, rngs, config.call_timeout)):
                r[2].set_result(reply)
            return

        async def answer():
            for r, reply in zip(requests, await run_real(callee, tasks, rngs)):
                r[2].set_result(reply)
        pending.append(asyncio.ensure_future(answer()))

    async def dispatch(callee, task: str, rng: random.Random, start: float) -> Reply:
        slots.activity += 1       # a new call: the virtual queue waits until things settle
        if config.failure_rate and rng.random() < config.failure_rate:
            if rng.random() < 0.5:
                return Reply(EXEC_ERR, "injected failure: the callee is unavailable", callee.latency, callee.cost)
            return Reply(TIMEOUT, "", config.call_timeout, callee.cost)
        if callee.virtual_clock:
            return await send(callee, task, rng, start)
        slots.real_started(start)
        try:
            return await send(callee, task, rng, start)
        finally:
            slots.real_ended(start)

    async def send(callee, task: str, rng: random.Random, start: float) -> Reply:
        if callee.batch:
            # calls to a batching callee that become ready at the same moment go in one batch
            key = (callee.name, round(start, 9))
            future = loop.create_future()
            if key not in batches:
                batches[key] = []
                loop.call_soon(settle, key, -1, 0)
            batches[key].append((task, rng, future))
            return await future
        if callee.virtual_clock and callee.concurrency:
            return await slots.enqueue(callee, [task], [rng], start)[0]
        if callee.virtual_clock:
            return call_callee(callee, [task], [rng], config.call_timeout)[0]
        return (await run_real(callee, [task], [rng]))[0]

    async def run_one(call: Call) -> CallResult:
        deps = []
        for ref in dict.fromkeys(call.refs):
            deps.append(await done[ref] if ref in done else history[ref])
        start = max((d.end if d.id in done else 0.0 for d in deps), default=0.0)
        failed = [d for d in deps if d.status != OK]
        if failed:   # the task stays unresolved: there is no result to paste in
            return CallResult(call.id, call.to, call.task, EXEC_ERR,
                              f"dependency {{{failed[0].id}}} failed ({failed[0].status})", 0.0, 0.0,
                              start, start, call.task)
        task = call.task
        for d in deps:
            task = task.replace("{%s}" % d.id, d.text)
        rng = random.Random(f"{seed}:{call.id}")
        reply = await dispatch(pool.get(call.to), task, rng, start)
        if reply.latency > config.call_timeout:
            reply = Reply(TIMEOUT, "", config.call_timeout, reply.cost)
        return CallResult(call.id, call.to, task, reply.status, reply.text, reply.latency, reply.cost,
                          start, start + reply.latency, call.task)

    async def finished(result: CallResult) -> CallResult:
        return result

    futures = []
    for item in items:
        future = asyncio.ensure_future(run_one(item) if isinstance(item, Call) else finished(item))
        futures.append(future)
        if item.id not in history:   # a duplicate id (a PARSE_ERR) never shadows the first call
            done.setdefault(item.id, future)
    results = list(await asyncio.gather(*futures))
    await asyncio.gather(*pending)
    return results


def run_turn(items: list, pool: Pool, history: dict[str, CallResult], seed: str,
             config: EnvConfig) -> list[CallResult]:
    if not items:
        return []
    return asyncio.run(_execute(items, pool, history, seed, config))


# ---------------------------------------------------------------- answers and state text

_NUMBER = re.compile(r"[-+]?\d+(\.\d+)?")
_SYNONYMS = {"true": "yes", "false": "no"}


def resolve_answer(text: str, history: dict[str, CallResult]) -> tuple[str | None, str | None]:
    """An answer may name results as calls do: `<answer>{4}</answer>` is call 4's result, so a
    policy need not copy a long number out of a state message. A reference to a call that has
    no OK result leaves the episode unanswered, and is a protocol error: (answer, error)."""
    for ref in dict.fromkeys(_REF.findall(text)):
        result = history.get(ref)
        if result is None or result.status != OK:
            why = "no such call" if result is None else f"it ended {result.status}"
            return None, f"the answer references {{{ref}}}, which has no OK result ({why})"
        text = text.replace("{%s}" % ref, result.text)
    return text, None


def normalize_answer(text: str) -> str:
    text = " ".join(str(text).strip().lower().split()).strip(" .!\"'")
    if re.fullmatch(r"[-+]?\d{1,3}(,\d{3})+(\.\d+)?", text):
        text = text.replace(",", "")
    return _SYNONYMS.get(text, text)


def answers_match(prediction: str | None, gold: str, rel_tol: float = 1e-6) -> bool:
    if prediction is None:
        return False
    p, g = normalize_answer(prediction), normalize_answer(gold)
    if _NUMBER.fullmatch(p) and _NUMBER.fullmatch(g):
        a, b = float(p), float(g)
        return abs(a - b) <= max(1e-9, rel_tol * abs(b))
    return p == g


def _xml(text: str, attribute: bool = False) -> str:
    """The one escape for every body and attribute value of a state message, so that each
    state message is well-formed XML even where it echoes the policy's text (an id like 1&a)."""
    text = html.escape(safe_text(text), quote=False)
    return text.replace('"', "&quot;") if attribute else text


def format_state(round_no: int, elapsed: float, cost: float, results: list[CallResult],
                 errors: list[str]) -> str:
    """No `from` attribute: the call's id names it, and its callee is in the policy's own turn
    (a token diet: about 5 tokens a result)."""
    lines = [f'<state round="{round_no}" elapsed="{elapsed:.2f}" cost="{cost:.4f}">']
    for e in errors:
        lines.append(f'<result id="-" status="{PARSE_ERR}" latency="0.00">{_xml(e)}</result>')
    for r in results:
        lines.append(f'<result id="{_xml(r.id, True)}" status="{_xml(r.status, True)}" '
                     f'latency="{r.latency:.2f}">{_xml(r.text[:2000])}</result>')
    lines.append("</state>")
    return "\n".join(lines)


def system_prompt(pool: Pool, config: EnvConfig) -> str:
    """Kept short on purpose: a small model reads it every turn, and every token of it costs
    training and decoding time. The pool lines carry what changes between episodes; the
    instructions name each tag once (constrained decoding, protocol_mask.py, enforces the rest)."""
    return (
        "Delegate the question's subtasks to the pool; never solve them yourself. A turn: <think>plan</think> "
        '(optional), then <call id="1" to="NAME">task</call> with a new id per call ({k} = call k\'s result; '
        "other calls run in parallel), or <answer>final answer</answer> ({k} allowed). Re-route failed calls.\n"
        f"Budget: {config.max_turns} turns, {config.time_budget:g} s. "
        "Pool (name | kind | description | cost | latency):\n" + pool.describe())


# ---------------------------------------------------------------- episodes

@dataclass
class Round:
    """One executed turn, kept for traces and SFT data."""
    number: int
    text: str
    results: list[CallResult]
    errors: list[str]
    elapsed: float                 # this round's critical path
    state: str


@dataclass
class EpisodeResult:
    question: str
    gold: str
    answer: str | None
    success: bool
    rounds: int                    # executed call turns (the answer turn is not counted)
    turns: int                     # assistant turns
    min_rounds: int
    latency: float                 # critical-path seconds
    cost: float
    calls: int
    parse_errors: int
    exec_errors: int
    timeouts: int
    redundant_calls: int
    outside_turns: int
    tokens: int
    protocol_ok: bool              # no PARSE_ERR, no stray text, a parseable answer
    decomposition: list[str]
    composition: str
    difficulty: int
    truncated: bool = False        # ended by the policy's room (context), not by the protocol
    repeated_failures: int = 0     # calls sent again as they were after an EXEC_ERR of their own (no reward term)
    rewards: dict = field(default_factory=dict)
    reward: float = 0.0

    def to_json(self) -> dict:
        return asdict(self)


class Episode:
    """One question, driven turn by turn:
        episode = Episode(task, pool, EnvConfig(), RewardConfig(), seed=0)
        while not episode.done:
            episode.step(policy(episode.messages))
        episode.result()
    """

    def __init__(self, task: Task, pool: Pool, config: EnvConfig | None = None,
                 reward: RewardConfig | None = None, seed: int | str = 0):
        self.task, self.pool = task, pool
        self.config, self.reward_config = config or EnvConfig(), reward or RewardConfig()
        self.seed = seed
        self.messages = [{"role": "system", "content": system_prompt(pool, self.config)},
                         {"role": "user", "content": task.question}]
        self.history: dict[str, CallResult] = {}
        self.rounds: list[Round] = []
        self.done, self.answer = False, None
        self.truncated = ""  # why the episode was cut short (see `truncate`), "" if it was not
        self.elapsed = self.cost = 0.0
        self.turns = self.tokens = self.parse_errors = self.outside_turns = 0
        self._ok_calls: set = set()
        self._failed_calls: set = set()

    def step(self, text: str, n_tokens: int | None = None) -> str | None:
        """Apply one assistant turn; return the state message, or None when the episode is over."""
        if self.done:
            raise RuntimeError("the episode is over")
        text = text if isinstance(text, str) else str(text)
        self.turns += 1
        self.tokens += n_tokens if n_tokens is not None else len(text.split())
        self.messages.append({"role": "assistant", "content": text})
        turn = parse_turn(text, self.config.max_turn_chars)
        self.outside_turns += turn.outside_chars > 0
        if turn.answer is not None:
            # calls written beside the answer are not run: that is a protocol error
            answer, error = resolve_answer(turn.answer, self.history)
            self.parse_errors += len(turn.errors) + (len(turn.calls) > 0) + (error is not None)
            self.answer, self.done = answer, True
            return None
        errors = list(turn.errors)
        if not turn.calls and not errors:
            errors.append("no call and no answer in this turn")
        items = validate(turn, self.pool, self.history, self.config)
        results = run_turn(items, self.pool, self.history, f"{self.seed}:{len(self.rounds) + 1}", self.config)
        self._mark_redundant(results)
        round_time = max((r.end for r in results), default=0.0)
        self.elapsed += round_time
        self.cost += sum(r.cost for r in results)
        self.parse_errors += len(errors) + sum(r.status == PARSE_ERR for r in results)
        for r in results:  # a PARSE_ERR with a reused id must not overwrite the earlier call
            self.history.setdefault(r.id, r)
        state = format_state(len(self.rounds) + 1, self.elapsed, self.cost, results, errors)
        self.rounds.append(Round(len(self.rounds) + 1, text, results, errors, round_time, state))
        self.messages.append({"role": "user", "content": state})
        if self.turns >= self.config.max_turns or self.elapsed >= self.config.time_budget:
            self.done = True
            return None
        return state

    def turn_spec(self):
        """What the next turn may say without a PARSE_ERR (the protocol mask's input, a
        protocol_mask.TurnSpec): this pool's names, the ids so far and those with an OK result,
        the limits."""
        from protocol_mask import TurnSpec   # deferred: scripted play never imports torch
        # The turn cap ends an episode after its last turn's calls run, so their results are
        # never read: a call there can only lose the answer. With last_turn_answers that turn
        # may hold only an answer (the parser still accepts calls there: unmasked play is as before).
        last = self.config.last_turn_answers and self.turns + 1 >= self.config.max_turns
        return TurnSpec.fit([c.name for c in self.pool.callees], list(self.history),
                            [k for k, r in self.history.items() if r.status == OK],
                            0 if last else self.config.max_calls_per_turn, self.config.max_task_chars,
                            self.config.max_turn_chars)

    def truncate(self, reason: str) -> None:
        """End the episode without an answer because the policy cannot go on (e.g. its context
        is full): scored as unanswered, and counted apart in results as truncated."""
        self.done, self.truncated = True, reason or "truncated"

    def _mark_redundant(self, results: list[CallResult]) -> None:
        this_turn = set()
        for r in results:
            if r.status == PARSE_ERR:
                continue
            key = r.key()
            r.redundant = key in self._ok_calls or key in this_turn
            r.repeats_failure = key in self._failed_calls
            this_turn.add(key)
        self._ok_calls |= {r.key() for r in results if r.status == OK}
        self._failed_calls |= {r.key() for r in results if r.status == EXEC_ERR and not r.text.startswith("dependency {")}

    def result(self) -> EpisodeResult:
        results = [r for rnd in self.rounds for r in rnd.results]
        success = answers_match(self.answer, self.task.answer, self.reward_config.answer_rel_tol)
        decomposition = sorted(_REF.sub("{}", " ".join(r.raw_task.lower().split()))
                               for r in results if r.status != PARSE_ERR)
        res = EpisodeResult(
            question=self.task.question, gold=self.task.answer, answer=self.answer, success=success,
            rounds=len(self.rounds), turns=self.turns, min_rounds=self.task.min_rounds,
            latency=self.elapsed, cost=self.cost, calls=len(results), parse_errors=self.parse_errors,
            exec_errors=sum(r.status == EXEC_ERR for r in results),
            timeouts=sum(r.status == TIMEOUT for r in results),
            redundant_calls=sum(r.redundant for r in results), outside_turns=self.outside_turns,
            tokens=self.tokens,
            protocol_ok=self.parse_errors == 0 and self.outside_turns == 0 and self.answer is not None,
            decomposition=decomposition, composition=self.task.composition,
            difficulty=self.task.difficulty, truncated=bool(self.truncated),
            repeated_failures=sum(r.repeats_failure for r in results))
        res.rewards = episode_rewards(res, self.reward_config)
        res.reward = sum(res.rewards.values())
        return res


def episode_rewards(r: EpisodeResult, c: RewardConfig) -> dict[str, float]:
    """Every reward term of one episode (the group diversity term is 0 here; see group_rewards)."""
    terms = {
        "success": c.w_success * r.success,
        "protocol": -(c.w_parse_error * min(r.parse_errors, c.parse_error_cap)
                      + c.w_no_answer * (r.answer is None) + c.w_outside * r.outside_turns),
        "redundancy": -c.w_redundant * r.redundant_calls,
        "diversity": 0.0,
        "rounds": -c.w_extra_round * max(0, r.rounds - r.min_rounds),
        "tokens": -c.w_token * r.tokens,
        "cost": -c.w_cost * r.cost,
        "latency": -c.w_latency * r.latency,
    }
    return {k: v + 0.0 for k, v in terms.items()}   # + 0.0 turns -0.0 into 0.0


def group_rewards(results: list[EpisodeResult], config: RewardConfig) -> list[dict[str, float]]:
    """Reward terms for G episodes of the same prompt, with the group diversity term filled in.
    Also updates each result's `rewards` and `reward`."""
    g = len(results)
    counts = Counter(tuple(r.decomposition) for r in results)
    out = []
    for r in results:
        terms = episode_rewards(r, config)
        if g > 1:
            same = counts[tuple(r.decomposition)]
            terms["diversity"] = config.w_group_diversity * r.success * (1 - (same - 1) / (g - 1))
        r.rewards, r.reward = terms, sum(terms.values())
        out.append(terms)
    return out


def play(episode: Episode, policy) -> EpisodeResult:
    """Drive an episode with any `policy(messages) -> str` until it is done."""
    while not episode.done:
        episode.step(policy(episode.messages))
    return episode.result()
