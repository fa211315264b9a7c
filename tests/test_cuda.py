"""CUDA: the block-sparse engine on GPU tensors against the fp64 reference.

Skipped cleanly on machines without CUDA (CI has none). On a GPU the engine runs its
plan with plain differentiable ops (the fused CPU kernel is CPU-only).
"""

from __future__ import annotations

import pytest
import torch

import sparse_attention as sa
from tests.conftest import assert_within_baseline, make_qkv

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

PATTERNS = {m.name: m.make() for m in sa.mechanisms("static")}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("name", sorted(PATTERNS))
def test_blocksparse_cuda_matches_reference(name, dtype):
    pattern = PATTERNS[name]
    B, Hq, Hkv, N, S, D = 2, 4, 2, 97, 113, 32
    q, k, v = make_qkv(B, Hq, Hkv, N, S, D, dtype=torch.float64)
    mask = pattern.mask(N, S)
    golden = sa.reference_attention(q, k, v, mask)
    g = torch.randn_like(golden)
    golden_grads = torch.autograd.grad(golden, (q, k, v), g)
    lp = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    ref_lp = sa.reference_attention(*lp, mask, upcast=False)
    ref_lp_grads = torch.autograd.grad(ref_lp, lp, g.to(dtype))
    dev = [t.detach().to("cuda", dtype).requires_grad_() for t in (q, k, v)]
    out = sa.attention(*dev, pattern, backend="blocksparse")
    grads = torch.autograd.grad(out, dev, g.to("cuda", dtype))
    assert_within_baseline("out", out.cpu(), ref_lp, golden)
    for label, a, b_, c in zip(("dq", "dk", "dv"), grads, ref_lp_grads, golden_grads, strict=True):
        assert_within_baseline(label, a.cpu(), b_, c, grad=True)
