"""Scripted policies that speak the protocol as text, through the real parser and environment.

A policy is any callable `policy(messages) -> str`: it reads the conversation so far (system
prompt with the pool description, the question, its own turns, the state messages) and writes
the next assistant turn. A trained model is one more such callable (infer.py plugs it in).

Design choices, and why:
- Scripted policies see only the text a model would see, plus (for the oracles) the task's gold
  subtask graph for decomposition. Routing is read from the pool description lines
  (`read_pool`), never from the pool objects, so the oracle routes unseen pools the way a model
  would have to: by reading. Its reading uses a small lexicon of skill and level words covering
  both the training wording and the unseen pools' wording.
- The parallel oracle writes the SFT data, so its turns are what we want a model to learn: a short
  <think>, then every unsolved subtask at once, chained ones through {k} references. On failure
  it re-routes to the next near-exact callee (read accuracy >= 0.95) and re-sends what depended
  on the failed call in the same turn; where no near-exact callee is left it asks two callees
  and accepts only an answer they agree on, because a single weak callee trades a visible
  failure for an invisible wrong answer (GraphPolicy's docstring has the rules). An OK answer
  that cannot be used as a value (empty, long, a sentence, not a number where arithmetic needs
  one: what a chat model serving as an agent may send) is treated as that callee's failure,
  because pasting it on only moves the failure downstream, where re-sending the call repeats it.
- Queueing: a call that would wait behind this turn's other calls to a callee with a
  concurrency limit goes to a near-exact callee that would finish it sooner; accuracy is never
  traded for it.
- Baselines isolate one ingredient each: serial oracle (same routing, one call per turn),
  single callee (same decomposition, no routing), random routing, and ask-every-agent-and-vote
  (no routing, redundancy instead).
"""
import html
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

from tasks import Task

Policy = Callable[[list[dict]], str]

SKILL_WORDS = {"lookup": ("facts", "knowledge", "trivia", "lookup", "lookups"),
               "math": ("arithmetic", "math", "calculator", "calculation", "sums", "numbers"),
               "text": ("text", "strings", "string", "spelling", "wordplay")}
LEVEL_WORDS = {"exact": 1.0, "excellent": 0.97, "strong": 0.95, "expert": 0.95, "superb": 0.95,
               "good": 0.87, "solid": 0.87, "reliable": 0.87, "capable": 0.87,
               "fair": 0.75, "average": 0.75, "passable": 0.75, "mediocre": 0.72,
               "weak": 0.5, "poor": 0.5, "unreliable": 0.5, "shaky": 0.5}
NEAR_EXACT = 0.95
MAX_VALUE_CHARS = 60     # an answer pasted into another task is a name or a number, never a paragraph
_VALUE_NUMBER = re.compile(r"-?\d+(\.\d+)?")
_RESULT = re.compile(r'<result id="([^"]*)" status="([A-Z_]+)" latency="[^"]*">(.*?)</result>', re.S)
_CALL = re.compile(r'<call id="([^"]*)" to="([^"]*)">')


@dataclass
class CalleeInfo:
    name: str
    kind: str
    description: str
    cost: float
    latency: float
    skills: dict[str, float] = field(default_factory=dict)   # skill -> accuracy read from the text
    concurrency: int = 0                                      # calls served at once; 0: no limit


def read_pool(system_prompt: str) -> list[CalleeInfo]:
    """Parse the pool lines '- "name" | kind | description | C | Ls[ | concurrency N]' (the cost
    and latency may carry their column's word: 'cost C', 'latency Ls')."""
    callees = []
    for line in system_prompt.splitlines():
        parts = line[2:].split(" | ") if line.startswith("- ") else []
        if len(parts) == 6 and parts[5].startswith("concurrency "):
            concurrency = int(parts.pop().split()[-1])
        elif len(parts) == 5:
            concurrency = 0
        else:
            continue
        name, kind, description, cost, latency = parts
        name = name.strip('"')
        info = CalleeInfo(name, kind, description, float(cost.split()[-1]), float(latency.split()[-1].rstrip("s")),
                          concurrency=concurrency)
        exact = "exact" in re.findall(r"[a-z]+", description.lower())
        for clause in re.split(r"[;,]", description.lower()):
            words = re.findall(r"[a-z]+", clause)
            level = next((LEVEL_WORDS[w] for w in words if w in LEVEL_WORDS), 1.0 if exact else 0.5)
            for skill, keys in SKILL_WORDS.items():
                if any(k in words for k in keys):
                    info.skills[skill] = max(info.skills.get(skill, 0.0), level)
        callees.append(info)
    return callees


def rank_for(skill: str, callees: list[CalleeInfo]) -> list[CalleeInfo]:
    """Most accurate first; then faster (the critical path), then cheaper."""
    able = [c for c in callees if skill in c.skills]
    return sorted(able, key=lambda c: (-c.skills[skill], c.latency, c.cost))


def last_state(messages: list[dict]) -> list[tuple[str, str, str, str]]:
    """(id, callee, status, text) of every result in the latest state message. A result names
    its call by id only; the callee is the one the policy's own last turn sent that call to."""
    if len(messages) < 3 or messages[-1]["role"] != "user":
        return []
    sent = dict(_CALL.findall(messages[-2]["content"])) if messages[-2]["role"] == "assistant" else {}
    return [(i, html.unescape(sent.get(i, "-")), s, html.unescape(t))
            for i, s, t in _RESULT.findall(messages[-1]["content"])]


class GraphPolicy:
    """Shared machinery: walk the task's subtask graph, track which call solved what, recover.
    Subclasses choose which subtasks to send in a turn and to whom.

    Recovery (`recover = True`), the behaviour the SFT data teaches:
    - a call that failed on its own (EXEC_ERR, TIMEOUT) is re-routed at once to the next
      near-exact callee for its skill that has not failed it yet, and everything downstream of
      it is re-sent in the same turn, chained with {k};
    - when no near-exact callee is left (or none exists for the skill), the subtask goes to the
      two best remaining callees at once, one answering and one cross-checking; its dependents
      wait. Two OK answers that agree settle it; a disagreement or a failed check goes to a
      tie-breaker (the best near-exact callee, even one that failed before: failures can be
      transient), whose answer stands;
    - an OK answer that is no usable value is its callee's failure like any other, except that
      the callee is never asked that subtask again; a call that took it as input is dropped
      (not that callee's fault) and sent again on the new answer; when no callee is left for a
      subtask, the policy gives up (<answer>unknown</answer>) instead of repeating calls;
    - every decision is stated in the turn's <think> line, in a few words.
    """
    think = True
    recover = True

    def __init__(self, task: Task, seed: int = 0):
        self.task, self.rng = task, random.Random(seed)
        self.solved: dict[int, str] = {}        # subtask id -> call id whose result is OK
        self.call_of: dict[str, int] = {}       # call id -> subtask id
        self.route: dict[int, list[str]] = {}   # subtask id -> callee(s) for its next attempt
        self.failed: dict[int, set[str]] = {}   # subtask id -> callees that failed it
        self.votes: dict[int, list[tuple[str, str, str]]] = {}   # cross-checked: (call id, text, callee)
        self.unusable: dict[int, set[str]] = {}  # subtask id -> callees whose OK answer was no usable value
        self.inputs: dict[str, list[str]] = {}   # call id -> the call ids its {k} references name
        self.next_id = 1
        self.notes: list[str] = []
        self.callees: list[CalleeInfo] = []

    def __call__(self, messages: list[dict]) -> str:
        if not self.callees:
            self.callees = read_pool(messages[0]["content"])
        self.read_results(last_state(messages))
        final = self.task.subtasks[-1].id if self.task.subtasks else None
        if final is not None and final in self.solved:
            return f"<answer>{{{self.solved[final]}}}</answer>"   # the result by reference, as calls do
        todo = self.choose([s for s in self.task.subtasks if s.id not in self.solved])
        calls = self.write_calls(todo)
        if not calls:
            return "<answer>unknown</answer>"
        head = f"<think>{self.plan_note(todo)}</think>\n" if self.think else ""
        return head + "\n".join(calls)

    # -- reading the state --------------------------------------------------------------------

    def read_results(self, results) -> None:
        """Results come in call order, so a call's inputs are read before it. An OK answer that
        is no usable value (`unusable`) counts as that callee's failure, and is never chained
        on; a call that took one as input is the input's victim, not a failure of its own
        callee: its result is dropped and it is sent again once its input is re-asked."""
        self.notes = []
        by_subtask: dict[int, list] = {}
        tainted: set[str] = set()
        for call_id, callee, status, text in results:
            sid = self.call_of.get(call_id)
            if sid is None:
                continue
            if any(i in tainted for i in self.inputs.get(call_id, ())):
                tainted.add(call_id)
                continue
            why = self.unusable_value(sid, text) if status == "OK" and self.recover else None
            if why:
                tainted.add(call_id)
                self.unusable.setdefault(sid, set()).add(callee)
                status, text = "UNUSABLE", why
            by_subtask.setdefault(sid, []).append((call_id, callee, status, text))
        for sid, rows in by_subtask.items():
            if sid in self.votes:
                self.read_check(sid, rows)
                continue
            ok = [r for r in rows if r[2] == "OK"]
            if ok:
                self.solve(sid, ok[0][0])
            for call_id, callee, status, text in rows:
                if status != "OK" and not text.startswith("dependency"):   # its own failure
                    self.on_failure(sid, status, call_id, callee, text)

    def unusable_value(self, sid: int, text: str) -> str | None:
        """Why an OK answer cannot be used as this subtask's value, or None. It will be pasted
        into another task or be the final answer, so it must be a short single value, and a
        number where arithmetic needs one (a math result may also be yes/no, or True/False)."""
        value = text.strip()
        if not value:
            return "an empty answer"
        if len(value) > MAX_VALUE_CHARS or "\n" in value:
            return "a long answer, not a value"
        feeds_math = any(sid in s.deps and s.kind == "math" for s in self.task.subtasks)
        own_math = self.kind(sid) == "math"
        truth = own_math and value.lower() in ("yes", "no", "true", "false")   # a comparison; Python prints True
        if (feeds_math or own_math) and not (_VALUE_NUMBER.fullmatch(value) or truth):
            return "not a number"
        if re.search(r'[:"]|\.$', value):
            return "a sentence, not a value"
        return None

    def solve(self, sid: int, call_id: str) -> None:
        self.solved[sid] = call_id
        self.route.pop(sid, None)
        self.votes.pop(sid, None)

    def on_failure(self, sid: int, status: str, call_id: str, callee: str, why: str = "") -> None:
        verb = {"TIMEOUT": "timed out", "UNUSABLE": f"gave {why}"}.get(status, "failed")
        if not self.recover:
            return                                    # a baseline: the same routing again
        self.failed.setdefault(sid, set()).add(callee)
        ranking = self.ranking(sid)
        if not ranking:                               # every able callee gave an unusable answer
            self.route[sid] = []
            self.notes.append(f"call {call_id} {verb}, no other callee for it")
            return
        left = [c for c in ranking if c.name not in self.failed[sid]]
        exact = [c for c in left if c.skills[self.kind(sid)] >= NEAR_EXACT]
        if exact:
            self.route[sid] = [exact[0].name]
            self.notes.append(f"call {call_id} {verb}, re-route to {exact[0].name}")
        elif len(left) >= 2:
            self.route[sid], self.votes[sid] = [left[0].name, left[1].name], []
            self.notes.append(f"call {call_id} {verb}, re-route to {left[0].name}, cross-check with {left[1].name}")
        else:
            target = (left or ranking)[0].name if ranking else callee
            self.failed[sid] = set()
            self.route[sid] = [target]
            self.notes.append(f"call {call_id} {verb}, " + ("retry" if target == callee else "re-route to") + f" {target}")

    def read_check(self, sid: int, rows) -> None:
        """A cross-checked subtask: agreement settles it, an exact tie-breaker overrules."""
        skill = self.kind(sid)
        level = {c.name: c.skills.get(skill, 0.0) for c in self.callees}
        for call_id, callee, status, text in rows:
            if status == "OK" and level.get(callee, 0.0) >= NEAR_EXACT:
                self.notes.append(f"{callee} settles it")
                self.solve(sid, call_id)
                return
            if status == "OK":
                self.votes[sid].append((call_id, text, callee))
        counts = Counter(_normalized(t) for _, t, _ in self.votes[sid])
        agreed = [v for v in self.votes[sid] if counts[_normalized(v[1])] >= 2]
        if agreed:
            ids = [v[0] for v in self.votes[sid] if v[1] == agreed[0][1]]
            self.notes.append(f"calls {ids[0]} and {ids[1]} agree")
            self.solve(sid, agreed[0][0])
            return
        ranking = self.ranking(sid)
        if not ranking and not self.votes[sid]:      # every able callee gave an unusable answer
            self.route[sid] = []
            self.notes.append(f"no callee left for subtask {sid}")
            return
        if not ranking:                              # only one usable answer is left: it stands
            self.solve(sid, self.votes[sid][0][0])
            return
        exact = [c for c in ranking if c.skills[skill] >= NEAR_EXACT]
        asked = {v[2] for v in self.votes[sid]} | {r[1] for r in rows}
        target = (exact or [c for c in ranking if c.name not in asked] or ranking)[0].name
        self.route[sid] = [target]
        failed = [(r[0], "timed out" if r[2] == "TIMEOUT" else "failed") for r in rows if r[2] != "OK"]
        if len(self.votes[sid]) >= 2:
            why = f"calls {self.votes[sid][-2][0]} and {self.votes[sid][-1][0]} disagree"
        else:
            why = " and ".join(f"call {cid} {verb}" for cid, verb in failed) or "no second answer"
        self.notes.append(f"{why}, {'retry' if target in {r[1] for r in rows} else 'ask'} {target}")

    # -- routing and writing --------------------------------------------------------------------

    def kind(self, sid: int) -> str:
        return self.task.subtasks[sid - 1].kind

    def ranking(self, sid: int) -> list[CalleeInfo]:
        """Able callees for the subtask, best first, without those whose answer was unusable."""
        unusable = self.unusable.get(sid, set())
        return [c for c in rank_for(self.kind(sid), self.callees) if c.name not in unusable]

    def callee_for(self, sid: int) -> str:
        """First choice: the most accurate callee for the subtask's skill."""
        ranking = self.ranking(sid)
        return ranking[0].name if ranking else self.callees[0].name

    def targets(self, sid: int) -> list[str]:
        if sid in self.route:
            return self.route[sid]
        ranking = self.ranking(sid)
        if not ranking and self.unusable.get(sid):
            return []
        if self.recover and len(ranking) >= 2 and ranking[0].skills[self.kind(sid)] < NEAR_EXACT:
            # no exact callee for this skill: answer and cross-check from the start
            self.route[sid], self.votes[sid] = [ranking[0].name, ranking[1].name], []
            return self.route[sid]
        return [self.callee_for(sid)]

    def choose(self, unsolved):
        """Which unsolved subtasks to send this turn (all of them; subclasses narrow it)."""
        return unsolved

    def write_calls(self, todo) -> list[str]:
        ids: dict[int, str] = {sid: cid for sid, cid in self.solved.items()}
        ends: dict[int, float] = {}              # this turn's subtasks: estimated end, for queueing
        load, info = _Load(), {c.name: c for c in self.callees}
        lines = []
        for s in todo:
            if any(d not in ids for d in s.deps):
                continue
            task = s.task
            for d in s.deps:
                task = task.replace("{%d}" % d, "{%s}" % ids[d])
            ready = max((ends.get(d, 0.0) for d in s.deps), default=0.0)
            targets = self.targets(s.id)
            if len(targets) == 1 and s.id not in self.votes and targets[0] in info:
                targets = [self.spread(s.id, info[targets[0]], ready, load)]
            for callee in targets:
                cid = str(self.next_id)
                self.next_id += 1
                self.call_of[cid] = s.id
                self.inputs[cid] = [ids[d] for d in s.deps]
                lines.append(f'<call id="{cid}" to="{callee}">{task}</call>')
                end = load.take(info[callee], ready) if callee in info else ready
                if s.id not in self.votes:   # a cross-checked result is not chained on yet
                    ids[s.id], ends[s.id] = cid, end
        return lines

    def spread(self, sid: int, first: CalleeInfo, ready: float, load: "_Load") -> str:
        """A call that would queue behind this turn's other calls to a callee with a concurrency
        limit goes to the near-exact callee for its skill that would finish it first (the first
        choice on a tie); one that would not queue, or has no near-exact alternative, stays."""
        skill = self.kind(sid)
        if load.finish(first, ready) <= ready + first.latency or first.skills.get(skill, 0.0) < NEAR_EXACT:
            return first.name
        options = [c for c in self.ranking(sid)
                   if c.skills[skill] >= NEAR_EXACT and c.name not in self.failed.get(sid, set())]
        best = min([first] + options, key=lambda c: load.finish(c, ready))
        if best is not first:
            self.notes.append(f"{first.name} is busy, call {self.next_id} to {best.name}")
        return best.name

    def plan_note(self, todo) -> str:
        if self.notes:
            return "; ".join(self.notes) + "."
        kinds = Counter(s.kind for s in todo)
        ready = sum(1 for s in todo if not s.deps or all(d in self.solved for d in s.deps))
        parts = ", ".join(f"{n} {k}" for k, n in kinds.items())
        if ready == len(todo):
            return f"{parts}; all independent, send in parallel."
        return f"{parts}; {ready} can start now, the rest wait via {{k}}."


class _Load:
    """The oracle's estimate of one turn's queues: when each slot of a callee with a concurrency
    limit frees, in seconds from the turn's start, given the calls written so far."""

    def __init__(self):
        self.free: dict[str, list[float]] = {}

    def finish(self, c: CalleeInfo, ready: float) -> float:
        slots = self.free.get(c.name)
        return max(ready, min(slots)) + c.latency if slots else ready + c.latency

    def take(self, c: CalleeInfo, ready: float) -> float:
        end = self.finish(c, ready)
        if c.concurrency:
            slots = self.free.setdefault(c.name, [0.0] * c.concurrency)
            slots[slots.index(min(slots))] = end
        return end


class ParallelOracle(GraphPolicy):
    pass


CALL_TEXT = re.compile(_CALL.pattern + r"(.*?)</call>", re.S)   # a call with its task (dagger.py reads turns with it)
_REF = re.compile(r"\{([^{}]*)\}")


def _normalized(text: str) -> str:
    """Case and spacing aside: how two answers, or a call's task and a subtask's, are compared."""
    return " ".join(text.lower().split())


def take_over(oracle: GraphPolicy, messages: list[dict]) -> GraphPolicy:
    """Bring a fresh oracle to the state of a conversation that someone else (a model) played,
    so that calling it writes the turn it would write from there: the teacher of on-policy
    distillation (dagger.py).

    The other player's calls are read the way the oracle reads its own. A call counts as work on
    a subtask when its task, with each {k} naming the subtask that call k worked on, is that
    subtask's task (case and spacing aside); any other call (a misspelled entity, an invented
    subtask, a value pasted where {k} belongs) is ignored, so its subtask is sent again. A call to a
    callee that lacks the skill is read as a call to a callee that failed it (re-routed, its
    dependents re-sent at once). A call to a callee able but below near-exact for the subtask's
    skill is a cross-check vote, not a settled answer, exactly as when the oracle asks two weak
    callees itself: one weak answer is not trusted
    (unless the oracle had routed the subtask to that callee alone, as its last resort), and
    a weak callee asked the same subtask again is no second opinion (the repeat is ignored).
    Every state but the last is read here; the oracle's own call reads the last, so that its
    <think> line states what it saw there.
    """
    oracle.callees = read_pool(messages[0]["content"])
    template = {_normalized(s.task): s.id for s in oracle.task.subtasks}
    level = {c.name: c.skills for c in oracle.callees}
    voters: dict[int, set[str]] = {}   # subtask id -> weak callees already asked it
    for i in range(2, len(messages), 2):        # assistant turns; each state follows its turn
        for call_id, callee, text in CALL_TEXT.findall(messages[i]["content"]):
            call_id, callee, text = html.unescape(call_id), html.unescape(callee), html.unescape(text)
            if call_id.isdigit():
                oracle.next_id = max(oracle.next_id, int(call_id) + 1)
            refs = _REF.findall(text)
            if any(r not in oracle.call_of for r in refs):
                continue
            sid = template.get(_normalized(_REF.sub(lambda m: "{%d}" % oracle.call_of[m.group(1)], text)))
            weak = sid is not None and 0.0 < level.get(callee, {}).get(oracle.kind(sid), 0.0) < NEAR_EXACT
            if sid is None or sid in oracle.solved or (weak and callee in voters.get(sid, ())):
                continue
            oracle.call_of[call_id], oracle.inputs[call_id] = sid, refs
            if weak and oracle.route.get(sid) != [callee]:   # not the oracle's own last resort
                oracle.votes.setdefault(sid, [])
                voters.setdefault(sid, set()).add(callee)
        if i + 2 < len(messages):
            oracle.read_results(last_state(messages[:i + 2]))
    return oracle


def teacher_turn(task: Task, messages: list[dict], seed: int = 0) -> str:
    """The parallel oracle's turn from the state `messages` ends in, whoever played before."""
    return take_over(ParallelOracle(task, seed), messages)(messages)


class SerialOracle(GraphPolicy):
    """The same routing, one call per turn, no in-turn chaining."""

    def choose(self, unsolved):
        ready = [s for s in unsolved if all(d in self.solved for d in s.deps)]
        return ready[:1]

    def plan_note(self, todo) -> str:
        return "; ".join(self.notes) + "." if self.notes else "One subtask at a time."


class SingleCallee(GraphPolicy):
    """Oracle decomposition, every call to one callee ('best' = best mean read accuracy)."""
    think = False
    recover = False

    def __init__(self, task: Task, name: str, seed: int = 0):
        super().__init__(task, seed)
        self.name = name

    def callee_for(self, sid: int) -> str:
        if self.name == "best":
            return max(self.callees, key=lambda c: (sum(c.skills.values()), -c.latency)).name
        return self.name


class RandomRouting(GraphPolicy):
    """Oracle decomposition, each call to a uniformly random callee."""
    think = False
    recover = False

    def callee_for(self, sid: int) -> str:
        return self.rng.choice(self.callees).name


class Vote(GraphPolicy):
    """Every agent gets every subtask; the majority of OK answers wins. Votes happen between
    rounds, so the graph is walked level by level with values pasted in (no {k})."""
    think = False

    def __init__(self, task: Task, seed: int = 0):
        super().__init__(task, seed)
        self.values: dict[int, str] = {}
        self.ballots: dict[int, list[str]] = {}

    def __call__(self, messages):
        if not self.callees:
            self.callees = read_pool(messages[0]["content"])
        for call_id, _, status, text in last_state(messages):
            sid = self.call_of.get(call_id)
            if sid is not None and status == "OK":
                self.ballots.setdefault(sid, []).append(text)
        for sid, ballot in self.ballots.items():
            self.values.setdefault(sid, Counter(ballot).most_common(1)[0][0])
        final = self.task.subtasks[-1].id
        if final in self.values:
            return f"<answer>{self.values[final]}</answer>"
        agents = [c for c in self.callees if c.kind == "agent"] or self.callees
        lines = []
        for s in self.task.subtasks:
            if s.id in self.values or any(d not in self.values for d in s.deps):
                continue
            task = s.resolve(self.values)
            for agent in agents:
                cid = str(self.next_id)
                self.next_id += 1
                self.call_of[cid] = s.id
                lines.append(f'<call id="{cid}" to="{agent.name}">{task}</call>')
        return "\n".join(lines) or "<answer>unknown</answer>"


SCRIPTED = ("oracle", "serial-oracle", "single:best", "random", "vote")


def scripted_policy(name: str, task: Task, seed: int = 0) -> Policy:
    """A fresh policy for one episode (scripted policies keep per-episode state)."""
    if name == "oracle":
        return ParallelOracle(task, seed)
    if name == "serial-oracle":
        return SerialOracle(task, seed)
    if name.startswith("single:"):
        return SingleCallee(task, name.split(":", 1)[1], seed)
    if name == "random":
        return RandomRouting(task, seed)
    if name == "vote":
        return Vote(task, seed)
    raise ValueError(f"unknown scripted policy {name!r}; expected one of {SCRIPTED} or single:<callee>")
