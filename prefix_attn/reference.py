"""Torch reference of the shared-prefix attention ops (used on CPU, and as the oracle in tests).

Decode attention over [shared prefix ; per-branch suffix] is split into two partial attentions
that each return (out, lse), merged exactly by log-sum-exp:

    prefix_attention  all queries of the branches sharing a prefix, folded into one query axis
                      per kv head, against ONE copy of the prefix KV: a matrix-matrix product.
    suffix_attention  each branch against its own suffix KV, causal, GQA.
    merge_attention   out = (out1 w1 + out2 w2) / (w1 + w2), w_i = exp(lse_i - max(lse1, lse2)).
    suffix_merge_attention  the last two fused (one kernel on GPU); also returns the merged lse.

Design choices:
- Math in fp32 whatever the input dtype; `out` is returned in the input dtype, `lse` in fp32,
  natural log. An attention over zero keys gives out = 0 and lse = -inf, and the merge treats
  lse = -inf as "weight exactly 0" (never 0 * NaN), so empty prefixes/suffixes need no special
  casing by the caller.
- Cache padding (positions past a prefix length or a query's causal limit) is masked, but
  must hold finite values here (p = 0 times NaN is NaN): allocate caches with zeros. The
  Triton kernels never load past a length, so they are safe either way.
- Masks are built from lengths/positions with broadcasting, not materialised per branch, so
  these ops stay usable as the CPU path of the engine, not only as a test oracle.
"""
import torch


def _masked_attention(q, k, v, valid, scale):
    """softmax(q k^T * scale) v over the keys where `valid` is True, plus the row LSE.

    q [..., M, D], k/v [..., S, D], valid broadcastable to [..., M, S] (None: all keys valid).
    fp32 in, fp32 out.
    """
    s = torch.matmul(q * scale, k.transpose(-1, -2))  # scale the (few) queries, not the scores
    if valid is not None:
        s = s.masked_fill(~valid, float("-inf"))
    m = s.amax(dim=-1)
    p = torch.softmax(s, dim=-1)  # one fused pass: faster on CPU than exp + sum by hand
    # The largest probability is exp(m - lse), so lse = m - log(max p): no second exp pass.
    lse = m - torch.log(p.amax(dim=-1))
    if valid is not None:  # a row with no key: softmax gives NaN; we want out = 0, lse = -inf
        empty = torch.isinf(m)
        p = p.masked_fill(empty[..., None], 0.0)
        lse = lse.masked_fill(empty, float("-inf"))
    return torch.matmul(p, v), lse


def prefix_attention(q, k, v, prefix_lens, scale):
    """q [NG, Hkv, M, D]; k, v [NG, Hkv, Pmax, D]; prefix_lens [NG]. No causal mask.

    Returns out [NG, Hkv, M, D] (q.dtype) and lse [NG, Hkv, M] (fp32, natural log).
    """
    NG, Hkv, M, D = q.shape
    assert k.shape == v.shape and k.shape[:2] == (NG, Hkv) and k.shape[3] == D, (q.shape, k.shape)
    assert prefix_lens.shape == (NG,), prefix_lens.shape
    pos = torch.arange(k.shape[2], device=q.device)
    valid = (pos[None, :] < prefix_lens.to(q.device)[:, None])[:, None, None, :]  # [NG,1,1,P]
    if bool(valid.all()):  # unpadded prefixes (the common case): skip the masking pass
        valid = None
    out, lse = _masked_attention(q.float(), k.float(), v.float(), valid, scale)
    return out.to(q.dtype), lse


def _causal_suffix_mask(q_start, Tq, S, device):
    """[N, Tq, S]: query t of branch n (at suffix slot q_start[n] + t) sees keys j <= that slot."""
    qpos = q_start.to(device)[:, None] + torch.arange(Tq, device=device)[None, :]
    return torch.arange(S, device=device)[None, None, :] <= qpos[:, :, None]


def suffix_attention(q, k, v, q_start, scale):
    """q [N, Hq, Tq, D]; k, v [N, Hkv, Smax, D]; q_start [N]. Causal within the suffix.

    Query t of branch n sits at suffix position q_start[n] + t and sees keys j <= q_start[n] + t.
    Query head h uses kv head h // (Hq // Hkv). Returns out [N, Hq, Tq, D], lse [N, Hq, Tq].
    """
    N, Hq, Tq, D = q.shape
    assert k.shape == v.shape and k.shape[0] == N and k.shape[3] == D, (q.shape, k.shape)
    Hkv, S = k.shape[1], k.shape[2]
    assert Hq % Hkv == 0, (Hq, Hkv)
    assert q_start.shape == (N,), q_start.shape
    G = Hq // Hkv
    # Group q heads by kv head instead of repeating K/V G times.
    qg = q.float().reshape(N, Hkv, G, Tq, D)
    valid = _causal_suffix_mask(q_start, Tq, S, q.device)
    out, lse = _masked_attention(qg, k.float()[:, :, None], v.float()[:, :, None],
                                 valid[:, None, None], scale)
    return out.reshape(N, Hq, Tq, D).to(q.dtype), lse.reshape(N, Hq, Tq)


def merge_attention(out1, lse1, out2, lse2):
    """Exact LSE merge of two partial attentions over disjoint key sets. out [..., D], lse [...]."""
    assert out1.shape == out2.shape and lse1.shape == lse2.shape == out1.shape[:-1]
    l1, l2 = lse1.float(), lse2.float()
    m = torch.maximum(l1, l2)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)  # both empty: weights 0, not NaN
    w1, w2 = torch.exp(l1 - m)[..., None], torch.exp(l2 - m)[..., None]
    # where(), not multiply: an empty side's out may be anything; its weight must be exactly 0.
    num = torch.where(w1 > 0, out1.float() * w1, 0.0) + torch.where(w2 > 0, out2.float() * w2, 0.0)
    den = w1 + w2
    return (num / torch.where(den > 0, den, torch.ones_like(den))).to(out1.dtype)


def suffix_merge_attention(q, k, v, q_start, scale, out1, lse1):
    """suffix_attention merged into a partial result (out1, lse1) -> (out, lse): the fused op.

    out1 [N, Hq, Tq, D] and lse1 [N, Hq, Tq] are the prefix part, unfolded to q's layout. The
    returned lse is that of the union of both key sets. Written as one online-softmax step
    (the suffix's scores join the prefix's running max and sum), which is also the fewest
    passes for the engine's CPU decode path.
    """
    N, Hq, Tq, D = q.shape
    assert k.shape == v.shape and k.shape[0] == N and k.shape[3] == D, (q.shape, k.shape)
    Hkv, S = k.shape[1], k.shape[2]
    assert Hq % Hkv == 0 and q_start.shape == (N,), (Hq, Hkv, q_start.shape)
    assert out1.shape == q.shape and lse1.shape == q.shape[:-1], (out1.shape, lse1.shape)
    G = Hq // Hkv
    # The G query heads of a kv head and their tokens share one matmul with that head's keys.
    s = torch.matmul(q.float().reshape(N, Hkv, G * Tq, D) * scale, k.float().transpose(-1, -2))
    valid = _causal_suffix_mask(q_start, Tq, S, q.device)
    s = s.view(N, Hkv, G, Tq, S).masked_fill(~valid[:, None, None], float("-inf"))
    l1 = lse1.float().view(N, Hkv, G, Tq)
    m = torch.maximum(s.amax(-1), l1)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)  # both sides empty: weights 0
    p = torch.exp(s - m[..., None])
    w1 = torch.exp(l1 - m)
    num = torch.matmul(p.view(N, Hkv, G * Tq, S), v.float()).view(N, Hkv, G, Tq, D)
    # where(), not multiply: an empty prefix's out may be anything; its weight must be exactly 0.
    num = num + torch.where(w1[..., None] > 0, out1.float().view(N, Hkv, G, Tq, D) * w1[..., None], 0.0)
    den = p.sum(-1) + w1
    out = num / torch.where(den > 0, den, torch.ones_like(den))[..., None]
    return out.reshape(N, Hq, Tq, D).to(q.dtype), (m + torch.log(den)).reshape(N, Hq, Tq)
