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
  <think>, then every unsolved subtask at once, chained ones through {k} references; on failure it
  retries a failed call once on EXEC_ERR, re-routes at once on TIMEOUT, and re-routes only to a
  callee the pool calls near-exact (read accuracy >= 0.95), because re-routing to a weak callee
  trades a visible failure for an invisible wrong answer.
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

SKILL_WORDS = {"lookup": ("facts", "knowledge", "trivia", "lookup"),
               "math": ("arithmetic", "math", "calculator", "calculation"),
               "text": ("text", "strings", "string", "spelling")}
LEVEL_WORDS = {"exact": 1.0, "excellent": 0.97, "strong": 0.95, "good": 0.87, "solid": 0.87,
               "fair": 0.75, "mediocre": 0.72, "weak": 0.5, "poor": 0.5}
NEAR_EXACT = 0.95
_RESULT = re.compile(r'<result id="([^"]*)" from="([^"]*)" status="([A-Z_]+)" latency="[^"]*">(.*?)</result>', re.S)


@dataclass
class CalleeInfo:
    name: str
    kind: str
    description: str
    cost: float
    latency: float
    skills: dict[str, float] = field(default_factory=dict)   # skill -> accuracy read from the text


def read_pool(system_prompt: str) -> list[CalleeInfo]:
    """Parse the pool lines '- name | kind | description | cost C | latency Ls'."""
    callees = []
    for line in system_prompt.splitlines():
        parts = line[2:].split(" | ") if line.startswith("- ") else []
        if len(parts) != 5:
            continue
        name, kind, description, cost, latency = parts
        info = CalleeInfo(name, kind, description, float(cost.split()[-1]), float(latency.split()[-1].rstrip("s")))
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
    """(id, callee, status, text) of every result in the latest state message."""
    if len(messages) < 3 or messages[-1]["role"] != "user":
        return []
    return [(i, f, s, html.unescape(t)) for i, f, s, t in _RESULT.findall(messages[-1]["content"])]


class GraphPolicy:
    """Shared machinery: walk the task's subtask graph, track which call solved what, retry.
    Subclasses choose which subtasks to send in a turn and to whom."""
    think = True

    def __init__(self, task: Task, seed: int = 0):
        self.task, self.rng = task, random.Random(seed)
        self.solved: dict[int, str] = {}        # subtask id -> call id whose result is OK
        self.call_of: dict[str, int] = {}       # call id -> subtask id
        self.route: dict[int, int] = {}         # subtask id -> index into its ranking
        self.retried: set[int] = set()
        self.next_id = 1
        self.notes: list[str] = []
        self.callees: list[CalleeInfo] = []
        self.answer_text: dict[str, str] = {}   # call id -> OK result text

    def __call__(self, messages: list[dict]) -> str:
        if not self.callees:
            self.callees = read_pool(messages[0]["content"])
        self.read_results(last_state(messages))
        final = self.task.subtasks[-1].id if self.task.subtasks else None
        if final is not None and final in self.solved:
            return f"<answer>{self.answer_text[self.solved[final]]}</answer>"
        todo = self.choose([s for s in self.task.subtasks if s.id not in self.solved])
        calls = self.write_calls(todo)
        if not calls:
            return "<answer>unknown</answer>"
        head = f"<think>{self.plan_note(todo)}</think>\n" if self.think else ""
        return head + "\n".join(calls)

    def read_results(self, results) -> None:
        self.notes = []
        for call_id, callee, status, text in results:
            sid = self.call_of.get(call_id)
            if sid is None:
                continue
            if status == "OK":
                self.solved[sid], self.answer_text[call_id] = call_id, text
            elif not text.startswith("dependency"):   # its own failure, not an upstream one
                self.on_failure(sid, status, call_id, callee)

    def on_failure(self, sid: int, status: str, call_id: str, callee: str) -> None:
        ranking = self.ranking(sid)
        if status == "EXEC_ERR" and sid not in self.retried:
            self.retried.add(sid)
            self.notes.append(f"call {call_id} failed, retry {callee}")
            return
        self.retried.discard(sid)
        good = [i for i, c in enumerate(ranking) if c.skills[self.kind(sid)] >= NEAR_EXACT]
        current = self.route.get(sid, 0)
        later = [i for i in good if i > current] or good or [current]
        self.route[sid] = later[0]
        target = ranking[later[0]].name if ranking else callee
        verb = "timed out" if status == "TIMEOUT" else "failed again"
        self.notes.append(f"call {call_id} {verb}, " + ("retry" if target == callee else "re-route to") + f" {target}")

    def kind(self, sid: int) -> str:
        return self.task.subtasks[sid - 1].kind

    def ranking(self, sid: int) -> list[CalleeInfo]:
        return rank_for(self.kind(sid), self.callees)

    def callee_for(self, sid: int) -> str:
        ranking = self.ranking(sid)
        return ranking[self.route.get(sid, 0) % len(ranking)].name if ranking else self.callees[0].name

    def choose(self, unsolved):
        """Which unsolved subtasks to send this turn (all of them; subclasses narrow it)."""
        return unsolved

    def write_calls(self, todo) -> list[str]:
        ids: dict[int, str] = {sid: cid for sid, cid in self.solved.items()}
        lines = []
        for s in todo:
            if any(d not in ids for d in s.deps):
                continue
            cid = str(self.next_id)
            self.next_id += 1
            task = s.task
            for d in s.deps:
                task = task.replace("{%d}" % d, "{%s}" % ids[d])
            ids[s.id], self.call_of[cid] = cid, s.id
            lines.append(f'<call id="{cid}" to="{self.callee_for(s.id)}">{task}</call>')
        return lines

    def plan_note(self, todo) -> str:
        if self.notes:
            return "; ".join(self.notes) + "."
        kinds = Counter(s.kind for s in todo)
        ready = sum(1 for s in todo if not s.deps or all(d in self.solved for d in s.deps))
        parts = ", ".join(f"{n} {k}" for k, n in kinds.items())
        if ready == len(todo):
            return f"{parts}; all independent, send in parallel."
        return f"{parts}; {ready} can start now, the rest wait via {{k}}."


class ParallelOracle(GraphPolicy):
    pass


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
