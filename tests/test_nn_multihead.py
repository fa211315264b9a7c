"""sa.nn.MultiheadAttention: torch parity with full attention, mask polarities, sparse weights, GQA, dropout.

Tolerance for the torch comparisons (the project's rule, sparse_attention.testing): torch's module
run in float64 is the golden output, torch's own float32 run is the baseline, and ours in float32
must satisfy max|ours - golden| <= 2 * max|torch32 - golden| + floor (floor >= 8 fp32 eps at the
output's magnitude). Both are float32 computations of the same math in a different order, so
ours may be off by as much as torch is, not more.
"""

from __future__ import annotations

import pytest
import torch
from conftest import assert_within_baseline

import sparse_attention as sa
from sparse_attention.nn.multihead import MAX_DENSE_WEIGHTS

E, H = 16, 4


def _pair(*, batch_first=True, kdim=None, vdim=None, bias=True, seed=0):
    torch.manual_seed(seed)
    ref = torch.nn.MultiheadAttention(E, H, batch_first=batch_first, kdim=kdim, vdim=vdim, bias=bias)
    if bias:  # torch zero-initialises biases; random ones make the comparison meaningful
        torch.nn.init.normal_(ref.in_proj_bias)
        torch.nn.init.normal_(ref.out_proj.bias)
    ours = sa.nn.MultiheadAttention(E, H, batch_first=batch_first, kdim=kdim, vdim=vdim, bias=bias)
    ours.load_state_dict(ref.state_dict())
    return ref.eval(), ours.eval()


def _inputs(B, N, S, *, batch_first=True, kdim=None, vdim=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, N, E, generator=g)
    k = torch.randn(B, S, kdim or E, generator=g)
    v = torch.randn(B, S, vdim or E, generator=g)
    if not batch_first:
        q, k, v = (t.transpose(0, 1) for t in (q, k, v))
    return q, k, v


def _assert_like_torch(ref, ours, args, kwargs):
    """Compare out and weights of ours (fp32) with torch fp32 (baseline) and torch fp64 (golden)."""
    with torch.no_grad():
        o32, w32 = ref(*args, **kwargs)
        ref64 = ref.double()
        cast = [a.double() if torch.is_tensor(a) and a.is_floating_point() else a for a in args]
        kw64 = {k: (v.double() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in kwargs.items()}
        o64, w64 = ref64(*cast, **kw64)
        ref.float()
        out, w = ours(*args, **kwargs)
    assert_within_baseline("out", out, o32, o64)
    if w32 is None:
        assert w is None, "weights returned with need_weights=False"
    else:
        assert_within_baseline("weights", w, w32, w64)


@pytest.mark.parametrize("batch_first", [True, False], ids=["batch_first", "seq_first"])
@pytest.mark.parametrize("kv", [(None, None), (10, 7)], ids=["packed", "kdim10-vdim7"])
@pytest.mark.parametrize("need_weights", [True, False], ids=["weights", "noweights"])
def test_matches_torch(batch_first, kv, need_weights):
    kdim, vdim = kv
    ref, ours = _pair(batch_first=batch_first, kdim=kdim, vdim=vdim)
    assert list(ref.state_dict()) == list(ours.state_dict())
    q, k, v = _inputs(3, 5, 11, batch_first=batch_first, kdim=kdim, vdim=vdim)
    kpm = torch.rand(3, 11) < 0.3
    kpm[:, 0] = False  # no fully padded row: torch gives NaN there (we give 0, tested below)
    for kwargs in (dict(), dict(key_padding_mask=kpm), dict(key_padding_mask=kpm, average_attn_weights=False)):
        _assert_like_torch(ref, ours, (q, k, v), dict(need_weights=need_weights, **kwargs))


@pytest.mark.parametrize("mask_kind", ["bool", "float", "bool-3d", "causal"])
def test_attn_mask_and_is_causal_match_torch(mask_kind):
    ref, ours = _pair()
    N = S = 9
    q, k, v = _inputs(2, N, S)
    g = torch.Generator().manual_seed(3)
    if mask_kind == "bool":
        mask = torch.rand(N, S, generator=g) < 0.3
        mask[:, 0] = False
        kwargs = dict(attn_mask=mask)
    elif mask_kind == "float":
        kwargs = dict(attn_mask=torch.randn(N, S, generator=g))
    elif mask_kind == "bool-3d":
        mask = torch.rand(2 * H, N, S, generator=g) < 0.3
        mask[..., 0] = False
        kwargs = dict(attn_mask=mask)
    else:
        kwargs = dict(attn_mask=torch.nn.Transformer.generate_square_subsequent_mask(N), is_causal=True)
    for need_weights in (True, False):
        _assert_like_torch(ref, ours, (q, k, v), dict(need_weights=need_weights, **kwargs))


def test_unbatched_input_matches_torch():
    ref, ours = _pair()
    q, k, v = (t[0] for t in _inputs(1, 4, 6))
    _assert_like_torch(ref, ours, (q, k, v), dict(key_padding_mask=torch.tensor([False, True] * 3)))


def test_no_bias_state_dict_matches_torch():
    ref, ours = _pair(bias=False)
    assert set(ref.state_dict()) == set(ours.state_dict())
    _assert_like_torch(ref, ours, _inputs(2, 4, 4), dict())


def test_key_padding_mask_true_means_ignore():
    """Polarity pin: changing the keys/values where key_padding_mask is True changes nothing."""
    _, m = _pair()
    q, k, v = _inputs(2, 5, 8)
    kpm = torch.zeros(2, 8, dtype=torch.bool)
    kpm[:, 5:] = True
    k2, v2 = k.clone(), v.clone()
    k2[:, 5:] += 10
    v2[:, 5:] -= 10
    out, w = m(q, k, v, key_padding_mask=kpm)
    out2, _ = m(q, k2, v2, key_padding_mask=kpm)
    torch.testing.assert_close(out2, out, rtol=0, atol=0)
    assert (w[:, :, 5:] == 0).all(), "padded keys received weight"
    changed, _ = m(q, k2, v2, key_padding_mask=~kpm)
    assert not torch.allclose(changed, out), "the inverted mask should attend the modified keys"


def test_attn_mask_bool_true_means_not_allowed():
    _, m = _pair()
    q, k, v = _inputs(1, 3, 4)
    mask = torch.tensor([[False, True, True, True]] * 3)  # only key 0 allowed
    _, w = m(q, k, v, attn_mask=mask)
    torch.testing.assert_close(w, torch.tensor([[[1.0, 0, 0, 0]] * 3]), rtol=0, atol=0)


def test_fully_masked_row_is_zero_not_nan():
    """Differs from torch on purpose (torch gives NaN): the row's attention output is 0."""
    _, m = _pair()
    q, k, v = _inputs(2, 3, 4)
    kpm = torch.zeros(2, 4, dtype=torch.bool)
    kpm[1] = True
    for need_weights in (True, False):
        out, w = m(q, k, v, key_padding_mask=kpm, need_weights=need_weights)
        assert torch.isfinite(out).all()
        # with no key the attention result is 0, so the layer returns the output projection's bias
        torch.testing.assert_close(out[1], m.out_proj.bias.expand(3, E).detach(), rtol=0, atol=0)
        if need_weights:
            assert (w[1] == 0).all()


@torch.no_grad()
def _dense_reference(m, q, k, v, pattern, key_padding_mask=None, dtype=torch.float64):
    """The module's maths through sa.reference_attention (the package's readable reference), in ``dtype``."""
    md = m.to(dtype)
    q, k, v = md._project(q.to(dtype), k.to(dtype), v.to(dtype))
    B, N, S = q.shape[0], q.shape[1], k.shape[1]
    q = q.view(B, N, md.num_heads, -1).transpose(1, 2)  # (B, H, N, D)
    k = k.view(B, S, md.num_kv_heads, -1).transpose(1, 2)  # (B, Hkv, S, D)
    v = v.view(B, S, md.num_kv_heads, -1).transpose(1, 2)
    mask = None if pattern is None else pattern.mask(N, S)
    o = sa.reference_attention(q, k, v, mask, key_padding_mask=key_padding_mask)
    out = md.out_proj(o.transpose(1, 2).reshape(B, N, -1))
    m.float()
    return out


@pytest.mark.parametrize("pattern", [sa.SlidingWindow(2), sa.Causal(), sa.BigBird(block=4, seed=1)],
                         ids=["sliding2", "causal", "bigbird4"])
@pytest.mark.parametrize("num_kv_heads", [4, 2, 1], ids=["mha", "gqa2", "mqa"])
def test_sparse_pattern_matches_reference(pattern, num_kv_heads):
    torch.manual_seed(1)
    m = sa.nn.MultiheadAttention(E, H, attention=pattern, num_kv_heads=num_kv_heads).eval()
    q, k, v = _inputs(2, 13, 13)
    kpm = torch.rand(2, 13) < 0.2
    golden = _dense_reference(m, q, k, v, pattern, kpm)
    with torch.no_grad():
        fast, none = m(q, k, v, key_padding_mask=kpm, need_weights=False)
        dense, w = m(q, k, v, key_padding_mask=kpm, need_weights=True, average_attn_weights=False)
    assert none is None
    base = _dense_reference(m, q, k, v, pattern, kpm, dtype=torch.float32)
    for name, out in (("blocksparse", fast), ("dense-with-weights", dense)):
        assert_within_baseline(name, out, base, golden)
    allowed = pattern.mask(13, 13) & ~kpm[:, None, None, :]
    assert (w[~allowed.expand_as(w)] == 0).all(), "weight outside the pattern"
    rows = allowed.expand_as(w).any(-1)
    torch.testing.assert_close(w.sum(-1)[rows], torch.ones(int(rows.sum())))


def test_sparse_weights_refused_when_large():
    m = sa.nn.MultiheadAttention(8, 2, attention=sa.SlidingWindow(1))
    n = int(MAX_DENSE_WEIGHTS**0.5) + 1
    x = torch.randn(1, n, 8)
    with pytest.raises(ValueError, match="need_weights=False"):
        m(x, x, x)
    out, w = m(x[:, :64], x[:, :64], x[:, :64], need_weights=False)
    assert w is None and out.shape == (1, 64, 8)


def test_registry_name_and_pattern_are_the_same_layer():
    a = sa.nn.MultiheadAttention(E, H, attention="causal_sliding_window")
    b = sa.nn.MultiheadAttention(E, H, attention=sa.registry.get("causal_sliding_window").make())
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 20, E)
    torch.testing.assert_close(a(x, x, x)[0], b(x, x, x)[0], rtol=0, atol=0)
    assert isinstance(a.attention, sa.SlidingWindow) and a.attention.causal


def test_per_head_pattern():
    pattern = sa.PerHead([sa.Causal(), sa.SlidingWindow(1), sa.Full(), sa.Causal()])
    m = sa.nn.MultiheadAttention(E, H, attention=pattern).eval()
    q, k, v = _inputs(2, 9, 9)
    golden = _dense_reference(m, q, k, v, pattern)
    base = _dense_reference(m, q, k, v, pattern, dtype=torch.float32)
    with torch.no_grad():
        out, w = m(q, k, v, average_attn_weights=False)
        fast, _ = m(q, k, v, need_weights=False)
    assert_within_baseline("dense-with-weights", out, base, golden)
    assert_within_baseline("blocksparse", fast, base, golden)
    assert (w[:, 0].triu(1) == 0).all() and (w[:, 2] > 0).all()


def test_gqa_parameter_shapes():
    m = sa.nn.MultiheadAttention(E, H, num_kv_heads=2)
    assert m.in_proj_weight.shape == (E + 2 * 2 * (E // H), E)
    assert m.in_proj_bias.shape == (E + 2 * 2 * (E // H),)


def test_dropout_only_in_training():
    torch.manual_seed(0)
    m = sa.nn.MultiheadAttention(E, H, attention=sa.SlidingWindow(3), dropout=0.5)
    x = torch.randn(2, 10, E)
    m.eval()
    for nw in (True, False):
        torch.testing.assert_close(m(x, x, x, need_weights=nw)[0], m(x, x, x, need_weights=nw)[0], rtol=0, atol=0)
    m.train()
    torch.manual_seed(1)
    a = m(x, x, x, need_weights=False)[0]
    torch.manual_seed(2)
    b = m(x, x, x, need_weights=False)[0]
    assert not torch.allclose(a, b), "dropout had no effect in training mode"


def test_module_mechanism():
    """A head-split module (here PerformerAttention) can be the mechanism; it gives no weights."""
    m = sa.nn.MultiheadAttention(E, H, attention=sa.nn.PerformerAttention(E // H, 32))
    x = torch.randn(2, 7, E)
    out, w = m(x, x, x, need_weights=False)
    assert out.shape == (2, 7, E) and w is None
    with pytest.raises(ValueError, match="need_weights=False"):
        m(x, x, x)


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(embed_dim=10, num_heads=4), ValueError, "divisible"),
    (dict(embed_dim=16, num_heads=4, num_kv_heads=3), ValueError, "num_kv_heads"),
    (dict(embed_dim=16, num_heads=4, attention="nope"), ValueError, "unknown mechanism"),
    (dict(embed_dim=16, num_heads=4, attention=3), TypeError, "attention must be"),
    (dict(embed_dim=16, num_heads=4, dropout=1.5), ValueError, "dropout"),
    (dict(embed_dim=16, num_heads=4, batch_first=1), TypeError, "batch_first"),
    (dict(embed_dim=16, num_heads=4, attention=sa.PerHead([sa.Causal(), sa.Full()])), ValueError, "per-head"),
])
def test_constructor_validation(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        sa.nn.MultiheadAttention(**kwargs)


def test_forward_validation():
    m = sa.nn.MultiheadAttention(E, H)
    x = torch.randn(2, 5, E)
    with pytest.raises(ValueError, match="query"):
        m(torch.randn(2, 5, E + 1), x, x)
    with pytest.raises(ValueError, match="key_padding_mask"):
        m(x, x, x, key_padding_mask=torch.zeros(2, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="key_padding_mask"):
        m(x, x, x, key_padding_mask=torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(TypeError, match="attn_mask"):
        m(x, x, x, attn_mask=torch.zeros(5, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="attn_mask"):
        m(x, x, x, attn_mask=torch.zeros(4, 5, dtype=torch.bool))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("need_weights", [False, True], ids=["blocksparse", "dense-with-weights"])
def test_half_precision_within_the_rule(dtype, need_weights):
    """Output in the input dtype; error vs float64 within 2x the same-dtype reference's error."""
    torch.manual_seed(2)
    pattern = sa.SlidingWindow(3)
    m = sa.nn.MultiheadAttention(E, H, attention=pattern, num_kv_heads=2).eval()
    q, k, v = (t.to(dtype) for t in _inputs(2, 21, 21))
    golden = _dense_reference(m, q, k, v, pattern)
    base = _dense_reference(m, q, k, v, pattern, dtype=dtype)
    m.to(dtype)
    with torch.no_grad():
        out, w = m(q, k, v, need_weights=need_weights)
    assert out.dtype == dtype and (w is None or w.dtype == dtype)
    assert_within_baseline("out", out, base, golden)


# --- Linformer inside the layer: E and F shorten the inputs before the projections ------------------------

LINFORMER_CASES = [  # (share_kv, bias, cross, padding, per-head E) ; per-head E is not folded
    (False, True, False, True, False),
    (True, True, False, False, False),
    (True, False, False, True, False),
    (False, False, True, True, False),
    (True, True, True, False, False),
    (False, True, False, True, True),
]


@pytest.mark.parametrize(("share_kv", "bias", "cross", "padding", "per_head"), LINFORMER_CASES,
                         ids=[f"{'shared' if c[0] else 'EF'}-{'bias' if c[1] else 'nobias'}-"
                              f"{'cross' if c[2] else 'self'}-{'kpm' if c[3] else 'nokpm'}{'-perhead' if c[4] else ''}"
                              for c in LINFORMER_CASES])
def test_linformer_layer_folds_e_into_the_inputs(monkeypatch, share_kv, bias, cross, padding, per_head):
    """MultiheadAttention(LinformerAttention) with one E for all heads mixes the inputs along the sequence
    first ((E X) W instead of E (X W)); output and every gradient (inputs, projections, E, F) equal
    Linformer between the layer's projections by the tolerance rule, and in float64 to rounding. A padded
    position holding NaN stays out of the mixtures."""
    import copy

    import torch.nn.functional as F
    from conftest import run_layer

    calls = []
    original = sa.nn.LinformerAttention.compress_inputs
    monkeypatch.setattr(sa.nn.LinformerAttention, "compress_inputs",
                        lambda self, *a, **kw: calls.append(1) or original(self, *a, **kw))
    g = torch.Generator().manual_seed(0)
    E, H, Hkv, B, N, K, L = 48, 4, 2, 2, 41, 16, 60
    S, kdim, vdim = (53, 20, 28) if cross else (N, None, None)
    att = sa.nn.LinformerAttention(L, K, share_kv=share_kv, num_heads=Hkv if per_head else None)
    m = sa.nn.MultiheadAttention(E, H, attention=att, num_kv_heads=Hkv, bias=bias, kdim=kdim, vdim=vdim)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.3)
    query = torch.randn(B, N, E, generator=g, dtype=torch.float64).float()
    key = torch.randn(B, S, kdim or E, generator=g, dtype=torch.float64).float() if cross else query
    value = torch.randn(B, S, vdim or E, generator=g, dtype=torch.float64).float() if cross else query
    kpm = None
    if padding:
        kpm = torch.rand(B, S, generator=g) < 0.3
        kpm[0, 3] = True
    inputs = [query, key, value] if cross else [query]

    def layer(module, fused_path):
        def fn(*t):
            qkv = t if cross else (t[0],) * 3
            if fused_path:
                return module(*qkv, key_padding_mask=kpm, need_weights=False)[0]
            (wq, bq), (wk, bk), (wv, bv) = module._in_projections()
            q = F.linear(qkv[0], wq, bq).view(B, N, H, -1).transpose(1, 2)
            k = F.linear(qkv[1], wk, bk).view(B, S, Hkv, -1).transpose(1, 2)
            v = F.linear(qkv[2], wv, bv).view(B, S, Hkv, -1).transpose(1, 2)
            if q.dtype == torch.float64:
                o = sa.approx.reference_linformer_attention(q, k, v, e_proj=module.attention.e_proj,
                                                            f_proj=module.attention.f_proj, key_padding_mask=kpm)
            else:
                o = module.attention(q, k, v, key_padding_mask=kpm)
            return module.out_proj(o.transpose(1, 2).reshape(B, N, E))
        return fn

    grad_out = torch.randn(B, N, E, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    m64 = copy.deepcopy(m).double()
    impl = run_layer(layer(m, True), m, inputs, grad_out)
    assert len(calls) == (0 if per_head else 1), f"compress_inputs ran {len(calls)} times"
    ref_lp = run_layer(layer(m, False), m, inputs, grad_out)
    golden = run_layer(layer(m64, False), m64, [t.double() for t in inputs], grad_out)
    names = ["out"] + [f"d{n}" for n in ("query", "key", "value")[:len(inputs)]] + \
        [f"d{n}" for n, _ in m.named_parameters()]
    for i, name in enumerate(names):
        assert_within_baseline(name, impl[i], ref_lp[i], golden[i], grad=i > 0, min_len=K)
    impl64 = run_layer(layer(m64, True), m64, [t.double() for t in inputs], grad_out)
    for name, a, b in zip(names, impl64, golden, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=lambda s, name=name: f"{name} (float64): {s}")
    if padding and cross:  # a NaN at a padded position changes nothing, not even the gradients
        key_nan = key.clone()
        key_nan[0, 3] = float("nan")
        with_nan = run_layer(layer(m, True), m, [query, key_nan, value], grad_out)
        for name, a, b in zip(names, with_nan, impl, strict=True):
            assert torch.equal(a, b), f"{name}: a NaN at a padded key position changed it"


def test_linformer_layer_refuses_a_sequence_longer_than_e():
    m = sa.nn.MultiheadAttention(16, 2, attention=sa.nn.LinformerAttention(10, 4))
    x = torch.randn(1, 11, 16)
    with pytest.raises(ValueError, match="exceeds"):
        m(x, x, x, need_weights=False)


@pytest.mark.parametrize("layout", ["seq_first", "unbatched"])
def test_self_attention_inputs_stay_one_tensor_through_layout_views(monkeypatch, layout):
    """Sequence-first and unbatched self-attention: query, key and value stay one tensor after the layout
    views, so ProbSparse's input-space path accumulates the key and value gradients in one buffer; the
    result equals the batch-first call on copies."""
    import sparse_attention.nn.probsparse_layer as layer_mod

    same = []
    original = layer_mod._InputSpaceAttention.forward

    def forward(ctx, *a):
        out = original(ctx, *a)
        same.append(ctx.same_input)
        return out

    monkeypatch.setattr(layer_mod._InputSpaceAttention, "forward", staticmethod(forward))
    torch.manual_seed(0)
    m = sa.nn.MultiheadAttention(16, 2, attention=sa.ProbSparse(1.0), batch_first=layout == "unbatched")
    x = torch.randn(12, 2, 16) if layout == "seq_first" else torch.randn(12, 16)
    out = m(x, x, x, need_weights=False)[0]
    assert same == [True], f"key and value were not one tensor: {same}"
    xb = x.transpose(0, 1) if layout == "seq_first" else x.unsqueeze(0)
    m.batch_first = True
    expected = m(xb, xb.clone(), xb.clone(), need_weights=False)[0]
    expected = expected.transpose(0, 1) if layout == "seq_first" else expected.squeeze(0)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mech", ["lsh", "probsparse", "routing", "strided"])
def test_is_causal_with_a_mechanism_built_causal(mech):
    """is_causal=True on a mechanism built with causal=True restricts nothing more: the same output, to the
    bit, as without it (it raised a TypeError for the content-based ones: "restricted by a static pattern")."""
    m = {"lsh": lambda: sa.LSH(4, causal=True), "probsparse": lambda: sa.ProbSparse(causal=True),
         "routing": lambda: sa.Routing(torch.randn(3, 8, generator=torch.Generator().manual_seed(0)), causal=True),
         "strided": lambda: sa.Strided(3, causal=True)}[mech]()
    torch.manual_seed(0)
    mha = sa.nn.MultiheadAttention(16, 2, attention=m, batch_first=True).eval()
    x = torch.randn(2, 12, 16)
    out = mha(x, x, x, need_weights=False, is_causal=True)[0]
    assert torch.equal(out, mha(x, x, x, need_weights=False)[0])


def test_causal_longformer_with_global_tokens_is_causal():
    """Longformer(causal=True) keeps j <= i for its global pairs too: is_causal=True restricts nothing more,
    and no output depends on a later token (its global tokens saw, and were seen by, every position)."""
    torch.manual_seed(0)
    pattern = sa.Longformer(2, global_indices=[0, 6], causal=True)
    assert not bool(pattern.mask(12, 12).triu(1).any())
    mha = sa.nn.MultiheadAttention(16, 2, attention=pattern, batch_first=True).eval()
    x = torch.randn(2, 12, 16)
    out = mha(x, x, x, need_weights=False, is_causal=True)[0]
    assert torch.equal(out, mha(x, x, x, need_weights=False)[0])
    y = x.clone()
    y[:, 7:] = torch.randn(2, 5, 16)
    assert torch.equal(mha(y, y, y, need_weights=False)[0][:, :7], out[:, :7])
