"""Playing and scoring episodes on task sets: the one evaluation harness, shared by infer.py
(the command line) and train.py (periodic evaluation during SFT and GRPO).

Design choices, and why:
- `play_episodes` is the one place that turns a policy into play: a scripted name is a
  `policy(messages) -> str` from baselines.py, played one episode at a time; a checkpoint folder
  or a loaded policy.Policy plays a batch of episodes at once on one engine (policy.play_batch:
  each episode one branch, state messages appended to it, identical prompts sharing one KV
  copy). torch is never imported unless a model plays.
- Every task is drawn from its own world (tasks.task_at), and its pool is built on that world,
  so evaluation never reuses a world from training.
- POOL "seen" is the randomized training family, drawn anew for every episode (seeded);
  "unseen" cycles through all unseen pools (pools/unseen-*.json); anything else is a pool name
  in pools/ or a JSON file path.
"""
import glob
import os
import random
import sys
import time

from baselines import scripted_policy
from env import EnvConfig, Episode, EpisodeResult, RewardConfig, play
from tasks import HELDOUT_COMPOSITIONS, graph_width, make_tasks, task_world, world_for_split
from tools import POOLS_DIR, load_pool, read_pool_spec


# ---------------------------------------------------------------- policies

def resolve_device(device: str) -> str:
    import torch
    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


def latest_of(runs_dir, stage: str) -> str | None:
    """The checkpoint runs/<stage>/latest names (a symlink, or a text file holding the
    folder's path), or None."""
    latest = os.path.join(runs_dir, stage, "latest")
    if os.path.islink(latest) or os.path.isdir(latest):
        return os.path.realpath(latest) if os.path.exists(latest) else None
    if os.path.isfile(latest):
        target = open(latest).read().strip()
        return target if os.path.isabs(target) else os.path.join(runs_dir, stage, target)
    return None


def run_checkpoints(run) -> list:
    """A run folder's checkpoints (runs/<stage>/<name>/checkpoints/step-*), oldest first."""
    from pathlib import Path
    return sorted((Path(run) / "checkpoints").glob("step-*"))


def latest_checkpoint(runs_dir: str = "runs") -> str | None:
    """The newest finished checkpoint: runs/grpo/latest, else runs/sft/latest."""
    return latest_of(runs_dir, "grpo") or latest_of(runs_dir, "sft")


def play_episodes(policy, episodes: list[Episode], indices: list[int], device: str = "auto",
                  temperature: float = 0.0, max_new_tokens: int = 256, seed: int = 0, batch: int = 16,
                  max_suffix_len: int = 2048, quiet: bool = False, mask: bool = True) -> None:
    """Play every episode to its end. A scripted policy plays them one by one (`indices` seed
    them); a checkpoint folder (or an already loaded policy.Policy) plays `batch` episodes at a
    time on one engine (policy.play_batch: all playing episodes decode together, a finished
    episode's row goes to the next one at once, identical prompts share KV; an episode longer
    than `max_suffix_len` tokens ends as truncated).
    Checkpoint play reports its progress on stderr, a line whenever turns end, unless `quiet`; it
    decodes under the protocol mask unless `mask` is False."""
    if isinstance(policy, str) and not os.path.isdir(policy):
        for episode, index in zip(episodes, indices):
            play(episode, scripted_policy(policy, episode.task, index))
        return
    import torch
    from policy import Policy as ModelPolicy, play_batch
    if isinstance(policy, str):
        model = ModelPolicy.load(policy, device=resolve_device(device))
    else:
        model = policy
    params = model.chat_params(temperature, max_new_tokens=max_new_tokens)
    generator = torch.Generator(model.model.output_weight().device).manual_seed(seed)
    start, tokens = time.perf_counter(), 0

    def progress(turns, playing, new_tokens):
        nonlocal tokens
        tokens += new_tokens
        elapsed = time.perf_counter() - start
        print(f"play: episodes {len(episodes) - playing}/{len(episodes)} done, {turns} turns, {tokens} tokens, "
              f"{tokens / elapsed:.1f} tok/s, {elapsed:.1f}s", file=sys.stderr, flush=True)
    play_batch(model, episodes, params, max_suffix_len, generator, on_turn=None if quiet else progress, mask=mask,
               max_rows=batch)


# ---------------------------------------------------------------- pools

def unseen_pool_names() -> list[str]:
    return sorted(os.path.basename(p)[:-5] for p in glob.glob(os.path.join(POOLS_DIR, "unseen-*.json")))


def pool_for_episode(pool: str, world, seed, index: int):
    if pool == "unseen":
        names = unseen_pool_names()
        return load_pool(names[index % len(names)], world)
    spec = read_pool_spec(pool)
    return load_pool(spec, world, random.Random(f"pool:{seed}:{index}") if spec.get("family") else None)


# ---------------------------------------------------------------- evaluation

def evaluate(policy, pool: str, split: str, n: int, seed: int, env_config: EnvConfig,
             reward_config: RewardConfig, device: str = "auto", temperature: float = 0.0,
             max_new_tokens: int = 256, batch: int = 16, max_suffix_len: int = 2048, quiet: bool = False,
             tasks: list | None = None, mask: bool = True, played: list | None = None) -> dict:
    """n tasks of `split` (or the first n of `tasks`, e.g. a JSONL dataset's, whose callees see
    the split's default world, as a free-text query's do), played and summarized. The played
    Episodes are appended to `played` when one is given (infer.py --episodes-out)."""
    source = split if tasks is None else tasks[0].split     # a dataset's tasks carry its path
    tasks = make_tasks(split, n, seed) if tasks is None else tasks[:n]
    n = len(tasks)
    episodes = [Episode(task, pool_for_episode(pool, task_world(task) if task.world_seed is not None
                                               else world_for_split(split), seed, i),
                        env_config, reward_config, seed=f"{seed}:{i}")
                for i, task in enumerate(tasks)]
    play_episodes(policy, episodes, list(range(n)), device, temperature, max_new_tokens, seed, batch, max_suffix_len,
                  quiet, mask)
    if played is not None:
        played.extend(episodes)
    results: list[EpisodeResult] = [e.result() for e in episodes]
    wide_latency = [r.latency for t, r in zip(tasks, results) if graph_width(t.subtasks) >= 3]
    name = policy if isinstance(policy, str) else "model"
    return summarize(results, wide_latency) | {"policy": name, "pool": pool, "split": source, "n": n, "seed": seed}


def summarize(results: list[EpisodeResult], wide_latency: list[float]) -> dict:
    """Means over the episodes. `heldout` mixes train's compositions with the five held out of
    training, so success is also split by composition: `success_trained_compositions` and
    `success_heldout_compositions` (None where the set has no such task), and `by_composition`."""
    def mean(xs):
        xs = list(xs)
        return sum(xs) / len(xs) if xs else 0.0

    def success_of(group):
        return mean(r.success for r in group) if group else None
    by_composition = {}
    for r in results:
        by_composition.setdefault(r.composition, []).append(r)
    return {
        "success": mean(r.success for r in results),
        "protocol": mean(r.protocol_ok for r in results),
        "rounds": mean(r.rounds for r in results),
        "latency": mean(r.latency for r in results),
        "latency_width3": mean(wide_latency),
        "n_width3": len(wide_latency),
        "cost": mean(r.cost for r in results),
        "calls": mean(r.calls for r in results),
        "redundant_calls": mean(r.redundant_calls for r in results),
        "repeated_failures": mean(r.repeated_failures for r in results),
        "answered": mean(r.answer is not None for r in results),
        "parse_errors": mean(r.parse_errors for r in results),
        "tokens": mean(r.tokens for r in results),
        "truncated": mean(r.truncated for r in results),
        "reward": mean(r.reward for r in results),
        "reward_terms": {k: mean(r.rewards[k] for r in results) for k in results[0].rewards} if results else {},
        "success_trained_compositions": success_of([r for r in results if r.composition not in HELDOUT_COMPOSITIONS]),
        "success_heldout_compositions": success_of([r for r in results if r.composition in HELDOUT_COMPOSITIONS]),
        "by_composition": {c: {"n": len(rs), "success": success_of(rs)} for c, rs in sorted(by_composition.items())},
    }
