"""The transformer, its presets, and the Hugging Face-layout checkpoint it loads and saves.

One decoder-only model covers the Llama family and its close relatives:
RMSNorm, rotary embeddings (`rope_theta`, optional "llama3" frequency scaling), grouped-query
attention, SwiGLU, optional q/k/v(/o) bias (Qwen2, Llama's `attention_bias`), optional per-head
q/k RMSNorm (Qwen3), tied or untied embeddings.

Design choices:
- Module names mirror the checkpoint's tensor names (`model.layers.3.self_attn.q_proj.weight`),
  so loading is a direct `load_state_dict` with no renaming. `checkpoint_tensor_shapes(config)`
  is the explicit table of every tensor a checkpoint must hold and its shape; the loader checks
  the file against it and names any missing, extra or mis-shaped tensor.
- Attention is a callable passed into `forward`. The default is plain causal attention over the
  given tokens (training, parity tests); the generation engine (policy.py) passes its own,
  which writes a KV cache and attends over a shared prefix plus a per-branch suffix. No global
  context object, no cache state inside the model.
- RoPE cos/sin are computed from the positions on each call: no buffers, so a model built on the
  meta device is filled entirely by the checkpoint and round trips exactly.
- Checkpoints are safetensors only (pickle files are refused: loading one runs arbitrary code),
  and writes are atomic: a temp folder beside the target, then a rename.
"""
import json
import math
import os
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


# ---------------------------------------------------------------------------------------------
# Config


SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3")
SUPPORTED_ROPE_TYPES = ("default", "llama3")
# config.json keys that only matter to training frameworks or generation defaults.
IGNORED_CONFIG_KEYS = {
    "architectures", "transformers_version", "torch_dtype", "dtype", "initializer_range",
    "use_cache", "attention_dropout", "pretraining_tp", "bos_token_id", "eos_token_id",
    "pad_token_id", "max_window_layers", "sliding_window", "layer_types", "transformers.js_config",
    "_name_or_path", "is_llama_config", "rope_interleaved", "output_attentions",
    "output_hidden_states", "return_dict", "chunk_size_feed_forward", "id2label", "label2id",
}


@dataclass(frozen=True)
class ModelConfig:
    """The fields of an HF `config.json` this model reads, with HF's names and defaults."""
    model_type: str = "llama"
    vocab_size: int = 32000
    hidden_size: int = 256
    intermediate_size: int = 688
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "llama3", "factor", "low_freq_factor", ...}
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Llama: bias on q, k, v and o. (Qwen2 always has q/k/v bias.)
    mlp_bias: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list | None = None
    pad_token_id: int | None = None

    @property
    def head_size(self) -> int:
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def qkv_bias(self) -> bool:
        return self.model_type == "qwen2" or self.attention_bias

    @property
    def o_bias(self) -> bool:
        return self.model_type == "llama" and self.attention_bias

    @property
    def qk_norm(self) -> bool:
        return self.model_type == "qwen3"

    @classmethod
    def from_hf(cls, d: dict) -> "ModelConfig":
        """Read an HF config dict; raise ValueError naming anything we cannot run faithfully."""
        d = dict(d)
        model_type = d.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"config.json: unsupported model_type {model_type!r} "
                             f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"config.json: unsupported hidden_act {d['hidden_act']!r} (only 'silu')")
        if d.get("use_sliding_window"):
            raise ValueError("config.json: use_sliding_window=true is not supported")
        if d.get("quantization_config"):
            raise ValueError("config.json: quantized checkpoints are not supported (quantization_config)")
        # transformers >= 5 writes rope settings as `rope_parameters`; older files use
        # top-level `rope_theta` and `rope_scaling`. Accept both, normalize to the old form.
        rope = dict(d.pop("rope_parameters", None) or {})
        if "rope_theta" in rope:
            d.setdefault("rope_theta", rope.pop("rope_theta"))
        scaling = dict(d.get("rope_scaling") or rope)
        if "type" in scaling:
            scaling.setdefault("rope_type", scaling.pop("type"))
        rope_type = scaling.get("rope_type", "default")
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(f"config.json: unsupported rope type {rope_type!r} "
                             f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
        d["rope_scaling"] = scaling if rope_type != "default" else None
        for checked in ("hidden_act", "use_sliding_window", "quantization_config"):
            d.pop(checked, None)
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(k for k in d if k not in known and k not in IGNORED_CONFIG_KEYS)
        if unknown:
            print(f"warning: config.json keys ignored: {', '.join(unknown)}", file=sys.stderr)
        return cls(**{k: v for k, v in d.items() if k in known})

    def to_hf(self) -> dict:
        """The config.json we write: the classic HF form other tools read."""
        d = asdict(self)
        arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
        d["architectures"] = [arch[self.model_type]]
        d["head_dim"] = self.head_size
        d["hidden_act"] = "silu"
        if d["rope_scaling"] is None:
            del d["rope_scaling"]
        return d


# From-scratch presets. The vocabulary size comes from the tokenizer trained for the model.
PRESETS = {
    # ~3.5M parameters with a 2k vocabulary: trains in minutes on 2 CPU cores.
    "tiny": dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                 max_position_embeddings=8192),
    # tiny with what `add_copy_circuit` builds on: attention biases (a constant-query head), one
    # kv head per query head (independent heads), a long rope wavelength (slow rotary pairs).
    "tiny-copy": dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True,
                      attention_bias=True, rope_theta=1e6, max_position_embeddings=8192),
    # ~25M parameters: the next step up when a GPU is available.
    "small": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                  num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=True,
                  max_position_embeddings=4096),
    # The shape of SmolLM2-135M (used by the benchmark with random weights).
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True,
                         max_position_embeddings=8192),
}


def preset_config(name: str, **overrides) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r} (known: {', '.join(PRESETS)})")
    return ModelConfig(**{**PRESETS[name], **overrides})


def checkpoint_tensor_shapes(c: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The explicit table: every tensor name a checkpoint of this config holds, and its shape."""
    h, hd, inter = c.hidden_size, c.head_size, c.intermediate_size
    q_dim, kv_dim = c.num_attention_heads * hd, c.num_key_value_heads * hd
    table = {"model.embed_tokens.weight": (c.vocab_size, h)}
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}."
        table.update({
            p + "input_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (q_dim, h),
            p + "self_attn.k_proj.weight": (kv_dim, h),
            p + "self_attn.v_proj.weight": (kv_dim, h),
            p + "self_attn.o_proj.weight": (h, q_dim),
            p + "post_attention_layernorm.weight": (h,),
            p + "mlp.gate_proj.weight": (inter, h),
            p + "mlp.up_proj.weight": (inter, h),
            p + "mlp.down_proj.weight": (h, inter),
        })
        if c.qkv_bias:
            table.update({p + "self_attn.q_proj.bias": (q_dim,), p + "self_attn.k_proj.bias": (kv_dim,),
                          p + "self_attn.v_proj.bias": (kv_dim,)})
        if c.o_bias:
            table[p + "self_attn.o_proj.bias"] = (h,)
        if c.qk_norm:
            table.update({p + "self_attn.q_norm.weight": (hd,), p + "self_attn.k_norm.weight": (hd,)})
        if c.mlp_bias:
            table.update({p + "mlp.gate_proj.bias": (inter,), p + "mlp.up_proj.bias": (inter,),
                          p + "mlp.down_proj.bias": (h,)})
    table["model.norm.weight"] = (h,)
    if not c.tie_word_embeddings:
        table["lm_head.weight"] = (c.vocab_size, h)
    return table


# ---------------------------------------------------------------------------------------------
# Modules


# A no-grad product of at most this many rows runs split (`linear`); measured on 2 cores,
# `bench.py --linear`, SmolLM2 shape: 1.5-1.6x at 1-4 rows, 1.1x at 8-64, none at 128 (MKL threads those).
SPLIT_MAX_ROWS = 64


def linear(x, weight, bias=None):
    """F.linear, except for a product of a few rows on a CPU with several threads: there the
    output features are cut into one block per thread, computed by ONE torch.bmm over the blocks.

    Why: a decode step multiplies every weight matrix by a handful of rows, a product that MKL
    runs on one core (at 1 row: 12 GB/s of weights, the same with 1 thread or 2; a plain read
    of both cores reaches 33), while torch's bmm gives each core its own batch entries. Each
    output is still one dot product of the same row and weight row; only which core computes it
    changes. Training (grad on) and prefill (many rows) keep F.linear, which threads well there.
    """
    parts = torch.get_num_threads()
    rows = x.numel() // x.shape[-1]
    if (parts < 2 or x.device.type != "cpu" or rows > SPLIT_MAX_ROWS or torch.is_grad_enabled()
            or weight.shape[0] % parts or rows == 0 or not weight.is_contiguous()):
        return F.linear(x, weight, bias)
    N, K = weight.shape
    x2 = x.reshape(rows, K)
    out = torch.bmm(x2.expand(parts, rows, K), weight.view(parts, N // parts, K).transpose(1, 2))
    out = out.transpose(0, 1).reshape(*x.shape[:-1], N)
    return out if bias is None else out + bias


class Linear(nn.Linear):
    """nn.Linear (same parameters, names and hooks) through `linear`."""

    def forward(self, x):
        return linear(x, self.weight, self.bias)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        # Normalize in fp32 then cast back before the weight, as the reference does (bf16 parity);
        # F.rms_norm is one fused op where the hand-written form is five.
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


def rope_inv_freq(c: ModelConfig, device=None) -> torch.Tensor:
    """Rotary inverse frequencies [head_dim/2], with llama3 scaling when configured."""
    d = c.head_size
    inv_freq = 1.0 / (c.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64, device=device) / d))
    s = c.rope_scaling
    if s is not None and s.get("rope_type") == "llama3":
        # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, a smooth ramp between.
        factor, low, high = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old_len = s["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        smooth = (old_len / wavelen - low) / (high - low)
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        mid = (1 - smooth) * inv_freq / factor + smooth * inv_freq
        is_mid = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        inv_freq = torch.where(is_mid, mid, scaled)
    return inv_freq.float()


def rope_cos_sin(config: ModelConfig, positions, dtype):
    """cos, sin [B, T, 1, head_dim] for positions [B, T]: computed in fp32, once per forward pass,
    then cast to the model's dtype (as the reference does, so bf16 runs match it too)."""
    freqs = positions[..., None].float() * rope_inv_freq(config, positions.device)
    emb = torch.cat((freqs, freqs), dim=-1)[:, :, None, :]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x, cos, sin):
    """x [B, T, H, D]. HF's rotate-half layout (the two halves of a head rotate together)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        hd = c.head_size
        self.n_heads, self.n_kv_heads, self.head_dim = c.num_attention_heads, c.num_key_value_heads, hd
        self.q_proj = Linear(c.hidden_size, self.n_heads * hd, bias=c.qkv_bias)
        self.k_proj = Linear(c.hidden_size, self.n_kv_heads * hd, bias=c.qkv_bias)
        self.v_proj = Linear(c.hidden_size, self.n_kv_heads * hd, bias=c.qkv_bias)
        self.o_proj = Linear(self.n_heads * hd, c.hidden_size, bias=c.o_bias)
        if c.qk_norm:
            self.q_norm = RMSNorm(hd, c.rms_norm_eps)
            self.k_norm = RMSNorm(hd, c.rms_norm_eps)

    def forward(self, x, cos, sin, attention, layer_idx: int):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = attention(layer_idx, q, k, v)  # [B, T, n_heads, head_dim]
        return self.o_proj(out.reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.gate_proj = Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)
        self.up_proj = Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)
        self.down_proj = Linear(c.intermediate_size, c.hidden_size, bias=c.mlp_bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = Attention(c)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = MLP(c)

    def forward(self, x, cos, sin, attention, layer_idx):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attention, layer_idx)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(c) for _ in range(c.num_hidden_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)


def plain_causal_attention(layer_idx, q, k, v):
    """Default attention: each row attends causally to its own given tokens only.

    q [B, T, Hq, D], k/v [B, T, Hkv, D] -> [B, T, Hq, D]. Right padding needs no mask: a real
    token never sees the padding after it.
    """
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         is_causal=True, enable_gqa=q.shape[2] != k.shape[2])
    return out.transpose(1, 2)


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = Backbone(config)
        if not config.tie_word_embeddings:
            self.lm_head = Linear(config.hidden_size, config.vocab_size, bias=False)

    def output_weight(self):
        return self.model.embed_tokens.weight if self.config.tie_word_embeddings else self.lm_head.weight

    def hidden_states(self, input_ids, positions=None, attention=plain_causal_attention):
        """Final-norm hidden states [B, T, hidden] (logits are one matmul away)."""
        B, T = input_ids.shape
        if positions is None:
            positions = torch.arange(T, device=input_ids.device).expand(B, T)
        assert positions.shape == (B, T), f"positions {tuple(positions.shape)} != input_ids {(B, T)}"
        x = self.model.embed_tokens(input_ids)
        cos, sin = rope_cos_sin(self.config, positions, x.dtype)
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, attention, i)
        return self.model.norm(x)

    def forward(self, input_ids, positions=None, attention=plain_causal_attention):
        """input_ids [B, T] -> logits [B, T, vocab]."""
        return F.linear(self.hidden_states(input_ids, positions, attention), self.output_weight())


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def init_weights(model: Transformer, seed: int = 0, std: float = 0.02) -> Transformer:
    """Random init for from-scratch training (normal(0, std) matrices, unit norms, zero biases)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=g) * std)
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                p.mul_(1 / math.sqrt(2 * model.config.num_hidden_layers))  # residual-branch scaling
    return model


def add_copy_circuit(model: Transformer, seed: int = 0, context: int = 2048, embed_std: float = 1.0,
                     logit_scale: float = 0.1, prev_gain: float = 3.0, match_scale: float = 10.0,
                     copy_gain: float = 10.0) -> Transformer:
    """Build an induction circuit into a freshly initialized model: head 0 of layer 0 attends to
    the previous token and writes its code into a subspace of the residual; head 0 of layer 1
    matches the current token's code against those, attends to the position just after the
    earlier occurrence of the current token, and writes that position's token back, which the
    tied output layer reads as "predict it again".

    Why: every skill the orchestrator needs is a copy from its context (entity names from the
    question, callee names from the pool lines, results into the answer). Gradient descent
    finds such a two-head circuit only after a long plateau (each head is useless without the
    other); measured here, the tiny preset learned no copy at all in 400 steps, nor in 150 with
    the previous-token head given. Built in, it copies from the first step (README). It is
    weights only, in the plain Llama layout (transformers loads it):
    - the previous-token head has zero q/k weights and constant q/k biases, rotated by one
      position against each other, so RoPE alone makes it peak at the previous position;
    - the matching uses only the rotary pairs that turn by less than 0.3 rad over `context`
      tokens, so it compares contents, not positions (a long rope_theta leaves more of them);
    - codes are an orthonormal projection of the token's normalized embedding; the previous
      token's code is written where the current token's code is not read (orthogonal
      subspaces), so the two do not interfere;
    - embeddings start at unit scale (and the final norm at `logit_scale`), so that Adam's
      steps of size lr are small against them and training does not scramble the codes.
    Heads 1.. of both layers and everything else keep their random init."""
    c = model.config
    D, d = c.head_size, c.hidden_size
    if c.num_hidden_layers < 2 or not c.qkv_bias or c.num_key_value_heads != c.num_attention_heads:
        raise ValueError("add_copy_circuit needs >= 2 layers, attention biases and one kv head per query head "
                         f"(got {c.num_hidden_layers} layers, qkv_bias={c.qkv_bias}, "
                         f"{c.num_attention_heads} heads / {c.num_key_value_heads} kv heads)")
    inv_freq = rope_inv_freq(c)
    slow = [p for p in range(D // 2) if inv_freq[p].item() * context < 0.3]
    if len(slow) < 4:
        raise ValueError(f"add_copy_circuit: only {len(slow)} rotary pairs are slow over {context} tokens "
                         f"(rope_theta {c.rope_theta}); raise rope_theta")
    match_dims = slow + [p + D // 2 for p in slow]
    g = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    code = basis[:, :D].T.float()            # [D, d]: the token's code, orthonormal rows
    prev_out = basis[:, D:2 * D].float()     # [d, D]: where the previous token's code goes
    fast = range(min(8, D // 2))             # the fastest pairs make the sharpest previous-token peak
    # 6.0: 36 per pair over sqrt(D) = 8; with rope_theta 1e6 the previous position outscores
    # its neighbours by about 3.7 (e^3.7 = 40), which leaves it about 0.95 of the weight (tested)
    q_bias, k_bias = torch.zeros(D), torch.zeros(D)
    for p in fast:
        theta = inv_freq[p].item()
        k_bias[p] = 6.0
        q_bias[p], q_bias[p + D // 2] = 6.0 * math.cos(theta), -6.0 * math.sin(theta)
    n = len(match_dims)
    match_q, match_k = torch.zeros(D, d), torch.zeros(D, d)
    match_q[match_dims], match_k[match_dims] = code[:n], prev_out.T[:n]
    a0, a1 = model.model.layers[0].self_attn, model.model.layers[1].self_attn
    dev, dt = a0.q_proj.weight.device, a0.q_proj.weight.dtype
    with torch.no_grad():
        model.model.embed_tokens.weight.mul_(embed_std / model.model.embed_tokens.weight.std())
        model.model.norm.weight.fill_(logit_scale)
        # |code(x)| is sqrt(D) for a normalized x; the write is prev_gain times an embedding's norm
        gain = prev_gain * embed_std * math.sqrt(d) / math.sqrt(D)
        for proj, w, b in ((a0.q_proj, 0.0, q_bias), (a0.k_proj, 0.0, k_bias), (a0.v_proj, code, 0.0),
                           (a1.q_proj, match_scale * match_q, 0.0), (a1.k_proj, match_scale * match_k, 0.0),
                           (a1.v_proj, code, 0.0)):
            proj.weight[:D] = torch.as_tensor(w, dtype=dt).to(dev)
            proj.bias[:D] = torch.as_tensor(b, dtype=dt).to(dev)
        a0.o_proj.weight[:, :D] = (gain * prev_out).to(dev, dt)
        a1.o_proj.weight[:, :D] = (copy_gain * code.T).to(dev, dt)
    return model


def copy_circuit_slices(config: ModelConfig) -> dict[str, tuple[slice, ...]]:
    """The parts of each tensor `add_copy_circuit` writes (head 0 of layers 0 and 1), by name:
    what a trainer keeps fixed so that the circuit survives the first steps of training."""
    D = config.head_size
    out = {}
    for layer in (0, 1):
        prefix = f"model.layers.{layer}.self_attn."
        for proj in ("q_proj", "k_proj", "v_proj"):
            out[prefix + proj + ".weight"] = (slice(0, D),)
            out[prefix + proj + ".bias"] = (slice(0, D),)
        out[prefix + "o_proj.weight"] = (slice(None), slice(0, D))
    return out


def default_dtype(device) -> torch.dtype:
    """fp32 on CPU (no fast bf16 here), bf16 on CUDA."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def build_model(config: ModelConfig, device="cpu", dtype=None, seed: int = 0) -> Transformer:
    model = init_weights(Transformer(config), seed)
    return model.to(device=device, dtype=dtype or default_dtype(device))


# ---------------------------------------------------------------------------------------------
# Checkpoint IO (Hugging Face layout)


PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "model.pth", "model.ckpt")


def read_config(path) -> ModelConfig:
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: no config.json (not a checkpoint folder)")
    return ModelConfig.from_hf(json.loads((path / "config.json").read_text()))


def _safetensors_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / s for s in shards]
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"]
    pickles = [p for p in PICKLE_FILES if (path / p).exists()]
    if pickles:
        raise ValueError(f"{path}: found {pickles[0]} but no model.safetensors: pickle checkpoints are "
                         f"refused (loading one can run arbitrary code); convert it to safetensors")
    raise FileNotFoundError(f"{path}: no model.safetensors or model.safetensors.index.json")


def read_tensors(path, device="cpu") -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint folder (single file or shards), by checkpoint name."""
    from safetensors import safe_open
    tensors = {}
    for file in _safetensors_files(Path(path)):
        if not file.is_file():
            raise FileNotFoundError(f"{file}: shard named in the index is missing")
        with safe_open(str(file), framework="pt", device=str(device)) as f:
            for name in f.keys():
                tensors[name] = f.get_tensor(name)
    return tensors


def check_tensors(config: ModelConfig, tensors: dict[str, torch.Tensor]) -> None:
    """Compare a checkpoint's tensors with the table; raise ValueError naming every mismatch."""
    expected = checkpoint_tensor_shapes(config)
    problems = [f"missing tensor {n} (expected shape {list(s)})" for n, s in expected.items() if n not in tensors]
    for name, t in tensors.items():
        if name not in expected:
            hint = " (config.json says tie_word_embeddings=true)" if name == "lm_head.weight" else ""
            problems.append(f"unexpected tensor {name}{hint}")
        elif tuple(t.shape) != expected[name]:
            problems.append(f"tensor {name} has shape {list(t.shape)}, expected {list(expected[name])}")
    if problems:
        raise ValueError("checkpoint does not match config.json:\n  " + "\n  ".join(problems))


def load_model(path, device="cpu", dtype=None) -> Transformer:
    """Load an HF-layout checkpoint folder into a Transformer (eval mode)."""
    config = read_config(path)
    tensors = read_tensors(path)
    check_tensors(config, tensors)
    dtype = dtype or default_dtype(device)
    with torch.device("meta"):
        model = Transformer(config)
    model.load_state_dict({n: t.to(device=device, dtype=dtype) for n, t in tensors.items()},
                          strict=True, assign=True)
    return model.eval()


def write_folder(path, texts: dict[str, str], tensor_files: dict[str, dict[str, torch.Tensor]]) -> Path:
    """Write text files and safetensors files into the folder `path` atomically.

    Everything goes into a temp folder beside `path`, which is then renamed into place, so a
    reader never sees a half-written checkpoint and a crash leaves the old one intact.
    """
    from safetensors.torch import save_file
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        for name, text in texts.items():
            (tmp / name).write_text(text)
        for name, group in tensor_files.items():
            save_file({n: t.detach().contiguous().cpu() for n, t in group.items()}, str(tmp / name),
                      metadata={"format": "pt"})
        for p in [tmp, *tmp.iterdir()]:  # mkdtemp makes 0700: give the usual permissions
            p.chmod(0o755 if p.is_dir() else 0o644)
        old = None
        if path.exists():
            old = path.parent / f".{path.name}.old-{os.getpid()}"
            path.rename(old)
        tmp.rename(path)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def write_checkpoint(path, hf_config: dict, tensors: dict[str, torch.Tensor],
                     extra_files: dict[str, str] | None = None,
                     extra_tensors: dict[str, dict[str, torch.Tensor]] | None = None) -> Path:
    """Write config.json + model.safetensors (+ extra text files, + extra safetensors files such
    as a training state) atomically into `path` (write_folder)."""
    return write_folder(path, {"config.json": json.dumps(hf_config, indent=2) + "\n", **(extra_files or {})},
                        {"model.safetensors": tensors, **(extra_tensors or {})})


def tokenizer_files(tokenizer_dir) -> dict[str, str]:
    """The tokenizer files of a checkpoint folder, by name, as text (what a saved folder copies)."""
    if tokenizer_dir is None:
        return {}
    return {name: (Path(tokenizer_dir) / name).read_text() for name in TOKENIZER_FILES
            if (Path(tokenizer_dir) / name).is_file()}


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "generation_config.json", "chat_template.jinja")


def save_model(model: Transformer, path, tokenizer_dir=None, dtype=None, extra_files=None,
               extra_tensors=None) -> Path:
    """Save `model` in the HF layout; copy the tokenizer files from `tokenizer_dir` if given.
    `extra_files` (text) and `extra_tensors` (safetensors files) are written in the same atomic
    step: the training state of a run sits beside its weights."""
    state = {n: t.to(dtype) if dtype else t for n, t in model.state_dict().items()}
    check_tensors(model.config, state)
    extra = {**(extra_files or {}), **tokenizer_files(tokenizer_dir)}
    return write_checkpoint(path, model.config.to_hf(), state, extra, extra_tensors)
