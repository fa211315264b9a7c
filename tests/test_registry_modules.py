"""Registry entries of kind "module": head-split modules sized by their layer (issue 5 item 1).

The registry-wide invariants (shapes, padding, causality, determinism, state_dict, gradients)
run over these entries in test_nn_invariants.py; here: building them, their options and errors,
their capabilities, and the bugs the invariant suite found in the modules.
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_qkv

import sparse_attention as sa
from sparse_attention import registry
from sparse_attention.approx import nystrom_attention, reference_nystrom_attention
from sparse_attention.nn.multihead import resolve_attention

E, H = 16, 4
MODULES = sa.mechanisms("module")

EXPECTED = {  # name -> module class, learned, fixed_length, causal_support, self_only
    "performer": (sa.nn.PerformerAttention, False, False, "strict", False),
    "linear": (sa.nn.LinearAttention, False, False, "strict", False),
    "linformer": (sa.nn.LinformerAttention, True, True, "none", False),
    "compressed": (sa.nn.CompressedAttention, True, False, "none", False),
    "nystrom": (sa.nn.NystromAttention, False, False, "none", False),
    "synthesizer": (sa.nn.SynthesizerAttention, True, True, "strict", False),
    "routing": (sa.nn.RoutingAttention, True, False, "keys", False),
    "sinkhorn": (sa.nn.SinkhornAttention, True, False, "strict", True),
    "reformer": (sa.nn.ReformerAttention, False, False, "keys", True),
}


def test_every_module_is_registered_with_its_capabilities():
    assert {m.name for m in MODULES} == set(EXPECTED)
    for m in MODULES:
        cls, learned, fixed, causal, self_only = EXPECTED[m.name]
        assert (m.learned, m.fixed_length, m.causal_support, m.self_only) == (learned, fixed, causal, self_only), m
        assert not m.causal, f"{m.name}: the default configuration of a module is not causal"
        built = m.make(head_dim=E // H, num_heads=H)
        assert type(built) is cls
        has_params = any(True for _ in built.parameters())
        assert has_params == (learned and m.name != "routing"), f"{m.name}: parameters {has_params}"
    # existing kinds keep their entries; every capability value is one of the documented ones
    assert [m.name for m in sa.mechanisms("static")][:2] == ["full", "causal"]
    assert {m.name for m in sa.mechanisms("content")} == {"topk", "probsparse", "lsh"}
    assert all(m.causal_support in registry.CAUSAL_SUPPORT and m.kind in registry.KINDS for m in sa.mechanisms())


def test_mechanisms_kind_is_validated():
    with pytest.raises(ValueError, match=r"'static', 'content', 'module'.*'modules'"):
        sa.mechanisms("modules")


@pytest.mark.parametrize("mech", MODULES, ids=lambda m: m.name)
def test_make_needs_the_layer_sizes_and_lists_valid_options(mech):
    with pytest.raises(ValueError, match=r"needs \['head_dim', 'num_heads'\].*build_attention"):
        mech.make()
    with pytest.raises(ValueError, match=r"unknown option.*'bogus'.*valid: \[.*'head_dim'"):
        mech.make(bogus=1, head_dim=4, num_heads=H)
    with pytest.raises(ValueError, match=r"unknown option.*'bogus'.*valid: \[.*'batch_first'"):
        sa.nn.build_attention(mech.name, E, H, bogus=1)
    with pytest.raises(ValueError, match=r"needs \['head_dim', 'num_heads'\]"):
        resolve_attention(mech.name)  # a layer that does not say its sizes


@pytest.mark.parametrize("mech", MODULES, ids=lambda m: m.name)
def test_by_name_in_the_layers(mech):
    torch.manual_seed(0)
    m = sa.nn.MultiheadAttention(E, H, attention=mech.name, num_kv_heads=2).eval()
    assert isinstance(m.attention, EXPECTED[mech.name][0])
    x = torch.randn(2, 20, E)
    out, w = m(x, x, x, need_weights=False)
    assert out.shape == x.shape and w is None
    enc = sa.nn.TransformerEncoderLayer(E, H, 32, 0.0, batch_first=True, attention=mech.name).eval()
    assert enc(x).shape == x.shape


def test_build_attention_linformer_with_its_length():
    m = sa.nn.build_attention("linformer", E, H, seq_len=50, k=6, per_head=True, num_kv_heads=2)
    assert m.attention.seq_len == 50 and m.attention.k == 6 and tuple(m.attention.e_proj.shape) == (2, 6, 50)
    x = torch.randn(2, 50, E)
    assert m(x, x, x, need_weights=False)[0].shape == x.shape
    y = torch.randn(2, 51, E)
    with pytest.raises(ValueError, match="seq_len"):
        m(y, y, y, need_weights=False)
    with pytest.raises(ValueError, match="divisible"):
        sa.nn.build_attention("linformer", 10, H)
    with pytest.raises(ValueError, match="num_kv_heads"):
        sa.nn.build_attention("linformer", E, H, num_kv_heads=3)


def test_module_built_from_a_name_follows_the_layer_dtype():
    for name in ("linformer", "synthesizer", "compressed"):
        for m in (sa.nn.MultiheadAttention(E, H, attention=name, dtype=torch.float64),
                  sa.nn.build_attention(name, E, H, dtype=torch.float64)):
            assert {p.dtype for p in m.parameters()} == {torch.float64}, name
            x = torch.randn(2, 9, E, dtype=torch.float64)
            assert m(x, x, x, need_weights=False)[0].dtype == torch.float64


def test_modules_refuse_weights_masks_and_caches():
    m = sa.nn.MultiheadAttention(E, H, attention="performer")
    x = torch.randn(1, 5, E)
    with pytest.raises(ValueError, match="need_weights=False"):
        m(x, x, x)
    with pytest.raises(ValueError, match="attn_mask"):
        m(x, x, x, need_weights=False, attn_mask=torch.zeros(5, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="causal=True"):
        m(x, x, x, need_weights=False, is_causal=True)
    with pytest.raises(ValueError, match="incremental decoding"):
        m.new_cache(is_causal=True)
    causal = sa.nn.build_attention("performer", E, H, causal=True)
    assert isinstance(causal.new_cache(), sa.approx.LinearAttentionState)  # its running sums, not a KV cache
    with pytest.raises(ValueError, match="incremental decoding"):
        causal(x, x, x, need_weights=False, cache=sa.nn.KVCache())


def test_reformer_in_a_layer_shares_query_and_key():
    """MultiheadAttention calls a shared-QK module with the projected queries and values only."""
    torch.manual_seed(0)
    m = sa.nn.MultiheadAttention(E, H, attention="reformer").eval()
    x = torch.randn(2, 24, E)
    out = m(x, x, x, need_weights=False)[0]
    wq, bq = m.in_proj_weight[:E], m.in_proj_bias[:E]
    wv, bv = m.in_proj_weight[2 * E:], m.in_proj_bias[2 * E:]
    q = torch.nn.functional.linear(x, wq, bq).view(2, 24, H, E // H).transpose(1, 2)
    v = torch.nn.functional.linear(x, wv, bv).view(2, 24, H, E // H).transpose(1, 2)
    expected = m.out_proj(m.attention(q, v).transpose(1, 2).reshape(2, 24, E))
    torch.testing.assert_close(out, expected)
    with pytest.raises(ValueError, match="shares queries and keys"):
        m(x, x.clone(), x, need_weights=False)


# --- bugs the registry-wide invariant suite found in the modules ---------------------------


def test_nystrom_padded_queries_do_not_move_the_query_landmarks():
    """Bug: in self-attention the query landmarks averaged padded tokens too, so the contents of
    padding changed every real token's output."""
    q, k, v = make_qkv(2, 2, 2, 21, 21, 8, dtype=torch.float64, requires_grad=False)
    kpm = torch.zeros(2, 21, dtype=torch.bool)
    kpm[0, 15:] = True
    kpm[1, 2:6] = True
    out = nystrom_attention(q, k, v, num_landmarks=4, key_padding_mask=kpm)
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    for t in (q2, k2, v2):
        t[kpm[:, None, :].expand(-1, 2, -1)] = torch.randn(int(kpm.sum()) * 2, 8, dtype=torch.float64) * 10
    out2 = nystrom_attention(q2, k2, v2, num_landmarks=4, key_padding_mask=kpm)
    real = ~kpm[:, None, :].expand(-1, 2, -1)
    torch.testing.assert_close(out2[real], out[real])
    ref = reference_nystrom_attention(q2, k2, v2, num_landmarks=4, key_padding_mask=kpm)
    torch.testing.assert_close(nystrom_attention(q2, k2, v2, num_landmarks=4, pinv_iterations=40,
                                                 key_padding_mask=kpm), ref, rtol=1e-6, atol=1e-8)


def test_routing_padded_tokens_do_not_steer_routing_or_the_centroids():
    """Bug: padded keys (and padded queries of self-attention) were routed by their contents,
    so padding changed which real keys a query saw; the k-means step averaged them in too."""
    q, k, v = make_qkv(2, 2, 2, 30, 30, 8, seed=5, requires_grad=False)
    kpm = torch.zeros(2, 30, dtype=torch.bool)
    kpm[0, 20:] = True
    kpm[1, 3:8] = True
    q2, k2, v2 = q.clone(), k.clone(), v.clone()
    for t in (q2, k2, v2):
        t[kpm[:, None, :].expand(-1, 2, -1)] = torch.randn(int(kpm.sum()) * 2, 8) * 10
    real = ~kpm[:, None, :].expand(-1, 2, -1)
    mod = sa.nn.RoutingAttention(3, 8, 2, decay=0.5, seed=1)
    mod.eval()
    torch.testing.assert_close(mod(q2, k2, v2, key_padding_mask=kpm)[real], mod(q, k, v, key_padding_mask=kpm)[real])
    mod.train()
    c0 = mod.centroids.clone()
    mod(q, k, v, key_padding_mask=kpm)
    c1 = mod.centroids.clone()
    mod.centroids.copy_(c0)
    mod(q2, k2, v2, key_padding_mask=kpm)
    torch.testing.assert_close(mod.centroids, c1, msg="padded tokens moved the centroids")


def test_sinkhorn_and_reformer_take_grouped_query_heads():
    """Bug: with fewer key/value heads than query heads (MultiheadAttention(num_kv_heads=...))
    SinkhornAttention raised and ReformerAttention failed on the head count of v."""
    q, k, v = make_qkv(2, 4, 2, 20, 20, 8, seed=6)
    sink = sa.nn.SinkhornAttention(8, 4, block=5).eval()
    expected = sink(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1))
    torch.testing.assert_close(sink(q, k, v), expected, rtol=0, atol=0)
    ref = sa.nn.ReformerAttention(4, seed=1)
    torch.testing.assert_close(ref(q, v), ref(q, v.repeat_interleave(2, 1)), rtol=0, atol=0)
    with pytest.raises(ValueError, match="multiple of the key/value heads"):
        sink(q, torch.cat([k, k[:, :1]], 1), torch.cat([v, v[:, :1]], 1))  # 3 key/value heads for 4 query heads


def test_routing_is_sized_for_the_length_by_the_bench(monkeypatch):
    """Routing's registry default (4 clusters) is for pictures; at length n the bench builds ⌈√n⌉
    clusters (the Routing Transformer's choice), unless the caller gives num_clusters."""
    from sparse_attention.bench import _module_call

    mech = registry.get("routing")
    assert mech.defaults["num_clusters"] == 4
    assert [mech.length_defaults(n)["num_clusters"] for n in (0, 1, 5, 1024, 1025, 4096)] == [1, 1, 3, 32, 33, 64]
    built, real_make = [], registry.Mechanism.make
    monkeypatch.setattr(registry.Mechanism, "make", lambda self, **o: built.append(o) or real_make(self, **o))
    q = torch.randn(1, 2, 100, 8)
    _module_call(mech, {}, q)
    _module_call(mech, {"num_clusters": 7}, q)
    assert [o["num_clusters"] for o in built] == [10, 7]
