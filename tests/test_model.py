"""model.py against the reference implementation (transformers), plus checkpoint-format errors.

The parity checkpoints are created and saved by transformers itself with random weights (every
parameter perturbed, so biases and norm weights matter), then loaded by our loader.
"""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import model as M

FAMILIES = {
    "llama-tied-gqa": dict(model_type="llama", tie_word_embeddings=True, num_key_value_heads=2),
    "llama-untied-mha-llama3-rope": dict(
        model_type="llama", tie_word_embeddings=False, num_key_value_heads=4, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
    "llama-attention-bias": dict(model_type="llama", attention_bias=True, num_key_value_heads=2),
    "qwen2-bias-gqa": dict(model_type="qwen2", num_key_value_heads=2, tie_word_embeddings=False),
    "qwen3-qk-norm": dict(model_type="qwen3", num_key_value_heads=2, head_dim=32, tie_word_embeddings=True),
}
BASE = dict(vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
            num_attention_heads=4, rms_norm_eps=1e-6, max_position_embeddings=256)


def hf_random_checkpoint(tmp_path, family):
    transformers = pytest.importorskip("transformers")
    kwargs = {**BASE, **FAMILIES[family]}
    config_cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
                  "qwen3": transformers.Qwen3Config}[kwargs.pop("model_type")]
    torch.manual_seed(0)
    ref = transformers.AutoModelForCausalLM.from_config(config_cls(**kwargs)).float().eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            p.add_(torch.randn_like(p) * (0.1 if "norm" in name else 0.05))
    ref.save_pretrained(tmp_path / family)
    return ref, tmp_path / family


@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_match_reference(tmp_path, family):
    ref, path = hf_random_checkpoint(tmp_path, family)
    ours = M.load_model(path)
    ids = torch.randint(0, BASE["vocab_size"], (2, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (ours(ids) - ref(ids).logits).abs().max().item()
    print(f"parity {family}: max |logit diff| {diff:.1e}")  # shown with `pytest -s`
    assert diff < 1e-4, f"{family}: max |logit diff| {diff:.2e}"


def test_saved_model_loads_in_reference_and_round_trips(tmp_path):
    transformers = pytest.importorskip("transformers")
    _, path = hf_random_checkpoint(tmp_path, "qwen2-bias-gqa")
    ours = M.load_model(path)
    M.save_model(ours, tmp_path / "ours")
    again = M.load_model(tmp_path / "ours")
    for (n1, t1), (n2, t2) in zip(ours.state_dict().items(), again.state_dict().items()):
        assert n1 == n2 and torch.equal(t1, t2), n1
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours").float().eval()
    ids = torch.randint(0, BASE["vocab_size"], (1, 20))
    with torch.no_grad():
        assert (ref(ids).logits - again(ids)).abs().max() < 1e-4


def test_sharded_checkpoint_loads(tmp_path):
    model = M.build_model(M.ModelConfig(**{**BASE, "num_key_value_heads": 2}), seed=3)
    M.save_model(model, tmp_path / "one")
    tensors = load_file(tmp_path / "one" / "model.safetensors")
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    shard_dir = tmp_path / "sharded"
    shard_dir.mkdir()
    (shard_dir / "config.json").write_text((tmp_path / "one" / "config.json").read_text())
    for file, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, shard_dir / file)
    weight_map = {k: f for f, keys in shards.items() for k in keys}
    (shard_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    ids = torch.randint(0, BASE["vocab_size"], (1, 12))
    assert torch.equal(M.load_model(shard_dir)(ids), model(ids))


def test_plain_forward_matches_naive_attention():
    """The default attention path against a hand-written softmax(QK^T)V with a causal mask."""
    c = M.ModelConfig(**{**BASE, "num_key_value_heads": 2})
    q, k, v = torch.randn(2, 7, 4, 16), torch.randn(2, 7, 2, 16), torch.randn(2, 7, 2, 16)
    k_rep, v_rep = k.repeat_interleave(2, dim=2), v.repeat_interleave(2, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k_rep) / 4.0
    scores = scores.masked_fill(torch.ones(7, 7, dtype=torch.bool).triu(1), float("-inf"))
    expected = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v_rep)
    assert torch.allclose(M.plain_causal_attention(0, q, k, v), expected, atol=1e-5)
    assert c.head_size == 16


@pytest.fixture
def saved(tmp_path):
    model = M.build_model(M.ModelConfig(**BASE), seed=0)
    return M.save_model(model, tmp_path / "ck")


def _rewrite_tensors(path, edit):
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors")


def test_missing_tensor_is_named(saved):
    _rewrite_tensors(saved, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"missing tensor model\.layers\.1\.mlp\.up_proj\.weight"):
        M.load_model(saved)


def test_wrong_shape_is_named(saved):
    def edit(t):
        t["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(32, 64)
    _rewrite_tensors(saved, edit)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.k_proj\.weight has shape \[32, 64\], expected \[64, 64\]"):
        M.load_model(saved)


def test_extra_tensor_is_named(saved):
    def edit(t):
        t["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.zeros(8)
    _rewrite_tensors(saved, edit)
    with pytest.raises(ValueError, match=r"unexpected tensor model\.layers\.0\.self_attn\.rotary_emb\.inv_freq"):
        M.load_model(saved)


def test_unknown_model_type_is_named(saved):
    config = json.loads((saved / "config.json").read_text())
    (saved / "config.json").write_text(json.dumps({**config, "model_type": "mamba"}))
    with pytest.raises(ValueError, match="unsupported model_type 'mamba'"):
        M.load_model(saved)


@pytest.mark.parametrize("field,value,message", [
    ("hidden_act", "gelu", "unsupported hidden_act 'gelu'"),
    ("rope_scaling", {"rope_type": "yarn", "factor": 4.0}, "unsupported rope type 'yarn'"),
    ("use_sliding_window", True, "use_sliding_window"),
])
def test_unsupported_config_field_is_named(saved, field, value, message):
    config = json.loads((saved / "config.json").read_text())
    (saved / "config.json").write_text(json.dumps({**config, field: value}))
    with pytest.raises(ValueError, match=message):
        M.load_model(saved)


def test_pickle_checkpoint_is_refused(saved):
    (saved / "model.safetensors").unlink()
    torch.save({"x": torch.zeros(1)}, saved / "pytorch_model.bin")
    with pytest.raises(ValueError, match="pytorch_model.bin.*pickle"):
        M.load_model(saved)


def test_failed_write_keeps_the_old_checkpoint(saved):
    before = (saved / "model.safetensors").read_bytes()
    with pytest.raises(Exception):
        M.write_checkpoint(saved, {"model_type": "llama"}, {"bad": object()})
    assert (saved / "model.safetensors").read_bytes() == before
    assert [p.name for p in saved.parent.iterdir()] == [saved.name]


@pytest.mark.parametrize("shape, out_features, bias", [((1, 48), 96, False), ((3, 1, 48), 112, True),
                                                       ((2, 5, 48), 96, True), ((64, 48), 64, False)])
def test_few_row_linear_splits_and_matches_a_float64_product(monkeypatch, shape, out_features, bias):
    """`linear` on a few rows under no_grad with 2 threads runs as ONE bmm over column blocks,
    and gives the float64 product (to float32 rounding)."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(*shape, generator=g), torch.randn(out_features, shape[-1], generator=g)
    b = torch.randn(out_features, generator=g) if bias else None
    expected = torch.nn.functional.linear(x.double(), w.double(), None if b is None else b.double())
    calls = []
    real_bmm = torch.bmm
    monkeypatch.setattr(torch, "bmm", lambda *a: calls.append(a[1].shape) or real_bmm(*a))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.no_grad():
            out = M.linear(x, w, b)
    finally:
        torch.set_num_threads(threads)
    assert calls == [(2, shape[-1], out_features // 2)]
    assert out.shape == (*shape[:-1], out_features) and out.dtype == torch.float32
    assert torch.allclose(out.double(), expected, atol=1e-5)


@pytest.mark.parametrize("case", ["grad", "one thread", "many rows", "odd features"])
def test_linear_keeps_the_plain_product_where_a_split_does_not_pay(monkeypatch, case):
    """Training (grad on), one thread, more than SPLIT_MAX_ROWS rows, or features that do not
    split evenly: no bmm, and the same values (and gradient) as F.linear."""
    rows = M.SPLIT_MAX_ROWS + 1 if case == "many rows" else 4
    x = torch.randn(rows, 48, requires_grad=case == "grad")
    w = torch.randn(97 if case == "odd features" else 96, 48, requires_grad=case == "grad")
    monkeypatch.setattr(torch, "bmm", lambda *a: pytest.fail("split product used"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1 if case == "one thread" else 2)
    try:
        with torch.set_grad_enabled(case == "grad"):
            out = M.linear(x, w)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(out, torch.nn.functional.linear(x, w))
    if case == "grad":
        out.sum().backward()
        assert torch.allclose(x.grad, w.sum(0).expand_as(x))


def test_model_linears_go_through_linear():
    """Every projection and an untied output layer are model.Linear (the split on few rows)."""
    model = M.build_model(M.ModelConfig(**{**BASE, "tie_word_embeddings": False}), seed=0)
    plain = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and not isinstance(m, M.Linear)]
    assert not plain and isinstance(model.lm_head, M.Linear)
