"""Triton kernels of the shared-prefix attention ops; same signatures as prefix_attn/reference.py.

Design choices:
- One kernel shape serves both attentions: a program owns BLOCK_M query rows of one
  (group-or-branch, kv head) and streams that head's keys in BLOCK_N tiles with an online
  softmax (flash-attention style), so K/V of a kv head are read once per query block.
- Prefix: the rows are all queries that share the prefix (branches x q heads of the kv head x
  tokens, folded by the caller), so the prefix KV is read once for all branches and QK^T is a
  real matrix-matrix product instead of G matrix-vector products.
- Suffix: GQA is handled the same way inside the kernel: the G = Hq // Hkv q heads of a kv head
  and the Tq query tokens are folded into the row axis (row r -> head r // Tq, token r % Tq),
  so decode (Tq = 1) still gets G rows per kv head and K/V are never repeated.
- Softmax runs in base 2 (scores pre-scaled by scale * log2(e), exp2 is the fast path on GPU);
  the stored LSE is converted back to the natural log so it matches the torch reference.
- fp32 accumulation and statistics. tl.dot runs on the input dtype (tensor cores for fp16/bf16)
  with input_precision="ieee", which only matters for fp32 inputs: it disables TF32 so fp32
  results match the reference to ~1e-5 instead of ~1e-3.
- Rows that see no key (empty prefix, padding) give out = 0 and lse = -inf, never NaN: the
  running max is replaced by 0 while it is still -inf, and l = 0 is guarded at the end.
- tl.dot needs every block dim >= 16 on GPU, so BLOCK_M, BLOCK_N >= 16 and D is a power of
  two >= 16. These kernels also run under TRITON_INTERPRET=1 (fp32/fp16) for CPU tests.
- suffix_merge_attention fuses the merge into the suffix pass by starting the online softmax
  from the prefix's (out1, lse1) instead of from zero; merge_attention stays as the plain op.
- Known limit: parallelism is NG (or N) x Hkv x ceil(M / BLOCK_M) programs with no split over
  keys, so a few groups with a very long prefix underuse a big GPU (flash-decoding's split-KV
  would fix that at the cost of a second reduction; not needed at this project's sizes).
"""
import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, Out, Lse, Lens, Start, O1, L1,  # O1/L1: partial result to merge into (HAS_PREV)
    sq_b, sq_h, sq_t,          # q strides: batch (group/branch), head, token (dim stride is 1)
    sk_b, sk_h, sk_s,          # k strides
    sv_b, sv_h, sv_s,          # v strides
    so_b, so_h, so_t,          # out strides (same layout as q)
    sl_b, sl_h, sl_t,          # lse strides
    M, Skv, qk_scale,          # rows per (batch, kv head), key capacity, scale * log2(e)
    G, T,                      # q heads per kv head, query tokens (runtime: M varies every step)
    CAUSAL: tl.constexpr, HAS_PREV: tl.constexpr,
    D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)  # prefix group or branch; int64: caches can pass 2^31 elements
    kvh = tl.program_id(2)

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    # Row r of this kv head is q head kvh * G + r // T, token r % T (prefix: G = 1, T = M).
    head = kvh * G + rows // T
    tok = rows % T
    d = tl.arange(0, D)

    q_off = b * sq_b + head * sq_h + tok * sq_t
    q = tl.load(Q + q_off[:, None] + d[None, :], mask=row_ok[:, None], other=0.0)

    if CAUSAL:
        # Query token t sits at suffix position start + t and sees keys j <= start + t.
        qpos = tl.load(Start + b) + tok
        n_keys = tl.minimum(tl.load(Start + b) + T, Skv)
    else:
        n_keys = tl.minimum(tl.load(Lens + b), Skv)

    o_off = b * so_b + head * so_h + tok * so_t
    l_off = b * sl_b + head * sl_h + tok * sl_t
    if HAS_PREV:
        # Fused merge: a normalised partial result (out1, lse1) is exactly the online-softmax
        # state (acc = out1, l = 1, m = lse1 in base 2), so the suffix keys just continue it.
        lse1 = tl.load(L1 + l_off, mask=row_ok, other=float("-inf"))
        m_i = lse1 * 1.4426950408889634
        l_i = tl.where(lse1 == float("-inf"), 0.0, 1.0)
        o1 = tl.load(O1 + o_off[:, None] + d[None, :], mask=row_ok[:, None], other=0.0)
        acc = tl.where(l_i[:, None] > 0, o1.to(tl.float32), 0.0)
    else:
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D], tl.float32)

    k_base = K + b * sk_b + kvh * sk_h
    v_base = V + b * sv_b + kvh * sv_h
    for start_n in range(0, n_keys, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        col_ok = cols < n_keys
        k = tl.load(k_base + cols[None, :] * sk_s + d[:, None], mask=col_ok[None, :], other=0.0)
        s = tl.dot(q, k, input_precision="ieee") * qk_scale  # [BLOCK_M, BLOCK_N], base-2 units
        valid = col_ok[None, :]
        if CAUSAL:
            valid = valid & (cols[None, :] <= qpos[:, None])
        s = tl.where(valid, s, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        # A row can see no key in this tile (causal) or at all (padding): keep exp2 off -inf - -inf.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + cols[:, None] * sv_s + d[None, :], mask=col_ok[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        m_i = m_new

    has_key = l_i > 0
    out = acc / tl.where(has_key, l_i, 1.0)[:, None]
    # Base-2 LSE times ln(2) = natural-log LSE, the convention of the reference and the merge.
    lse2 = m_i + tl.log2(tl.where(has_key, l_i, 1.0))
    lse = tl.where(has_key, lse2 * 0.6931471805599453, float("-inf"))
    tl.store(Out + o_off[:, None] + d[None, :], out.to(Out.dtype.element_ty), mask=row_ok[:, None])
    tl.store(Lse + l_off, lse, mask=row_ok)


@triton.jit
def _merge_kernel(O1, L1, O2, L2, Out, R, D: tl.constexpr, BLOCK_R: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    d = tl.arange(0, D)
    offs = rows[:, None] * D + d[None, :]
    l1 = tl.load(L1 + rows, mask=row_ok, other=float("-inf"))
    l2 = tl.load(L2 + rows, mask=row_ok, other=float("-inf"))
    m = tl.maximum(l1, l2)
    m = tl.where(m == float("-inf"), 0.0, m)  # both sides empty: both weights 0, output 0
    w1 = tl.exp(l1 - m)
    w2 = tl.exp(l2 - m)
    o1 = tl.load(O1 + offs, mask=row_ok[:, None], other=0.0).to(tl.float32)
    o2 = tl.load(O2 + offs, mask=row_ok[:, None], other=0.0).to(tl.float32)
    # where(), not multiply: an empty side's out may hold anything, its weight must be exactly 0.
    num = tl.where(w1[:, None] > 0, o1 * w1[:, None], 0.0) + tl.where(w2[:, None] > 0, o2 * w2[:, None], 0.0)
    den = w1 + w2
    out = num / tl.where(den > 0, den, 1.0)[:, None]
    tl.store(Out + offs, out.to(Out.dtype.element_ty), mask=row_ok[:, None])


def _block(n, lo=16, hi=64):
    return max(lo, min(hi, triton.next_power_of_2(max(n, 1))))


def _check_qkv(q, k, v):
    assert q.dim() == 4 and k.dim() == 4 and k.shape == v.shape, (q.shape, k.shape, v.shape)
    assert q.dtype == k.dtype == v.dtype and q.dtype in (torch.float32, torch.float16, torch.bfloat16)
    assert q.device == k.device == v.device
    D = q.shape[-1]
    assert k.shape[-1] == D and D >= 16 and D & (D - 1) == 0, f"head_dim {D}: need a power of two >= 16"
    assert q.stride(-1) == k.stride(-1) == v.stride(-1) == 1, "last dim must be contiguous"


def _launch(q, k, v, lens, start, scale, M, G, T, causal, grid_b, grid_h, prev=None):
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = torch.empty(q.shape[:3], device=q.device, dtype=torch.float32)
    if prev is not None:  # read with out's / lse's strides, so make them the same layout
        o1, l1 = prev[0].contiguous(), prev[1].contiguous()
        assert o1.shape == out.shape and o1.dtype == out.dtype, (o1.shape, o1.dtype)
        assert l1.shape == lse.shape and l1.dtype == torch.float32, (l1.shape, l1.dtype)
    else:
        o1, l1 = out, lse  # unused
    BLOCK_M, BLOCK_N = _block(M), _block(k.shape[2])
    grid = (triton.cdiv(M, BLOCK_M), grid_b, grid_h)
    _attn_fwd_kernel[grid](
        q, k, v, out, lse, lens, start, o1, l1,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3], *lse.stride(),
        M, k.shape[2], scale * LOG2E, G, T,
        CAUSAL=causal, HAS_PREV=prev is not None, D=q.shape[-1], BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
    )
    return out, lse


def prefix_attention(q, k, v, prefix_lens, scale):
    """q [NG, Hkv, M, D]; k, v [NG, Hkv, Pmax, D]; prefix_lens [NG]. See reference.py."""
    _check_qkv(q, k, v)
    NG, Hkv, M, D = q.shape
    assert k.shape[:2] == (NG, Hkv), (q.shape, k.shape)
    assert prefix_lens.shape == (NG,) and not prefix_lens.is_floating_point()
    lens = prefix_lens.to(device=q.device, dtype=torch.int32).contiguous()
    # Prefix rows need no head/token decoding: G = 1 head per kv head, T = M tokens.
    return _launch(q, k, v, lens, lens, scale, M, G=1, T=M, causal=False, grid_b=NG, grid_h=Hkv)


def _suffix(q, k, v, q_start, scale, prev):
    _check_qkv(q, k, v)
    N, Hq, Tq, D = q.shape
    Hkv = k.shape[1]
    assert k.shape[0] == N and Hq % Hkv == 0, (q.shape, k.shape)
    assert q_start.shape == (N,) and not q_start.is_floating_point()
    start = q_start.to(device=q.device, dtype=torch.int32).contiguous()
    G = Hq // Hkv
    return _launch(q, k, v, start, start, scale, G * Tq, G=G, T=Tq, causal=True, grid_b=N, grid_h=Hkv,
                   prev=prev)


def suffix_attention(q, k, v, q_start, scale):
    """q [N, Hq, Tq, D]; k, v [N, Hkv, Smax, D]; q_start [N]. See reference.py."""
    return _suffix(q, k, v, q_start, scale, prev=None)


def suffix_merge_attention(q, k, v, q_start, scale, out1, lse1):
    """suffix_attention merged into (out1 [N, Hq, Tq, D], lse1 [N, Hq, Tq]) in one pass -> (out, lse)."""
    return _suffix(q, k, v, q_start, scale, prev=(out1, lse1))


def merge_attention(out1, lse1, out2, lse2):
    """Exact LSE merge of two partial attentions. out [..., D], lse [...] fp32. See reference.py."""
    assert out1.shape == out2.shape and lse1.shape == lse2.shape == out1.shape[:-1]
    assert out1.dtype == out2.dtype and lse1.dtype == lse2.dtype == torch.float32
    # The kernel indexes rows flat; callers often pass unfolded (permuted) prefix outputs.
    out1, lse1, out2, lse2 = (t.contiguous() for t in (out1, lse1, out2, lse2))
    D = out1.shape[-1]
    assert D & (D - 1) == 0, f"head_dim {D}: need a power of two"
    out = torch.empty_like(out1)
    R = lse1.numel()
    BLOCK_R = 16
    _merge_kernel[(triton.cdiv(R, BLOCK_R),)](out1, lse1, out2, lse2, out, R, D=D, BLOCK_R=BLOCK_R)
    return out
