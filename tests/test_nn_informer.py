"""InformerEncoder (ProbSparse + distilling), build_attention, and the forecasting example."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest
import torch
from conftest import assert_within_baseline, run_layer

import sparse_attention as sa


@pytest.mark.parametrize(("length", "layers", "expected"), [(97, 3, 25), (96, 2, 48), (5, 3, 2), (1, 2, 1)])
def test_distilling_halves_the_length_between_layers(length, layers, expected):
    enc = sa.nn.InformerEncoder(16, 2, layers, dim_feedforward=32, dropout=0.0)
    x = torch.randn(2, length, 16)
    y = enc(x)
    assert y.shape == (2, expected, 16)
    y.square().sum().backward()
    assert all(p.grad is not None for p in enc.parameters()), "a parameter gets no gradient"
    assert sa.nn.InformerEncoder(16, 2, layers, distil=False)(x).shape == x.shape


def test_every_query_active_layer_equals_full_attention_layer():
    """With u >= N every query attends all keys: the ProbSparse layer equals the same layer with full attention."""
    torch.manual_seed(0)
    layer = sa.nn.InformerEncoderLayer(16, 2, 32, dropout=0.0, factor=100).eval()
    full = sa.nn.InformerEncoderLayer(16, 2, 32, dropout=0.0).eval()
    full.attn = sa.nn.MultiheadAttention(16, 2)  # same parameters, full attention
    full.load_state_dict(layer.state_dict())
    x = torch.randn(3, 20, 16)
    torch.testing.assert_close(layer(x), full(x), atol=2e-6, rtol=2e-6)


def test_build_attention_by_name_and_errors():
    m = sa.nn.build_attention("sliding_window", 32, 4, window=3, dropout=0.0)
    assert isinstance(m, sa.nn.MultiheadAttention)
    x = torch.randn(2, 10, 32)
    out, _ = m(x, x, x, need_weights=False)
    ref = sa.nn.MultiheadAttention(32, 4, attention=sa.SlidingWindow(3))
    ref.load_state_dict(m.state_dict())
    torch.testing.assert_close(out, ref(x, x, x, need_weights=False)[0])
    with pytest.raises(ValueError, match="unknown mechanism 'nope'"):
        sa.nn.build_attention("nope", 32, 4)
    with pytest.raises(ValueError, match=r"unknown option.*'wndow'.*valid.*window"):
        sa.nn.build_attention("sliding_window", 32, 4, wndow=3)


@pytest.mark.slow
def test_forecasting_example_learns():
    root = pathlib.Path(__file__).resolve().parents[1]
    r = subprocess.run([sys.executable, str(root / "examples" / "informer_forecast.py"), "--steps", "150"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    line = r.stdout.strip().splitlines()[-1]
    ours, last, season = (float(part.split()[-1]) for part in line.split("|"))
    assert ours < last and ours < season, line


# --- the ProbSparse layer (nn/probsparse_layer.py) ------------------------------------------------------


def _composed(m, query, key, value, kpm, *, golden):
    """The definition: ProbSparse on the layer's projections, then out_proj (fp64: the package reference;
    otherwise sa.attention, the generic path in the input dtype)."""
    import torch.nn.functional as F

    (wq, bq), (wk, bk), (wv, bv) = m._in_projections()
    B, N, E = query.shape
    S, H, Hkv, D = key.shape[1], m.num_heads, m.num_kv_heads, m.head_dim
    q = F.linear(query, wq, bq).view(B, N, H, D).transpose(1, 2)
    k = F.linear(key, wk, bk).view(B, S, Hkv, D).transpose(1, 2)
    v = F.linear(value, wv, bv).view(B, S, Hkv, D).transpose(1, 2)
    o = m.attention.reference(q, k, v, key_padding_mask=kpm) if golden else \
        sa.attention(q, k, v, m.attention, key_padding_mask=kpm)
    return m.out_proj(o.to(query.dtype).transpose(1, 2).reshape(B, N, E))


def _layer_case(causal, bias, factor, kv_heads, cross, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    E, H, B, N = 48, 4, 2, 41
    # causal "sum" cross-attends to fewer keys than queries: the first 12 queries come before every key
    S, kdim, vdim = (29 if causal == "sum" else 67, 20, 28) if cross else (N, None, None)
    mech = sa.ProbSparse(factor, causal=bool(causal), seed=seed, causal_lazy=causal or "mean")
    m = sa.nn.MultiheadAttention(E, H, attention=mech,
                                 num_kv_heads=kv_heads, bias=bias, kdim=kdim, vdim=vdim)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.3)
    m = m.to(dtype)
    query = torch.randn(B, N, E, generator=g, dtype=torch.float64).to(dtype)
    key = torch.randn(B, S, kdim or E, generator=g, dtype=torch.float64).to(dtype) if cross else query
    value = torch.randn(B, S, vdim or E, generator=g, dtype=torch.float64).to(dtype) if cross else query
    kpm = torch.rand(B, S, generator=g) < 0.3
    kpm[1] = True if cross else kpm[1]  # cross: the second batch entry has no real key at all
    return m, query, key, value, kpm


# factor 1 -> u = 4 active queries per head; H·u = 16 against Hkv·D = 48 / 24 / 12 projected features:
# the keys and values are read as inputs (in input space) unless Hkv = 1 or factor 3 (u = 12, H·u = 48)
LAYER_CASES = [  # (causal: False or its lazy rows' "mean"/"sum", bias, factor, kv_heads, cross, input space)
    (False, True, 1.0, 4, False, True),
    (False, False, 1.0, 2, False, True),
    (False, True, 1.0, 2, True, True),
    (False, True, 1.0, 1, True, False),
    (False, True, 3.0, 4, False, False),
    ("mean", True, 1.0, 2, False, True),
    ("mean", False, 1.0, 4, True, True),
    ("sum", True, 1.0, 2, True, True),
    ("mean", True, 1.0, 1, False, False),
    ("mean", True, 3.0, 4, True, False),
]


@pytest.mark.parametrize(("causal", "bias", "factor", "kv_heads", "cross", "input_space"), LAYER_CASES,
                         ids=[f"{'causal-' + c[0] if c[0] else 'full'}-{'bias' if c[1] else 'nobias'}-c{c[2]:g}-"
                              f"Hkv{c[3]}-{'cross' if c[4] else 'self'}" for c in LAYER_CASES])
def test_probsparse_layer_equals_probsparse_between_projections(monkeypatch, causal, bias, factor, kv_heads,
                                                                cross, input_space):
    """MultiheadAttention(ProbSparse) projects only what its active queries need; its output and every
    gradient (inputs and parameters) equal ProbSparse between the layer's projections, by the tolerance
    rule, with key padding (cross: one batch entry with no real key)."""
    import copy

    import sparse_attention.nn.multihead as multihead
    import sparse_attention.nn.probsparse_layer as layer_mod

    calls = {"layer": 0, "inputs": 0}

    def spy(name, fn):
        def wrapped(*a, **kw):
            calls[name] += 1
            return fn(*a, **kw)
        return wrapped

    monkeypatch.setattr(multihead, "probsparse_layer", spy("layer", layer_mod.probsparse_layer))
    monkeypatch.setattr(layer_mod, "_attend_inputs", spy("inputs", layer_mod._attend_inputs))
    m, query, key, value, kpm = _layer_case(causal, bias, factor, kv_heads, cross)
    m64 = copy.deepcopy(m).double()
    inputs = [query] if not cross else [query, key, value]

    def fused(*t):
        qkv = (t[0], t[0], t[0]) if not cross else t
        return m(*qkv, key_padding_mask=kpm, need_weights=False)[0]

    def composed(module, golden):
        def fn(*t):
            qkv = (t[0], t[0], t[0]) if not cross else t
            return _composed(module, *qkv, kpm, golden=golden)
        return fn

    grad_out = torch.randn(query.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    impl = run_layer(fused, m, inputs, grad_out.float())
    assert calls == {"layer": 1, "inputs": int(input_space)}, f"the fused layer did not take the expected path: {calls}"
    ref_lp = run_layer(composed(m, golden=False), m, inputs, grad_out.float())
    golden = run_layer(composed(m64, golden=True), m64, [t.double() for t in inputs], grad_out)
    names = ["out"] + [f"d{n}" for n in ("query", "key", "value")[:len(inputs)]] + \
        [f"d{n}" for n, _ in m.named_parameters()]
    for i, name in enumerate(names):
        assert_within_baseline(name, impl[i], ref_lp[i], golden[i], grad=i > 0, min_len=key.shape[1])
    # float64: the same function, to rounding
    impl64 = run_layer(lambda *t: m64(*((t[0],) * 3 if not cross else t), key_padding_mask=kpm,
                                       need_weights=False)[0], m64, [t.double() for t in inputs], grad_out)
    for name, a, b in zip(names, impl64, golden, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=lambda s, name=name: f"{name} (float64): {s}")


@pytest.mark.parametrize("causal", [False, "mean"])
@pytest.mark.parametrize("input_space", [True, False])
def test_probsparse_layer_dropout_matches_the_generic_path(input_space, causal):
    """Training mode with dropout: the same weights are dropped (same RNG draws) as on the generic path."""
    factor = 1.0 if input_space else 3.0
    m, query, _, _, kpm = _layer_case(causal, True, factor, 4, False, dtype=torch.float64)
    m.dropout = 0.3
    m.train()
    (wq, bq), (wk, bk), (wv, bv) = m._in_projections()
    B, N, E = query.shape
    grad_out = torch.randn(query.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)

    def generic(x):
        qkv = [torch.nn.functional.linear(x, w, b).view(B, N, -1, m.head_dim).transpose(1, 2)
               for w, b in ((wq, bq), (wk, bk), (wv, bv))]
        o = sa.attention(*qkv, m.attention, key_padding_mask=kpm, dropout_p=0.3)
        return m.out_proj(o.transpose(1, 2).reshape(B, N, E))

    def seeded(fn, seed):
        def run(x):
            torch.manual_seed(seed)
            return fn(x)
        return run

    layer = seeded(lambda x: m(x, x, x, key_padding_mask=kpm, need_weights=False)[0], 11)
    fused = run_layer(layer, m, [query], grad_out)
    expected = run_layer(seeded(generic, 11), m, [query], grad_out)
    names = ["out", "dquery"] + [f"d{n}" for n, _ in m.named_parameters()]
    for name, a, b in zip(names, fused, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=lambda s, name=name: f"{name}: {s}")
    other = run_layer(seeded(lambda x: m(x, x, x, key_padding_mask=kpm, need_weights=False)[0], 12), m, [query],
                       grad_out)
    assert not torch.allclose(other[0], fused[0]), "dropout had no effect: the test cannot see a wrong mask"


@pytest.mark.parametrize("causal", [False, True])
def test_probsparse_layer_gradgradcheck(monkeypatch, causal):
    """fp64 gradcheck and gradgradcheck through the input-space path (its backward recomputes the
    weights from the inputs when a graph of the backward is asked for), with key padding."""
    import sparse_attention.nn.probsparse_layer as layer_mod

    calls = []
    original = layer_mod._attend_inputs
    monkeypatch.setattr(layer_mod, "_attend_inputs", lambda *a, **kw: calls.append(1) or original(*a, **kw))
    torch.manual_seed(0)
    m = sa.nn.MultiheadAttention(8, 2, attention=sa.ProbSparse(1.0, causal=causal)).double()  # u = 3, H·u < 8
    x = torch.randn(2, 8, 8, dtype=torch.float64, requires_grad=True)
    kv = torch.randn(2, 7, 8, dtype=torch.float64, requires_grad=True)
    kpm = torch.zeros(2, 7, dtype=torch.bool)
    kpm[1, 5:] = True

    def f(x, kv):
        return m(x, kv, kv, key_padding_mask=kpm, need_weights=False)[0]

    assert torch.autograd.gradcheck(f, (x, kv))
    assert torch.autograd.gradgradcheck(f, (x, kv))
    assert calls, "the input-space path did not run"
