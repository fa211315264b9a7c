"""Invariants of every pattern, looping over the registry (plus compositions and PerHead).

predicate == materialised mask; the block layout covers every allowed pair and its FULL
blocks are fully allowed; causal patterns ignore future keys; decode consistency;
window >= S degenerates to full/causal; stats() counts the mask exactly.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import make_qkv, padding_mask

import sparse_attention as sa
from sparse_attention.engine import _run_blocksparse
from sparse_attention.patterns.base import FULL

MECHS = sa.mechanisms("static")

EXTRA = {
    "window8_or_global0": sa.SlidingWindow(8) | sa.Global([0, 5]),
    "causal_and_strided3": sa.Causal() & sa.Strided(3),
    "longformer_dil2_globals": sa.Longformer(4, global_indices=(0, 3, 20), dilation=2),
    "bigbird_b16": sa.BigBird(block=16, random_blocks=1, seed=3),
    "bigbird_b5_g3": sa.BigBird(block=5, window_blocks=5, global_blocks=3, random_blocks=2, seed=1),
    "per_head": sa.PerHead([sa.Causal(), sa.SlidingWindow(5), sa.Strided(3, causal=True), sa.BlockLocal(7)]),
    "strided_causal5": sa.Strided(5, causal=True),
    "random_blocks_b7": sa.RandomBlocks(3, block=7, seed=2),
}

PATTERNS = {m.name: m.make() for m in MECHS} | EXTRA
LENGTHS = [(1, 1), (37, 37), (97, 97), (37, 97), (97, 37), (1, 97), (97, 1), (301, 301)]


def _ok(pattern, N, S) -> bool:
    try:
        pattern.check_lengths(N, S)
        return True
    except ValueError:
        return False


def _ns_id(t):
    return f"N{t[0]}-S{t[1]}"


def pointwise_mask(pattern, N, S) -> torch.Tensor:
    """allowed() evaluated one scalar pair at a time (small N, S only)."""
    H = pattern.num_heads
    heads = [None] if H is None else list(range(H))
    out = torch.zeros(len(heads), N, S, dtype=torch.bool)
    for hi, h in enumerate(heads):
        for i in range(N):
            for j in range(S):
                r = pattern.allowed(torch.tensor(i), torch.tensor(j), n_q=N, n_k=S, head=h)
                assert r.dtype == torch.bool and r.numel() == 1
                out[hi, i, j] = bool(r)
    return out if H is not None else out[0]


@pytest.mark.parametrize("NS", [(1, 1), (13, 13), (9, 23), (23, 9)], ids=_ns_id)
@pytest.mark.parametrize("name", list(PATTERNS))
def test_mask_equals_pointwise_allowed(name, NS):
    pattern = PATTERNS[name]
    N, S = NS
    if not _ok(pattern, N, S):
        pytest.skip("pattern undefined at this S")
    m = pattern.mask(N, S)
    expected_shape = (N, S) if pattern.num_heads is None else (pattern.num_heads, N, S)
    assert tuple(m.shape) == expected_shape and m.dtype == torch.bool
    assert torch.equal(m, pointwise_mask(pattern, N, S)), f"{name}: mask() != pointwise allowed()"


def _expand_blocks(dense_blocks: torch.Tensor, N: int, S: int, block: int) -> torch.Tensor:
    """(Hl, QB, KB) -> (Hl, N, S) element coverage."""
    e = dense_blocks.repeat_interleave(block, 1).repeat_interleave(block, 2)
    return e[:, :N, :S]


@pytest.mark.parametrize("block", [1, 4, 16, 32, 64])
@pytest.mark.parametrize("NS", LENGTHS, ids=_ns_id)
@pytest.mark.parametrize("name", list(PATTERNS))
def test_layout_covers_mask_and_full_blocks_are_full(name, NS, block):
    pattern = PATTERNS[name]
    N, S = NS
    if not _ok(pattern, N, S):
        pytest.skip("pattern undefined at this S")
    if block == 1 and N * S > 100 * 100:
        pytest.skip("block 1 only on short lengths")
    m = pattern.mask(N, S)
    m3 = m if m.dim() == 3 else m.unsqueeze(0)
    lay = pattern.layout(N, S, block)
    assert lay.n_q == N and lay.n_k == S and lay.block == block
    QB, KB = -(-N // block), -(-S // block)
    dense = lay.to_dense()
    assert dense.shape[1:] == (QB, KB), f"to_dense shape {tuple(dense.shape)}"
    assert dense.shape[0] in (1, m3.shape[0])
    cover = _expand_blocks(dense, N, S, block).expand_as(m3)
    missing = m3 & ~cover
    assert not missing.any(), f"{name}: {int(missing.sum())} allowed pairs lie in blocks the layout skips"
    # every visited block holds at least one allowed pair (empty blocks are dropped)
    blocks_allowed = F.pad(m3, (0, KB * block - S, 0, QB * block - N)).view(
        m3.shape[0], QB, block, KB, block).any(4).any(2)
    assert not (dense & ~blocks_allowed.expand_as(dense) if dense.shape[0] == blocks_allowed.shape[0]
                else dense & ~blocks_allowed.any(0, keepdim=True)).any(), f"{name}: layout visits an empty block"
    # kv_index ascending per row, padding with the sentinel at the end
    kv, valid = lay.kv_index, lay.valid
    sentinel = KB
    assert torch.equal(kv[~valid], torch.full_like(kv[~valid], sentinel))
    if kv.shape[-1] > 1:
        assert (kv[..., 1:] > kv[..., :-1])[valid[..., 1:]].all(), "kv_index not strictly ascending"
    # FULL blocks are fully allowed (inside the valid rows / cols)
    for h, r, c in torch.nonzero(lay.kind == FULL).tolist():
        hb = h if m3.shape[0] > 1 else 0
        kb = int(kv[h, r, c])
        blk = m3[hb, r * block : (r + 1) * block, kb * block : (kb + 1) * block]
        assert blk.all(), f"{name}: FULL block (head {h}, q block {r}, kv block {kb}) has masked pairs"


@pytest.mark.parametrize("NS", [(37, 37), (97, 97), (20, 97)], ids=_ns_id)
@pytest.mark.parametrize("name", [m.name for m in MECHS])
def test_stats_attended_pairs_equal_mask_sum(name, NS):
    pattern = PATTERNS[name]
    N, S = NS
    st = pattern.stats(N, S, num_heads=2, head_dim=16)
    assert st.attended_pairs == int(pattern.mask(N, S).sum()), f"{name}: stats pairs != mask().sum()"
    assert st.density == pytest.approx(int(pattern.mask(N, S).sum()) / (N * S))


@pytest.mark.parametrize("block", [4, 16, 64])
@pytest.mark.parametrize("name", ["per_head", "longformer_dil2_globals", "bigbird_b5_g3"])
def test_stats_attended_pairs_extra_patterns(name, block):
    pattern = PATTERNS[name]
    m = pattern.mask(45, 45)
    H = 1 if pattern.num_heads is None else pattern.num_heads
    assert pattern.stats(45, 45, block=block).attended_pairs == int(m.sum()) // H


CAUSAL_PATTERNS = {m.name: m.make() for m in MECHS if m.causal} | {
    "strided_causal5": sa.Strided(5, causal=True),
    "longformer_causal_dil2": sa.Longformer(3, dilation=2, causal=True),
    "causal_and_blocklocal": sa.Causal() & sa.BlockLocal(8),
}


def test_registry_causal_flag_matches_masks():
    """A mechanism flagged causal never allows a future key; one flagged not causal does somewhere."""
    for m in MECHS:
        mask = m.make().mask(97, 97)
        future = torch.triu(torch.ones(97, 97, dtype=torch.bool), 1)
        assert bool((mask & future).any()) != m.causal, f"{m.name}: causal={m.causal} disagrees with its mask"


@pytest.mark.parametrize("backend", ["blocksparse", "dense"])
@pytest.mark.parametrize("NS", [(37, 37), (37, 97), (97, 37)], ids=_ns_id)
@pytest.mark.parametrize("name", list(CAUSAL_PATTERNS))
def test_causal_patterns_ignore_future_keys(name, NS, backend):
    """Perturbing key/value j > position(i) leaves row i unchanged (bitwise on one backend)."""
    pattern = CAUSAL_PATTERNS[name]
    N, S = NS
    q, k, v = make_qkv(2, 4, 2, N, S, 8, requires_grad=False)
    out = sa.attention(q, k, v, pattern, backend=backend)
    cut = S - N + N // 2  # query row N//2 sits at position cut; keys > cut are its future
    k2, v2 = k.clone(), v.clone()
    k2[:, :, cut + 1 :] = torch.randn_like(k2[:, :, cut + 1 :]) * 50
    v2[:, :, cut + 1 :] = torch.randn_like(v2[:, :, cut + 1 :]) * 50
    out2 = sa.attention(q, k2, v2, pattern, backend=backend)
    rows = slice(0, N // 2 + 1)
    torch.testing.assert_close(out2[:, :, rows], out[:, :, rows], atol=1e-6, rtol=1e-6,
                               msg=lambda m: f"out (past rows) changed with future keys: {m}")
    assert not torch.allclose(out2[:, :, -1], out[:, :, -1]), "last row should see the perturbed keys"


@pytest.mark.parametrize("NS", [(1, 1), (37, 37), (37, 97), (97, 37)], ids=_ns_id)
@pytest.mark.parametrize("backend", ["blocksparse", "dense", "auto"])
def test_full_equals_sdpa(backend, NS):
    N, S = NS
    q, k, v = make_qkv(2, 4, 2, N, S, 7, 5, requires_grad=False)
    ref = F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    for pattern in (None, sa.Full()):
        out = sa.attention(q, k, v, pattern, backend=backend)
        torch.testing.assert_close(out, ref, atol=2e-6, rtol=2e-6, msg=lambda m: f"out vs SDPA: {m}")


@pytest.mark.parametrize("backend", ["blocksparse", "dense"])
@pytest.mark.parametrize("S", [1, 37, 97, 130])
@pytest.mark.parametrize("name", ["causal", "causal_sliding_window", "strided_causal5", "longformer_causal_dil2",
                                  "random_blocks", "bigbird"])
def test_decode_step_equals_last_row(name, S, backend):
    """N=1 against a length-S cache equals the last row of the full N=S call."""
    pattern = CAUSAL_PATTERNS.get(name) or PATTERNS[name]
    q, k, v = make_qkv(2, 4, 1, S, S, 8, requires_grad=False)
    full = sa.attention(q, k, v, pattern, backend=backend)
    step = sa.attention(q[:, :, -1:], k, v, pattern, backend=backend)
    torch.testing.assert_close(step, full[:, :, -1:], atol=2e-6, rtol=2e-6,
                               msg=lambda m: f"out decode vs full last row: {m}")
    assert torch.equal(pattern.mask(1, S)[..., 0, :], pattern.mask(S, S)[..., -1, :]), "mask last row"


@pytest.mark.parametrize("backend", ["blocksparse", "dense"])
@pytest.mark.parametrize("NS", [(37, 37), (20, 37), (37, 20)], ids=_ns_id)
@pytest.mark.parametrize("causal", [False, True], ids=["bidir", "causal"])
def test_wide_window_equals_full_or_causal(causal, NS, backend):
    N, S = NS
    q, k, v = make_qkv(1, 2, 2, N, S, 8, requires_grad=False)
    plain = sa.Causal() if causal else sa.Full()
    for w in (S + N, S + N + 5):
        wide = sa.SlidingWindow(w, causal=causal)
        assert torch.equal(wide.mask(N, S), plain.mask(N, S)), f"mask of window {w}"
        a = sa.attention(q, k, v, wide, backend=backend)
        b = sa.attention(q, k, v, plain, backend=backend)
        torch.testing.assert_close(a, b, atol=2e-6, rtol=2e-6, msg=lambda m, w=w: f"out window={w}: {m}")


def test_causal_alignment_is_bottom_right():
    """Pin the documented grid: N=2, S=5 -> rows [1,1,1,1,0], [1,1,1,1,1]; N=5, S=2 -> 3 empty rows."""
    m = sa.Causal().mask(2, 5).int().tolist()
    assert m == [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    m = sa.Causal().mask(5, 2).int().tolist()
    assert m == [[0, 0], [0, 0], [0, 0], [1, 0], [1, 1]]


def test_documented_grids():
    """The ASCII grids in the module docstrings."""
    sw = sa.SlidingWindow(1).mask(5, 5).int()
    assert sw.tolist() == [[1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [0, 1, 1, 1, 0], [0, 0, 1, 1, 1], [0, 0, 0, 1, 1]]
    st = sa.Strided(2, causal=True).mask(5, 5).int()
    assert st.tolist() == [[1, 0, 0, 0, 0], [0, 1, 0, 0, 0], [1, 0, 1, 0, 0], [0, 1, 0, 1, 0], [1, 0, 1, 0, 1]]
    lf = sa.Longformer(1, global_indices=(0,)).mask(5, 5).int()
    assert lf.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 0, 1, 1, 1], [1, 0, 0, 1, 1]]
    bb = sa.BigBird(block=1, window_blocks=3, global_blocks=2, random_blocks=0).mask(6, 6).int()
    assert bb.tolist() == [[1] * 6, [1, 1, 1, 0, 0, 1], [1, 1, 1, 1, 0, 1], [1, 0, 1, 1, 1, 1],
                           [1, 0, 0, 1, 1, 1], [1] * 6]
    bl = sa.BlockLocal(2).mask(5, 5).int()
    assert bl.tolist() == [[1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 1, 0], [0, 0, 1, 1, 0], [0, 0, 0, 0, 1]]


def test_random_blocks_reproducible_and_seeded():
    a = sa.RandomBlocks(2, block=8, seed=1).mask(64, 64)
    b = sa.RandomBlocks(2, block=8, seed=1).mask(64, 64)
    c = sa.RandomBlocks(2, block=8, seed=2).mask(64, 64)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # each query block draws exactly num_blocks distinct key blocks
    per_block = a.view(8, 8, 8, 8).any(3).any(1).sum(-1)
    assert torch.equal(per_block, torch.full((8,), 2))


def test_bigbird_random_blocks_avoid_window_and_globals():
    bb = sa.BigBird(block=4, window_blocks=3, global_blocks=2, random_blocks=1, seed=0)
    no_random = sa.BigBird(block=4, window_blocks=3, global_blocks=2, random_blocks=0)
    m, m0 = bb.mask(40, 40), no_random.mask(40, 40)
    assert (m0 & ~m).sum() == 0
    extra_blocks = (m & ~m0).view(10, 4, 10, 4).any(3).any(1).sum(-1)
    # middle query blocks (not global) get exactly one extra random block
    assert torch.equal(extra_blocks[1:-1], torch.ones(8, dtype=torch.long))


def test_per_head_mask_stacks_heads():
    ph = EXTRA["per_head"]
    m = ph.mask(23, 23)
    for h, p in enumerate(ph.patterns):
        assert torch.equal(m[h], p.mask(23, 23)), f"head {h}"


@pytest.mark.parametrize("block", [16, 32])
def test_blocksparse_per_head_with_padding_block_sizes(block):
    ph = EXTRA["per_head"]
    q, k, v = make_qkv(2, 4, 2, 50, 50, 8, requires_grad=False)
    kpm = padding_mask(2, 50)
    out = _run_blocksparse(q, k, v, ph, scale=0.3, key_padding_mask=kpm, block=block)
    ref = sa.reference_attention(q.double(), k.double(), v.double(), ph.mask(50, 50), key_padding_mask=kpm,
                                 scale=0.3)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5, msg=lambda m: f"out: {m}")
