"""The native top-k kernel (sparse_attention/native): exact against a stable sort, and the fallbacks."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import assert_within_baseline
from hypothesis import given, settings
from hypothesis import strategies as st

from sparse_attention import native

needs_native = pytest.mark.skipif(not native.available(), reason=f"native kernels unavailable: {native.status()}")


def _reference(s: torch.Tensor, k: int) -> torch.Tensor:
    """The documented order, by a stable descending sort (NaN first, equal values by lower column):
    the first k columns of each row, ascending."""
    return s.sort(dim=-1, descending=True, stable=True).indices[..., :k].sort(-1).values


def _rows(kind: str, R: int, S: int, k: int, gen: torch.Generator) -> torch.Tensor:
    s = torch.randn(R, S, generator=gen)
    if kind == "ties":  # a few distinct values, -0.0 and +0.0 among them
        s = torch.randint(-2, 3, (R, S), generator=gen).float() * 0.5
        s[s == 0] = torch.where(torch.rand(int((s == 0).sum()), generator=gen) < 0.5, -0.0, 0.0)
    elif kind == "zeros":  # -0.0 and +0.0 (equal values, ranked by column) below a few ones
        s = torch.where(torch.rand(R, S, generator=gen) < 0.5, -0.0, 0.0)
        s[:, torch.randint(0, S, (3,), generator=gen)] = 1.0
    elif kind == "masked":  # about half allowed
        s.masked_fill_(torch.rand(R, S, generator=gen) < 0.5, float("-inf"))
    elif kind == "causal":  # row r allows its first r + 1 columns: fewer than k finite values in early rows
        s.masked_fill_(torch.ones(R, S, dtype=torch.bool).triu(1), float("-inf"))
    elif kind == "empty":  # nothing allowed, and one row with a single +inf
        s.fill_(float("-inf"))
        s[0, S // 2] = float("inf")
    elif kind == "nan":  # NaN of both signs in some rows
        s[0, torch.randint(0, S, (3,), generator=gen)] = float("nan")
        s[1, torch.randint(0, S, (2,), generator=gen)] = -float("nan")
        s[2] = float("nan")
    elif kind == "ascending":  # every column beats the ones before it
        s = s.sort(-1).values
    return s


@needs_native
@pytest.mark.parametrize("kind", ["randn", "ties", "zeros", "masked", "causal", "empty", "nan", "ascending"])
@pytest.mark.parametrize("S, k", [(1, 1), (7, 7), (40, 9), (100, 25), (257, 64), (1000, 3), (4099, 64),
                                  (16384, 128)])
def test_native_top_k_is_the_stable_order(kind, S, k):
    """Rows short enough to take every column (S <= 4k) and long ones (two passes), with ties, masks,
    fewer than k finite values, NaN and sorted rows: exactly the first k columns in the documented order,
    ascending, with their values."""
    gen = torch.Generator().manual_seed(S * 7 + k)
    s = _rows(kind, 12, S, k, gen)
    values, cols = native.topk_rows(s, k)
    want = _reference(s, k)
    assert torch.equal(cols, want), f"{kind} S={S} k={k}: columns differ in rows " \
                                    f"{(cols != want).any(-1).nonzero().flatten().tolist()}"
    assert torch.equal(values.view(torch.int32), s.gather(-1, want).view(torch.int32)), "values are not the row's"


@needs_native
def test_native_top_k_layouts():
    """Leading dimensions, rows that are not contiguous, and no rows at all."""
    s = torch.randn(2, 3, 500, generator=torch.Generator().manual_seed(4))
    for t in (s, s.transpose(0, 1), s[:, :, ::2], s.transpose(-1, -2).contiguous().transpose(-1, -2)):
        values, cols = native.topk_rows(t, 17)
        assert values.shape == cols.shape == t.shape[:-1] + (17,)
        assert torch.equal(cols, _reference(t, 17))
    values, cols = native.topk_rows(torch.empty(0, 5, 30), 4)
    assert values.shape == cols.shape == (0, 5, 4)


@needs_native
def test_native_top_k_declines_what_it_does_not_handle():
    s = torch.randn(3, 50)
    assert native.topk_rows(s.double(), 5) is None, "float64"
    assert native.topk_rows(s, 0) is None and native.topk_rows(s, 51) is None, "k out of 1..S"
    x = s.clone().requires_grad_()
    assert native.topk_rows(x, 5) is None, "autograd would need the values' graph"
    with torch.no_grad():
        assert native.topk_rows(x, 5) is not None


def test_native_kernels_build_where_a_compiler_is():
    """On a machine with a C compiler (CI's included) the kernels must build: a failure is a bug, not a
    reason to fall back silently."""
    if native._compiler() is None or os.environ.get("SPARSE_ATTENTION_NATIVE") == "0":
        pytest.skip("no C compiler, or disabled")
    assert native.available(), native.status()


def _run(code: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=300)


_PROBE = """
    import warnings
    warnings.simplefilter("always")
    import torch, sparse_attention as sa
    from sparse_attention import native
    with warnings.catch_warnings(record=True) as caught:
        ok = native.available()
    q, k, v = (torch.randn(1, 2, 300, 8, generator=torch.Generator().manual_seed(i)) for i in range(3))
    kept = sa.explain(q, k, sa.TopK(5))
    out = sa.attention(q, k, v, sa.TopK(5))
    ref = sa.reference_attention(q.double(), k.double(), v.double(), kept)
    print(ok, int(kept.sum()), float((out.double() - ref).abs().max()) < 1e-5,
          [str(w.category.__name__) for w in caught])
    print(native.status())
"""


def test_disabled_or_failing_build_falls_back_to_torch(tmp_path):
    """SPARSE_ATTENTION_NATIVE=0, and a compiler that fails (with a RuntimeWarning saying so): TopK still
    keeps 5 keys per row and equals the reference."""
    done = _run(_PROBE, {"SPARSE_ATTENTION_NATIVE": "0", "SPARSE_ATTENTION_CACHE": str(tmp_path)})
    first, status = done.stdout.strip().splitlines()
    assert first == "False 3000 True []", done.stdout + done.stderr
    assert "SPARSE_ATTENTION_NATIVE=0" in status
    done = _run(_PROBE, {"CC": "false", "SPARSE_ATTENTION_CACHE": str(tmp_path)})
    first, *status = done.stdout.strip().splitlines()
    assert first == "False 3000 True ['RuntimeWarning']", done.stdout + done.stderr
    assert "failed" in status[0]
    assert not list(tmp_path.iterdir()), "a failed build left files in the cache"


def test_build_is_cached(tmp_path):
    """The first process compiles into the cache; the next one loads that file; a damaged file is built
    again."""
    if native._compiler() is None:
        pytest.skip("no C compiler")
    env = {"SPARSE_ATTENTION_CACHE": str(tmp_path)}
    first = _run(_PROBE, env)
    assert first.stdout.startswith("True 3000 True []"), first.stdout + first.stderr
    built = list(tmp_path.iterdir())
    assert len(built) == 1 and built[0].suffix == ".so", built
    stamp = built[0].stat().st_mtime_ns
    second = _run(_PROBE, env)
    assert second.stdout.startswith("True 3000 True []"), second.stdout + second.stderr
    assert str(built[0]) in second.stdout and built[0].stat().st_mtime_ns == stamp
    built[0].write_bytes(b"not a shared library")  # a damaged cached build is built again
    third = _run(_PROBE, env)
    assert third.stdout.startswith("True 3000 True []"), third.stdout + third.stderr
    assert not built[0].read_bytes().startswith(b"not a shared library"), "the damaged file is still there"


def _buckets_reference(p: torch.Tensor) -> torch.Tensor:
    """LSH.hash's convention for argmax over [p, -p]: the column of the largest |p| (torch.argmax: the
    first maximum, NaN highest), plus half when that entry is negative. (It differs from argmax of the
    concatenation only on an exact tie between some p_i > 0 and p_j = -p_i with j < i.)"""
    col = p.abs().argmax(-1, keepdim=True)
    return (col + p.shape[-1] * (p.gather(-1, col) < 0)).squeeze(-1)


@needs_native
@pytest.mark.parametrize("half", [1, 7, 16, 17, 32, 256])
@pytest.mark.parametrize("kind", ["randn", "ties", "zeros", "nan"])
def test_native_lsh_buckets_equal_the_argmax(half, kind):
    """Buckets from the projections as LSH.hash defines them: first column on ties, first NaN when
    there is one."""
    gen = torch.Generator().manual_seed(half)
    p = torch.randn(300, half, generator=gen)
    if kind == "ties":
        p = torch.randint(-2, 3, (300, half), generator=gen).float()
    elif kind == "zeros":
        p = torch.where(torch.rand(300, half, generator=gen) < 0.5, -0.0, 0.0)
    elif kind == "nan":
        p[::3, torch.randint(0, half, (1,), generator=gen)] = float("nan")
        p[1::3, half // 2:] = float("nan")
    got = native.lsh_buckets(p)
    assert torch.equal(got, _buckets_reference(p)), f"rows {(got != _buckets_reference(p)).nonzero().flatten()[:5]}"
    t = p.t().contiguous().t()  # the same values, column-major
    assert torch.equal(native.lsh_buckets(t), got), "strided rows"
    assert native.lsh_buckets(p.view(3, 100, half)).shape == (3, 100)


@needs_native
@pytest.mark.parametrize("L, values", [(1, 1), (50, 1), (97, 6), (1000, 33), (4096, 129)])
def test_native_bucket_order_is_the_stable_sort(L, values):
    b = torch.randint(0, values, (2, 3, L), generator=torch.Generator().manual_seed(L))
    want = torch.sort(b * L + torch.arange(L), dim=-1).indices
    assert torch.equal(native.bucket_order(b, values), want)
    assert torch.equal(native.bucket_order(b.transpose(0, 1), values), want.transpose(0, 1)), "strided rows"


@needs_native
def test_native_bucket_order_edges():
    assert native.bucket_order(torch.empty(0, 5, dtype=torch.long), 3).shape == (0, 5)
    assert native.bucket_order(torch.empty(4, 0, dtype=torch.long), 3).shape == (4, 0)
    with pytest.raises(ValueError, match=r"\[0, 3\), got min 0, max 3"):
        native.bucket_order(torch.tensor([[0, 3, 1]]), 3)
    with pytest.raises(ValueError, match="got min -1"):
        native.bucket_order(torch.tensor([[0, -1, 1]]), 3)
    assert native.bucket_order(torch.zeros(3, 4), 3) is None, "float ids: not for the kernel"


def test_build_without_openmp_runs_on_one_thread(tmp_path):
    """A compiler that rejects -fopenmp: the kernels are built without it and run on the calling thread."""
    cc = native._compiler()
    if cc is None:
        pytest.skip("no C compiler")
    wrapper = tmp_path / "cc-no-openmp"
    wrapper.write_text('#!/bin/sh\nfor a in "$@"; do [ "$a" = -fopenmp ] && exit 1; done\nexec '
                       + " ".join(cc) + ' "$@"\n')
    wrapper.chmod(0o755)
    done = _run(_PROBE, {"CC": str(wrapper), "SPARSE_ATTENTION_CACHE": str(tmp_path / "cache")})
    first, status = done.stdout.strip().splitlines()
    assert first == "True 3000 True []", done.stdout + done.stderr
    assert "one thread (built without OpenMP)" in status


@needs_native
@settings(max_examples=150, deadline=None)
@given(S=st.integers(1, 600), k_frac=st.floats(0.0, 1.0), data=st.data())
def test_native_top_k_property(S, k_frac, data):
    """Random lengths and k, rows drawn from a small alphabet of values (ties, ±0, ±inf, NaN) or
    random normal values: always the documented stable order."""
    k = max(1, min(S, round(k_frac * S) if data.draw(st.booleans()) else round(k_frac * 20)))
    seed = data.draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    if data.draw(st.booleans()):
        alphabet = torch.tensor([float("-inf"), -1.0, -0.0, 0.0, 0.5, 1.0, float("inf"), float("nan")])
        s = alphabet[torch.randint(0, len(alphabet), (4, S), generator=gen)]
    else:
        s = torch.randn(4, S, generator=gen)
    values, cols = native.topk_rows(s, k)
    assert torch.equal(cols, _reference(s, k))
    assert torch.equal(values.view(torch.int32), s.gather(-1, cols).view(torch.int32))


@needs_native
def test_native_mix_rows_is_the_weighted_sum_of_gathered_rows():
    """out[r] = sum_j w[r, j] v[cols[r, j]], zero weights summed too (a NaN behind one propagates, as in
    the CSR product it replaces)."""
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(50, 24, generator=gen)
    cols = torch.randint(0, 50, (3, 7, 5), generator=gen)
    w = torch.rand(3, 7, 5, generator=gen)
    w[0, 0] = 0.0
    want = torch.einsum("abj,abje->abe", w.double(), v.double()[cols])
    torch.testing.assert_close(native.mix_rows(w, cols, v).double(), want, rtol=1e-6, atol=1e-6)
    v[cols[1, 2, 3]] = float("nan")
    w[1, 2, 3] = 0.0
    out = native.mix_rows(w, cols, v)
    assert bool(out[1, 2].isnan().all()), "a NaN behind a zero weight must propagate"
    assert native.mix_rows(w.double(), cols, v.double()) is None, "float64: not for the kernel"
    assert native.mix_rows(torch.empty(0, 5), torch.empty(0, 5, dtype=torch.long), v).shape == (0, 24)


@needs_native
def test_native_dot_rows_and_scatter_groups():
    """dW's dot products with gathered rows, and dV/dK's scatter-adds by groups of rows that own their
    output rows, against einsum and index_add_ references."""
    gen = torch.Generator().manual_seed(1)
    groups, rows_per, keys_per, k, E = 3, 10, 7, 4, 20
    a = torch.randn(groups * rows_per, E, generator=gen)
    b = torch.randn(groups * keys_per, E, generator=gen)
    group_of_row = torch.arange(groups * rows_per) // rows_per
    cols = torch.randint(0, keys_per, (groups * rows_per, k), generator=gen) + (group_of_row * keys_per)[:, None]
    want = torch.einsum("re,rje->rj", a.double(), b.double()[cols])
    torch.testing.assert_close(native.dot_rows(a, cols, b).double(), want, rtol=1e-6, atol=1e-6)
    w = torch.rand(groups * rows_per, k, generator=gen)
    want = torch.zeros(groups * keys_per, E, dtype=torch.float64).index_add_(
        0, cols.flatten(), (w.double()[..., None] * a.double()[:, None, :]).reshape(-1, E))
    got = native.scatter_groups(w, cols, a, groups, keys_per)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
    skip = torch.rand(cols.shape, generator=gen) < 0.3  # negative columns: pairs left out
    want = torch.zeros(groups * keys_per, E, dtype=torch.float64).index_add_(
        0, cols[~skip], w.double()[~skip][:, None] * a.double()[torch.nonzero(~skip)[:, 0]])
    got = native.scatter_groups(w, cols.masked_fill(skip, -1), a, groups, keys_per)
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-6)
    assert native.dot_rows(a.double(), cols, b.double()) is None, "float64: not for the kernel"


@needs_native
@pytest.mark.parametrize("K", [1, 7, 64, 70, 130])
def test_native_pair_counts_count_the_shared_clusters(K):
    """For every cluster and (query slot, key slot) pair: the number of clusters holding both tokens,
    against a brute-force count over membership tables (K across 64-bit words)."""
    gen = torch.Generator().manual_seed(K)
    B, H, N, S, wq, wk = 2, 2, 40, 33, 6, 5
    qi = torch.stack([torch.randperm(N, generator=gen)[:wq] for _ in range(B * H * K)]).view(B, H, K, wq)
    ki = torch.stack([torch.randperm(S, generator=gen)[:wk] for _ in range(B * H * K)]).view(B, H, K, wk)
    in_q = torch.zeros(B, H, N, K).scatter_(2, qi.transpose(2, 3), 1.0)  # token x cluster membership
    in_k = torch.zeros(B, H, S, K).scatter_(2, ki.transpose(2, 3), 1.0)
    shared = in_q @ in_k.transpose(-1, -2)  # (B, H, N, S) clusters both tokens are in
    want = torch.stack([shared[b, h][qi[b, h, c]][:, ki[b, h, c]] for b in range(B) for h in range(H)
                        for c in range(K)]).view(B, H, K, wq, wk)
    assert torch.equal(native.pair_counts(qi, ki, N, S), want)
    torch.testing.assert_close(native.pair_counts(qi, ki, N, S, neg_log=True), -want.double().log().float(),
                               rtol=0, atol=0)  # the same float64 log, rounded once
    with pytest.raises(ValueError, match=r"\[0, 40\)"):
        native.pair_counts(qi + N, ki, N, S)


@needs_native
def test_native_items_check_their_shapes():
    """The items kernels index their tensors by q's, k's and v's sizes: any tensor of another shape (a key,
    value, second source, output gradient, output or log-sum-exp) is a ValueError naming it, before the
    kernels could read or write past its end."""
    G, N, D, Dv, I, wq, wk = 2, 6, 8, 4, 3, 2, 3
    q, k, v = torch.randn(G, N, D), torch.randn(G, N, D), torch.randn(G, N, Dv)
    qrows, krows = torch.zeros(G, I, wq, dtype=torch.long), torch.zeros(G, I, wk, dtype=torch.long)
    ok = {"k2": torch.randn(G, 5, D), "v2": torch.randn(G, 5, Dv)}
    for name, bad in (("k", torch.randn(G, N, 3)), ("v", torch.randn(G, N + 1, Dv)), ("k2", torch.randn(G, 5, 3)),
                      ("v2", torch.randn(G, 5, 1)), ("krows", torch.zeros(G, I + 1, wk, dtype=torch.long))):
        args = {"k": k, "v": v, "krows": krows, **ok, name: bad}
        with pytest.raises(ValueError, match=f"^{name} must be"):
            native.items_forward(q, args["k"], args["v"], qrows, args["krows"], None, 0.5, args["k2"], args["v2"])
    out, lse = native.items_forward(q, k, v, qrows, krows, None, 0.5, **ok)
    for name, bad in (("g", torch.randn(G, N, Dv + 1)), ("o", out[:, :-1]), ("lse", lse[:1])):
        args = {"g": torch.randn(G, N, Dv), "o": out, "lse": lse, name: bad}
        with pytest.raises(ValueError, match=f"^{name} must be"):
            native.items_backward(q, k, v, args["g"], args["o"], args["lse"], qrows, krows, None, 0.5, **ok)
    with pytest.raises(ValueError, match="k2 and v2 go together"):
        native.items_forward(q, k, v, qrows, krows, None, 0.5, ok["k2"])


def _items_reference(q, k, v, qrows, krows, bias, scale):
    """Union softmax over items, in q's dtype: each query's (item, key) pairs, -1 slots left out; (out, lse)."""
    G, Nq, _ = q.shape
    out = torch.zeros(G, Nq, v.shape[-1], dtype=q.dtype)
    lse = torch.full((G, Nq), float("-inf"), dtype=q.dtype)
    bias = bias.to(q.dtype)
    for gi in range(G):
        for t in range(Nq):
            logits, values = [], []
            for i, j in zip(*torch.nonzero(qrows[gi] == t, as_tuple=True), strict=True):
                keep = krows[gi, i] >= 0
                logits.append(k[gi, krows[gi, i][keep]] @ q[gi, t] * scale + bias[gi, i, j][keep])
                values.append(v[gi, krows[gi, i][keep]])
            if logits and torch.isfinite(torch.cat(logits)).any():
                s, vals = torch.cat(logits), torch.cat(values)
                lse[gi, t] = torch.logsumexp(s, 0)
                out[gi, t] = torch.softmax(s, 0) @ vals
    return out, lse


@pytest.mark.parametrize("shape", [(3, 20, 13, 13, 5, 7, 11), (2, 30, 16, 40, 4, 17, 33), (1, 9, 3, 5, 3, 2, 1)],
                         ids=lambda s: "G{}-N{}-D{}-Dv{}-I{}-wq{}-wk{}".format(*s))
@pytest.mark.parametrize("bias_rows", ["full", "one-row", "one-row-unexpanded"])
def test_native_items_forward_and_backward(shape, bias_rows, native_build):
    """Softmax attention over items given by row indices (queries in several items, -1 slots, a bias with
    -inf entries, expanded or full) against a loop over each query's pairs: output, log-sum-exp and the
    three gradients, by the tolerance rule (float64 golden, the loop in float32 as the baseline); built for
    this CPU and for AVX2."""
    if not native.items_available():
        pytest.skip(f"the items kernels need 32-byte vectors: {native.status()}")
    G, N, D, Dv, I, wq, wk = shape
    gen = torch.Generator().manual_seed(sum(shape))
    q, g = torch.randn(G, N, D, generator=gen), torch.randn(G, N, Dv, generator=gen)
    k, v = torch.randn(G, N + 3, D, generator=gen), torch.randn(G, N + 3, Dv, generator=gen)
    qrows = torch.stack([torch.randperm(N, generator=gen)[:wq] for _ in range(G * I)]).view(G, I, wq)
    krows = torch.stack([torch.randperm(N + 3, generator=gen)[:wk] for _ in range(G * I)]).view(G, I, wk)
    qrows[0, 0, -1] = -1  # an empty query slot
    krows[-1, -1, 0] = -1  # an empty key slot (its bias is -inf below)
    rows = wq if bias_rows == "full" else 1
    bias = torch.randn(G, I, rows, wk, generator=gen)
    bias[0, 1 % I, 0, :] = float("-inf")  # an item row with no allowed key
    bias[..., 0] = torch.where(krows[..., None, 0] < 0, float("-inf"), bias[..., 0])
    given = bias if bias_rows == "one-row-unexpanded" else bias.expand(G, I, wq, wk)  # size-1 rows: shared
    bias = bias.expand(G, I, wq, wk)
    scale = 0.37
    out, lse = native.items_forward(q, k, v, qrows, krows, given, scale)
    runs = {}
    for dtype in (torch.float32, torch.float64):
        x = [t.detach().to(dtype, copy=True).requires_grad_() for t in (q, k, v)]
        o, l = _items_reference(*x, qrows, krows, bias, scale)
        o.backward(g.to(dtype))
        runs[dtype] = (o.detach(), l.detach(), *(t.grad for t in x))
    finite = torch.isfinite(runs[torch.float64][1])
    assert torch.equal(torch.isfinite(lse), finite), "rows without a key differ"
    assert torch.equal(out[~finite], torch.zeros_like(out[~finite])), "a row without a key: output 0"
    # the kernel writes each gradient row on its first visit, and zeros only the rows no item reaches: memory
    # the allocator hands back full of NaN must not show through
    dirty = [torch.full_like(t, float("nan")) for t in (q, k, v)]
    del dirty
    grads = native.items_backward(q, k, v, g, out, torch.where(finite, lse, float("inf")), qrows, krows, given, scale)
    impl = (out, lse[finite], *grads)
    lp = (runs[torch.float32][0], runs[torch.float32][1][finite], *runs[torch.float32][2:])
    golden = (runs[torch.float64][0], runs[torch.float64][1][finite], *runs[torch.float64][2:])
    for name, a, b, c in zip(("out", "lse", "dq", "dk", "dv"), impl, lp, golden, strict=True):
        assert_within_baseline(name, a, b, c, grad=name.startswith("d"))
    unused = torch.ones(G, N, dtype=torch.bool)
    unused[torch.arange(G).view(G, 1, 1).expand_as(qrows)[qrows >= 0], qrows[qrows >= 0]] = False
    assert torch.equal(grads[0][unused], torch.zeros_like(grads[0][unused])), "dq: a query in no item"
    # the keys and values split into two sources (rows from m on in k2, v2): the same numbers, bit for bit
    m = (N + 3) // 3
    two = {"k2": k[:, m:].contiguous(), "v2": v[:, m:].contiguous()}
    out2, lse2 = native.items_forward(q, k[:, :m], v[:, :m], qrows, krows, given, scale, **two)
    assert torch.equal(out2, out) and torch.equal(lse2, lse), "forward with a second source"
    grads2 = native.items_backward(q, k[:, :m], v[:, :m], g, out, torch.where(finite, lse, float("inf")), qrows,
                                   krows, given, scale, **two)
    split = (grads[0], grads[1][:, :m], grads[2][:, :m], grads[1][:, m:], grads[2][:, m:])
    for name, a, b in zip(("dq", "dk", "dv", "dk2", "dv2"), grads2, split, strict=True):
        assert torch.equal(a, b), f"{name} with a second source"


def test_empty_advises_whole_huge_pages_inside_the_tensor(monkeypatch):
    """native.empty: float32 of the shape asked; from 4 MiB up, madvise(MADV_HUGEPAGE) over the 2 MiB pages
    that lie wholly inside the tensor's bytes (never past them), below that and where no advice is given here,
    no call. The real call (whatever this kernel's mode) leaves a tensor that takes writes."""
    calls = []
    monkeypatch.setattr(native, "_madvise_fn", lambda addr, length, advice: calls.append((addr, length, advice)) or 0)
    huge = 1 << 21
    for shape in [(3, 1 << 20), (2, huge // 4), (5, 7, 1 << 15)]:  # 12 MiB, 4 MiB, 4.4 MiB
        t = native.empty(*shape)
        assert t.shape == shape and t.dtype == torch.float32 and t.is_contiguous()
        (addr, length, advice), = calls
        start, end = t.data_ptr(), t.data_ptr() + t.numel() * 4
        assert advice == 14 and addr % huge == 0 and length % huge == 0 and length > 0
        assert start <= addr and addr + length <= end and addr - start < huge and end - (addr + length) < huge
        calls.clear()
    native.empty(1023, 1024)  # just under 4 MiB: no advice
    assert not calls
    monkeypatch.setattr(native, "_madvise_fn", False)  # this machine gives no advice (mode always or never)
    native.empty(4, 1 << 20)
    assert not calls
    monkeypatch.setenv("SPARSE_ATTENTION_HUGE_PAGES", "0")  # switched off: no advice whatever the mode
    monkeypatch.setattr(native, "_madvise_fn", None)
    assert native._madvise() is None
    monkeypatch.delenv("SPARSE_ATTENTION_HUGE_PAGES")
    monkeypatch.setattr(native, "_madvise_fn", None)  # looked up for real
    t = native.empty(4, 1 << 20)
    t.fill_(1.5)
    assert t.sum().item() == 1.5 * 4 * (1 << 20)
