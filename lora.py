"""LoRA adapters for model.Transformer: training, merging for generation, and the PEFT folder
layout (`adapter_config.json` + `adapter_model.safetensors`) that `peft` loads on transformers.

A LoRA adapter adds `scale * B(A(x))` to the output of a linear layer `W`: A is [rank, in],
B is [out, rank], scale = alpha / rank. B starts at zero, so a new adapter leaves the model as
it was; only A and B train, the base weights stay frozen.

Design choices, and why:
- The model does not know about adapters (this module imports model.py, not the reverse). An
  `Adapter` is a separate nn.Module holding A and B, and forward hooks on the target linears
  add their term. The model's own modules, names and state_dict are untouched, so its
  checkpoint table and loader need no change, and the adapter's own state_dict is already in
  peft's tensor names (`base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight`):
  saving is `state_dict()`, with no renaming.
- Generation runs merged (`Adapter.merged()`): each target's weight is replaced by a new
  tensor W + scale * B @ A for the duration, so rollouts and evaluation run the plain model at
  its plain speed; on exit the original weight objects are put back, so the base is restored
  bit for bit (a subtraction would leave roundoff). This costs one more copy of the targeted
  weights while generating. Loading an adapter for inference only merges in place, for good.
- `Adapter.disabled()` runs the base alone: GRPO's KL reference (`AdapterOff`) is the same
  weights with the hooks off, not a second copy of the model.
- Training state holds the adapter and its optimizer moments only: the Adapter is the module
  handed to the optimizer and to train.save_checkpoint; the base is re-read from the folder
  named in adapter_config.json.
- An adapter folder names its base (`base_model_name_or_path`): a path relative to the
  repository root, or absolute. The base may itself be an adapter folder (an SFT adapter that a
  GRPO adapter was trained on): loading merges the chain, innermost first, which is what peft
  users do with `merge_and_unload()` before loading the next adapter.
- A chain flattens into one adapter, exactly (`python lora.py --adapter TOP --out DIR`): the
  merged terms add up to one LoRA term whose rank is the sum of theirs. A release continued from
  an earlier one ships as a single folder that peft loads on the base alone.
- Every stage adds its rank, so a flattened chain grows with each stage. `--rank R` keeps, per
  target, the best rank-R approximation of its summed term (the top R singular directions,
  which minimize the error in Frobenius norm), and `--dtype float16` stores the tensors in half
  precision; both are lossy, so the result is a new policy to evaluate, and the command prints
  the discarded share of each term's norm. Loading casts the tensors back to the model's dtype.
  The folder's `flatten.json` records the chain, the ranks, the dtype and that share.
"""
import json
import math
import os
import sys
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import cli
from model import Transformer, load_model, tokenizer_files, write_folder

ROOT = Path(__file__).resolve().parent
# Every linear layer of attention and MLP, named as in the checkpoint, and where it sits.
TARGETS = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
           "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
RECORD_FILE = "flatten.json"   # what `python lora.py` made a folder from (peft ignores it)


@dataclass(frozen=True)
class LoraSpec:
    rank: int
    alpha: float
    targets: tuple[str, ...] = tuple(TARGETS)
    layers: tuple[int, ...] | None = None   # None: every layer

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def check_spec(spec: LoraSpec, num_layers: int) -> None:
    """Raise ValueError naming the first problem of a spec for a model of `num_layers` layers."""
    if spec.rank < 1:
        raise ValueError(f"--lora-rank {spec.rank}: must be at least 1 for an adapter")
    if not spec.alpha > 0:
        raise ValueError(f"--lora-alpha {spec.alpha}: must be positive")
    unknown = [t for t in spec.targets if t not in TARGETS]
    if unknown or not spec.targets or len(set(spec.targets)) < len(spec.targets):
        raise ValueError(f"--lora-targets {' '.join(spec.targets) or '(none)'}: choose among {', '.join(TARGETS)}, "
                         "each once")
    bad = [i for i in spec.layers or () if not 0 <= i < num_layers]
    if bad or spec.layers == () or len(set(spec.layers or ())) < len(spec.layers or ()):
        raise ValueError(f"--lora-layers {' '.join(map(str, spec.layers or ())) or '(none)'}: the model has layers "
                         f"0..{num_layers - 1}, or -{num_layers}..-1 from the top (each once)")


def _child(root: nn.Module, path: str) -> nn.Module:
    """The module at dotted `path` under root, created empty on the way if missing."""
    for part in path.split("."):
        if not hasattr(root, part):
            root.add_module(part, nn.Module())
        root = getattr(root, part)
    return root


def peft_config(s: LoraSpec, base: str) -> dict:
    """adapter_config.json for an adapter of spec `s` on the base named `base`."""
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base,
            "r": s.rank, "lora_alpha": s.alpha, "target_modules": list(s.targets),
            "layers_to_transform": list(s.layers) if s.layers is not None else None,
            "layers_pattern": "layers" if s.layers is not None else None,
            "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
            "use_dora": False, "init_lora_weights": True, "modules_to_save": None, "inference_mode": True,
            "rank_pattern": {}, "alpha_pattern": {}, "revision": None}


class Adapter(nn.Module):
    """The A and B matrices of every target, under peft's names, hooked into `model`."""

    def __init__(self, model: Transformer, spec: LoraSpec, base: str, seed: int = 0):
        super().__init__()
        check_spec(spec, model.config.num_hidden_layers)
        self.spec, self.base, self.mode = spec, base, "on"
        self.model_ref = [model]    # a list: not registered as a submodule (the base is not the adapter's)
        weight = model.model.embed_tokens.weight
        g = torch.Generator().manual_seed(seed)
        self.targets: list[tuple[nn.Linear, nn.Linear, nn.Linear]] = []
        self.handles = []
        layers = spec.layers if spec.layers is not None else range(model.config.num_hidden_layers)
        for i in sorted(layers):
            for t in spec.targets:
                linear = getattr(getattr(model.model.layers[i], TARGETS[t]), t)
                node = _child(self, f"base_model.model.model.layers.{i}.{TARGETS[t]}.{t}")
                a = nn.Linear(linear.in_features, spec.rank, bias=False, device="meta")
                b = nn.Linear(spec.rank, linear.out_features, bias=False, device="meta")
                # peft's default init: A as nn.Linear's own (Kaiming uniform), B zero
                a.weight = nn.Parameter(nn.init.kaiming_uniform_(torch.empty(a.weight.shape), a=math.sqrt(5),
                                                                 generator=g).to(weight.device, weight.dtype))
                b.weight = nn.Parameter(torch.zeros(b.weight.shape, device=weight.device, dtype=weight.dtype))
                node.lora_A, node.lora_B = a, b
                self.targets.append((linear, a, b))
                self.handles.append(linear.register_forward_hook(self._hook(a, b)))

    def _hook(self, a: nn.Linear, b: nn.Linear):
        def add_delta(module, args, output):
            if self.mode == "on":
                # one fused multiply-add over the layer's output: output + scale * (x A^T) B^T
                low = F.linear(args[0], a.weight).reshape(-1, a.out_features)
                return torch.addmm(output.reshape(-1, b.out_features), low, b.weight.t(),
                                   alpha=self.spec.scale).view(output.shape)
        return add_delta

    def remove(self) -> None:
        """Take the hooks out of the model: it runs as its own weights say."""
        for h in self.handles:
            h.remove()
        self.handles = []

    def delta(self, a: nn.Linear, b: nn.Linear) -> torch.Tensor:
        return self.spec.scale * (b.weight @ a.weight)

    @contextmanager
    def disabled(self):
        """The base model alone (the KL reference)."""
        mode, self.mode = self.mode, "off"
        try:
            yield
        finally:
            self.mode = mode

    @contextmanager
    def merged(self):
        """Each target's weight replaced by W + scale * B @ A (the hooks off), so generation pays
        nothing for the adapter; the original weights are put back on exit, unchanged."""
        originals = [linear.weight for linear, _, _ in self.targets]
        mode, self.mode = self.mode, "merged"
        try:
            with torch.no_grad():
                for linear, a, b in self.targets:
                    linear.weight = nn.Parameter(linear.weight + self.delta(a, b), requires_grad=False)
            yield
        finally:
            for (linear, _, _), w in zip(self.targets, originals):
                linear.weight = w
            self.mode = mode

    def merge_and_remove(self) -> Transformer:
        """Add the adapter into the weights in place, for good, and unhook it: inference."""
        with torch.no_grad():
            for linear, a, b in self.targets:
                linear.weight += self.delta(a, b)
        self.remove()
        return self.model_ref[0]

    def peft_config(self) -> dict:
        return peft_config(self.spec, self.base)

    def save(self, path, tokenizer_dir=None, extra_files=None, extra_tensors=None) -> Path:
        """adapter_config.json + adapter_model.safetensors (+ the base's tokenizer files, + a
        training state), written atomically as one folder."""
        texts = {CONFIG_FILE: json.dumps(self.peft_config(), indent=2) + "\n", **tokenizer_files(tokenizer_dir),
                 **(extra_files or {})}
        return write_folder(path, texts, {WEIGHTS_FILE: self.state_dict(), **(extra_tensors or {})})

    def load_weights(self, path) -> None:
        """Read adapter_model.safetensors from `path` into this adapter; ValueError naming any
        missing, unexpected or mis-shaped tensor."""
        from safetensors.torch import load_file
        file = Path(path) / WEIGHTS_FILE
        if not file.is_file():
            raise FileNotFoundError(f"{path}: no {WEIGHTS_FILE}")
        tensors = load_file(str(file))
        own = self.state_dict()
        problems = [f"missing tensor {n}" for n in own if n not in tensors]
        problems += [f"unexpected tensor {n}" for n in tensors if n not in own]
        problems += [f"tensor {n} has shape {list(t.shape)}, expected {list(own[n].shape)}"
                     for n, t in tensors.items() if n in own and t.shape != own[n].shape]
        if problems:
            raise ValueError(f"{file} does not match {CONFIG_FILE}: " + "; ".join(problems[:5]))
        with torch.no_grad():
            for n, p in self.named_parameters():
                p.copy_(tensors[n])


class AdapterOff:
    """A model seen with its adapter off: what GRPO's KL reference calls (forward, hidden
    states, output weight) on the same weights as the policy, with no copy of them."""

    def __init__(self, model: Transformer, adapter: Adapter):
        self.wrapped, self.adapter = model, adapter

    def output_weight(self):
        return self.wrapped.output_weight()

    def hidden_states(self, *args, **kwargs):
        with self.adapter.disabled():
            return self.wrapped.hidden_states(*args, **kwargs)

    def __call__(self, *args, **kwargs):
        with self.adapter.disabled():
            return self.wrapped(*args, **kwargs)


def merged(adapter: Adapter | None):
    """adapter.merged(), or nothing to do without an adapter."""
    return adapter.merged() if adapter is not None else nullcontext()


# ---------------------------------------------------------------------------------------------
# Folders


def is_adapter(path) -> bool:
    return (Path(path) / CONFIG_FILE).is_file()


def base_name(path) -> str:
    """How an adapter names its base: relative to the repository root if it lies inside it, else
    absolute (symlinks such as runs/sft/latest resolved, so the name stays valid when they move)."""
    real = Path(os.path.realpath(path))
    return str(real.relative_to(ROOT)) if real.is_relative_to(ROOT) else str(real)


def base_folder(name: str) -> Path:
    """Where a base_model_name_or_path points: absolute, or relative to the repository root."""
    return Path(name) if os.path.isabs(name) else ROOT / name


def read_adapter_config(path) -> tuple[LoraSpec, Path]:
    """The spec and the resolved base folder of an adapter folder; ValueError naming the problem
    (an unsupported peft option, a base that is not there)."""
    file = Path(path) / CONFIG_FILE
    try:
        c = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{file}: cannot read it ({e})") from None
    if c.get("peft_type") != "LORA":
        raise ValueError(f"{file}: peft_type {c.get('peft_type')!r}, only LORA adapters are supported")
    for key, plain in (("use_dora", False), ("use_rslora", False), ("fan_in_fan_out", False), ("bias", "none"),
                       ("rank_pattern", {}), ("alpha_pattern", {}), ("modules_to_save", None)):
        if c.get(key, plain) not in (plain, None, {}, []):
            raise ValueError(f"{file}: {key}={c[key]!r} is not supported")
    targets = c.get("target_modules")
    if isinstance(targets, str) or not targets:
        raise ValueError(f"{file}: target_modules must be a list of names among {', '.join(TARGETS)}")
    layers = c.get("layers_to_transform")
    layers = (layers,) if isinstance(layers, int) else tuple(layers) if layers is not None else None
    spec = LoraSpec(int(c["r"]), float(c["lora_alpha"]), tuple(targets), layers)
    base = c.get("base_model_name_or_path") or ""
    resolved = base_folder(base)
    if not base or not ((resolved / "config.json").is_file() or is_adapter(resolved)):
        raise ValueError(f"{file}: its base_model_name_or_path {base!r} is not a checkpoint folder "
                         f"(looked at {resolved}; relative paths are read from {ROOT})")
    return spec, resolved


def chain(path) -> list[Path]:
    """The folders from `path` down a chain of adapters, each naming the next as its base,
    ending with the full checkpoint at the bottom (just `[path]` for a checkpoint)."""
    folders = [Path(path)]
    while is_adapter(folders[-1]):
        base = read_adapter_config(folders[-1])[1]
        if base.resolve() in {f.resolve() for f in folders}:
            raise ValueError(f"{path}: adapters name each other as their base in a cycle")
        folders.append(base)
    return folders


def root_base(path) -> Path:
    """The full checkpoint at the bottom of a chain of adapter folders (the folder itself if it is one)."""
    return chain(path)[-1]


def tokenizer_folder(path) -> Path:
    """Where a checkpoint or adapter folder's tokenizer is: the folder itself if it holds one
    (ours copy the base's), else the base at the bottom of its chain (peft saves none)."""
    return Path(path) if (Path(path) / "tokenizer.json").is_file() else root_base(path)


def load_adapter(path, model: Transformer) -> Adapter:
    """An adapter folder's weights, hooked into `model` (its base, already loaded)."""
    spec, base = read_adapter_config(path)
    try:
        adapter = Adapter(model, spec, base_name(base))
    except ValueError as e:
        raise ValueError(f"{Path(path) / CONFIG_FILE}: {e}") from None
    adapter.load_weights(path)
    return adapter


def load_any(path, device="cpu", dtype=None) -> Transformer:
    """A checkpoint folder, or an adapter folder merged into its base (a chain of them, innermost
    first): the model a policy plays with."""
    if not is_adapter(path):
        return load_model(path, device=device, dtype=dtype)
    root_base(path)   # refuses a cycle before loading anything
    model = load_any(read_adapter_config(path)[1], device=device, dtype=dtype)
    return load_adapter(path, model).merge_and_remove()


# ---------------------------------------------------------------------------------------------
# Flattening a chain


def flatten(path) -> tuple[dict, dict[str, torch.Tensor], list[Path]]:
    """One adapter equal to the chain of adapters ending at `path` (an SFT adapter, more SFT on
    it, GRPO on that): adapter_config.json's dict and the tensors, on the chain's full checkpoint,
    and the adapter folders it read (top first).

    Merging a chain adds each adapter's term: W + sum_i s_i B_i A_i. That sum is itself one LoRA
    term of rank sum_i r_i, A stacked along the rank and B side by side, with each B_i rescaled
    by s_i / s for the one scale s = alpha / rank. So the flattened adapter is exact, not a
    low-rank approximation, and peft loads it on the base alone. The chain's adapters must sit
    on the same targets and layers (what sft.py and grpo.py make when they continue one)."""
    from safetensors.torch import load_file
    *folders, base = chain(path)
    if not folders:
        raise ValueError(f"{path}: not an adapter folder (no {CONFIG_FILE})")
    specs = [read_adapter_config(f)[0] for f in folders]
    place = lambda s: (sorted(s.targets), sorted(s.layers) if s.layers is not None else None)
    for f, s in zip(folders, specs):
        if place(s) != place(specs[0]):
            raise ValueError(f"{f}: its targets or layers differ from {folders[0]}'s; only adapters on the same "
                             "targets and layers flatten into one")
    rank = sum(s.rank for s in specs)
    spec = LoraSpec(rank, specs[0].scale * rank, specs[0].targets, specs[0].layers)
    tensors = [load_file(str(f / WEIGHTS_FILE)) for f in folders]
    for f, t in zip(folders, tensors):
        if t.keys() != tensors[0].keys():
            raise ValueError(f"{f / WEIGHTS_FILE}: its tensor names differ from {folders[0] / WEIGHTS_FILE}'s")
    flat = {}
    for name in tensors[0]:
        if ".lora_A." in name:
            flat[name] = torch.cat([t[name] for t in tensors], dim=0)
        else:
            flat[name] = torch.cat([t[name] * (s.scale / spec.scale) for t, s in zip(tensors, specs)], dim=1)
    return peft_config(spec, base_name(base)), flat, folders


def truncate(config: dict, tensors: dict[str, torch.Tensor], rank: int) -> tuple[dict, dict, list[float]]:
    """The best rank-`rank` adapter for each target of a (flattened) adapter, at the same scale,
    and per target the share of its term's Frobenius norm that was dropped.

    A term B @ A (B [out, r], A [r, in]) is factored without forming it: B = Qb Rb and
    A^T = Qa Ra (QR), so B A = Qb (Rb Ra^T) Qa^T, and the SVD of the small r x r middle,
    U S V^T, gives the term's SVD. The top `rank` directions, split as sqrt(S) on each side,
    are the new B and A. In float64, so the rotation itself loses nothing."""
    if not 0 < rank <= config["r"]:
        raise ValueError(f"--rank {rank}: must be between 1 and the adapter's rank {config['r']}")
    out, dropped = {}, []
    for a_name in sorted(n for n in tensors if ".lora_A." in n):
        b_name = a_name.replace(".lora_A.", ".lora_B.")
        a, b = tensors[a_name].double(), tensors[b_name].double()
        qb, rb = torch.linalg.qr(b)
        qa, ra = torch.linalg.qr(a.T)
        u, sv, vh = torch.linalg.svd(rb @ ra.T)
        root = sv[:rank].sqrt()
        out[b_name] = ((qb @ u[:, :rank]) * root).to(tensors[b_name].dtype)
        out[a_name] = ((root[:, None] * vh[:rank]) @ qa.T).to(tensors[a_name].dtype)
        total = sv.square().sum()
        dropped.append(float((sv[rank:].square().sum() / total).sqrt()) if total > 0 else 0.0)
    scale = config["lora_alpha"] / config["r"]
    return {**config, "r": rank, "lora_alpha": scale * rank}, out, dropped


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class FlattenConfig:
    adapter: str = cli.field("", "an adapter folder, alone or the top of a chain of them", "input / output")
    out: str = cli.field("", "the new folder to write: one adapter on the chain's full checkpoint", "input / output")
    rank: int = cli.field(0, "keep each target's best rank-R approximation (0: the chain's summed rank, exact)",
                          "compression")
    dtype: str = cli.field("float32", "the stored tensors' precision (float16 halves the folder)", "compression",
                           choices=tuple(DTYPES))


@cli.entry_point
def main(argv=None):
    cfg = cli.parse_config(FlattenConfig, argv, "Flatten a chain of LoRA adapters into one equal adapter "
                                                "(rank: the sum of theirs) that peft loads on the base alone.")
    cli.check(bool(cfg.adapter) and is_adapter(cfg.adapter),
              f"--adapter {cfg.adapter!r}: not an adapter folder (no {CONFIG_FILE})")
    cli.check(bool(cfg.out) and not Path(cfg.out).exists(), f"--out {cfg.out!r}: name a folder that does not exist yet")
    cli.check(cfg.rank >= 0, f"--rank {cfg.rank}: must be 0 (exact) or positive")
    try:
        config, tensors, folders = flatten(cfg.adapter)
        summed, share = config["r"], None
        if cfg.rank:
            config, tensors, dropped = truncate(config, tensors, cfg.rank)
            share = {"mean": sum(dropped) / len(dropped), "max": max(dropped)}
    except ValueError as e:
        raise cli.UsageError(str(e)) from None
    tensors = {n: t.to(DTYPES[cfg.dtype]) for n, t in tensors.items()}
    record = {"chain": [str(f) for f in folders], "summed_rank": summed, "rank": config["r"],
              "dtype": cfg.dtype, "dropped_norm_share": share}
    write_folder(cfg.out, {CONFIG_FILE: json.dumps(config, indent=2) + "\n",
                           RECORD_FILE: json.dumps(record, indent=2) + "\n"}, {WEIGHTS_FILE: tensors})
    how = "equal to" if not cfg.rank and cfg.dtype == "float32" else "approximating"
    print(f"wrote {cfg.out}: one rank-{config['r']} {cfg.dtype} adapter on {config['base_model_name_or_path']}, "
          f"{how} the chain of adapters ending at {cfg.adapter}")
    if share:
        print(f"--rank {cfg.rank} dropped {share['mean']:.2%} of a target's norm on average "
              f"(at most {share['max']:.2%}, over {len(dropped)} targets)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
