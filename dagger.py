"""The oracle corrects mistakes: on-policy distillation (DAgger: the model plays, the oracle
writes the turn it would write from each state reached), and planted mistakes (the oracle's own
first turn made wrong, as a trained model makes it wrong, then the oracle's recovery).

    rows = collect(policy, episodes=96, seed=0, failure_rate=0.15)   # sft.py --dagger 96
    policy = Mistaken(task, seed, random.Random(0))                   # sft.py --mistakes 0.5

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
- Planted mistakes (`Mistaken`, sft.py --mistakes P) reach the commonest of those states without
  a model playing, so they cost no decoding: one call of the oracle's first turn is made wrong
  the way a trained model's calls are wrong (sent to a tool that lacks its skill, an entity
  with letters dropped, a word of the relation dropped), and half the time the next turn sends
  the same wrong call again, as the model does. Those turns are context, not targets; from the
  state they leave, the oracle takes over (baselines.teacher_turn) and its turns are learned.
"""
import random
import re

from baselines import CALL_TEXT, ParallelOracle, read_pool, teacher_turn
from env import EnvConfig, Episode
from evaluation import play_episodes
from tasks import task_at, task_world
from tools import load_pool

FIRST_TASK = 1_000_000   # training task indices from here on: no oracle episode uses them
_THINK = re.compile(r"<think>.*?</think>", re.S)
_ENTITY_WORD = re.compile(r"\b[A-Z][a-z]{4,}\b")   # long enough that dropping letters leaves a word


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
    env = EnvConfig(failure_rate=failure_rate)
    tasks, played = [], []
    for i in range(episodes):
        task = task_at("train", FIRST_TASK + i, seed)
        draw = random.Random(f"dagger-pool:{seed}:{i}")
        tasks.append(task)
        played.append(CappedEpisode(Episode(task, load_pool(pool, task_world(task), draw), env,
                                            seed=f"dagger:{seed}:{i}"), turns))
    # one engine for all of them: a finished episode's row goes to the next at once (greedy, so
    # the same turns as batch after batch, without each batch waiting for its slowest episode)
    play_episodes(policy, played, list(range(episodes)), batch=batch, quiet=quiet)
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


# ---------------------------------------------------------------- planted mistakes

def plant_mistake(oracle: ParallelOracle, turn: str, system_prompt: str, rng: random.Random) -> tuple[str, str] | None:
    """The oracle's turn (the last it wrote) with one call made wrong, and that call's wrong line;
    None when no call in it can be. The mistakes are the ones a trained model makes: the call sent
    to a tool that lacks its skill, an entity with one or two letters dropped, or a word of a
    lookup's relation dropped ("birth of X" for "birth year of X"). Each makes the call fail,
    deterministically."""
    options = {"route": [], "spelling": [], "relation": []}
    tools = [c for c in read_pool(system_prompt) if c.kind == "tool"]
    for call_id, callee, text in CALL_TEXT.findall(turn):
        subtask = oracle.task.subtasks[oracle.call_of[call_id] - 1]   # the oracle knows what it sent
        line = f'<call id="{call_id}" to="{callee}">{text}</call>'
        for tool in tools:
            if subtask.kind not in tool.skills:
                options["route"].append((line, f'<call id="{call_id}" to="{tool.name}">{text}</call>'))
        for word in _ENTITY_WORD.findall(text) if subtask.kind == "lookup" else ():   # a text tool takes any word
            cut = rng.randrange(1, len(word) - 2)
            short = word[:cut] + word[cut + rng.choice((1, 2)):]
            options["spelling"].append((line, line.replace(f">{text}<", ">" + text.replace(word, short, 1) + "<")))
        words = text.split()
        relation = [k for k, w in enumerate(words[:-2]) if w.islower() and w != "of" and words[k + 1] != "of"]
        if subtask.kind == "lookup" and relation:   # "founding year of X": drop "year", not "founding"
            k = rng.choice(relation) + 1
            options["relation"].append((line, line.replace(f">{text}<", ">" + " ".join(words[:k] + words[k + 1:]) + "<")))
    kinds = [k for k, v in options.items() if v]
    if not kinds:
        return None
    line, wrong = rng.choice(options[rng.choice(kinds)])   # the kind first: a turn has many more routes
    return turn.replace(line, wrong, 1), wrong


class Mistaken:
    """A scripted policy (baselines' interface) whose first turn carries a planted mistake, and
    half the time a second turn that repeats the wrong call; from then on the oracle takes over.
    `mistaken_turns` says how many of its first turns are mistakes (0 when the first turn had
    no call to make wrong: then it is the plain oracle throughout)."""

    def __init__(self, task, seed: int, rng: random.Random):
        self.task, self.seed, self.rng = task, seed, rng
        self.oracle = ParallelOracle(task, seed)
        self.mistaken_turns, self.wrong_call = 0, ""

    def __call__(self, messages: list[dict]) -> str:
        turn_number = len(messages) // 2   # system prompt and question, then a turn and a state each
        if turn_number == 1:
            turn = self.oracle(messages)
            planted = plant_mistake(self.oracle, turn, messages[0]["content"], self.rng)
            if planted is None:
                return turn
            self.mistaken_turns, (turn, self.wrong_call) = 1, planted
            return turn
        if not self.mistaken_turns:
            return self.oracle(messages)
        if turn_number == 2 and self.rng.random() < 0.5:
            self.mistaken_turns = 2
            call_id, callee, text = CALL_TEXT.findall(self.wrong_call)[0]
            return (f"<think>call {call_id} failed, retry.</think>\n"   # the next id: the oracle's own next one
                    f'<call id="{self.oracle.next_id}" to="{callee}">{text}</call>')
        return teacher_turn(self.task, messages, self.seed)
