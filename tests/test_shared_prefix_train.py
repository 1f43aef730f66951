"""Shared-prefix training forward (policy.shared_prefix_logits) against the plain per-sequence
pass: logits, loss and every parameter's gradient, with ragged suffixes, GQA, several groups of
different prompt lengths and G in {1, 2, 8}."""
import pytest
import torch

import model as M
from policy import shared_prefix_logits


def _model(kv_heads):
    config = M.ModelConfig(vocab_size=64, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=512)
    return M.init_weights(M.Transformer(config), seed=2, std=0.3)


def _case(G, prompt_lens, seed=0):
    g = torch.Generator().manual_seed(seed)
    prefixes = [torch.randint(1, 64, (n,), generator=g).tolist() for n in prompt_lens]
    suffixes, group_of, masks = [], [], []
    for p in range(len(prefixes)):
        for _ in range(G):
            n = int(torch.randint(2, 30, (1,), generator=g))          # ragged suffixes
            suffixes.append(torch.randint(1, 64, (n,), generator=g).tolist())
            masks.append((torch.rand(n - 1, generator=g) < 0.6).float())
            group_of.append(p)
    return prefixes, suffixes, group_of, masks


def _rel(x, ref):
    """Relative error ||x - ref|| / ||ref|| (fp32 sums in another order differ by ~1e-7)."""
    return ((x - ref).norm() / ref.norm().clamp(min=1e-12)).item()


def _loss_plain(model, prefixes, suffixes, group_of, masks):
    """Reference: every sequence alone, prompt included, plain causal attention."""
    total, logits = 0.0, []
    for s, g, m in zip(suffixes, group_of, masks):
        ids = torch.tensor([prefixes[g] + s])
        out = model(ids[:, :-1])[0]
        P = len(prefixes[g])
        logits.append(out[P - 1:])                      # predictions of the suffix tokens
        lp = torch.log_softmax(out[P:], -1).gather(-1, ids[0, P + 1:, None])[:, 0]
        total = total - (lp * m).sum()
    return total, logits


def _loss_shared(model, prefixes, suffixes, group_of, masks):
    out = shared_prefix_logits(model, prefixes, suffixes, group_of)
    total = 0.0
    for n, (s, m) in enumerate(zip(suffixes, masks)):
        lp = torch.log_softmax(out[n, :len(s) - 1], -1).gather(-1, torch.tensor(s[1:])[:, None])[:, 0]
        total = total - (lp * m).sum()
    return total, out


@pytest.mark.parametrize("G", [1, 2, 8])
@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_logits_loss_and_gradients_equal_the_plain_pass(G, kv_heads):
    prefixes, suffixes, group_of, masks = _case(G, prompt_lens=[17, 5, 40])
    plain_model, shared_model = _model(kv_heads), _model(kv_heads)
    loss_ref, logits_ref = _loss_plain(plain_model, prefixes, suffixes, group_of, masks)
    loss, logits = _loss_shared(shared_model, prefixes, suffixes, group_of, masks)
    for n, s in enumerate(suffixes):
        # row n's logits at its suffix positions (the first one is predicted by the prompt's
        # last token, which the shared pass does not return); relative to the largest logit
        ref = logits_ref[n][1:len(s)]
        assert _rel(logits[n, :len(s) - 1], ref) < 1e-5
    assert loss.item() == pytest.approx(loss_ref.item(), rel=1e-5)
    loss_ref.backward()
    loss.backward()
    for (name, p), q in zip(plain_model.named_parameters(), shared_model.parameters()):
        assert _rel(q.grad, p.grad) < 1e-5, name
