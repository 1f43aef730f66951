"""model.add_copy_circuit: a previous-token head and an induction head built into a new model.

References: the attention pattern recomputed by hand from the model's own projections (plain
softmax over q.k, no engine, no SDPA), an induction copier written here (the token that followed
the latest earlier occurrence of the current token), and transformers loading the checkpoint.
"""
import math
from types import SimpleNamespace

import pytest
import torch

import model as M
import train
from sft import copy_drill_batch


def circuit_model(vocab=2048, seed=0, **overrides):
    model = M.build_model(M.preset_config("tiny-copy", vocab_size=vocab, **overrides), seed=seed)
    return M.add_copy_circuit(model, seed=seed)


def induction_reference(ids: torch.Tensor) -> torch.Tensor:
    """[B, T] -> [B, T]: the token after the latest earlier occurrence of ids[b, p], else -1."""
    out = torch.full_like(ids, -1)
    for b in range(ids.shape[0]):
        last = {}
        for p in range(ids.shape[1]):
            t = ids[b, p].item()
            if t in last:
                out[b, p] = ids[b, last[t] + 1]
            last[t] = p
    return out


def test_previous_token_head_attends_to_the_previous_position():
    model = circuit_model()
    T = 600
    ids = torch.randint(0, 2048, (1, T), generator=torch.Generator().manual_seed(0))
    attn = model.model.layers[0].self_attn
    x = model.model.layers[0].input_layernorm(model.model.embed_tokens(ids))
    D = attn.head_dim
    q = attn.q_proj(x)[..., :D].view(1, T, 1, D)
    k = attn.k_proj(x)[..., :D].view(1, T, 1, D)
    cos, sin = M.rope_cos_sin(model.config, torch.arange(T)[None], torch.float32)
    q, k = M.apply_rope(q, cos, sin)[0, :, 0], M.apply_rope(k, cos, sin)[0, :, 0]
    scores = (q @ k.T / math.sqrt(D)).masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), -math.inf)
    probs = scores.softmax(-1)
    on_previous = probs[torch.arange(1, T), torch.arange(T - 1)]
    assert on_previous.min().item() > 0.85 and on_previous.mean().item() > 0.9


def test_circuit_copies_from_the_first_step():
    ids, mask = copy_drill_batch(torch.arange(4, 2048), rows=8, length=256,
                                 generator=torch.Generator().manual_seed(3))
    # the repeats' positions, where an induction copier predicts the next token (a filler token
    # that recurs by chance can make it predict another, more recent successor: those are left out)
    reference = induction_reference(ids)[:, :-1]
    scored = mask.bool() & (reference == ids[:, 1:])
    assert scored.sum() > 0.9 * mask.sum()
    reference = reference[scored]

    def loss_and_agreement(model):
        with torch.no_grad():
            logits = model(ids[:, :-1])[scored]
        return (torch.nn.functional.cross_entropy(logits, reference).item(),
                (logits.argmax(-1) == reference).float().mean().item())

    uniform = math.log(2048)
    plain = loss_and_agreement(M.build_model(M.preset_config("tiny-copy", vocab_size=2048), seed=0))
    default = loss_and_agreement(circuit_model())
    sharp = loss_and_agreement(M.add_copy_circuit(M.build_model(M.preset_config("tiny-copy", vocab_size=2048)),
                                                  copy_gain=30.0))
    assert plain[0] > 0.95 * uniform and plain[1] < 0.05
    assert default[0] < 0.55 * uniform          # the default gain: a soft copy (about 3.6 nats against 7.6)
    assert sharp[0] < 0.2 * uniform and sharp[1] > 0.85


@pytest.mark.parametrize("overrides, message", [
    (dict(num_key_value_heads=2), "one kv head per query head"),
    (dict(attention_bias=False), "attention biases"),
    (dict(num_hidden_layers=1), ">= 2 layers"),
    (dict(rope_theta=10000.0), "raise rope_theta"),
])
def test_circuit_refuses_a_shape_it_cannot_build_on(overrides, message):
    model = M.build_model(M.preset_config("tiny-copy", vocab_size=64, **overrides))
    with pytest.raises(ValueError, match=message):
        M.add_copy_circuit(model)


def test_frozen_circuit_survives_a_training_step():
    model = circuit_model(vocab=64)
    slices = M.copy_circuit_slices(model.config)
    train.freeze_slices(model, slices)
    before = {k: v.clone() for k, v in model.named_parameters()}
    optimizer = train.make_optimizer(model, SimpleNamespace(lr=1e-2, weight_decay=0.0, beta2=0.99))
    ids = torch.randint(0, 64, (2, 32))
    torch.nn.functional.cross_entropy(model(ids[:, :-1]).reshape(-1, 64), ids[:, 1:].reshape(-1)).backward()
    train.optimizer_step(model, optimizer, 1e-2, 1.0)
    params = dict(model.named_parameters())
    for name, index in slices.items():
        assert torch.equal(params[name][index], before[name][index]), name
        rest = torch.ones_like(params[name], dtype=torch.bool)
        rest[index] = False
        if name.endswith("weight"):   # the other heads' parts of the same tensor do train
            assert not torch.equal(params[name][rest], before[name][rest]), name


def test_circuit_model_loads_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = circuit_model(vocab=300).eval()
    M.save_model(model, tmp_path / "ckpt")
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt").float().eval()
    ids = torch.randint(0, 300, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (ref(ids).logits - model(ids)).abs().max().item()
    assert diff < 1e-4
