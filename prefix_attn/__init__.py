"""Shared-prefix attention ops: the one dispatch point between Triton (CUDA) and torch (elsewhere).

    prefix_attention(q, k, v, prefix_lens, scale) -> (out, lse)   queries folded per kv head
    suffix_attention(q, k, v, q_start, scale)     -> (out, lse)   per branch, causal, GQA
    merge_attention(out1, lse1, out2, lse2)       -> out          exact log-sum-exp merge
    suffix_merge_attention(q, k, v, q_start, scale, out1, lse1) -> (out, lse)
                                                  suffix part and merge fused in one pass

Shapes and conventions are documented in prefix_attn/reference.py; lse is fp32, natural log, and
-inf for a row that saw no key. The Triton module is imported lazily, on the first CUDA call,
so that importing `prefix_attn` never imports triton on CPU (TRITON_INTERPRET must be set before
triton is imported, which is the tests' business, not ours).

Why not `kernels/`: transformers (5.25 on) depends on the PyPI package `kernels`, and a top-level
folder of that name in the working directory shadows it, so importing transformers beside this
project failed. tests/test_layout.py checks that no top-level module of ours shadows an installed
distribution.
"""
from . import reference


def _impl(t):
    """The module implementing the ops for tensor t: Triton on CUDA when importable, else torch."""
    if t.is_cuda:
        try:
            from . import triton_attention
            return triton_attention
        except ImportError:
            pass
    return reference


def prefix_attention(q, k, v, prefix_lens, scale):
    return _impl(q).prefix_attention(q, k, v, prefix_lens, scale)


def suffix_attention(q, k, v, q_start, scale):
    return _impl(q).suffix_attention(q, k, v, q_start, scale)


def merge_attention(out1, lse1, out2, lse2):
    return _impl(out1).merge_attention(out1, lse1, out2, lse2)


def suffix_merge_attention(q, k, v, q_start, scale, out1, lse1):
    return _impl(q).suffix_merge_attention(q, k, v, q_start, scale, out1, lse1)
