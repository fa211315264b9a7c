"""Invariants every module passes, looping over the registry of mechanisms (issue 5, "Correctness").

For each registered mechanism, ``sa.nn.MultiheadAttention(attention=name)`` (self-attention, no
weights, so content-based mechanisms and head-split modules take part too): output shapes,
batch_first and key_padding_mask conventions, causal mechanisms never see the future (modules:
in their causal=True configuration), eval mode deterministic, state_dict round trip, gradients
reach every parameter. The other layers pass the same module checks. torch.compile is checked on
one small case per kind of mechanism.
"""

from __future__ import annotations

import copy
import shutil
import time

import pytest
import torch

import sparse_attention as sa

E, H, N, B = 16, 4, 37, 2  # N: odd, over two blocks of the registry's default block size 16

MECHANISMS = sa.mechanisms()
IDS = [m.name for m in MECHANISMS]

# (This suite found that ProbSparse's and LSH's selection steps read padded tokens; they now leave
# padded keys, and padded queries of self-attention, out of the selection. It found the same in
# Nyström's query landmarks and RoutingAttention's routing and k-means step.)
KPM_PARAMS = MECHANISMS
STRICT_CAUSAL_MODULES = [m for m in MECHANISMS if m.kind == "module" and m.causal_support == "strict"]
KEYS_CAUSAL = [m for m in MECHANISMS if m.causal_support == "keys"]


def _mha(mech, **kwargs):
    torch.manual_seed(0)
    return sa.nn.MultiheadAttention(E, H, attention=mech.name, **kwargs)


def _call(m, x, **kwargs):
    return m(x, x, x, need_weights=False, **kwargs)[0]


def _x(seed=0, n=N):
    return torch.randn(B, n, E, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("mech", MECHANISMS, ids=IDS)
def test_shapes_and_batch_first(mech):
    m = _mha(mech).eval()
    x = _x()
    out = _call(m, x)
    assert out.shape == (B, N, E) and torch.isfinite(out).all()
    seq = _mha(mech, batch_first=False).eval()
    seq.load_state_dict(m.state_dict())
    torch.testing.assert_close(_call(seq, x.transpose(0, 1)).transpose(0, 1), out, rtol=0, atol=0)
    one = _call(m, x[0])  # unbatched (N, E)
    assert one.shape == (N, E)
    torch.testing.assert_close(one, out[0], msg=f"{mech.name}: unbatched != batch element 0")


@pytest.mark.parametrize("mech", MECHANISMS, ids=IDS)
def test_empty_batch(mech):
    """A batch of no sequences gives an empty output and an empty gradient, training and eval (every mechanism
    and module once took a reshape with -1, which PyTorch cannot infer when the batch is 0)."""
    for train in (True, False):
        m = _mha(mech).train(train)
        x = torch.randn(0, N, E, requires_grad=True)
        out = _call(m, x)
        out.sum().backward()
        assert out.shape == (0, N, E) and x.grad.shape == x.shape


@pytest.mark.parametrize("mech", KPM_PARAMS, ids=IDS)
def test_key_padding_mask_true_is_ignored(mech):
    """In eval and in training mode (each call on a fresh copy of the same module: training moves state such
    as routing's centroids), what the padded tokens hold does not change the real tokens' outputs. (Training
    mode found that Sinkhorn's soft sorting mixed padded keys and values into the sorted blocks.)"""
    base = _mha(mech)
    x = _x()
    kpm = torch.zeros(B, N, dtype=torch.bool)
    kpm[0, 30:] = True
    kpm[1, 5:9] = True
    y = x.clone()
    y[kpm] = torch.randn(int(kpm.sum()), E, generator=torch.Generator().manual_seed(3)) * 10
    for train in (False, True):
        out, out_y = (_call(copy.deepcopy(base).train(train), t, key_padding_mask=kpm) for t in (x, y))
        # padded tokens still produce outputs (they are queries too); the real ones must not notice them
        torch.testing.assert_close(out_y[~kpm], out[~kpm],
                                   msg=f"{mech.name} (training={train}): padded keys changed real outputs")


def _assert_no_future(m, name, **kwargs):
    x = _x()
    out = _call(m, x, **kwargs)
    for t in (0, 16, 30):
        y = x.clone()
        y[:, t + 1:] = torch.randn_like(y[:, t + 1:]) * 10
        torch.testing.assert_close(_call(m, y, **kwargs)[:, :t + 1], out[:, :t + 1],
                                   msg=f"{name}: output at positions <= {t} saw the future")


@pytest.mark.parametrize("mech", [m for m in MECHANISMS if m.causal], ids=[m.name for m in MECHANISMS if m.causal])
def test_causal_mechanisms_never_see_the_future(mech):
    _assert_no_future(_mha(mech).eval(), mech.name)


@pytest.mark.parametrize("mech", STRICT_CAUSAL_MODULES, ids=[m.name for m in STRICT_CAUSAL_MODULES])
def test_strictly_causal_modules_never_see_the_future(mech):
    """Module mechanisms with causal_support "strict", built causal=True: in eval and in training
    mode (Sinkhorn sorts softly there), and with is_causal=True (accepted, changes nothing)."""
    torch.manual_seed(0)
    m = sa.nn.build_attention(mech.name, E, H, causal=True).eval()
    _assert_no_future(m, mech.name)
    _assert_no_future(m, mech.name, is_causal=True)
    _assert_no_future(m.train(), f"{mech.name} (train mode)")


@pytest.mark.parametrize("mech", KEYS_CAUSAL, ids=[m.name for m in KEYS_CAUSAL])
def test_key_causal_mechanisms_never_read_future_values_or_attend_future_keys(mech):
    """causal_support "keys" (LSH, ProbSparse, Routing, Reformer): with causal=True, changing the
    values after position t changes no output at or before t (no future key is attended), while
    the keys after t may (the selection is global). Checked on head-split q, k, v; modules in eval and
    in training mode (each call on a fresh copy: training moves routing's centroids)."""
    torch.manual_seed(0)
    D = E // H
    base = mech.make(causal=True, **({"head_dim": D, "num_heads": H} if mech.kind == "module" else {}))
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(B, H, N, D, generator=g) for _ in range(3))
    for train in (False, True) if isinstance(base, torch.nn.Module) else (False,):
        def run(q, k, v, train=train):
            if not isinstance(base, torch.nn.Module):
                return sa.attention(q, k, v, base)
            mod = copy.deepcopy(base).train(train)
            return mod(q, v) if getattr(mod, "shared_qk", False) else mod(q, k, v)

        out = run(q, k, v)
        for t in (0, 16, 30):
            v2 = v.clone()
            v2[:, :, t + 1:] = torch.randn_like(v2[:, :, t + 1:]) * 10
            torch.testing.assert_close(run(q, k, v2)[:, :, :t + 1], out[:, :, :t + 1],
                                       msg=f"{mech.name} (training={train}): output at positions <= {t} read "
                                           "a future value")


def test_mechanisms_without_causal_support_refuse_it():
    for mech in MECHANISMS:
        if mech.causal_support == "none":
            with pytest.raises(ValueError, match="causal"):
                sa.nn.build_attention(mech.name, E, H, causal=True)


@pytest.mark.parametrize("mech", MECHANISMS, ids=IDS)
def test_is_causal_makes_any_mechanism_causal_or_is_refused(mech):
    """is_causal=True restricts the mechanism to Causal(); mechanisms that cannot be restricted
    (ProbSparse, LSH: they have their own causal=True option) refuse with a TypeError saying so;
    module mechanisms not built causal refuse with a ValueError (they cannot be restricted per call)."""
    m = _mha(mech).eval()
    x = _x()
    try:
        _call(m, x, is_causal=True)
    except TypeError as e:
        assert mech.kind == "content" and "causal" in str(e), f"{mech.name}: unexpected refusal {e}"
        return
    except ValueError as e:
        assert mech.kind == "module" and not mech.causal and "causal=True" in str(e), \
            f"{mech.name}: unexpected refusal {e}"
        return
    _assert_no_future(m, mech.name, is_causal=True)


@pytest.mark.parametrize("mech", MECHANISMS, ids=IDS)
def test_eval_is_deterministic_and_state_dict_round_trips(mech):
    m = _mha(mech, dropout=0.5).eval()
    x = _x()
    out = _call(m, x)
    torch.testing.assert_close(_call(m, x), out, rtol=0, atol=0, msg=f"{mech.name}: eval not deterministic")
    torch.manual_seed(123)  # a different initialisation, then the saved weights
    other = sa.nn.MultiheadAttention(E, H, attention=mech.name, dropout=0.5).eval()
    other.load_state_dict(m.state_dict())
    torch.testing.assert_close(_call(other, x), out, rtol=0, atol=0, msg=f"{mech.name}: state_dict round trip")


@pytest.mark.parametrize("mech", MECHANISMS, ids=IDS)
def test_gradients_reach_every_parameter(mech):
    m = _mha(mech, num_kv_heads=2).train()
    x = _x().requires_grad_(True)
    out = _call(m, x)
    out.backward(torch.randn_like(out))
    for name, p in [("input", x), *m.named_parameters()]:
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, \
            f"{mech.name}: no gradient reached {name}"


def _zoo():
    """(name, module, example input builder, call) for the other layers."""
    yield ("encoder-sliding", lambda: sa.nn.TransformerEncoderLayer(E, H, 32, 0.3, batch_first=True,
                                                                     attention="sliding_window"),
           lambda: (_x(),), lambda m, x: m(x))
    yield ("decoder-causal-cross-window", lambda: sa.nn.TransformerDecoderLayer(
        E, H, 32, 0.3, batch_first=True, norm_first=True, attention="causal", cross_attention=sa.SlidingWindow(4)),
        lambda: (_x(), _x(1, 20)), lambda m, x, mem: m(x, mem))
    yield ("pooling-time", lambda: sa.nn.AttentionPooling(E, 8), lambda: (_x(),), lambda m, x: m(x)[0])
    yield ("pooling-feature", lambda: sa.nn.AttentionPooling(E, 8, pool="feature"), lambda: (_x(),),
           lambda m, x: m(x)[0])
    yield ("window2d-shifted", lambda: sa.nn.WindowAttention2d(E, H, 3, 1, attn_drop=0.3, proj_drop=0.3),
           lambda: (torch.randn(B, 7, 5, E, generator=torch.Generator().manual_seed(0)),), lambda m, x: m(x))


ZOO = list(_zoo())


@pytest.mark.parametrize("name, build, inputs, call", ZOO, ids=[z[0] for z in ZOO])
def test_layers_eval_state_dict_and_gradients(name, build, inputs, call):
    torch.manual_seed(0)
    m = build().eval()
    args = inputs()
    out = call(m, *args)
    torch.testing.assert_close(call(m, *args), out, rtol=0, atol=0, msg=f"{name}: eval not deterministic")
    torch.manual_seed(9)
    other = build().eval()
    other.load_state_dict(m.state_dict())
    torch.testing.assert_close(call(other, *args), out, rtol=0, atol=0, msg=f"{name}: state_dict round trip")
    m.train()
    args = [a.clone().requires_grad_(True) for a in args]
    y = call(m, *args)
    y.backward(torch.randn_like(y))
    for pname, p in [*((f"input{i}", a) for i, a in enumerate(args)), *m.named_parameters()]:
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, \
            f"{name}: no gradient reached {pname}"


@pytest.mark.parametrize("name", ["causal_sliding_window", "linformer"])
def test_torch_compile_does_not_change_results(name):
    """One small case per kind (a causal sliding window; a module mechanism, Linformer), eval.
    Skips when no C++ compiler is present or compilation fails or takes over 60 s on this machine."""
    if shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.skip("torch.compile needs a C++ compiler on CPU")
    torch.manual_seed(0)
    m = sa.nn.MultiheadAttention(E, H, attention=name).eval()
    x = _x(n=24)
    expected = _call(m, x)
    start = time.perf_counter()
    try:
        compiled = torch.compile(m)
        got = compiled(x, x, x, need_weights=False)[0]
    except Exception as e:  # noqa: BLE001 - any compiler failure means "not supported here"
        pytest.skip(f"torch.compile unavailable: {type(e).__name__}: {str(e)[:200]}")
    if time.perf_counter() - start > 60:
        pytest.skip("torch.compile too slow on this machine")
    torch.testing.assert_close(got, expected)
