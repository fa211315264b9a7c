"""Bad input raises ValueError/TypeError naming the argument, before any backend runs (rule 0)."""

from __future__ import annotations

import pytest
import torch

import sparse_attention as sa
from sparse_attention import registry


def _qkv(B=2, Hq=4, Hkv=2, N=5, S=7, D=8, Dv=8, dtype=torch.float32):
    return torch.randn(B, Hq, N, D, dtype=dtype), torch.randn(B, Hkv, S, D, dtype=dtype), torch.randn(
        B, Hkv, S, Dv, dtype=dtype)


BACKENDS = ["auto", "blocksparse", "dense"]


def _bad_calls():
    q, k, v = _qkv()
    yield "q_rank3", (q[0], k, v), {}, ValueError, r"\bq\b.*4 dimensions"
    yield "k_rank5", (q, k[None], v), {}, ValueError, r"\bk\b.*4 dimensions"
    yield "v_rank2", (q, k, v[0, 0]), {}, ValueError, r"\bv\b.*4 dimensions"
    yield "batch_mismatch", (q, k[:1], v[:1]), {}, ValueError, r"batch|shape\[0\]"
    yield "kv_batch_mismatch", (q, k, v[:1]), {}, ValueError, r"v\.shape\[0\]"
    yield "head_dim_mismatch", (q, k[..., :7], v), {}, ValueError, r"head dim.*q\.shape\[-1\]=8.*k\.shape\[-1\]=7"
    yield "kv_length_mismatch", (q, k, v[:, :, :6]), {}, ValueError, r"k\.shape\[2\]=7.*v\.shape\[2\]=6"
    yield "kv_heads_mismatch", (q, k, v[:, :1]), {}, ValueError, r"k\.shape\[1\].*v\.shape\[1\]"
    q3, k3, v3 = _qkv(Hq=4, Hkv=3)
    yield "hq_not_multiple", (q3, k3, v3), {}, ValueError, r"Hq=4, Hkv=3"
    yield "mixed_dtype", (q, k.double(), v), {}, TypeError, r"dtype.*k=torch\.float64"
    yield "int_dtype", (q.long(), k.long(), v.long()), {}, TypeError, r"\bq\b.*floating"
    yield "bool_dtype", (q, k, v.bool()), {}, TypeError, r"\bv\b.*floating"
    yield "not_tensor", (q.tolist(), k, v), {}, TypeError, r"\bq\b.*torch\.Tensor"
    yield "kpm_wrong_shape", (q, k, v), {"key_padding_mask": torch.zeros(2, 5, dtype=torch.bool)}, ValueError, \
        r"key_padding_mask.*\(2, 7\)"
    yield "kpm_3d", (q, k, v), {"key_padding_mask": torch.zeros(2, 1, 7, dtype=torch.bool)}, ValueError, \
        r"key_padding_mask"
    yield "kpm_float", (q, k, v), {"key_padding_mask": torch.zeros(2, 7)}, TypeError, r"key_padding_mask.*bool"
    yield "kpm_uint8", (q, k, v), {"key_padding_mask": torch.zeros(2, 7, dtype=torch.uint8)}, TypeError, \
        r"key_padding_mask.*bool"
    yield "kpm_list", (q, k, v), {"key_padding_mask": [[False] * 7] * 2}, TypeError, r"key_padding_mask"
    yield "dropout_above_1", (q, k, v), {"dropout_p": 1.5}, ValueError, r"dropout_p.*1\.5"
    yield "dropout_negative", (q, k, v), {"dropout_p": -0.1}, ValueError, r"dropout_p.*-0\.1"
    yield "dropout_nan", (q, k, v), {"dropout_p": float("nan")}, ValueError, r"dropout_p"
    yield "dropout_str", (q, k, v), {"dropout_p": "0.1"}, TypeError, r"dropout_p"
    yield "scale_inf", (q, k, v), {"scale": float("inf")}, ValueError, r"scale"
    yield "scale_nan", (q, k, v), {"scale": float("nan")}, ValueError, r"scale"
    yield "scale_str", (q, k, v), {"scale": "1"}, TypeError, r"scale"
    yield "pattern_not_pattern", (q, k, v, "causal"), {}, TypeError, r"pattern.*str"
    yield "pattern_mask_tensor", (q, k, v, torch.ones(5, 7, dtype=torch.bool)), {}, TypeError, r"pattern.*Tensor"
    yield "per_head_wrong_heads", (q, k, v, sa.PerHead([sa.Causal(), sa.Full()])), {}, ValueError, \
        r"pattern.*2 heads.*Hq=4"
    yield "global_index_out_of_range", (q, k, v, sa.Global([0, 7])), {}, ValueError, r"indices.*S=7.*7"
    yield "longformer_global_out_of_range", (q, k, v, sa.Longformer(2, global_indices=(9,))), {}, ValueError, \
        r"indices.*S=7"
    yield "union_global_out_of_range", (q, k, v, sa.Causal() | sa.Global([8])), {}, ValueError, r"indices.*S=7"


BAD = list(_bad_calls())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_call_raises_naming_argument(case, backend):
    _, args, kwargs, exc, match = case
    with pytest.raises(exc, match=match):
        sa.attention(*args, backend=backend, **kwargs)


@pytest.mark.parametrize("bad", ["flash", "", "Dense", None, 3])
def test_unknown_backend(bad):
    q, k, v = _qkv()
    exc = TypeError if not isinstance(bad, str) else ValueError
    with pytest.raises(exc, match=r"backend"):
        sa.attention(q, k, v, backend=bad)


def test_unknown_backend_lists_known_ones():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"'flash'") as info:
        sa.attention(q, k, v, backend="flash")
    for name in ("auto", "blocksparse", "dense"):
        assert name in str(info.value), f"{name!r} missing from {info.value}"


PATTERN_CTOR_ERRORS = [
    ("sliding_window_negative", lambda: sa.SlidingWindow(-1), ValueError, r"window.*-1"),
    ("sliding_window_float", lambda: sa.SlidingWindow(2.5), TypeError, r"window"),
    ("sliding_window_bool", lambda: sa.SlidingWindow(True), TypeError, r"window"),
    ("sliding_window_causal_str", lambda: sa.SlidingWindow(3, causal="yes"), TypeError, r"causal"),
    ("strided_zero", lambda: sa.Strided(0), ValueError, r"stride.*0"),
    ("strided_negative", lambda: sa.Strided(-2), ValueError, r"stride"),
    ("block_local_zero", lambda: sa.BlockLocal(0), ValueError, r"block.*0"),
    ("random_blocks_block_zero", lambda: sa.RandomBlocks(2, block=0), ValueError, r"block"),
    ("random_blocks_negative", lambda: sa.RandomBlocks(-1), ValueError, r"num_blocks"),
    ("global_negative", lambda: sa.Global([-1]), ValueError, r"indices"),
    ("global_float", lambda: sa.Global([1.5]), TypeError, r"indices"),
    ("global_not_iterable", lambda: sa.Global(3), TypeError, r"indices"),
    ("global_float_tensor", lambda: sa.Global(torch.tensor([1.0])), TypeError, r"indices"),
    ("longformer_negative_window", lambda: sa.Longformer(-3), ValueError, r"window"),
    ("longformer_dilation_zero", lambda: sa.Longformer(2, dilation=0), ValueError, r"dilation"),
    ("longformer_negative_global", lambda: sa.Longformer(2, global_indices=(-1,)), ValueError, r"global_indices"),
    ("bigbird_block_zero", lambda: sa.BigBird(block=0), ValueError, r"block"),
    ("bigbird_even_window", lambda: sa.BigBird(window_blocks=2), ValueError, r"window_blocks"),
    ("bigbird_negative_random", lambda: sa.BigBird(random_blocks=-1), ValueError, r"random_blocks"),
    ("per_head_empty", lambda: sa.PerHead([]), ValueError, r"PerHead"),
    ("per_head_not_patterns", lambda: sa.PerHead([sa.Causal(), "full"]), TypeError, r"patterns\[1\]"),
    ("per_head_single_pattern", lambda: sa.PerHead(sa.Causal()), TypeError, r"PerHead"),
    ("per_head_nested", lambda: sa.PerHead([sa.PerHead([sa.Full()])]), ValueError, r"patterns\[0\]"),
    ("union_with_str", lambda: sa.Causal() | "full", TypeError, r"\|"),
    ("intersection_with_int", lambda: sa.Causal() & 3, TypeError, r"&"),
    ("union_heads_differ", lambda: sa.PerHead([sa.Full()] * 2) | sa.PerHead([sa.Full()] * 3), ValueError,
     r"head counts"),
]


@pytest.mark.parametrize("case", PATTERN_CTOR_ERRORS, ids=[c[0] for c in PATTERN_CTOR_ERRORS])
def test_bad_pattern_arguments(case):
    _, build, exc, match = case
    with pytest.raises(exc, match=match):
        build()


def test_mask_and_layout_validate_lengths():
    with pytest.raises(ValueError, match=r"n_q"):
        sa.Causal().mask(-1, 4)
    with pytest.raises(TypeError, match=r"n_k"):
        sa.Causal().mask(4, 2.0)
    with pytest.raises(ValueError, match=r"block"):
        sa.Causal().layout(4, 4, 0)
    with pytest.raises(ValueError, match=r"indices.*S=3"):
        sa.Global([5]).mask(4, 3)
    with pytest.raises(ValueError, match=r"indices.*S=3"):
        sa.Global([5]).layout(4, 3, 16)


def test_per_head_allowed_rejects_bad_head():
    ph = sa.PerHead([sa.Full(), sa.Causal()])
    with pytest.raises(ValueError, match=r"head"):
        ph.allowed(torch.tensor(0), torch.tensor(0), n_q=1, n_k=1, head=2)


def test_unknown_registry_name_lists_known():
    with pytest.raises(ValueError, match=r"'nope'.*bigbird.*causal"):
        registry.get("nope")


def test_registry_get_known():
    for m in sa.mechanisms():
        assert registry.get(m.name) is m


@pytest.mark.parametrize("m", sa.mechanisms(), ids=lambda m: m.name)
def test_unknown_make_option(m):
    with pytest.raises(ValueError, match=r"unknown option.*'bogus'"):
        m.make(bogus=1)


@pytest.mark.parametrize("m", sa.mechanisms("static"), ids=lambda m: m.name)
def test_make_accepts_its_defaults_and_overrides(m):
    p = m.make(**m.defaults)
    assert isinstance(p, sa.Pattern)
    assert p == m.make()
    assert torch.equal(p.mask(23, 23), m.make().mask(23, 23))


def test_negative_window_via_registry():
    with pytest.raises(ValueError, match=r"window"):
        registry.get("sliding_window").make(window=-4)
