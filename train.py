"""What both training stages share: the run folder, checkpoints with their training state and
resume, AdamW with warm-up and cosine decay, metrics and the progress line, periodic evaluation.
sft.py and grpo.py keep only what is particular to their stage.

Design choices, and why:
- A run is a folder, runs/<stage>/<name>/: `config.json` (the exact config, written once),
  `metrics.jsonl` (one JSON object per logged step), and `checkpoints/step-NNNNNN/`, each a
  plain HF-layout checkpoint that `model.load_model` (and transformers) read. The training
  state sits in the same folder, written in the same atomic rename: `training_state.json`
  (step, data position, schedule, RNG states) and `optimizer.safetensors` (AdamW moments by
  parameter name). Nothing is pickled, so a checkpoint never runs code when it is read.
- `runs/<stage>/latest` is a relative symlink to the newest finished run's final checkpoint,
  replaced atomically; infer.py follows it.
- Resume is exact: the data order is a function of (seed, epoch), the training state records
  how far into it the run got, so a killed run continues the same batches, and its loss curve
  continues the first one (a test kills one with SIGKILL).
- The learning rate is a pure function of the step (linear warm-up, cosine to a floor), so it
  needs no scheduler object to save.
- With --lora-rank R the base is frozen whole and a LoRA adapter (lora.py) is what trains: the
  optimizer, the gradient clip, the checkpoints and resume see the adapter only, and its
  checkpoints are PEFT adapter folders naming the base they were trained on.
- Decoupled weight decay only on matrices (not on norms, biases or embeddings), the usual
  choice for transformers.
"""
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch

import cli
import lora
from env import EnvConfig, RewardConfig
from evaluation import evaluate, run_checkpoints
from model import load_model, read_config, save_model
from tasks import SPLITS


@dataclass
class TrainConfig:
    """Knobs shared by both stages (each entry point adds its own)."""
    name: str = cli.field("", "run name: runs/<stage>/<name> (default: <time>-seed<seed>)", "run")
    resume: bool = cli.field(False, "continue run --name (default: the newest run of this stage) "
                             "from its last checkpoint", "run")
    seed: int = cli.field(0, "seed for data, init and sampling", "run")
    device: str = cli.field("auto", "cpu or cuda (auto: cuda if available)", "run")
    runs_dir: str = cli.field("runs", "where runs are written", "run")
    precision: str = cli.field("auto", "fp32, or bf16-mixed (fp32 weights and AdamW state, bf16 autocast in the "
                               "training passes); auto: bf16-mixed on CUDA, fp32 on CPU", "run")
    dist_timeout: float = cli.field(1800.0, "under torchrun: seconds a rank waits for the others before it stops "
                                    "(longer than rank 0's data generation and periodic evaluation)", "run")
    lr: float = cli.field(3e-3, "peak learning rate", "optimizer")
    min_lr_frac: float = cli.field(0.1, "final learning rate as a fraction of --lr (cosine decay)", "optimizer")
    warmup_steps: int = cli.field(30, "linear warm-up steps", "optimizer")
    weight_decay: float = cli.field(0.01, "AdamW decoupled weight decay (matrices only)", "optimizer")
    beta2: float = cli.field(0.99, "AdamW beta2", "optimizer")
    grad_clip: float = cli.field(1.0, "clip the global gradient norm to this (0 = off)", "optimizer")
    ckpt_every: int = cli.field(100, "save a resumable checkpoint every N steps (0 = only at the end)", "run")
    log_every: int = cli.field(10, "print the progress line every N steps (0 = only at the end)", "run")
    eval_every: int = cli.field(200, "greedy held-out evaluation every N steps (0 = only at the end)", "eval")
    eval_n: int = cli.field(64, "tasks per periodic evaluation (0: no evaluation)", "eval")
    eval_split: str = cli.field("heldout", "split of the periodic evaluation", "eval")
    eval_pool: str = cli.field("seen", "pool of the periodic evaluation", "eval")
    eval_mask: bool = cli.field(True, "the periodic evaluation decodes under the protocol mask (--no-eval-mask: "
                                "unconstrained, so its protocol score is the format the model learned)", "eval")
    eval_seed: int = cli.field(0, "seed of the periodic evaluation's tasks and pool draws (not --seed: runs of "
                               "every training seed are compared on the same tasks)", "eval")


@dataclass
class LoraOptions:
    """LoRA flags, the same in both stages."""
    lora_rank: int = cli.field(0, "train a LoRA adapter of this rank on the frozen base (0: fine-tune the weights "
                               "themselves, as --freeze-layers leaves them)", "lora")
    lora_alpha: float = cli.field(32.0, "LoRA alpha: the adapter's output is scaled by alpha / rank", "lora")
    lora_targets: list[str] = cli.field(list(lora.TARGETS), "linear layers that get an adapter, by checkpoint "
                                        "name", "lora")
    lora_layers: list[int] = cli.field([], "layer indices that get adapters, negative ones counted from the top as "
                                       "in Python (-1: the last layer); none given: every layer", "lora")


def lora_spec(config, num_layers: int) -> lora.LoraSpec:
    """The adapter's spec, --lora-layers resolved to indices from 0 (the adapter_config names
    those, as peft does)."""
    layers = tuple(i + num_layers if -num_layers <= i < 0 else i for i in config.lora_layers)
    return lora.LoraSpec(config.lora_rank, config.lora_alpha, tuple(config.lora_targets), layers or None)


def check_lora(config, init: str) -> None:
    """Refuse bad LoRA flags at the start, before a run folder exists: one line each."""
    if config.lora_rank == 0:
        return
    cli.check(config.lora_rank > 0, f"--lora-rank {config.lora_rank}: must be 0 (off) or more")
    cli.check(bool(init), f"--lora-rank {config.lora_rank} needs a pretrained base to adapt (--init CHECKPOINT); "
                          "a new model (--preset) trains every weight: add --lora-rank 0")
    cli.check(config.freeze_layers == 0, "--freeze-layers is for full fine-tuning; with --lora-rank choose the "
                                         "adapted layers with --lora-layers")
    try:
        layers = read_config(lora.root_base(init)).num_hidden_layers
    except (OSError, ValueError) as e:
        raise TrainingError(f"--init {init}: " + str(e).replace("\n", " ")) from None
    try:
        lora.check_spec(lora_spec(config, layers), layers)
    except ValueError as e:
        raise TrainingError(str(e).replace("\n", " ")) from None


def add_adapter(model, config, init: str) -> "lora.Adapter | None":
    """With --lora-rank: freeze the whole base and hook a new adapter (B = 0: the model is
    unchanged until it trains) into it, naming `init` as its base. None without."""
    if config.lora_rank == 0:
        return None
    model.requires_grad_(False)
    return lora.Adapter(model, lora_spec(config, model.config.num_hidden_layers), lora.base_name(init),
                        seed=config.seed)


# ---------------------------------------------------------------- precision

PRECISIONS = ("auto", "fp32", "bf16-mixed")


def precision_of(precision: str, device) -> str:
    """--precision resolved: auto is bf16-mixed on CUDA, fp32 elsewhere (this CPU has no fast bf16)."""
    if precision not in PRECISIONS:
        raise TrainingError(f"--precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "bf16-mixed" if torch.device(device).type == "cuda" else "fp32"
    return precision


def autocast(precision: str, device):
    """The context training passes run in. Weights and AdamW moments are fp32 in every mode
    (models are loaded for training with dtype=torch.float32): a bf16 weight rounds away any
    update under 1/256 of itself, so at lr 2e-4 most of a step would be lost. bf16-mixed runs
    the matmuls in bf16 under torch.autocast; losses are taken in fp32."""
    device_type = torch.device(device).type
    return torch.autocast(device_type, dtype=torch.bfloat16, enabled=precision_of(precision, device) == "bf16-mixed")


# ---------------------------------------------------------------- run folders

class TrainingError(cli.UsageError):
    """A problem a user can fix (missing or broken checkpoint, bad flags): one clear line."""


def check_config(config, init_pending: bool = False) -> None:
    """The knobs both stages share, refused in one line before any work: no data generated, no
    model loaded, no run folder made. `init_pending`: --init is the default checkpoint, still to
    be converted (convert_gguf.default_checkpoint_missing), so its folder is not checked here."""
    check = cli.check
    check(config.steps >= 1, f"--steps must be at least 1 (got {config.steps})")
    for flag in ("ckpt_every", "log_every", "eval_every", "warmup_steps"):
        value = getattr(config, flag)
        check(value >= 0, f"--{flag.replace('_', '-')} must be 0 or more (got {value})")
    check(config.eval_n >= 0, f"--eval-n must be 0 (no evaluation) or more (got {config.eval_n})")
    check(config.lr > 0, f"--lr must be positive (got {config.lr})")
    check(config.eval_split in SPLITS, f"--eval-split {config.eval_split!r}: expected one of {', '.join(SPLITS)}")
    check(config.freeze_layers >= 0, f"--freeze-layers must be 0 or more (got {config.freeze_layers})")
    if config.init and not init_pending:
        check(os.path.isdir(config.init), f"--init {config.init}: the folder does not exist (a checkpoint was expected)")
        check(any(os.path.isfile(os.path.join(config.init, f)) for f in ("config.json", lora.CONFIG_FILE)),
              f"--init {config.init}: not a checkpoint or adapter folder (no config.json or {lora.CONFIG_FILE} in it)")
    precision_of(config.precision, "cpu")


def run_dir(config, stage: str) -> Path:
    """The run folder: a new one, or (with --resume) an existing one."""
    stage_dir = Path(config.runs_dir) / stage
    if config.resume:
        if config.name:
            path = stage_dir / config.name
        else:
            runs = sorted((p for p in stage_dir.glob("*") if (p / "config.json").is_file()),
                          key=lambda p: p.stat().st_mtime)
            if not runs:
                raise TrainingError(f"--resume: no run in {stage_dir} to resume")
            path = runs[-1]
        if not (path / "config.json").is_file():
            raise TrainingError(f"--resume: {path} is not a run folder (no config.json)")
        return path
    name = config.name or time.strftime("%Y%m%d-%H%M%S") + f"-seed{config.seed}"
    path = stage_dir / name
    if (path / "config.json").exists():
        raise TrainingError(f"{path} already exists: pass --resume to continue it, or another --name")
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(asdict(config), indent=2, default=str) + "\n")
    return path


def resumed_config(config, stage: str, explicit: set[str]):
    """With --resume, the run's own config.json, with only the flags given explicitly on this
    command line (`explicit`, e.g. --steps to extend it) overriding it: `python sft.py --resume
    --name R` continues R as it was started, not with this command's defaults. Overrides hold
    for this command only (config.json is not rewritten: a command that then fails must not
    change the run), and the progress log names them."""
    if not config.resume:
        return config
    path = run_dir(config, stage)
    try:
        saved = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise TrainingError(f"--resume: cannot read {path / 'config.json'}: {e}") from None
    known = {f.name for f in fields(config)}
    values = {k: v for k, v in saved.items() if k in known}
    values.update({k: getattr(config, k) for k in explicit})
    values.update(resume=True, name=path.name)
    merged = replace(config, **values)
    changed = sorted(k for k in explicit - {"resume", "name"} if saved.get(k) != getattr(merged, k))
    flags = ", ".join(cli.flag_name(k) for k in changed)
    print(f"resume: the config of {path}" + (f", overridden by {flags}" if changed else ""), file=sys.stderr)
    # A flag added after the run started takes its default now, which may not be how it ran:
    # say so, so that the flag can be given to continue the run as it began.
    absent = sorted(known - set(saved) - explicit - {"resume", "name"})
    if absent:
        print(f"resume: {path / 'config.json'} predates " + ", ".join(
            f"{cli.flag_name(k)} (now {getattr(merged, k)!r})" for k in absent), file=sys.stderr)
    return merged


def set_latest(run: Path, checkpoint: Path) -> None:
    """Point runs/<stage>/latest at a finished checkpoint (relative symlink, atomic replace)."""
    latest = run.parent / "latest"
    tmp = run.parent / f".latest-{os.getpid()}"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    tmp.symlink_to(os.path.relpath(checkpoint, run.parent))
    os.replace(tmp, latest)


# ---------------------------------------------------------------- optimizer and schedule

def make_optimizer(model: torch.nn.Module, config) -> torch.optim.AdamW:
    decay, rest = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 and "embed" not in name else rest).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": config.weight_decay},
                              {"params": rest, "weight_decay": 0.0}],
                             lr=config.lr, betas=(0.9, config.beta2), eps=1e-8)


def lr_at(step: int, total: int, config) -> float:
    """Linear warm-up to --lr, then cosine decay to --lr * --min-lr-frac at `total` steps."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = min(1.0, (step - config.warmup_steps) / max(1, total - config.warmup_steps))
    floor = config.lr * config.min_lr_frac
    return floor + (config.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def freeze_slices(model, slices: dict[str, tuple[slice, ...]]) -> None:
    """Keep parts of tensors fixed: their gradient is zeroed as it is computed, so AdamW's
    moments for them stay zero and its update is zero (weight decay alone still shrinks them,
    by lr * weight_decay a step)."""
    params = dict(model.named_parameters())
    for name, index in slices.items():
        mask = torch.ones_like(params[name])
        mask[index] = 0
        params[name].register_hook(lambda grad, mask=mask: grad * mask)


def freeze_bottom(model, n: int) -> None:
    """Freeze the embeddings (so a tied output layer too) and the first n layers: no gradient,
    no optimizer state, and no backward through them."""
    if n == 0:
        return
    if not 0 < n < len(model.model.layers):
        raise TrainingError(f"--freeze-layers {n}: the model has {len(model.model.layers)} layers; "
                            f"leave at least one to train")
    model.model.embed_tokens.requires_grad_(False)
    for layer in model.model.layers[:n]:
        layer.requires_grad_(False)


def optimizer_step(model, optimizer, lr: float, grad_clip: float) -> float:
    """Set the lr, clip, step, zero the grads; returns the pre-clip gradient norm. `model` is
    what trains: the model, or its LoRA adapter."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(norm)


# ---------------------------------------------------------------- checkpoints and resume

def _optimizer_tensors(model, optimizer) -> dict[str, torch.Tensor]:
    names = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for p, state in optimizer.state.items():
        for key, value in state.items():
            out[f"{names[id(p)]}.{key}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return out


def save_checkpoint(run: Path, step: int, model, tokenizer_dir, optimizer, state: dict, adapter=None) -> Path:
    """An HF-layout checkpoint plus everything resume needs, in one atomic write; with an
    adapter, the adapter folder (PEFT layout) and its optimizer state only."""
    state = {**state, "step": step, "python_rng": random.getstate(),
             "torch_rng": torch.get_rng_state().tolist()}
    path = run / "checkpoints" / f"step-{step:06d}"
    extra_files = {"training_state.json": json.dumps(state, default=list) + "\n"}
    extra_tensors = {"optimizer.safetensors": _optimizer_tensors(adapter or model, optimizer)}
    if adapter is not None:
        adapter.save(path, tokenizer_dir, extra_files, extra_tensors)
    else:
        save_model(model, path, tokenizer_dir=tokenizer_dir, extra_files=extra_files, extra_tensors=extra_tensors)
    return path


def load_training_state(path: Path, model, optimizer, adapter=None) -> dict:
    """Load weights (the adapter's, with one), optimizer moments and RNG states from a
    checkpoint into the live objects; every problem is a TrainingError naming the file or tensor."""
    from safetensors.torch import load_file
    try:
        if adapter is not None:
            adapter.load_weights(path)
        else:
            loaded = load_model(path, device=next(model.parameters()).device, dtype=next(model.parameters()).dtype)
        state = json.loads((path / "training_state.json").read_text())
        moments = load_file(str(path / "optimizer.safetensors"))
    except (OSError, ValueError, json.JSONDecodeError) as e:
        raise TrainingError(f"cannot resume from {path}: {e}") from None
    try:
        if adapter is None:
            model.load_state_dict(loaded.state_dict())
    except RuntimeError as e:   # a flag changed the model's shape since the run started
        first = next((line.strip() for line in str(e).splitlines()[1:] if line.strip()), str(e))
        raise TrainingError(f"cannot resume from {path}: the checkpoint does not fit the model this config "
                            f"builds ({first[:200]})") from None
    params = dict((adapter or model).named_parameters())
    for name, value in moments.items():
        pname, key = name.rsplit(".", 1)
        if pname not in params:
            raise TrainingError(f"cannot resume from {path}: optimizer.safetensors has {name}, "
                                f"which names no parameter of the model")
        p = params[pname]
        if key != "step" and value.shape != p.shape:
            raise TrainingError(f"cannot resume from {path}: optimizer tensor {name} has shape "
                                f"{list(value.shape)}, expected {list(p.shape)}")
        optimizer.state[p][key] = value.to(p.device) if key != "step" else value
    version, internal, gauss = state["python_rng"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(torch.tensor(state["torch_rng"], dtype=torch.uint8))
    return state


def saved_init(checkpoint: Path | None) -> str:
    """The checkpoint a run started from, as its training state recorded it ("" if none or
    unreadable: load_training_state then names the problem)."""
    try:
        return json.loads((checkpoint / "training_state.json").read_text()).get("init", "") if checkpoint else ""
    except (OSError, ValueError):
        return ""


def resume_point(run: Path) -> Path | None:
    """The newest checkpoint of a run that has its training state (None: start afresh)."""
    for path in reversed(run_checkpoints(run)):
        if (path / "training_state.json").is_file():
            return path
    return None


# ---------------------------------------------------------------- metrics and progress

class Metrics:
    """metrics.jsonl (one object per call) and a one-line progress report on stderr; both
    nothing when write is False (a rank other than 0 under torchrun)."""

    def __init__(self, run: Path, total_steps: int, start_step: int = 0, write: bool = True):
        self.path = run / "metrics.jsonl"
        self.total, self.start_step, self.start_time, self.write = total_steps, start_step, time.time(), write
        if write and self.path.is_file():   # a resumed run: drop the rows of steps it will redo
            rows = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= start_step]
            self.path.write_text("".join(r + "\n" for r in rows))

    def log(self, row: dict) -> None:
        if not self.write:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")

    def progress(self, step: int, **values) -> None:
        if not self.write:
            return
        done = step - self.start_step
        elapsed = time.time() - self.start_time
        eta = elapsed / max(1, done) * (self.total - step)
        parts = " ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in values.items())
        print(f"step {step}/{self.total} {parts} elapsed {elapsed / 60:.1f}m eta {eta / 60:.1f}m",
              file=sys.stderr, flush=True)


# ---------------------------------------------------------------- evaluation

def evaluate_policy(policy, split: str, pool: str, n: int, seed: int, env_config=None,
                    reward_config=None, batch: int = 32, mask: bool = True) -> dict:
    """Greedy evaluation of an in-memory policy.Policy through the real environment, on the
    same tasks and pool draws as `python infer.py --eval`."""
    was_training = policy.model.training
    policy.model.eval()
    try:
        with torch.no_grad():
            return evaluate(policy, pool, split, n, seed, env_config or EnvConfig(),
                            reward_config or RewardConfig(), batch=batch, quiet=True, mask=mask)
    finally:
        policy.model.train(was_training)


def due(step: int, every: int, last: int) -> bool:
    """Whether an every-N-steps action (log, eval, checkpoint) runs at this 1-based step: every
    `every` steps, and always at the last step; every = 0 means only at the last."""
    return (every > 0 and step % every == 0) or step == last


def periodic_eval(policy, config, step: int) -> dict:
    """The held-out evaluation both stages log: `eval_*` metrics for the step's row, and one
    line on stderr. Nothing with --eval-n 0."""
    if config.eval_n == 0:
        return {}
    start = time.time()
    s = evaluate_policy(policy, config.eval_split, config.eval_pool, config.eval_n, config.eval_seed,
                        mask=config.eval_mask)
    row = {f"eval_{k}": s[k] for k in ("success", "protocol", "rounds", "latency", "cost", "reward")}
    row["eval_seconds"] = time.time() - start
    print(f"eval step {step}: success {s['success']:.3f} protocol {s['protocol']:.3f} rounds {s['rounds']:.2f} "
          f"latency {s['latency']:.2f}s cost {s['cost']:.4f} ({config.eval_n} {config.eval_split} tasks, "
          f"{row['eval_seconds']:.0f}s)", file=sys.stderr)
    return row
