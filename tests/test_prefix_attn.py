"""Shared-prefix attention: reference ops and Triton kernels vs plain attention over [prefix ; suffix].

On a machine without CUDA the Triton kernels run under TRITON_INTERPRET=1 (fp32, fp16) on CPU
tensors; with CUDA the same tests run the compiled kernels on the GPU (fp32, fp16, bf16).
"""
import math
import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"  # must precede the first import of triton

TRITON_ERR = ""
try:
    from prefix_attn import triton_attention as tri
except ImportError as e:  # triton missing or broken: the torch path is still tested
    tri, TRITON_ERR = None, str(e)

import prefix_attn
from prefix_attn import reference as ref

DEVICE = "cuda" if CUDA else "cpu"
needs_triton = pytest.mark.skipif(tri is None, reason=f"triton not importable: {TRITON_ERR}")
TRITON_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])
TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
GARBAGE = 100.0  # finite filler for cache padding: a mask bug shows up as a large error


def make_scenario(prefix_lens, branches, suffix_lens, Tq, Hq, Hkv, D, dtype=torch.float32,
                  device=DEVICE, seed=0):
    """NG prefix groups; group g has branches[g] branches with their own suffix lengths.

    suffix_lens[n] counts branch n's suffix tokens including its Tq new ones, so q_start = len - Tq.
    """
    g = torch.Generator().manual_seed(seed)
    NG, N = len(prefix_lens), sum(branches)
    assert len(suffix_lens) == N
    Pmax, Smax = max(max(prefix_lens), 1), max(suffix_lens) + 2  # + 2: padding to ignore

    def rand(*shape):
        return torch.randn(*shape, generator=g)

    pk, pv = rand(NG, Hkv, Pmax, D), rand(NG, Hkv, Pmax, D)
    sk, sv = rand(N, Hkv, Smax, D), rand(N, Hkv, Smax, D)
    for i, L in enumerate(prefix_lens):
        pk[i, :, L:], pv[i, :, L:] = GARBAGE, GARBAGE
    for i, L in enumerate(suffix_lens):
        sk[i, :, L:], sv[i, :, L:] = GARBAGE, GARBAGE
    conv = dict(device=device, dtype=dtype)
    return dict(
        q=rand(N, Hq, Tq, D).to(**conv), pk=pk.to(**conv), pv=pv.to(**conv),
        sk=sk.to(**conv), sv=sv.to(**conv),
        prefix_lens=torch.tensor(prefix_lens, device=device),
        q_start=torch.tensor([L - Tq for L in suffix_lens], device=device),
        group_of=[gi for gi, b in enumerate(branches) for _ in range(b)],
        branches=branches, scale=1.0 / math.sqrt(D),
    )


def fold(q, branches, Hkv):
    """[N, Hq, Tq, D] -> [NG, Hkv, Mmax, D], M = (branch, q head of the kv head, token), padded."""
    N, Hq, Tq, D = q.shape
    G, Mmax = Hq // Hkv, max(branches) * (Hq // Hkv) * Tq
    out = q.new_zeros(len(branches), Hkv, Mmax, D)
    n0 = 0
    for gi, b in enumerate(branches):
        x = q[n0:n0 + b].reshape(b, Hkv, G, Tq, D).permute(1, 0, 2, 3, 4).reshape(Hkv, b * G * Tq, D)
        out[gi, :, :x.shape[1]] = x
        n0 += b
    return out


def unfold(x, branches, Hq, Tq):
    """Inverse of fold for out [NG, Hkv, Mmax, D] or lse [NG, Hkv, Mmax] (padding dropped)."""
    Hkv, G = x.shape[1], Hq // x.shape[1]
    parts = []
    for gi, b in enumerate(branches):
        y = x[gi, :, :b * G * Tq].reshape(Hkv, b, G, Tq, *x.shape[3:])
        parts.append(y.transpose(0, 1).reshape(b, Hq, Tq, *x.shape[3:]))
    return torch.cat(parts)


def plain_attention(s):
    """Oracle: per branch, softmax(QK^T * scale + causal mask) V over [its prefix ; its suffix], fp64."""
    q = s["q"].double()
    N, Hq, Tq, D = q.shape
    Hkv = s["pk"].shape[1]
    out = torch.zeros(N, Hq, Tq, D, dtype=torch.float64, device=q.device)
    for n in range(N):
        gi, qs = s["group_of"][n], int(s["q_start"][n])
        P, L = int(s["prefix_lens"][gi]), qs + Tq
        k = torch.cat([s["pk"][gi, :, :P], s["sk"][n, :, :L]], dim=1).double()  # [Hkv, P + L, D]
        v = torch.cat([s["pv"][gi, :, :P], s["sv"][n, :, :L]], dim=1).double()
        k, v = k.repeat_interleave(Hq // Hkv, 0), v.repeat_interleave(Hq // Hkv, 0)
        key_pos = torch.arange(P + L, device=q.device) - P  # suffix position; prefix is < 0
        mask = key_pos[None, :] <= (qs + torch.arange(Tq, device=q.device))[:, None]
        att = (q[n] @ k.transpose(-1, -2) * s["scale"]).masked_fill(~mask, float("-inf"))
        out[n] = att.softmax(-1) @ v
    return out


def shared_prefix_attention(ops, s):
    """Run the split attention exactly as the engine does: fold, prefix, unfold, suffix, merge."""
    q, branches = s["q"], s["branches"]
    N, Hq, Tq, D = q.shape
    Hkv = s["pk"].shape[1]
    o1, l1 = ops.prefix_attention(fold(q, branches, Hkv), s["pk"], s["pv"], s["prefix_lens"], s["scale"])
    o1, l1 = unfold(o1, branches, Hq, Tq), unfold(l1, branches, Hq, Tq)
    o2, l2 = ops.suffix_attention(q, s["sk"], s["sv"], s["q_start"], s["scale"])
    return ops.merge_attention(o1, l1, o2, l2), (o1, l1, o2, l2)


# GQA (Hq=4, Hkv=2) and MHA; ragged prefixes (one empty, several not multiples of 16/64, one
# spanning several key tiles), ragged branch counts and suffix lengths; decode and Tq > 1.
SCENARIOS = {
    "gqa_decode": dict(prefix_lens=[37, 0, 130], branches=[3, 1, 2], suffix_lens=[1, 5, 2, 3, 9, 1],
                       Tq=1, Hq=4, Hkv=2, D=32),
    "gqa_append": dict(prefix_lens=[19, 70], branches=[2, 3], suffix_lens=[4, 11, 3, 80, 6],
                       Tq=3, Hq=4, Hkv=2, D=16),
    "mha_decode_d64": dict(prefix_lens=[65, 5], branches=[2, 2], suffix_lens=[2, 7, 1, 4],
                           Tq=1, Hq=2, Hkv=2, D=64),
}


@pytest.mark.parametrize("name", SCENARIOS)
def test_reference_matches_plain_attention(name):
    s = make_scenario(**SCENARIOS[name], device="cpu")
    out, (o1, l1, o2, l2) = shared_prefix_attention(ref, s)
    torch.testing.assert_close(out.double(), plain_attention(s), atol=1e-5, rtol=1e-5)
    assert l1.dtype == l2.dtype == torch.float32 and out.dtype == s["q"].dtype
    # The empty prefix group gives lse = -inf and out = 0, and the merge still has no NaN.
    for n, gi in enumerate(s["group_of"]):
        if s["prefix_lens"][gi] == 0:
            assert torch.isneginf(l1[n]).all() and (o1[n] == 0).all()


def test_reference_lse_is_natural_log():
    s = make_scenario(prefix_lens=[9], branches=[1], suffix_lens=[3], Tq=1, Hq=2, Hkv=1, D=16, device="cpu")
    q = fold(s["q"], [1], 1)
    _, lse = ref.prefix_attention(q, s["pk"], s["pv"], s["prefix_lens"], s["scale"])
    expect = torch.logsumexp(q[0, 0] @ s["pk"][0, 0, :9].T * s["scale"], dim=-1)
    torch.testing.assert_close(lse[0, 0], expect, atol=1e-5, rtol=1e-5)


def test_merge_handles_empty_sides():
    o = torch.randn(3, 8)
    inf = torch.full((3,), float("-inf"))
    lse = torch.randn(3)
    nan = torch.full((3, 8), float("nan"))  # an empty side's out must not leak, even as NaN
    for ops in [ref] + ([tri] if tri is not None else []):
        dev = lambda t: t.to(DEVICE) if ops is tri else t
        torch.testing.assert_close(ops.merge_attention(dev(nan), dev(inf), dev(o), dev(lse)).cpu(), o)
        torch.testing.assert_close(ops.merge_attention(dev(o), dev(lse), dev(nan), dev(inf)).cpu(), o)
        both = ops.merge_attention(dev(o), dev(inf), dev(o), dev(inf)).cpu()
        assert (both == 0).all()


@needs_triton
@pytest.mark.parametrize("dtype", TRITON_DTYPES, ids=str)
@pytest.mark.parametrize("name", SCENARIOS)
def test_triton_matches_reference_and_plain(name, dtype):
    s = make_scenario(**SCENARIOS[name], dtype=dtype)
    out, parts = shared_prefix_attention(tri, s)
    assert out.device.type == DEVICE and out.dtype == dtype
    tol = TOL[dtype]
    # Reference in fp32 on the same (rounded) inputs: each partial op must agree, LSE included.
    s32 = {k: (v.float() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in s.items()}
    ref_out, ref_parts = shared_prefix_attention(ref, s32)
    for got, want in zip(parts, ref_parts):
        torch.testing.assert_close(got.float(), want, atol=tol, rtol=tol, equal_nan=False)
    torch.testing.assert_close(out.float(), ref_out, atol=tol, rtol=tol)
    torch.testing.assert_close(out.double(), plain_attention(s), atol=tol, rtol=tol)


@pytest.mark.parametrize("name", ["gqa_decode", "gqa_append"])
def test_fused_suffix_merge(name):
    # The fused op must equal suffix + merge, for the reference and (when present) Triton.
    impls = [(ref, torch.float32)] + ([(tri, dt) for dt in TRITON_DTYPES] if tri is not None else [])
    for ops, dtype in impls:
        s = make_scenario(**SCENARIOS[name], dtype=dtype, device=DEVICE if ops is tri else "cpu")
        out, (o1, l1, o2, l2) = shared_prefix_attention(ops, s)
        fused, lse = ops.suffix_merge_attention(s["q"], s["sk"], s["sv"], s["q_start"], s["scale"], o1, l1)
        tol = TOL[dtype]
        torch.testing.assert_close(fused.float(), out.float(), atol=tol, rtol=tol)
        torch.testing.assert_close(fused.double(), plain_attention(s), atol=tol, rtol=tol)
        torch.testing.assert_close(lse, torch.logaddexp(l1, l2), atol=tol, rtol=tol)


@needs_triton
def test_triton_prefix_tiles_and_block_edges():
    # Prefix lengths around tile boundaries (BLOCK_N = 64 here) and more folded rows than BLOCK_M.
    s = make_scenario(prefix_lens=[64, 63, 129, 1], branches=[9, 1, 2, 1], suffix_lens=[2] * 13,
                      Tq=1, Hq=8, Hkv=1, D=16)
    q = fold(s["q"], s["branches"], 1)
    assert q.shape[2] > 64  # several query blocks
    got = tri.prefix_attention(q, s["pk"], s["pv"], s["prefix_lens"], s["scale"])
    want = ref.prefix_attention(q, s["pk"], s["pv"], s["prefix_lens"], s["scale"])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


@needs_triton
def test_triton_accepts_strided_views():
    # The engine slices caches (e.g. [:, :, :Pmax] of a bigger buffer): only the last dim must be dense.
    s = make_scenario(prefix_lens=[20, 33], branches=[1, 2], suffix_lens=[3, 5, 2], Tq=1, Hq=4, Hkv=2, D=32)
    big_k = torch.zeros(2, 2, 50, 32, device=DEVICE)
    big_k[:, :, :33] = s["pk"]
    pk = big_k[:, :, :33]
    q = fold(s["q"], s["branches"], 2)
    got = tri.prefix_attention(q, pk, s["pv"], s["prefix_lens"], s["scale"])
    want = ref.prefix_attention(q, s["pk"], s["pv"], s["prefix_lens"], s["scale"])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
    q_t = s["q"].transpose(1, 2).contiguous().transpose(1, 2)  # [N, Tq, Hq, D] storage, as from a linear
    got = tri.suffix_attention(q_t, s["sk"], s["sv"], s["q_start"], s["scale"])
    want = ref.suffix_attention(s["q"], s["sk"], s["sv"], s["q_start"], s["scale"])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


def test_dispatch():
    s = make_scenario(prefix_lens=[5], branches=[2], suffix_lens=[2, 3], Tq=1, Hq=2, Hkv=1, D=16, device="cpu")
    assert prefix_attn._impl(s["q"]) is ref
    out, _ = shared_prefix_attention(prefix_attn, s)
    torch.testing.assert_close(out, shared_prefix_attention(ref, s)[0], atol=0, rtol=0)
    if CUDA and tri is not None:
        assert prefix_attn._impl(s["q"].cuda()) is tri


@needs_triton
@pytest.mark.slow
def test_triton_bigger_shapes():
    # Engine-like decode shape: 2 prompts x 8 branches, GQA 4:1, D = 64, long ragged prefixes.
    cfg = dict(prefix_lens=[300, 517], branches=[8, 8], suffix_lens=list(range(1, 17)),
               Tq=1, Hq=8, Hkv=2, D=64)
    for dtype in TRITON_DTYPES:
        s = make_scenario(**cfg, dtype=dtype)
        out, _ = shared_prefix_attention(tri, s)
        torch.testing.assert_close(out.double(), plain_attention(s), atol=TOL[dtype], rtol=TOL[dtype])
