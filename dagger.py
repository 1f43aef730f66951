"""On-policy distillation from the oracle (DAgger): the model plays, the oracle corrects.

    rows = collect(policy, episodes=96, seed=0, failure_rate=0.15)   # sft.py --dagger 96

SFT on the oracle's trajectories shows the model only states the oracle reaches. A trained model
leaves them at its first mistake (a call routed to a callee that cannot do it, an entity
misspelled) and then meets states it was never shown: it keeps calling after it holds the
answer, or repeats a failing call. DAgger's fix is cheap here, because the teacher is a program:
the model plays training tasks, and at states it reached the oracle writes the turn it would
write from there (baselines.teacher_turn); those turns become training targets beside the
oracle's own trajectories.

Design choices, and why:
- A row is the model's conversation up to one state, then the teacher's turn. The model's own
  turns in it are context, marked {"learn": false}: the loss covers the teacher's turn only
  (sft.episode_tokens), so the model learns what to do from its states, not what it did.
- Only states where the teacher's action differs from the model's become rows (the <think>
  line aside: it is the teacher's account of its own reading), plus the state a capped episode
  ends in; at most `per_episode` of them, drawn at random, so one long failing episode does not
  fill the data with its near-identical later states.
- Episodes play at most `turns` turns (the environment's budget, and so its prompt, unchanged):
  the first mistakes happen early, and a model that loops would otherwise spend the whole
  10-turn budget of decoding on states that repeat.
- Play is greedy and under the protocol mask, as the model is evaluated: the states collected
  are the ones its evaluation visits. Tasks are training tasks from an index range the oracle
  data (sft.generate_episodes) does not reach, each on its own pool draw and world.
- One collection per run, from the --init model: a second round of DAgger is another sft.py run
  with --init at the first one's adapter.
"""
import random
import re
import sys
import time

from baselines import teacher_turn
from env import EnvConfig, Episode
from tasks import task_at, task_world
from tools import load_pool

FIRST_TASK = 1_000_000   # training task indices from here on: no oracle episode uses them
_THINK = re.compile(r"<think>.*?</think>", re.S)


def action(turn: str) -> str:
    """A turn without its <think> line and spacing: what it does."""
    return " ".join(_THINK.sub("", turn).split())


class CappedEpisode:
    """An episode that play_batch stops after `turns` turns; the episode itself (its budget, its
    prompt) is untouched."""

    def __init__(self, episode: Episode, turns: int):
        self.episode, self.turns = episode, turns

    @property
    def messages(self):
        return self.episode.messages

    @property
    def done(self):
        return self.episode.done or self.episode.turns >= self.turns

    def step(self, text: str, n_tokens: int | None = None) -> str | None:
        state = self.episode.step(text, n_tokens)
        return None if self.done else state

    def turn_spec(self):
        return self.episode.turn_spec()

    def truncate(self, reason: str) -> None:
        self.episode.truncate(reason)


def states_to_correct(task, messages: list[dict], seed: int) -> list[tuple[int, str]]:
    """(k, teacher's turn) for each state messages[:k] where the teacher would act otherwise than
    the model did, and for the last state if the model has not answered from it yet."""
    out = []
    for k in range(2, len(messages) + 1, 2):
        if messages[k - 1]["role"] != "user":
            break
        teacher = teacher_turn(task, messages[:k], seed)
        if k == len(messages) or action(teacher) != action(messages[k]["content"]):
            out.append((k, teacher))
    return out


def collect(policy, episodes: int, seed: int, failure_rate: float, pool: str = "seen", turns: int = 4,
            per_episode: int = 2, batch: int = 16, quiet: bool = False) -> list[dict]:
    """Play `episodes` training tasks with `policy` (a policy.Policy) and return the rows the
    oracle's corrections make, in sft.py's trajectory format."""
    from policy import play_batch   # deferred: importing this module needs no torch
    params = policy.chat_params(0.0)
    env = EnvConfig(failure_rate=failure_rate)
    tasks, played = [], []
    for i in range(episodes):
        task = task_at("train", FIRST_TASK + i, seed)
        draw = random.Random(f"dagger-pool:{seed}:{i}")
        tasks.append(task)
        played.append(CappedEpisode(Episode(task, load_pool(pool, task_world(task), draw), env,
                                            seed=f"dagger:{seed}:{i}"), turns))
    start = time.perf_counter()
    for k in range(0, episodes, batch):
        play_batch(policy, played[k:k + batch], params)
        if not quiet:
            print(f"dagger: {min(k + batch, episodes)}/{episodes} episodes played in "
                  f"{time.perf_counter() - start:.0f}s", file=sys.stderr, flush=True)
    rows, rng = [], random.Random(f"dagger-pick:{seed}")
    for i, (task, capped) in enumerate(zip(tasks, played)):
        messages = capped.messages
        picks = states_to_correct(task, messages, i)
        for k, teacher in sorted(rng.sample(picks, min(per_episode, len(picks)))):
            context = messages[:2] + [m | {"learn": False} if m["role"] == "assistant" else m for m in messages[2:k]]
            rows.append({"messages": context + [{"role": "assistant", "content": teacher}],
                         "meta": {"dagger": True, "index": FIRST_TASK + i, "turn": k // 2,
                                  "composition": task.composition, "world_seed": task.world_seed,
                                  "gold": task.answer, "model_answered": capped.episode.answer is not None}})
    return rows
