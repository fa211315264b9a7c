"""Every mechanism, on every backend, against the fp64 reference: output and all gradients.

Sizes are awkward on purpose (lengths 1, 37, 97, 301; N != S both ways; head dims 7 and 59;
Dv != D; MHA/GQA/MQA; key padding with a fully padded batch element).
"""

from __future__ import annotations

import functools
import zlib

import pytest
import torch
from conftest import assert_within_baseline, check_against_reference, make_qkv, padding_mask, run_and_grad

import sparse_attention as sa
from sparse_attention.engine import _run_blocksparse

MECHS = {m.name: m for m in sa.mechanisms("static")}


def _extra_patterns() -> dict[str, sa.Pattern]:
    return {
        "window8_or_global0": sa.SlidingWindow(8) | sa.Global([0, 5]),
        "causal_and_strided3": sa.Causal() & sa.Strided(3),
        "strided5_causal": sa.Strided(5, causal=True),  # residue classes where N == S and unpadded
        "longformer_dil2_globals": sa.Longformer(4, global_indices=(0, 3, 20), dilation=2),
        "longformer_causal_dil2": sa.Longformer(5, global_indices=(1,), dilation=2, causal=True),
        "bigbird_b16": sa.BigBird(block=16, window_blocks=3, global_blocks=2, random_blocks=1, seed=3),
        "random_blocks_b16": sa.RandomBlocks(2, block=16, seed=5),
        "blocklocal_or_causalwindow": sa.BlockLocal(10) | sa.SlidingWindow(3, causal=True),
    }


EXTRA = _extra_patterns()


def all_patterns() -> dict[str, sa.Pattern | None]:
    pats: dict[str, sa.Pattern | None] = {name: m.make() for name, m in MECHS.items()}
    pats.update(EXTRA)
    pats["none"] = None
    return pats


PATTERNS = all_patterns()

# (B, Hq, Hkv, N, S, D, Dv, padding) ; padding: None, "some", or "one_empty" (batch element 1 all padded)
SHAPES = [
    (2, 4, 4, 97, 97, 16, 16, "some"),
    (2, 4, 2, 37, 97, 7, 11, "one_empty"),  # GQA, N < S, odd D, Dv != D
    (2, 2, 1, 97, 37, 59, 59, None),  # MQA, N > S: leading queries of causal patterns are empty
    (1, 2, 2, 301, 301, 16, 8, None),
    (2, 2, 1, 1, 97, 8, 8, "some"),  # decode step
    (2, 4, 2, 37, 1, 8, 8, None),  # a single key
]


def shape_id(s) -> str:
    B, Hq, Hkv, N, S, D, Dv, pad = s
    h = f"H{Hq}" if Hq == Hkv else f"H{Hq}kv{Hkv}"
    dv = "" if Dv == D else f"-Dv{Dv}"
    p = "" if pad is None else f"-pad_{pad}"
    return f"B{B}-{h}-N{N}-S{S}-D{D}{dv}{p}"


def _call(pattern, backend, kpm):
    return functools.partial(_attn, pattern=pattern, backend=backend, kpm=kpm)


def _attn(q, k, v, *, pattern, backend, kpm):
    return sa.attention(q, k, v, pattern, key_padding_mask=kpm, backend=backend)


def _kpm(shape, seed=0):
    B, _, _, _, S, _, _, pad = shape
    if pad is None:
        return None
    return padding_mask(B, S, seed=seed, all_padded=1 if pad == "one_empty" else None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
@pytest.mark.parametrize("name", list(PATTERNS))
def test_blocksparse_matches_reference(name, shape, dtype):
    _compare_backend("blocksparse", name, shape, dtype, seed=zlib.crc32(name.encode()) % 1000)


@pytest.mark.parametrize("shape", SHAPES[:3], ids=shape_id)
@pytest.mark.parametrize("name", list(PATTERNS))
def test_dense_backend_matches_reference(name, shape):
    _compare_backend("dense", name, shape, torch.float32, seed=1)


def _compare_backend(backend, name, shape, dtype, seed):
    pattern = PATTERNS[name]
    B, Hq, Hkv, N, S, D, Dv, _ = shape
    try:
        pattern is None or pattern.check_lengths(N, S)
    except ValueError:
        pytest.skip(f"{name} is not defined for S={S}")
    q, k, v = make_qkv(B, Hq, Hkv, N, S, D, Dv, dtype=dtype, seed=seed)
    check_against_reference(_call(pattern, backend, _kpm(shape)), q, k, v, pattern, key_padding_mask=_kpm(shape))


BLOCK_SHAPES = [(1, 2, 1, 97, 97, 8, 8, "some"), (2, 2, 2, 70, 131, 8, 5, None), (1, 2, 2, 131, 50, 8, 8, None)]


@pytest.mark.parametrize("block", [16, 32, 64])
@pytest.mark.parametrize("shape", BLOCK_SHAPES, ids=shape_id)
@pytest.mark.parametrize("name", [n for n in PATTERNS if n != "none"])
def test_blocksparse_block_sizes(name, shape, block):
    """The layout changes with the block size; every block size must give the same attention."""
    pattern = PATTERNS[name]
    B, Hq, Hkv, N, S, D, Dv, _ = shape
    q, k, v = make_qkv(B, Hq, Hkv, N, S, D, Dv, seed=2)
    kpm = _kpm(shape)
    fn = functools.partial(_run_blocksparse, pattern=pattern, scale=D**-0.5, key_padding_mask=kpm, block=block)
    check_against_reference(lambda a, b, c: fn(a, b, c), q, k, v, pattern, key_padding_mask=kpm)


PER_HEAD = sa.PerHead([sa.Causal(), sa.SlidingWindow(5), sa.Strided(3, causal=True), sa.Global([2]) | sa.BlockLocal(8)])


@pytest.mark.parametrize("backend", ["blocksparse", "dense"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("NS", [(37, 37), (37, 97), (97, 37)], ids=lambda t: f"N{t[0]}-S{t[1]}")
def test_per_head_matches_reference(NS, dtype, backend):
    N, S = NS
    q, k, v = make_qkv(2, 4, 2, N, S, 7, 9, dtype=dtype, seed=3)
    kpm = padding_mask(2, S, all_padded=0)
    check_against_reference(_call(PER_HEAD, backend, kpm), q, k, v, PER_HEAD, key_padding_mask=kpm)


@pytest.mark.parametrize("name", ["causal", "sliding_window", "bigbird"])
def test_long_sequence_1000(name):
    pattern = PATTERNS[name]
    q, k, v = make_qkv(1, 2, 1, 1000, 1000, 16, seed=4)
    check_against_reference(_call(pattern, "blocksparse", None), q, k, v, pattern)


@pytest.mark.parametrize("pattern", [sa.SlidingWindow(6, causal=True), sa.Causal()], ids=repr)
@pytest.mark.parametrize(("backend", "scale"), [
    ("blocksparse", 0.0), ("blocksparse", -0.3), ("blocksparse", 2.5), ("dense", 0.0), ("dense", -0.3),
    ("dense", 2.5)])
def test_explicit_scale(scale, backend, pattern):
    """scale <= 0 included: the CPU kernel's is_causal gives NaN there (torch 2.13), the engine must not."""
    q, k, v = make_qkv(2, 2, 2, 37, 37, 8, seed=5)
    fn = lambda a, b, c: sa.attention(a, b, c, pattern, scale=scale, backend=backend)  # noqa: E731
    check_against_reference(fn, q, k, v, pattern, scale=scale)


@pytest.mark.parametrize("pattern", [sa.Strided(2, causal=True), sa.Causal() & sa.Strided(5)], ids=repr)
@pytest.mark.parametrize("NS", [(37, 37), (5, 6), (64, 65), (64, 66)], ids=str)
@pytest.mark.parametrize("scale", [0.0, -0.5, 2.5])
@pytest.mark.parametrize("backend", ["auto", "blocksparse", "dense"])
def test_explicit_scale_causal_strided(backend, scale, NS, pattern):
    """The residue-class path with scale <= 0: SDPA's is_causal (NaN there) served every class triangle with
    no shift, which N != S with 0 < S - N < stride also gives (NaN out of (5, 6) with stride 2)."""
    N, S = NS
    q, k, v = make_qkv(1, 2, 1, N, S, 8, seed=6)
    fn = lambda a, b, c: sa.attention(a, b, c, pattern, scale=scale, backend=backend)  # noqa: E731
    check_against_reference(fn, q, k, v, pattern, scale=scale)


def test_fully_padded_batch_element_is_exactly_zero():
    """Batch element 1 has every key padded: its output and dq are exactly 0, dk/dv finite (zero)."""
    for backend in ("blocksparse", "dense"):
        for pattern in (None, sa.Causal(), sa.SlidingWindow(4), sa.BigBird(block=16, random_blocks=1)):
            q, k, v = make_qkv(2, 4, 2, 37, 53, 7)
            kpm = padding_mask(2, 53, all_padded=1)
            out = sa.attention(q, k, v, pattern, key_padding_mask=kpm, backend=backend)
            g = torch.randn_like(out)
            dq, dk, dv = torch.autograd.grad(out, (q, k, v), g)
            tag = f"{backend}-{pattern!r}"
            assert torch.equal(out[1], torch.zeros_like(out[1])), f"out[1] not exactly 0 for {tag}"
            assert torch.equal(dq[1], torch.zeros_like(dq[1])), f"dq[1] not exactly 0 for {tag}"
            assert torch.equal(dk[1], torch.zeros_like(dk[1])), f"dk[1] not exactly 0 for {tag}"
            assert torch.equal(dv[1], torch.zeros_like(dv[1])), f"dv[1] not exactly 0 for {tag}"
            for name, t in (("out", out), ("dq", dq), ("dk", dk), ("dv", dv)):
                assert torch.isfinite(t).all(), f"{name} has non-finite values for {tag}"
            assert out[0].abs().sum() > 0, f"out[0] unexpectedly zero for {tag}"


@pytest.mark.parametrize("backend", ["blocksparse", "dense"])
def test_empty_rows_from_pattern_are_exactly_zero(backend):
    """Causal with N > S: the first N - S queries see no key (bottom-right): output and dq rows are 0."""
    N, S = 40, 17
    q, k, v = make_qkv(1, 2, 1, N, S, 8)
    out = sa.attention(q, k, v, sa.Causal(), backend=backend)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    assert torch.equal(out[:, :, : N - S], torch.zeros_like(out[:, :, : N - S])), "out of empty rows"
    assert torch.equal(dq[:, :, : N - S], torch.zeros_like(dq[:, :, : N - S])), "dq of empty rows"
    assert out[:, :, N - S :].abs().amin(-1).gt(0).any(), "out of non-empty rows is zero"
    for name, t in (("dk", dk), ("dv", dv)):
        assert torch.isfinite(t).all(), f"{name} not finite"


@pytest.mark.parametrize("backend", ["blocksparse", "dense"])
def test_empty_intersection_gives_zero(backend):
    """diagonal & strided & global{3} keeps only (3, 3): every other row is empty -> exact 0, no NaN."""
    pattern = sa.SlidingWindow(0, causal=True) & sa.Strided(2) & sa.Global([3])
    q, k, v = make_qkv(1, 2, 2, 20, 20, 4)
    out = sa.attention(q, k, v, pattern, backend=backend)
    ref = sa.reference_attention(q.double(), k.double(), v.double(), pattern.mask(20, 20))
    assert torch.isfinite(out).all(), "out has non-finite values"
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5, msg=lambda m: f"out: {m}")
    empty = ~pattern.mask(20, 20).any(-1)
    assert empty.sum() >= 18
    assert torch.equal(out[:, :, empty], torch.zeros_like(out[:, :, empty])), "empty rows not exactly 0"


def test_backends_agree_bitwise_on_dense_equivalent_pattern():
    """A pattern equal to a dense mask matches the dense mask bit-for-bit on the same backend."""
    q, k, v = make_qkv(2, 2, 2, 37, 37, 8, requires_grad=False)
    for backend in ("dense", "blocksparse"):
        a = sa.attention(q, k, v, sa.SlidingWindow(40), backend=backend)
        b = sa.attention(q, k, v, sa.Full(), backend=backend)
        assert torch.equal(a, b), f"{backend}: SlidingWindow(40) != Full() at S=37"


def test_backward_is_deterministic():
    """Repeated backward through the block-sparse engine is bitwise equal."""
    q, k, v = make_qkv(2, 4, 2, 97, 97, 8)
    kpm = padding_mask(2, 97)
    g = torch.randn(2, 4, 97, 8)
    pattern = sa.BigBird(block=16, random_blocks=1)
    grads = [torch.autograd.grad(sa.attention(q, k, v, pattern, key_padding_mask=kpm, backend="blocksparse"),
                                 (q, k, v), g) for _ in range(3)]
    for name, i in (("dq", 0), ("dk", 1), ("dv", 2)):
        assert torch.equal(grads[0][i], grads[1][i]) and torch.equal(grads[0][i], grads[2][i]), name


@pytest.mark.slow
@pytest.mark.parametrize("NS", [(2100, 2100), (1, 2500), (700, 2300)], ids=lambda t: f"N{t[0]}-S{t[1]}")
@pytest.mark.parametrize("name", ["causal", "sliding_window", "bigbird", "strided", "longformer"])
def test_long_sequences_auto_backend(name, NS):
    """Lengths above 2048 (block 128) through backend="auto", which picks the block-sparse engine here."""
    N, S = NS
    pattern = PATTERNS[name]
    q, k, v = make_qkv(1, 2, 1, N, S, 16, seed=9)
    kpm = padding_mask(1, S)
    check_against_reference(_call(pattern, "auto", kpm), q, k, v, pattern, key_padding_mask=kpm)


ITEM_SHAPES = [((2, 3), 5, 9, 4, 4, "mask"), ((6,), 7, 7, 4, 3, "row_broadcast"), ((2, 2, 3), 4, 10, 8, 8, "mask"),
               ((3,), 6, 11, 5, 7, "none"), ((2, 5), 64, 128, 16, 16, "mask")]


def _items_case(lead, Lq, Lk, D, Dv, allowed_kind):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(*lead, L, E, generator=gen, dtype=torch.float64)
               for L, E in ((Lq, D), (Lk, D), (Lk, Dv)))
    allowed = None
    if allowed_kind != "none":
        allowed = torch.rand(*lead, 1 if allowed_kind == "row_broadcast" else Lq, Lk, generator=gen) < 0.6
    if allowed_kind == "mask":
        allowed[..., 0, :] = False  # a row with no key
    g = torch.randn(*lead, Lq, Dv, generator=gen, dtype=torch.float64)
    return q, k, v, allowed, g


@pytest.mark.parametrize("path", ["native", "fused"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("lead", "Lq", "Lk", "D", "Dv", "allowed_kind"), ITEM_SHAPES)
def test_items_attention_matches_masked_softmax(lead, Lq, Lk, D, Dv, allowed_kind, dtype, path, monkeypatch):
    """The batch of independent items (used by Sinkhorn) against plain masked softmax, output and gradients:
    float32 on the native items kernels, or on PyTorch's fused kernel when they are unavailable (float64
    always: to 1e-10); rows with no allowed key give exactly 0, a mask may broadcast over rows or be None."""
    from sparse_attention import native
    from sparse_attention.engine import blocksparse
    from sparse_attention.reference import masked_softmax

    if path == "native" and (dtype != torch.float32 or not native.items_available()):
        pytest.skip("the native items kernels take float32 only, and need a build with 32-byte vectors")
    if path == "fused":
        monkeypatch.setattr(native, "items_available", lambda: False)
    calls = []

    def spy(*args, forward=native.items_forward):
        found = forward(*args)
        calls.append(found is not None)
        return found
    monkeypatch.setattr(native, "items_forward", spy)
    q, k, v, allowed, g = _items_case(lead, Lq, Lk, D, Dv, allowed_kind)
    mask = torch.ones(Lq, Lk, dtype=torch.bool) if allowed is None else allowed.expand(*lead, Lq, Lk)

    def plain(a, b, c):
        return masked_softmax(a @ b.transpose(-1, -2) * 0.3, mask) @ c

    x = [t.to(dtype) for t in (q, k, v, g)]
    fast = run_and_grad(lambda a, b, c: blocksparse.items_attention(a, b, c, allowed, scale=0.3), *x)
    assert calls == [path == "native"], f"expected the {path} path, native calls: {calls}"
    golden = run_and_grad(plain, q, k, v, g)
    if dtype == torch.float64:
        for name, a, b in zip(("out", "dq", "dk", "dv"), fast, golden, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=lambda m, n=name: f"{n}: {m}")
    else:
        baseline = run_and_grad(plain, *x)
        for i, name in enumerate(("out", "dq", "dk", "dv")):
            assert_within_baseline(name, fast[i], baseline[i], golden[i], grad=i > 0, min_len=min(Lq, Lk))
    if allowed_kind == "mask":
        assert torch.equal(fast[0][..., 0, :], torch.zeros_like(fast[0][..., 0, :])), "a row with no key: 0"
        assert torch.equal(fast[1][..., 0, :], torch.zeros_like(fast[1][..., 0, :])), "a row with no key: dq 0"


@pytest.mark.parametrize("path", ["native", "fused", "plain"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("lead", "Lq", "Lk", "D", "Dv", "allowed_kind"), ITEM_SHAPES[:3])
def test_items_attention_second_part_is_the_concatenation(lead, Lq, Lk, D, Dv, allowed_kind, dtype, path,
                                                          monkeypatch):
    """Keys and values given in two parts (k2, v2: read in place by the native kernels, concatenated on the
    others) give bit for bit what the concatenated keys and values give, output and the gradients of every
    part, on each path (native items kernels, PyTorch's fused kernel, plain ops); mismatched parts raise."""
    from sparse_attention import native
    from sparse_attention.engine import blocksparse

    if path == "native" and (dtype != torch.float32 or not native.items_available()):
        pytest.skip("the native items kernels take float32 only, and need a build with 32-byte vectors")
    if path == "fused":
        monkeypatch.setattr(native, "items_available", lambda: False)
    if path == "plain":
        monkeypatch.setattr(blocksparse, "all_finite", lambda *t: False)
    q, k, v, allowed, g = _items_case(lead, Lq, Lk, D, Dv, allowed_kind)
    q, k, v, g = (t.to(dtype) for t in (q, k, v, g))
    m = Lk // 3
    parts = [t[..., sl, :].detach().clone().requires_grad_() for t in (k, v) for sl in (slice(None, m), slice(m, None))]
    q = q.detach().clone().requires_grad_()
    split = blocksparse.items_attention(q, parts[0], parts[2], allowed, scale=0.3, k2=parts[1], v2=parts[3])
    split_grads = torch.autograd.grad(split, (q, *parts), g)
    whole = run_and_grad(lambda a, b, c: blocksparse.items_attention(a, b, c, allowed, scale=0.3), q, k, v, g)
    assert torch.equal(split, whole[0]) and torch.equal(split_grads[0], whole[1]), "output, dq"
    for i, (name, full) in enumerate((("dk", whole[2]), ("dv", whole[3]))):
        assert torch.equal(split_grads[1 + 2 * i], full[..., :m, :]), f"{name}, first part"
        assert torch.equal(split_grads[2 + 2 * i], full[..., m:, :]), f"{name}, second part"
    with pytest.raises(ValueError, match="k2 and v2"):
        blocksparse.items_attention(q, parts[0], parts[2], allowed, scale=0.3, k2=parts[1][..., :-1], v2=parts[3])
    with pytest.raises(ValueError, match="k2 and v2 go together"):
        blocksparse.items_attention(q, parts[0], parts[2], allowed, scale=0.3, k2=parts[1])


@pytest.mark.parametrize("allowed_kind", ["mask", "none"])
def test_mixed_items_attention_matches_the_product_and_gradients(allowed_kind, monkeypatch):
    """Items against their own keys and a p-mixture of their group's keys (Sinkhorn's soft sorting): the native
    path (mixtures read in place, their gradients added into dk and dv in place, p's gradient) against the
    same call on plain float32 ops (baseline) and float64 (golden), by the tolerance rule: output and the
    gradients of q, k, v and p; bad shapes raise."""
    from sparse_attention import native
    from sparse_attention.engine import blocksparse

    if not native.items_available():
        pytest.skip("the native items kernels need a build with 32-byte vectors")
    G, n, Lq, Lk, D, Dv = 3, 5, 8, 8, 16, 12
    gen = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(G, n, L, E, generator=gen, dtype=torch.float64) for L, E in ((Lq, D), (Lk, D), (Lk, Dv)))
    p = torch.softmax(torch.randn(G, n, n, generator=gen, dtype=torch.float64), -1)
    g = torch.randn(G, n, Lq, Dv, generator=gen, dtype=torch.float64)
    allowed = None
    if allowed_kind == "mask":
        allowed = torch.rand(G, n, Lq, 2 * Lk, generator=gen) < 0.7
        allowed[0, 1, 2] = False  # a row with no key

    def run(dtype):
        x = [t.detach().to(dtype).requires_grad_() for t in (q, k, v, p)]
        out = blocksparse.mixed_items_attention(*x, allowed, scale=0.3)
        return [out.detach(), *torch.autograd.grad(out, x, g.to(dtype))]

    calls = []
    apply = blocksparse._MixedItemsFunction.apply
    monkeypatch.setattr(blocksparse._MixedItemsFunction, "apply", lambda *a: calls.append(1) or apply(*a))
    impl = run(torch.float32)
    assert calls == [1], "the native path did not run"
    golden = run(torch.float64)
    monkeypatch.setattr(blocksparse, "all_finite", lambda *t: False)
    baseline = run(torch.float32)
    assert calls == [1], "float64 and non-finite inputs take items_attention"
    for i, name in enumerate(("out", "dq", "dk", "dv", "dp")):
        assert_within_baseline(name, impl[i], baseline[i], golden[i], grad=i > 0, min_len=Lk)
    with pytest.raises(ValueError, match="p's leading dimensions"):
        blocksparse.mixed_items_attention(q, k[:, :-1], v, p, allowed, scale=0.3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_items_attention_with_an_empty_part(dtype):
    """An empty second part is no part (the same result as without one); an empty first part leaves the second
    alone; bad dtypes of the parts, and a p that is not square or not of q's dtype, are refused."""
    from sparse_attention.engine import blocksparse

    gen = torch.Generator().manual_seed(12)
    q, k, v = (torch.randn(3, 4, L, E, generator=gen, dtype=dtype) for L, E in ((5, 6), (7, 6), (7, 2)))
    none = blocksparse.items_attention(q, k, v, None, scale=0.4)
    empty = blocksparse.items_attention(q, k, v, None, scale=0.4, k2=k[..., :0, :], v2=v[..., :0, :])
    assert torch.equal(empty, none)
    only_second = blocksparse.items_attention(q, k[..., :0, :], v[..., :0, :], None, scale=0.4, k2=k, v2=v)
    assert torch.equal(only_second, none)
    with pytest.raises(TypeError, match="k2 and v2 must have k's and v's dtypes"):
        blocksparse.items_attention(q, k, v, None, scale=0.4, k2=k.to(torch.bfloat16), v2=v)
    p = torch.softmax(torch.randn(3, 4, 4, generator=gen, dtype=dtype), -1)
    with pytest.raises(ValueError, match="p must be"):
        blocksparse.mixed_items_attention(q, k, v, p[..., :3], None, scale=0.4)
    with pytest.raises(TypeError, match="share a dtype"):
        blocksparse.mixed_items_attention(q, k, v, p.to(torch.bfloat16), None, scale=0.4)


@pytest.mark.parametrize("where", ["q", "k", "v"])
def test_items_attention_propagates_nan(where):
    """A NaN in an item's query, key or value makes the rows that read it NaN (the native and fused kernels
    would turn a NaN score into probability 0 or a zero row: non-finite inputs take the plain path); other
    items stay finite."""
    from sparse_attention.engine.blocksparse import items_attention

    q, k, v, allowed, _ = _items_case((4,), 6, 9, 8, 8, "none")
    q, k, v = (t.float() for t in (q, k, v))
    {"q": q, "k": k, "v": v}[where][2, 3, 1] = float("nan")
    out = items_attention(q, k, v, allowed, scale=0.3)
    nan_rows = out.isnan().any(-1)
    expected = torch.zeros(4, 6, dtype=torch.bool)
    expected[2, 3 if where == "q" else slice(None)] = True
    assert torch.equal(nan_rows, expected), f"NaN rows {nan_rows.nonzero().tolist()}"
    # a NaN key spoils every score of its item's rows, a NaN value one column of them, a NaN query its row
    spoilt = {"q": out[2, 3], "k": out[2], "v": out[2, :, 1]}[where]
    assert bool(spoilt.isnan().all()), f"NaN in {where}: {spoilt}"


@pytest.mark.parametrize("layout", ["kernel", "contiguous"])
def test_kernel_gradient_rows_without_copies(layout):
    """kernel_grad_rows / kernel_grad_select read the rows of a (B, H, L, E) gradient in storage order (the
    kernel's backward stores it as (B, L, H, E)) and give what reshaping to logical rows would give."""
    from sparse_attention.engine.blocksparse import _bwd, _fwd, kernel_grad_rows, kernel_grad_select

    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(3, 5, 7, 4, generator=gen) for _ in range(3))
    o, lse = _fwd(q, k, v, 0.0, False, scale=0.5)
    x = _bwd(torch.randn(o.shape, generator=gen), q, k, v, o, lse, 0.0, False, scale=0.5)[0]
    if layout == "contiguous":
        x = x.contiguous()
    assert x.transpose(1, 2).is_contiguous() == (layout == "kernel")
    logical = x.reshape(-1, 4)
    pos = torch.randint(0, 105, (60,), generator=gen)
    torch.testing.assert_close(kernel_grad_select(x, pos), logical[pos], rtol=0, atol=0)
    idx = torch.randint(0, 11, (105,), generator=gen)
    rows, perm = kernel_grad_rows(x, idx)
    want = torch.zeros(11, 4).index_add_(0, idx, logical)
    torch.testing.assert_close(torch.zeros(11, 4).index_add_(0, perm, rows), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("causal", "N", "S", "pad", "residue"), [
    (False, 97, 97, "one_empty", True), (False, 37, 98, "some", True), (False, 97, 39, None, True),  # S - N: 1, 2 mod 4
    (True, 97, 97, None, True), (True, 3, 3, None, True), (True, 97, 97, "some", True), (True, 37, 98, None, True),
    (True, 97, 39, "one_empty", True), (True, 97, 97, "some", False),  # the last: mask over the limit (set to 0)
], ids=lambda x: str(x))
def test_strided_runs_as_residue_classes(monkeypatch, causal, N, S, pad, residue):
    """Strided through backend="auto": dense attention within residue classes (causal: SDPA's triangle, or a
    shifted triangle mask for N != S or key padding), the block-sparse layout where the causal padded mask would
    be too large; either way equal to the reference."""
    import sparse_attention.engine as engine
    import sparse_attention.engine.residue as residue_mod

    calls = []
    original = engine.residue_attention
    monkeypatch.setattr(engine, "residue_attention", lambda *a, **kw: calls.append(1) or original(*a, **kw))
    if not residue:
        monkeypatch.setattr(residue_mod, "CAUSAL_PADDED_MASK_LIMIT", 0)
    pattern = sa.Strided(4, causal=causal)
    q, k, v = make_qkv(2, 4, 2, N, S, 8, 6, seed=4)
    kpm = None if pad is None else padding_mask(2, S, all_padded=1 if pad == "one_empty" else None)
    check_against_reference(_call(pattern, "auto", kpm), q, k, v, pattern, key_padding_mask=kpm)
    assert bool(calls) == residue, f"residue classes used: {bool(calls)}, expected {residue}"


def test_strided_residue_classes_propagate_nan():
    """A NaN in an attended input reaches the rows that attend it (SDPA's math kernel, not the fused one)."""
    q, k, v = make_qkv(1, 2, 2, 12, 12, 4, requires_grad=False)
    q[0, 0, 5] = float("nan")  # query 5: class 1 of stride 4
    v[0, 1, 2] = float("nan")  # key 2 of head 1: class 2
    out = sa.attention(q, k, v, sa.Strided(4))
    assert torch.isnan(out[0, 0, 5]).all() and torch.isnan(out[0, 1, 2::4]).all()
    assert torch.isfinite(out[0, 0, [0, 1, 2, 3, 4, 6]]).all() and torch.isfinite(out[0, 1, 1::4]).all()


@pytest.mark.parametrize(("pattern", "residue"), [
    (sa.Causal() & sa.Strided(4), True), (sa.Strided(4) & sa.Strided(4, causal=True), True),
    (sa.Strided(4) & sa.Strided(2), False), (sa.Causal() & sa.Strided(4) & sa.SlidingWindow(9), False),
], ids=["causal_and_strided", "strided_and_causal_strided", "two_strides", "with_window"])
def test_strided_intersections_run_as_residue_classes(monkeypatch, pattern, residue):
    """An intersection of Strided(s) and Causal() parts is Strided(s, causal=True) and runs by residue classes;
    other intersections keep the layout. Both equal the reference (N != S, padding)."""
    import sparse_attention.engine as engine

    calls = []
    original = engine.residue_attention
    monkeypatch.setattr(engine, "residue_attention", lambda *a, **kw: calls.append(1) or original(*a, **kw))
    q, k, v = make_qkv(2, 4, 2, 37, 98, 8, 6, seed=6)
    kpm = padding_mask(2, 98)
    check_against_reference(_call(pattern, "auto", kpm), q, k, v, pattern, key_padding_mask=kpm)
    assert bool(calls) == residue
