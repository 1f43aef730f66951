"""Stage 2: GRPO through the environment, with the four-part reward (success, protocol,
diversity, efficiency).

    python grpo.py                                  from runs/sft/latest, about 15 minutes on 2 cores
    python grpo.py --init runs/sft/<run>/checkpoints/step-000600
    python grpo.py --serial-only                    ablation: one call per turn
    python grpo.py --w-latency 0 --w-cost 0 --w-token 0 --w-extra-round 0   ablation: no efficiency terms
    python grpo.py --init runs/sft/latest --lora-rank 16 --kl-coef 0.01   a LoRA adapter; KL to the base, adapter off
    python grpo.py --resume

Design choices, and why:
- A step samples --prompts prompts (a training task, each in a world of its own, and a fresh
  pool draw), then --group episodes of each, all played at once by policy.play_batch: one
  engine, the G episodes of a prompt are branches of ONE prefix (its KV stored once), each
  state message appended to its own branch. The engine records every generated token's
  log-prob under the sampling policy: the "old" log-probs of the ratio.
- Rewards are env.group_rewards, so the group-diversity term is live; every term is logged.
  --failure-rate-max samples each prompt's injected failure rate in [0, max], so recovery is
  practised under RL too.
- The loss is rl_loss.grpo_loss (advantages, clipped ratio with separate low/high bounds, k3
  KL to a frozen reference, masked aggregation). Prompt and state-message tokens are masked;
  truncated episodes are masked out or kept with their (penalized) reward (--truncated).
  Groups with zero reward variance carry no signal (their advantages are 0) and are dropped
  from the training pass by default (--drop-zero-variance), but always counted.
- Rollouts decode under the protocol mask (protocol_mask.py; --no-mask turns it off), and the
  training pass takes each generated token's log-prob over the tokens its mask allowed (the
  mask id the engine recorded per token), for the policy and the KL reference alike: the
  importance ratio compares the distribution that sampled, not the unmasked one. The protocol
  reward stays, so that the model also learns the format it would need without the mask.
- --serial-only sets the environment's max_calls_per_turn to 1: a second call in a turn is a
  PARSE_ERR, the protocol's own way of refusing an action, so the reward's protocol term
  penalizes it and the call is not run (a reward-only penalty would still let parallel calls
  buy their latency advantage).
- --lora-rank R trains a LoRA adapter (train.add_adapter) on the --init model (an adapter
  folder as --init is merged into its base first, and the new adapter names it as its base).
  The rollouts run with the adapter merged into the weights (lora.Adapter.merged), and the KL
  reference is the same weights with the adapter off (lora.AdapterOff): the initial policy,
  without a second copy of the model.
- Weights, the KL reference and AdamW state are fp32 on every device; --precision bf16-mixed
  (the CUDA default) runs only the training passes under bf16 autocast (train.autocast). The
  rollouts stay at the weights' fp32, since the engine's caches take the weights' dtype.
"""
import copy
import dataclasses
import random
import sys
import time
from dataclasses import dataclass

import torch

import cli
import dataparallel
import lora
import rl_loss
import train
from env import EnvConfig, Episode, EpisodeResult, RewardConfig, group_rewards
from evaluation import latest_of, resolve_device, summarize
from policy import Policy, play_batch, prefix_kv, suffix_logits
from tasks import task_at, task_world
from tools import load_pool


@dataclass
class GRPOOptions:
    init: str = cli.field("", "checkpoint to start from (default: runs/sft/latest)", "model")
    freeze_layers: int = cli.field(0, "freeze the embeddings (and a tied output layer) and the first N layers", "model")
    steps: int = cli.field(100, "GRPO steps (one rollout batch each)", "optimizer")
    prompts: int = cli.field(4, "prompts (task + pool draw) per step", "rollout")
    group: int = cli.field(8, "episodes per prompt (G)", "rollout")
    temperature: float = cli.field(1.0, "sampling temperature of the rollouts", "rollout")
    max_new_tokens: int = cli.field(160, "longest assistant turn in a rollout, in tokens", "rollout")
    max_suffix_len: int = cli.field(1536, "tokens an episode may add after its prompt; longer ends truncated", "rollout")
    failure_rate_max: float = cli.field(0.2, "each prompt's injected failure rate is drawn in [0, this]", "rollout")
    pool: str = cli.field("seen", "pool (family) of the rollouts", "rollout")
    serial_only: bool = cli.field(False, "ablation: one call per turn (a second call is PARSE_ERR)", "rollout")
    mask: bool = cli.field(True, "protocol-constrained decoding in the rollouts, and the same mask in the "
                           "training pass's log-probs", "rollout")
    std_normalize: bool = cli.field(False, "divide advantages by their group's std", "loss")
    clip_low: float = cli.field(0.2, "lower clip of the importance ratio (1 - clip_low)", "loss")
    clip_high: float = cli.field(0.28, "upper clip of the importance ratio (1 + clip_high)", "loss")
    kl_coef: float = cli.field(0.0, "k3 KL to the initial model (0: no reference model is kept)", "loss")
    aggregation: str = cli.field("token-mean", "loss aggregation: token-mean or constant (Dr.GRPO)", "loss",
                                 choices=["token-mean", "constant"])
    norm_tokens: int = cli.field(256, "tokens per episode of the 'constant' normalizer", "loss")
    truncated: str = cli.field("mask", "truncated episodes: mask (no loss) or penalize (keep their reward)",
                               "loss", choices=["mask", "penalize"])
    drop_zero_variance: bool = cli.field(True, "leave groups whose rewards are all equal out of the training pass", "loss")
    updates_per_batch: int = cli.field(1, "optimizer steps per rollout batch", "loss")
    # A full fine-tune of SmolLM2-135M keeps about 2.5 MB of activations a token for backward:
    # 8192 ran a 24 GB machine out of memory on long rollouts; 4096 peaked at 17 GB (docs/training.md).
    micro_batch_tokens: int = cli.field(4096, "tokens per forward/backward pass", "loss")
    shared_prefix_train: bool = cli.field(True, "training pass: a group's prompt computed once, its episodes "
                                          "attending to its K/V (equal to the plain pass, about 2x faster at G=8)",
                                          "loss")


# GRPO's optimizer defaults differ from SFT's: a smaller step from a trained model
GRPOConfig = dataclasses.make_dataclass(
    "GRPOConfig", cli.config_fields(GRPOOptions) + cli.config_fields(train.LoraOptions)
    + cli.config_fields(train.TrainConfig, lr=2e-4, warmup_steps=5, ckpt_every=25, eval_every=50,
                          log_every=1, eval_n=64)
    + cli.config_fields(EnvConfig) + cli.config_fields(RewardConfig))


# ---------------------------------------------------------------- rollouts

@dataclass
class Rollout:
    ids: list[int]          # prompt + everything after it
    mask: list[int]         # 1 on generated tokens (next-token positions, aligned with ids[1:])
    logp_old: list[float]   # aligned with ids[1:], 0 where mask is 0
    reward: float
    prompt_len: int = 0     # the prompt's tokens: ids[:prompt_len], shared by the episode's group
    advantage: float = 0.0
    mask_ids: list[int] | None = None   # aligned with ids[1:]: the protocol mask each token was sampled under (-1: none)


def rollout_step(policy: Policy, config, step: int, generator,
                 world=dataparallel.World()) -> tuple[list[EpisodeResult], list[Rollout], dict]:
    """This rank's share of the --prompts (whole groups) x --group episodes, played on one
    engine: their scored results (group rewards included), token streams and timing."""
    env = cli.sub_config(EnvConfig, config)
    if config.serial_only:
        env.max_calls_per_turn = 1
    reward_config = cli.sub_config(RewardConfig, config)
    episodes = []
    for p in world.shard(range(config.prompts)):
        index = step * config.prompts + p
        task = task_at("train", index, 1000 + config.seed)   # tasks SFT (seed 0..) did not use
        rng = random.Random(f"grpo:{config.seed}:{index}")
        pool = load_pool(config.pool, task_world(task), rng)
        episode_env = dataclasses.replace(env, failure_rate=rng.uniform(0, config.failure_rate_max))
        for g in range(config.group):
            # identical opening messages: the group shares one prefix in the engine
            episodes.append(Episode(task, pool, episode_env, reward_config, seed=f"grpo:{index}:{g}"))
    t = time.time()
    params = policy.chat_params(config.temperature, max_new_tokens=config.max_new_tokens)
    if config.mask:   # the last step's mask ids are spent: drop its compiled states
        policy.protocol_mask.clear()
    with torch.no_grad():
        engine, branch_of = play_batch(policy, episodes, params, config.max_suffix_len, generator, mask=config.mask)
    rollout_seconds = time.time() - t
    results = [e.result() for e in episodes]
    for k in range(0, len(results), config.group):
        group_rewards(results[k:k + config.group], reward_config)
    rollouts = []
    for episode, result, b in zip(episodes, results, branch_of):
        prompt = policy.tokenizer.encode_chat(episode.messages[:2])
        tokens, logps = engine.tokens[b], engine.logprobs[b]
        learn = [lp is not None for lp in logps]
        if episode.truncated and config.truncated == "mask":
            learn = [False] * len(learn)
        ids = prompt + tokens
        mask = [0] * (len(prompt) - 1) + [int(x) for x in learn]
        logp_old = [0.0] * (len(prompt) - 1) + [lp if lp is not None else 0.0 for lp in logps]
        mask_ids = [-1] * (len(prompt) - 1) + engine.mask_ids[b] if config.mask else None
        rollouts.append(Rollout(ids, mask, logp_old, result.reward, len(prompt), mask_ids=mask_ids))
    generated = sum(sum(1 for lp in engine.logprobs[b] if lp is not None) for b in branch_of)
    stats = {"rollout_seconds": rollout_seconds, "generated_tokens": generated,
             "rollout_tokens_per_s": generated / max(rollout_seconds, 1e-9)}
    return results, rollouts, stats


# ---------------------------------------------------------------- the training pass

def sequence_logprobs(model, ids: torch.Tensor, allowed=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of each next token [B, T-1] (with grad) and the entropy of each next-token
    distribution [B, T-1] (no grad)."""
    return logprobs_and_entropy(model(ids[:, :-1]), ids[:, 1:], allowed)


def logprobs_and_entropy(logits: torch.Tensor, targets: torch.Tensor, allowed=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of each target under its logits (with grad), and each distribution's entropy (no
    grad). `allowed` (bool [..., V], or None): the distribution is renormalized over these tokens."""
    logits = logits.float()
    if allowed is not None:
        logits = logits.masked_fill(~allowed, float("-inf"))
    logp_all = torch.log_softmax(logits, -1)
    with torch.no_grad():
        entropy = torch.special.entr(logp_all.exp()).sum(-1)
    return logp_all.gather(-1, targets[..., None]).squeeze(-1), entropy


def allowed_rows(masks, rows: list[list[int] | None], width: int, device):
    """bool [B, width, V] of the tokens each position's protocol mask allowed (every token where a
    rollout has no mask id, -1), or None when no position of the batch was masked."""
    if masks is None or all(r is None or max(r, default=-1) < 0 for r in rows):
        return None
    ids = _pad([(r if r is not None else [])[:width] for r in rows], -1, torch.long, "cpu")
    ids = torch.nn.functional.pad(ids, (0, width - ids.shape[1]), value=-1)
    return masks.rows(ids).to(device)


def _pad(rows: list[list], value, dtype, device) -> torch.Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=dtype, device=device)


def micro_batches(rollouts: list[Rollout], budget: int, skip: int = 0, spread: float = 1.25) -> list[list[Rollout]]:
    """Similar lengths together: each batch's padded size within `budget` tokens, and its longest
    episode at most `spread` times its shortest, so padding stays small (lengths not counting
    the first `skip` tokens of each episode: a shared prompt computed apart)."""
    out, batch = [], []
    for r in sorted(rollouts, key=lambda r: len(r.ids)):
        size = len(r.ids) - skip
        if batch and ((len(batch) + 1) * size > budget or size > spread * (len(batch[0].ids) - skip)):
            out.append(batch)
            batch = []
        batch.append(r)
    return out + ([batch] if batch else [])


def plain_passes(model, reference, rollouts: list[Rollout], budget: int, device, masks=None):
    """Each episode in full, in micro-batches of similar lengths. Yields (episodes, mask,
    old log-probs, logprobs(m) -> (log-probs, entropies) [B, T-1], tokens run). With `masks`
    (a protocol_mask.ProtocolMask), log-probs are over the tokens each position's mask allowed."""
    for batch in micro_batches(rollouts, budget):
        ids = _pad([r.ids for r in batch], 0, torch.long, device)
        allowed = allowed_rows(masks, [r.mask_ids for r in batch], ids.shape[1] - 1, device)
        yield (batch, _pad([r.mask for r in batch], 0, torch.float32, device),
               _pad([r.logp_old for r in batch], 0.0, torch.float32, device),
               lambda m, ids=ids, allowed=allowed: sequence_logprobs(m, ids, allowed), ids.numel())


def shared_passes(model, reference, rollouts: list[Rollout], budget: int, device, masks=None):
    """The episodes of each prompt: the prompt (less its last token) runs ONCE (policy.prefix_kv);
    the rest of each episode attends to its K/V (policy.suffix_logits), in micro-batches of
    similar suffix lengths, so that neither padding nor memory grows with the group. The
    micro-batches see the prompt's K/V as detached leaves; once the caller has run backward on
    every micro-batch of a group, their summed gradient flows through the prompt's graph in one
    backward. Same yields as plain_passes; the gradient equals the plain pass's."""
    groups: dict[tuple, list[Rollout]] = {}
    for r in rollouts:
        groups.setdefault(tuple(r.ids[:r.prompt_len]), []).append(r)
    for group in groups.values():
        P = group[0].prompt_len - 1
        if P < 1:   # nothing to share
            yield from plain_passes(model, reference, group, budget, device, masks)
            continue
        kv, lengths = prefix_kv(model, [group[0].ids[:P]])
        # a frozen layer's K/V needs no gradient (--freeze-layers): its leaf asks for none
        leaves = [tuple(t.detach().requires_grad_(t.requires_grad) for t in pair) for pair in kv]
        kv_of = {id(model): leaves}
        if reference is not None:
            with torch.no_grad():
                kv_of[id(reference)] = prefix_kv(reference, [group[0].ids[:P]])[0]
        for n, batch in enumerate(micro_batches(group, budget, skip=P)):
            suffixes = [r.ids[P:] for r in batch]
            ids = _pad(suffixes, 0, torch.long, device)
            allowed = allowed_rows(masks, [r.mask_ids[P:] if r.mask_ids is not None else None for r in batch],
                                   ids.shape[1] - 1, device)

            def logprobs(m, suffixes=suffixes, ids=ids, allowed=allowed):
                logits = suffix_logits(m, kv_of[id(m)], lengths, suffixes, [0] * len(suffixes))
                return logprobs_and_entropy(logits[:, :-1], ids[:, 1:], allowed)
            yield (batch, _pad([r.mask[P:] for r in batch], 0, torch.float32, device),
                   _pad([r.logp_old[P:] for r in batch], 0.0, torch.float32, device), logprobs,
                   ids.numel() + (P if n == 0 else 0))
        grads = [(t, leaf.grad) for pair, leaves_pair in zip(kv, leaves) for t, leaf in zip(pair, leaves_pair)
                 if leaf.grad is not None]
        if grads:
            torch.autograd.backward([t for t, _ in grads], [g for _, g in grads])


def train_on(model, reference, optimizer, rollouts: list[Rollout], config, lr: float, device,
             world=dataparallel.World(), trainable=None, masks=None) -> dict:
    """One optimizer step on the rollouts (gradient accumulated over micro-batches): each
    episode in full, or (--shared-prefix-train) each group's prompt once (shared_passes).
    Under torchrun, `rollouts` are this rank's; the loss is normalized by the whole batch's.
    `trainable`: what the optimizer updates, if not the model itself (its LoRA adapter).
    `masks`: the protocol_mask.ProtocolMask the rollouts' mask ids belong to (None: no mask)."""
    total_tokens, episodes = map(int, world.sum(sum(sum(r.mask) for r in rollouts), len(rollouts)))
    sums = {"clip_fraction": 0.0, "kl": 0.0, "ratio": 0.0, "entropy": 0.0, "loss": 0.0}
    trained_tokens = 0
    passes = shared_passes if config.shared_prefix_train else plain_passes
    # The passes (and the prompt's backward in shared_passes) run under autocast; the rollouts'
    # old log-probs came from the engine at the weights' fp32, so under bf16-mixed the first
    # update's ratio is off 1 by bf16's roundoff, well inside the clip range.
    with train.autocast(config.precision, device):
        for batch, mask, logp_old, logprobs, tokens in passes(model, reference, rollouts, config.micro_batch_tokens,
                                                              device, masks):
            adv = torch.tensor([r.advantage for r in batch], dtype=torch.float32, device=device)
            logp, entropy = logprobs(model)
            logp_ref = None
            if reference is not None:
                with torch.no_grad():
                    logp_ref, _ = logprobs(reference)
            loss, stats = rl_loss.grpo_loss(logp, logp_old, adv, mask, config.clip_low, config.clip_high,
                                            config.kl_coef, logp_ref, config.aggregation, config.norm_tokens,
                                            total_tokens=total_tokens, episodes=episodes)
            loss.backward()
            n = mask.sum().item()
            for k in ("clip_fraction", "kl", "ratio"):
                sums[k] += stats[k] * n
            sums["entropy"] += (entropy * mask).sum().item()
            sums["loss"] += loss.item()
            trained_tokens += tokens
    sums = dict(zip(sums, world.sum(*sums.values())))
    trained_tokens = int(world.sum(trained_tokens)[0])
    world.sum_grads(trainable or model)
    grad_norm = train.optimizer_step(trainable or model, optimizer, lr, config.grad_clip)
    out = {k: v / max(1, total_tokens) for k, v in sums.items() if k != "loss"}
    return out | {"loss": sums["loss"], "grad_norm": grad_norm, "train_tokens": trained_tokens}


def all_ranks(world, results: list[EpisodeResult], flat: torch.Tensor, rstats: dict):
    """Every rank's episodes, zero-variance flags and rollout timing, for rank 0's metrics row
    (the ranks play at the same time: the rollout took the slowest rank's seconds)."""
    if world.size == 1:
        return results, flat, rstats
    shares = world.gather((results, flat.tolist(), rstats))
    generated, seconds = sum(s["generated_tokens"] for *_, s in shares), max(s["rollout_seconds"] for *_, s in shares)
    return ([r for res, _, _ in shares for r in res], torch.tensor([f for _, fl, _ in shares for f in fl]),
            {"rollout_seconds": seconds, "generated_tokens": generated,
             "rollout_tokens_per_s": generated / max(seconds, 1e-9)})


def episode_stats(results: list[EpisodeResult], flat_groups: torch.Tensor) -> dict:
    """The step's rollout metrics: evaluation.summarize's means (rewards as scored for training,
    group diversity included), each reward term as r_<term>, the format-error rate and the
    fraction of groups whose rewards are all equal."""
    s = summarize(results, [])
    terms = s.pop("reward_terms")
    for key in ("latency_width3", "n_width3"):
        s.pop(key)
    s["format_error_rate"] = sum(r.parse_errors > 0 or r.outside_turns > 0 for r in results) / len(results)
    s["zero_variance_groups"] = flat_groups.float().mean().item()
    return s | {f"r_{term}": value for term, value in terms.items()}


# ---------------------------------------------------------------- the run

def check_config(config) -> None:
    train.check_config(config)
    check = cli.check
    for flag in ("prompts", "group", "max_new_tokens", "max_suffix_len", "updates_per_batch", "micro_batch_tokens"):
        value = getattr(config, flag)
        check(value >= 1, f"--{flag.replace('_', '-')} must be at least 1 (got {value})")
    check(0.0 <= config.failure_rate_max <= 1.0,
          f"--failure-rate-max is a probability, in [0, 1] (got {config.failure_rate_max})")
    check(config.temperature > 0, f"--temperature must be positive: GRPO samples its groups (got {config.temperature})")


def run(config, world=dataparallel.World()) -> int:
    check_config(config)
    cli.log_config(config)
    cli.check(config.prompts % world.size == 0, f"--prompts {config.prompts} on {world.size} ranks: each rank plays "
              "whole groups, so --prompts must be a multiple of the number of ranks")
    device = resolve_device(config.device)
    precision = train.precision_of(config.precision, device)
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    # a new run's folder is made only once its start has loaded: a bad start leaves nothing behind
    resumed = world.first(lambda: train.run_dir(config, "grpo")) if config.resume else None
    resume_from = train.resume_point(resumed) if resumed else None
    # A resumed run keeps the start it was given (its KL reference), even if sft/latest has moved on.
    init = config.init or train.saved_init(resume_from) or latest_of(config.runs_dir, "sft") or ""
    if not init:
        raise train.TrainingError(f"no SFT checkpoint to start from ({config.runs_dir}/sft/latest does not exist): "
                                  "run `python sft.py` first, or pass --init CHECKPOINT")
    train.check_lora(config, init)
    try:
        policy = Policy.load(init, device=device, dtype=torch.float32)  # fp32 master weights (train.autocast)
    except (OSError, ValueError) as e:
        raise train.TrainingError(f"--init {init}: {e}") from None
    run_path = resumed or world.first(lambda: train.run_dir(config, "grpo"))
    model = policy.model
    adapter = train.add_adapter(model, config, init)
    trainable = adapter or model   # what the optimizer updates and the checkpoints hold
    if adapter is None:
        train.freeze_bottom(model, config.freeze_layers)
    if config.kl_coef == 0:
        reference = None
    elif adapter is not None:
        reference = lora.AdapterOff(model, adapter)
    else:
        reference = copy.deepcopy(model).eval().requires_grad_(False)
    optimizer = train.make_optimizer(trainable, config)
    generator = torch.Generator(device).manual_seed(config.seed + 1_000_003 * world.rank)  # each rank its own
    step = 0
    if resume_from is not None:
        state = train.load_training_state(resume_from, model, optimizer, adapter)
        step = state["step"]
        generators = state.get("generators", [state["generator"]])
        if len(generators) == world.size:
            generator.set_state(torch.tensor(generators[world.rank], dtype=torch.uint8))
        else:   # a valid continuation, not the rollouts an uninterrupted run would have played
            generator.manual_seed(config.seed + 1_000_003 * world.rank + step)
            print(f"resume: the run sampled on {len(generators)} rank(s), this one on {world.size}: "
                  f"sampling re-seeded", file=sys.stderr)
        print(f"resumed from {resume_from} at step {step}", file=sys.stderr)
    world.check_same(model, step)
    print(f"grpo: {init} -> {run_path} ({device}, {precision})", file=sys.stderr)
    metrics = train.Metrics(run_path, config.steps, step, write=world.main)
    path = resume_from
    while step < config.steps:
        t0 = time.time()
        model.eval()
        with lora.merged(adapter):
            results, rollouts, rstats = rollout_step(policy, config, step, generator, world)
        model.train()
        rewards = torch.tensor([r.reward for r in rollouts]).view(-1, config.group)   # this rank's groups
        advantages = rl_loss.group_advantages(rewards, config.std_normalize).flatten().tolist()
        for r, a in zip(rollouts, advantages):
            r.advantage = a
        flat = rewards.max(dim=1).values == rewards.min(dim=1).values      # [prompts]
        keep = [r for k, r in enumerate(rollouts)
                if sum(r.mask) > 0 and not (config.drop_zero_variance and flat[k // config.group])]
        t1 = time.time()
        lr = train.lr_at(step, config.steps, config)
        tstats = {}
        trained, = world.sum(len(keep))
        for _ in range(config.updates_per_batch if trained else 0):
            tstats = train_on(model, reference, optimizer, keep, config, lr, device, world=world, trainable=trainable,
                              masks=policy.protocol_mask if config.mask else None)
        train_seconds = time.time() - t1
        step += 1
        results, flat, rstats = all_ranks(world, results, flat, rstats)
        row = {"step": step, "lr": lr, **episode_stats(results, flat), **rstats, **tstats,
               "train_seconds": train_seconds, "trained_episodes": int(trained),
               "train_tokens_per_s": tstats.get("train_tokens", 0) * config.updates_per_batch / max(train_seconds, 1e-9)}
        if world.main and train.due(step, config.eval_every, config.steps):
            with lora.merged(adapter):
                row |= train.periodic_eval(policy, config, step)
        row["step_seconds"] = time.time() - t0
        metrics.log(row)
        if train.due(step, config.log_every, config.steps):
            metrics.progress(step, reward=row["reward"], success=row["success"], protocol=row["protocol"],
                             zero_var=row["zero_variance_groups"], kl=row.get("kl", 0.0),
                             rollout_s=round(rstats["rollout_seconds"], 1), train_s=round(train_seconds, 1))
        if train.due(step, config.ckpt_every, config.steps):
            generators = world.gather(generator.get_state().tolist())
            if world.main:
                path = train.save_checkpoint(run_path, step, model, lora.tokenizer_folder(init), optimizer,
                                             {"generator": generators[0], "generators": generators, "init": init},
                                             adapter)
    if world.main:
        train.set_latest(run_path, path)
        print(f"done: {path} ({run_path.parent}/latest)", file=sys.stderr)
    return 0


@cli.entry_point
def main(argv=None) -> int:
    config = cli.parse_config(GRPOConfig, argv, description=__doc__.split("\n\n")[0])
    config = train.resumed_config(config, "grpo", cli.explicit_fields(GRPOConfig, argv))
    with dataparallel.launch(resolve_device(config.device), config.dist_timeout) as world:
        return run(config, world)


if __name__ == "__main__":
    dataparallel.exit_process(main())
