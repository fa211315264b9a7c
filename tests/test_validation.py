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


# ----------------------------------------------------------------------------- module constructors
# Bad options fail when the module is built, naming the option and the value received (rule 0): a flag
# is a bool (the string "False" must not switch it on; 0/1 are refused as in LinearAttention(causal=1)).

INF = float("inf")

MODULE_CTOR_ERRORS = [
    # boolean flags
    ("linear_causal_int", lambda: sa.nn.LinearAttention(causal=1), TypeError, r"causal.*1"),
    ("performer_causal_str", lambda: sa.nn.PerformerAttention(8, causal="False"), TypeError, r"causal.*'False'"),
    ("performer_causal_int", lambda: sa.nn.PerformerAttention(8, causal=0), TypeError, r"causal.*0"),
    ("synth_causal_str", lambda: sa.nn.SynthesizerAttention(12, mode="random", causal="False"), TypeError,
     r"causal.*'False'"),
    ("synth_mix_str", lambda: sa.nn.SynthesizerAttention(12, mode="random", mix="no"), TypeError, r"mix.*'no'"),
    ("synth_mix_int", lambda: sa.nn.SynthesizerAttention(12, mode="random", mix=1), TypeError, r"mix.*1"),
    ("synth_fixed_str", lambda: sa.nn.SynthesizerAttention(12, mode="random", fixed="no"), TypeError,
     r"fixed.*'no'"),
    ("synth_fixed_str_dense", lambda: sa.nn.SynthesizerAttention(12, head_dim=4, fixed="False"), TypeError,
     r"fixed.*'False'"),
    ("favor_orthogonal_str", lambda: sa.approx.FavorPlus(8, orthogonal="no"), TypeError, r"orthogonal.*'no'"),
    ("favor_orthogonal_int", lambda: sa.approx.FavorPlus(8, orthogonal=1), TypeError, r"orthogonal.*1"),
    ("linformer_share_kv_str", lambda: sa.nn.LinformerAttention(16, 4, share_kv="no"), TypeError,
     r"share_kv.*'no'"),
    ("linformer_causal_str", lambda: sa.nn.LinformerAttention(16, 4, causal="False"), TypeError,
     r"causal.*'False'"),
    ("linformer_causal_true", lambda: sa.nn.LinformerAttention(16, 4, causal=True), ValueError, r"causal"),
    ("compressed_bias_str", lambda: sa.nn.CompressedAttention(3, head_dim=4, bias="no"), TypeError,
     r"bias.*'no'"),
    ("window2d_qkv_bias_str", lambda: sa.nn.WindowAttention2d(8, 2, 4, qkv_bias="no"), TypeError,
     r"qkv_bias.*'no'"),
    ("window2d_qkv_bias_int", lambda: sa.nn.WindowAttention2d(8, 2, 4, qkv_bias=0), TypeError, r"qkv_bias.*0"),
    # Synthesizer factors: a pair of positive ints (a, b) with a * b = max_len
    ("synth_factors_int", lambda: sa.nn.SynthesizerAttention(12, mode="factorized_dense", head_dim=4, factors=5),
     TypeError, r"factors.*5"),
    ("synth_factors_triple",
     lambda: sa.nn.SynthesizerAttention(12, mode="factorized_dense", head_dim=4, factors=(2, 6, 1)),
     TypeError, r"factors.*\(2, 6, 1\)"),
    ("synth_factors_float",
     lambda: sa.nn.SynthesizerAttention(12, mode="factorized_dense", head_dim=4, factors=(2.0, 6.0)),
     TypeError, r"factors.*\(2\.0, 6\.0\)"),
    ("synth_factors_negative",
     lambda: sa.nn.SynthesizerAttention(12, mode="factorized_dense", head_dim=4, factors=(-2, -6)),
     ValueError, r"factors.*\(-2, -6\)"),
    ("synth_factors_product",
     lambda: sa.nn.SynthesizerAttention(12, mode="factorized_dense", head_dim=4, factors=(3, 5)),
     ValueError, r"factors.*max_len=12.*\(3, 5\)"),
    # WindowAttention2d dropouts and scale
    ("window2d_attn_drop_above_1", lambda: sa.nn.WindowAttention2d(8, 2, 4, attn_drop=1.5), ValueError,
     r"attn_drop.*1\.5"),
    ("window2d_proj_drop_negative", lambda: sa.nn.WindowAttention2d(8, 2, 4, proj_drop=-1), ValueError,
     r"proj_drop.*-1"),
    ("window2d_attn_drop_str", lambda: sa.nn.WindowAttention2d(8, 2, 4, attn_drop="0.1"), TypeError,
     r"attn_drop.*'0\.1'"),
    ("window2d_proj_drop_bool", lambda: sa.nn.WindowAttention2d(8, 2, 4, proj_drop=True), TypeError,
     r"proj_drop.*True"),
    ("window2d_scale_str", lambda: sa.nn.WindowAttention2d(8, 2, 4, scale="x"), TypeError, r"scale.*'x'"),
    ("window2d_scale_bool", lambda: sa.nn.WindowAttention2d(8, 2, 4, scale=True), TypeError, r"scale.*True"),
    ("window2d_scale_inf", lambda: sa.nn.WindowAttention2d(8, 2, 4, scale=INF), ValueError, r"scale.*inf"),
    # eps, checked when the module is built (not at the first forward)
    ("linear_eps_negative", lambda: sa.nn.LinearAttention(eps=-1), ValueError, r"eps.*-1"),
    ("linear_eps_str", lambda: sa.nn.LinearAttention(eps="x"), TypeError, r"eps.*'x'"),
    ("linear_eps_bool", lambda: sa.nn.LinearAttention(eps=True), TypeError, r"eps.*True"),
    ("performer_eps_negative", lambda: sa.nn.PerformerAttention(8, eps=-1), ValueError, r"eps.*-1"),
    ("performer_eps_nan", lambda: sa.nn.PerformerAttention(8, eps=float("nan")), ValueError, r"eps.*nan"),
    ("performer_eps_str", lambda: sa.nn.PerformerAttention(8, eps="a"), TypeError, r"eps.*'a'"),
    ("performer_eps_bool", lambda: sa.nn.PerformerAttention(8, eps=True), TypeError, r"eps.*True"),
]
# scale, checked when the module is built: a real finite number or None (default 1/sqrt(D))
_SCALED = {
    "linformer": lambda scale: sa.nn.LinformerAttention(16, 4, scale=scale),
    "compressed": lambda scale: sa.nn.CompressedAttention(3, head_dim=4, scale=scale),
    "nystrom": lambda scale: sa.nn.NystromAttention(2, scale=scale),
    "synthesizer": lambda scale: sa.nn.SynthesizerAttention(12, mode="random", mix=True, scale=scale),
}
for _name, _build in _SCALED.items():
    MODULE_CTOR_ERRORS += [
        (f"{_name}_scale_str", lambda b=_build: b("x"), TypeError, r"scale.*'x'"),
        (f"{_name}_scale_bool", lambda b=_build: b(True), TypeError, r"scale.*True"),
        (f"{_name}_scale_inf", lambda b=_build: b(INF), ValueError, r"scale.*inf"),
    ]


@pytest.mark.parametrize("case", MODULE_CTOR_ERRORS, ids=[c[0] for c in MODULE_CTOR_ERRORS])
def test_bad_module_arguments(case):
    _, build, exc, match = case
    with pytest.raises(exc, match=match):
        build()


@pytest.mark.parametrize("name", sorted(_SCALED))
def test_module_scale_none_and_numbers_accepted(name):
    assert _SCALED[name](None).scale is None
    assert _SCALED[name](0.5).scale == 0.5


@pytest.mark.parametrize("mode", ["dense", "factorized_dense"])
def test_synthesizer_dense_head_dim_mismatch(mode):
    m = sa.nn.SynthesizerAttention(12, mode=mode, head_dim=4)
    q, k, v = (torch.randn(1, 2, 5, 6) for _ in range(3))
    with pytest.raises(ValueError, match=r"head_dim=4.*D=6"):
        m(q, k, v)


def test_valid_flags_still_work():
    assert sa.nn.PerformerAttention(8, causal=True).causal is True
    assert sa.nn.SynthesizerAttention(12, mode="random", causal=True, mix=True, fixed=True).causal is True
    assert sa.approx.FavorPlus(8, orthogonal=False).orthogonal is False
    assert sa.nn.LinformerAttention(16, 4, share_kv=True).f_proj is None
    assert sa.nn.CompressedAttention(3, head_dim=4, bias=False).k_conv.bias is None
    assert sa.nn.WindowAttention2d(8, 2, 4, qkv_bias=False).qkv.bias is None
    m = sa.nn.SynthesizerAttention(12, mode="factorized_dense", head_dim=4, factors=[3, 4])
    assert [mlp.w2.shape[-1] for mlp in m.mlps] == [3, 4]
    assert sa.nn.WindowAttention2d(8, 2, 4, scale=2).scale == 2.0


def test_synthesizer_refuses_non_tensor_inputs():
    syn = sa.nn.SynthesizerAttention(12, mode="dense", head_dim=4)
    with pytest.raises(TypeError, match="q must be a 4-D tensor"):
        syn([[1.0]], torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4))
    with pytest.raises(TypeError, match=r"v must be a 4-D tensor \(B, H, L, ·\), got \(5, 4\)"):
        syn(torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4), torch.randn(5, 4))


# --- Pattern.stats / sa.pattern_stats: every size argument is checked before the layout is built (num_heads=0
# was a ZeroDivisionError, batch=-1 gave negative FLOPs, block=0 silently meant "choose one")
STATS_ERRORS = [
    ("num_heads_zero", {"num_heads": 0}, ValueError, r"num_heads must be >= 1, got 0"),
    ("num_heads_float", {"num_heads": 2.0}, TypeError, r"num_heads must be an int, got 2\.0"),
    ("num_heads_bool", {"num_heads": True}, TypeError, r"num_heads must be an int, got True"),
    ("batch_negative", {"batch": -1}, ValueError, r"batch must be >= 0, got -1"),
    ("head_dim_zero", {"head_dim": 0}, ValueError, r"head_dim must be >= 1, got 0"),
    ("head_dim_float", {"head_dim": 8.0}, TypeError, r"head_dim must be an int, got 8\.0"),
    ("block_zero", {"block": 0}, ValueError, r"block must be >= 1, got 0"),
    ("block_float", {"block": 16.0}, TypeError, r"block must be an int, got 16\.0"),
    ("dtype_str", {"dtype": "float32"}, TypeError, r"dtype must be .*got 'float32'"),
    ("dtype_int", {"dtype": torch.int64}, TypeError, r"dtype must be .*got torch\.int64"),
    ("n_q_float", {"n_q": 16.0}, TypeError, r"n_q must be an int, got 16\.0"),
    ("n_k_negative", {"n_k": -1}, ValueError, r"n_k must be >= 0, got -1"),
]


def _stats(entry, n_q=16, n_k=16, **kwargs):
    pattern = sa.SlidingWindow(4)
    if entry == "method":
        return pattern.stats(n_q, n_k, **kwargs)
    return sa.pattern_stats(pattern, n_q, n_k, **kwargs)


@pytest.mark.parametrize("entry", ["method", "function"])
@pytest.mark.parametrize("case", STATS_ERRORS, ids=[c[0] for c in STATS_ERRORS])
def test_stats_bad_arguments(entry, case):
    _, kwargs, exc, match = case
    with pytest.raises(exc, match=match):
        _stats(entry, **kwargs)


@pytest.mark.parametrize("kwargs, exc, match", [
    ({"num_kv_heads": 0}, ValueError, r"num_kv_heads must be >= 1, got 0"),
    ({"num_kv_heads": 2.0, "num_heads": 4}, TypeError, r"num_kv_heads must be an int, got 2\.0"),
    ({"num_kv_heads": 3, "num_heads": 4}, ValueError, r"num_heads must be a multiple of num_kv_heads.*4.*3"),
], ids=["kv_zero", "kv_float", "kv_not_divisor"])
def test_pattern_stats_bad_kv_heads(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        _stats("function", **kwargs)


def test_pattern_stats_refuses_non_pattern():
    with pytest.raises(TypeError, match=r"pattern must be a sparse_attention\.Pattern, got str"):
        sa.pattern_stats("sliding_window", 16, 16)


@pytest.mark.parametrize("entry", ["method", "function"])
def test_stats_valid_arguments_still_work(entry):
    auto = _stats(entry)
    assert _stats(entry, block=None).block == auto.block  # None = choose the block
    assert _stats(entry, block=8).block == 8
    assert _stats(entry, batch=0).flops_forward == 0  # an empty batch costs nothing, as attention accepts B=0
    assert _stats(entry, num_heads=2, batch=3, head_dim=7, dtype=torch.bfloat16).flops_dense == 4 * 3 * 2 * 7 * 256
    assert sa.pattern_stats(sa.SlidingWindow(4), 16, 16, num_heads=4, num_kv_heads=2).attended_pairs == \
        auto.attended_pairs
    # grouped-query attention through either entry: the method forwards num_kv_heads (it once had no such argument)
    assert _stats(entry, num_heads=4, num_kv_heads=2) == sa.pattern_stats(sa.SlidingWindow(4), 16, 16, num_heads=4,
                                                                          num_kv_heads=2)
    with pytest.raises(ValueError, match=r"num_heads must be a multiple of num_kv_heads, got num_heads=4, "
                                         r"num_kv_heads=3"):
        _stats(entry, num_heads=4, num_kv_heads=3)


# --- sa.nn.MultiheadAttention: flags are bools (check_bool), inputs have the layer's dtype
def _mha(**kwargs):
    return sa.nn.MultiheadAttention(8, 2, **kwargs)


MHA_CTOR_ERRORS = [
    ("bias_str", {"bias": "no"}, r"bias must be a bool, got 'no'"),
    ("bias_int", {"bias": 0}, r"bias must be a bool, got 0"),
    ("batch_first_int", {"batch_first": 1}, r"batch_first must be a bool, got 1"),
]


@pytest.mark.parametrize("case", MHA_CTOR_ERRORS, ids=[c[0] for c in MHA_CTOR_ERRORS])
def test_multihead_bad_flags_in_constructor(case):
    _, kwargs, match = case
    with pytest.raises(TypeError, match=match):
        _mha(**kwargs)


MHA_FORWARD_FLAGS = [
    ("is_causal", "False"),
    ("need_weights", "no"),
    ("need_weights", 0),
    ("average_attn_weights", "no"),
    ("average_attn_weights", 1),
]


@pytest.mark.parametrize("flag, value", MHA_FORWARD_FLAGS, ids=[f"{f}={v!r}" for f, v in MHA_FORWARD_FLAGS])
def test_multihead_bad_flags_in_forward(flag, value):
    x = torch.randn(2, 5, 8)
    with pytest.raises(TypeError, match=rf"{flag} must be a bool, got {value!r}"):
        _mha()(x, x, x, **{flag: value})


def test_multihead_new_cache_is_causal_must_be_bool():
    for m in (_mha(), _mha(attention=sa.Causal())):  # checked whether or not the mechanism is causal already
        with pytest.raises(TypeError, match=r"is_causal must be a bool, got 'yes'"):
            m.new_cache(is_causal="yes")
    assert isinstance(_mha().new_cache(is_causal=True), sa.nn.KVCache)


@pytest.mark.parametrize("kdim", [None, 6], ids=["packed", "separate"])
def test_multihead_input_dtype_must_match_the_layer(kdim):
    m = _mha(kdim=kdim, vdim=kdim)
    q, kv = torch.randn(2, 5, 8), torch.randn(2, 7, kdim or 8)
    with pytest.raises(TypeError, match=r"query must have the dtype of the layer's parameters \(torch\.float32\), "
                                        r"got torch\.float64"):
        m(q.double(), kv.double(), kv.double())
    with pytest.raises(TypeError, match=r"key must have .*\(torch\.float32\), got torch\.float64"):
        m(q, kv.double(), kv)
    with pytest.raises(TypeError, match=r"value must have .*\(torch\.float32\), got torch\.float16"):
        m(q, kv, kv.half())
    with pytest.raises(TypeError, match=r"query must have .*\(torch\.float64\), got torch\.float32"):
        m.double()(q, kv.double(), kv.double())


def test_multihead_autocast_still_mixes_dtypes():
    m, x = _mha(), torch.randn(2, 5, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts the projections' inputs itself
        assert m(x, x, x)[0].dtype == torch.bfloat16
        assert m(x.bfloat16(), x, x.bfloat16(), need_weights=False)[0].dtype == torch.bfloat16


# --- TransformerEncoderLayer / TransformerDecoderLayer: every constructor argument checked before building
_LAYERS = {"encoder": sa.nn.TransformerEncoderLayer, "decoder": sa.nn.TransformerDecoderLayer}
LAYER_CTOR_ERRORS = [
    ("ff_zero", {"dim_feedforward": 0}, ValueError, r"dim_feedforward must be >= 1, got 0"),
    ("ff_negative", {"dim_feedforward": -1}, ValueError, r"dim_feedforward must be >= 1, got -1"),
    ("ff_float", {"dim_feedforward": 16.5}, TypeError, r"dim_feedforward must be an int, got 16\.5"),
    ("eps_negative", {"layer_norm_eps": -1.0}, ValueError, r"layer_norm_eps must be a positive finite .*-1\.0"),
    ("eps_zero", {"layer_norm_eps": 0.0}, ValueError, r"layer_norm_eps must be a positive finite .*0\.0"),
    ("eps_nan", {"layer_norm_eps": float("nan")}, ValueError, r"layer_norm_eps must be .*nan"),
    ("eps_inf", {"layer_norm_eps": INF}, ValueError, r"layer_norm_eps must be .*inf"),
    ("eps_str", {"layer_norm_eps": "a"}, TypeError, r"layer_norm_eps must be .*'a'"),
    ("eps_bool", {"layer_norm_eps": True}, TypeError, r"layer_norm_eps must be .*True"),
    ("norm_first_str", {"norm_first": "no"}, TypeError, r"norm_first must be a bool, got 'no'"),
    ("norm_first_int", {"norm_first": 1}, TypeError, r"norm_first must be a bool, got 1"),
    ("bias_str", {"bias": "no"}, TypeError, r"bias must be a bool, got 'no'"),
    ("batch_first_str", {"batch_first": "no"}, TypeError, r"batch_first must be a bool, got 'no'"),
    ("dropout_above_1", {"dropout": 1.5}, ValueError, r"dropout must be a dropout probability in \[0, 1\], got 1\.5"),
    ("dropout_str", {"dropout": "0.1"}, TypeError, r"dropout must be a dropout probability .*'0\.1'"),
    ("activation_unknown", {"activation": "tanh"}, ValueError, r"activation must be one of .*'tanh'"),
    ("activation_int", {"activation": 3}, TypeError, r"activation must be a string or a callable, got int"),
    ("d_model_zero", {"d_model": 0}, ValueError, r"d_model must be >= 1, got 0"),
    ("nhead_float", {"nhead": 2.0}, TypeError, r"nhead must be an int, got 2\.0"),
    ("nhead_not_divisor", {"nhead": 3}, ValueError, r"d_model must be divisible by nhead, got d_model=8, nhead=3"),
]


@pytest.mark.parametrize("layer", sorted(_LAYERS))
@pytest.mark.parametrize("case", LAYER_CTOR_ERRORS, ids=[c[0] for c in LAYER_CTOR_ERRORS])
def test_transformer_layer_bad_arguments(layer, case):
    _, kwargs, exc, match = case
    kwargs = {"d_model": 8, "nhead": 2, "dim_feedforward": 16, **kwargs}
    with pytest.raises(exc, match=match):
        _LAYERS[layer](**kwargs)


def test_transformer_layer_valid_arguments_still_work():
    enc = sa.nn.TransformerEncoderLayer(8, 2, 16, 0.0, "gelu", 1e-6, True, True, False)
    assert enc.norm_first is True and enc.linear1.bias is None and enc.norm1.eps == 1e-6
    dec = sa.nn.TransformerDecoderLayer(8, 2, 16, layer_norm_eps=1)  # an int eps is a real number
    assert dec.norm1.eps == 1.0 and dec.norm_first is False


def test_decoder_new_cache_and_forward_flags_must_be_bools():
    dec = sa.nn.TransformerDecoderLayer(8, 2, 16, batch_first=True, attention="causal")
    with pytest.raises(TypeError, match=r"cache_memory must be a bool, got 'no'"):
        dec.new_cache(cache_memory="no")
    with pytest.raises(TypeError, match=r"is_causal must be a bool, got 'yes'"):
        dec.new_cache(is_causal="yes")
    assert dec.new_cache(cache_memory=False).memory is None
    tgt, mem = torch.randn(2, 3, 8), torch.randn(2, 5, 8)
    with pytest.raises(TypeError, match=r"tgt_is_causal must be a bool, got 'no'"):
        dec(tgt, mem, tgt_is_causal="no")
    with pytest.raises(TypeError, match=r"memory_is_causal must be a bool, got 0"):
        dec(tgt, mem, memory_is_causal=0)
    enc = sa.nn.TransformerEncoderLayer(8, 2, 16, batch_first=True)
    with pytest.raises(TypeError, match=r"is_causal must be a bool, got 'False'"):
        enc(tgt, is_causal="False")


# --- WindowAttention2d: x must be a floating tensor of the layer's dtype (int input was F.linear's RuntimeError)
def test_window2d_input_dtype():
    m = sa.nn.WindowAttention2d(8, 2, 4)
    x = torch.randn(1, 5, 6, 8)
    with pytest.raises(TypeError, match=r"x must be a floating tensor, got torch\.int64"):
        m(x.long())
    with pytest.raises(TypeError, match=r"x must have the dtype of the layer's parameters \(torch\.float32\), "
                                        r"got torch\.float64"):
        m(x.double())
    assert m.double()(x.double()).dtype == torch.float64
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert sa.nn.WindowAttention2d(8, 2, 4)(x).shape == x.shape


def test_verdict_refuses_what_would_fool_it():
    """The tolerance rule: a baseline entry that overflowed or is NaN neither passes everything (inf
    tolerance) nor fails an exact implementation (NaN tolerance); shapes are never broadcast; at least one
    baseline."""
    from sparse_attention.testing import verdict

    golden = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    for bad in (float("inf"), float("nan")):
        baseline = golden.float()
        baseline[0, 0] = bad
        assert not verdict("out", (golden + 100).float(), baseline, golden).ok
        assert verdict("out", golden.float(), baseline, golden).ok
    with pytest.raises(ValueError, match=r"impl has shape \(1, 4\), golden \(3, 4\)"):
        verdict("out", golden.float()[:1], golden.float(), golden)
    with pytest.raises(ValueError, match=r"baseline has shape \(4,\)"):
        verdict("out", golden.float(), golden.float()[0], golden)
    with pytest.raises(ValueError, match="at least one"):
        verdict("out", golden.float(), [], golden)


def test_kept_stats_and_render_masks_check_their_inputs(tmp_path):
    with pytest.raises(TypeError, match="kept must be a bool tensor"):
        sa.kept_stats(torch.tensor([[1, 2], [3, 4]]))
    with pytest.raises(TypeError, match="kept must be a bool tensor"):
        sa.kept_stats(torch.ones(4, dtype=torch.bool))
    pytest.importorskip("matplotlib")
    from sparse_attention.viz import render_masks

    masks = torch.ones(2, 4, 4, dtype=torch.bool)
    for bad, exc, match in ((masks[0], TypeError, "masks must be a bool tensor"),
                            (masks.float(), TypeError, "masks must be a bool tensor")):
        with pytest.raises(exc, match=match):
            render_masks(bad, str(tmp_path / "m.png"), title="t")
    with pytest.raises(ValueError, match="one title per mask"):
        render_masks(masks, str(tmp_path / "m.png"), title="t", panel_titles=["a"])
    with pytest.raises(ValueError, match="block must be >= 1"):
        render_masks(masks, str(tmp_path / "m.png"), title="t", block=-2)


def test_stats_peak_counts_the_chunk_the_engine_makes():
    """The peak estimate adds the engine's largest chunk of work: about ROW_CHUNK_BYTES for a long call, only
    the call's own work for a short one (it once added the whole 24 MB to every estimate), nothing for an
    empty batch."""
    from sparse_attention.engine.blocksparse import ROW_CHUNK_BYTES
    assert sa.SlidingWindow(4).stats(64, num_heads=2, head_dim=8).peak_memory_bytes < 1 << 20
    assert sa.SlidingWindow(4).stats(64, num_heads=2, head_dim=8, batch=0).peak_memory_bytes == 0
    one, two = (sa.SlidingWindow(256).stats(16384, num_heads=8, batch=b).peak_memory_bytes for b in (1, 2))
    chunk = 2 * one - two  # the per-batch part doubles; each call's largest chunk is cut to ROW_CHUNK_BYTES
    assert 0.9 * ROW_CHUNK_BYTES <= chunk <= ROW_CHUNK_BYTES
