"""KV-cache decoding: step-by-step (one token or a chunk at a time) equals the full causal pass;
the sliding-window cache is a ring whose size stops growing."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_within_baseline

import sparse_attention as sa

E, H = 16, 4
T = 23  # generated length, not a multiple of any chunk size below


def _decode(m, x, chunk, cache):
    """Feed x (B, T, E) to m chunk by chunk; returns the outputs and the cache size after each step."""
    outs, sizes = [], []
    for s in range(0, x.shape[1], chunk):
        xc = x[:, s:s + chunk]
        outs.append(m(xc, xc, xc, need_weights=False, cache=cache)[0])
        sizes.append(cache.nbytes())
    return torch.cat(outs, 1), sizes


@pytest.mark.parametrize("pattern", [sa.Causal(), sa.SlidingWindow(5, causal=True), sa.SlidingWindow(0, causal=True),
                                     sa.Strided(3, causal=True), sa.Causal() & sa.Strided(4),
                                     sa.Longformer(3, global_indices=[0], dilation=2, causal=True),
                                     sa.nn.LinearAttention(causal=True),
                                     sa.nn.PerformerAttention(E // H, 8, causal=True)],
                         ids=["causal", "window5", "window0", "strided3", "causal&strided4", "longformer",
                              "linear", "performer"])
@pytest.mark.parametrize("chunk", [1, 3, 7, T])
@pytest.mark.parametrize("num_kv_heads", [4, 2], ids=["mha", "gqa2"])
def test_decoding_equals_full_pass(pattern, chunk, num_kv_heads):
    """Decoding with new_cache() equals the full causal pass: a KV cache (a ring for sliding windows), or
    for causal linear attention a LinearAttentionState (its running sums, of constant size)."""
    torch.manual_seed(0)
    m = sa.nn.MultiheadAttention(E, H, attention=pattern, num_kv_heads=num_kv_heads).eval()
    x = torch.randn(2, T, E)
    with torch.no_grad():
        full = m(x, x, x, need_weights=False)[0]
        golden = m.double()(x.double(), x.double(), x.double(), need_weights=False)[0]
        m.float()
        cache = m.new_cache()
        steps, sizes = _decode(m, x, chunk, cache)
    # the full fp32 pass is the baseline: decoding computes the same rows over fewer keys
    assert_within_baseline("decoded", steps, full, golden)
    if isinstance(cache, sa.approx.LinearAttentionState):
        assert cache.length == T and len(set(sizes)) == 1, f"the state grew: {sizes}"
        return
    assert cache.seen == T
    if isinstance(pattern, sa.SlidingWindow):
        assert cache.window == pattern.window
        assert len(set(sizes)) == 1, f"ring buffer grew: {sizes}"
        assert cache.k.shape[2] == pattern.window
    else:
        assert cache.k.shape[2] == T


def test_performer_does_not_redraw_in_the_middle_of_a_sequence():
    """In training mode with redraw_interval=1, a call with a state that already holds keys keeps the features
    its sums were built with; a new sequence (an empty state, or no state) redraws as usual."""
    m = sa.nn.PerformerAttention(4, 8, causal=True, redraw_interval=1).train()
    q, k, v = (torch.randn(1, 2, 6, 4) for _ in range(3))
    state = sa.approx.LinearAttentionState()
    m(q[:, :, :1], k[:, :, :1], v[:, :, :1], state=state)
    drawn = m.feature_map.projection.clone()
    for t in range(1, 6):
        m(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], state=state)
    assert torch.equal(m.feature_map.projection, drawn)
    m(q, k, v, state=sa.approx.LinearAttentionState())
    assert not torch.equal(m.feature_map.projection, drawn)


def test_a_linear_attention_state_is_refused_by_other_mechanisms():
    m = sa.nn.MultiheadAttention(E, H, attention=sa.Causal())
    x = torch.randn(1, 3, E)
    with pytest.raises(ValueError, match="LinearAttention"):
        m(x, x, x, need_weights=False, cache=sa.approx.LinearAttentionState())


def test_ring_buffer_is_constant_over_a_long_generation():
    m = sa.nn.MultiheadAttention(E, H, attention=sa.SlidingWindow(4, causal=True)).eval()
    cache = m.new_cache()
    x = torch.randn(1, 1, E)
    with torch.no_grad():
        for _ in range(4):
            m(x, x, x, need_weights=False, cache=cache)
        size = cache.nbytes()
        ptr = cache.k.data_ptr()
        for _ in range(200):
            m(x, x, x, need_weights=False, cache=cache)
    assert cache.nbytes() == size and cache.k.data_ptr() == ptr, "the ring was reallocated"
    assert len(cache) == 4 and cache.seen == 204


def test_decoding_with_padding_and_is_causal():
    """Full attention made causal per call; padded tokens (True) are never attended, also from the cache."""
    torch.manual_seed(0)
    m = sa.nn.MultiheadAttention(E, H).eval()
    x = torch.randn(2, 9, E)
    kpm = torch.zeros(2, 9, dtype=torch.bool)
    kpm[0, 2] = kpm[1, 5] = True
    with torch.no_grad():
        full = m(x, x, x, key_padding_mask=kpm, is_causal=True, need_weights=False)[0]
        cache = m.new_cache(is_causal=True)
        outs = [m(x[:, s:s + 2], x[:, s:s + 2], x[:, s:s + 2], key_padding_mask=kpm[:, s:s + 2], is_causal=True,
                  need_weights=False, cache=cache)[0] for s in range(0, 9, 2)]
    torch.testing.assert_close(torch.cat(outs, 1), full)
    assert cache.padding is not None and cache.padding.tolist() == kpm.tolist()


def test_ring_buffer_keeps_padding_flags():
    torch.manual_seed(0)
    m = sa.nn.MultiheadAttention(E, H, attention=sa.SlidingWindow(3, causal=True)).eval()
    x = torch.randn(1, 10, E)
    kpm = torch.zeros(1, 10, dtype=torch.bool)
    kpm[0, 4] = True
    with torch.no_grad():
        full = m(x, x, x, key_padding_mask=kpm, need_weights=False)[0]
        cache = m.new_cache()
        outs = [m(x[:, s:s + 1], x[:, s:s + 1], x[:, s:s + 1], key_padding_mask=kpm[:, s:s + 1],
                  need_weights=False, cache=cache)[0] for s in range(10)]
    torch.testing.assert_close(torch.cat(outs, 1), full)


@pytest.mark.parametrize("norm_first", [False, True], ids=["post-norm", "pre-norm"])
@pytest.mark.parametrize("mechanisms", [(sa.SlidingWindow(3, causal=True), "causal"),
                                        (sa.nn.LinearAttention(causal=True), sa.nn.LinearAttention(causal=True))],
                         ids=["kv-cache", "linear-state"])
def test_layers_decode_with_cache(norm_first, mechanisms):
    """The encoder and decoder layers decode with their new_cache(): a KV cache, or the running sums of
    causal linear attention."""
    torch.manual_seed(0)
    enc = sa.nn.TransformerEncoderLayer(E, H, 32, 0.0, batch_first=True, norm_first=norm_first,
                                        attention=mechanisms[0]).eval()
    dec = sa.nn.TransformerDecoderLayer(E, H, 32, 0.0, batch_first=True, norm_first=norm_first,
                                        attention=mechanisms[1]).eval()
    x, mem = torch.randn(2, 11, E), torch.randn(2, 5, E)
    with torch.no_grad():
        cache = enc.new_cache()
        steps = torch.cat([enc(x[:, s:s + 4], cache=cache) for s in range(0, 11, 4)], 1)
        torch.testing.assert_close(steps, enc(x))
        cache = dec.new_cache()
        steps = torch.cat([dec(x[:, s:s + 1], mem, cache=cache) for s in range(11)], 1)
        torch.testing.assert_close(steps, dec(x, mem))


def test_cache_refuses_non_causal_and_mismatched_windows():
    m = sa.nn.MultiheadAttention(E, H, attention=sa.SlidingWindow(3))
    with pytest.raises(ValueError, match="causal"):
        m.new_cache()
    with pytest.raises(ValueError, match="causal"):  # global tokens see every position
        sa.nn.MultiheadAttention(E, H, attention=sa.Longformer(3, global_indices=[5])).new_cache()
    x = torch.randn(1, 2, E)
    with pytest.raises(ValueError, match="causal"):
        m(x, x, x, need_weights=False, cache=sa.nn.KVCache())
    c = sa.nn.MultiheadAttention(E, H, attention=sa.SlidingWindow(6, causal=True))
    with pytest.raises(ValueError, match="window=3"):
        c(x, x, x, need_weights=False, cache=sa.nn.KVCache(window=3))
    with pytest.raises(ValueError, match="window"):
        sa.nn.KVCache(window=-1)
    cache = c.new_cache()
    c(x, x, x, need_weights=False, cache=cache)
    with pytest.raises(ValueError, match="reset"):
        y = torch.randn(3, 1, E)
        c(y, y, y, need_weights=False, cache=cache)
    cache.reset()
    assert len(cache) == 0 and cache.nbytes() == 0


# --- cross-attention: the memory's keys and values, projected once ----------------------------


def _count_memory_projections(monkeypatch, memory_len):
    """Counts F.linear calls on a (·, S, ·)-shaped input of the memory's length S (the key/value
    projections of the cross-attention; the decoder's own inputs here have other lengths)."""
    import sparse_attention.nn.multihead as mh

    calls = {"n": 0}
    real = mh.F.linear

    def linear(x, *args, **kwargs):
        if x.dim() >= 2 and memory_len in x.shape[:-1]:
            calls["n"] += 1
        return real(x, *args, **kwargs)

    monkeypatch.setattr(mh.F, "linear", linear)
    return calls


@pytest.mark.parametrize("norm_first", [False, True], ids=["post-norm", "pre-norm"])
@pytest.mark.parametrize("batch_first", [True, False], ids=["batch-first", "seq-first"])
@pytest.mark.parametrize("num_kv_heads", [4, 2], ids=["mha", "gqa2"])
def test_decoder_memory_cache_equals_full_pass_and_projects_memory_once(norm_first, batch_first, num_kv_heads,
                                                                          monkeypatch):
    torch.manual_seed(0)
    dec = sa.nn.TransformerDecoderLayer(E, H, 32, 0.0, batch_first=batch_first, norm_first=norm_first,
                                        attention="causal", num_kv_heads=num_kv_heads).eval()
    B, S = 2, 7
    x, mem = torch.randn(B, T, E), torch.randn(B, S, E)
    mpm = torch.zeros(B, S, dtype=torch.bool)
    mpm[1, 5:] = True  # padded memory positions

    def seq(t):  # the layer's layout
        return t if batch_first else t.transpose(0, 1)

    memory = seq(mem)
    with torch.no_grad():
        full = seq(dec(seq(x), memory, memory_key_padding_mask=mpm))
        golden = seq(dec.double()(seq(x).double(), memory.double(), memory_key_padding_mask=mpm))
        dec.float()
        cache = dec.new_cache()
        assert isinstance(cache, sa.nn.DecoderCache) and isinstance(cache.memory, sa.nn.MemoryCache)
        calls = _count_memory_projections(monkeypatch, S)
        steps, ptrs = [], set()
        for s in range(0, T, 3):  # chunks of 3 new tokens, the last one shorter
            steps.append(seq(dec(seq(x[:, s:s + 3]), memory, memory_key_padding_mask=mpm, cache=cache)))
            ptrs.add(cache.memory.k.data_ptr())
    assert_within_baseline("decoded", torch.cat(steps, 1), full, golden)
    assert calls["n"] == 2, f"memory projected {calls['n']} times (key and value once each expected)"
    assert cache.memory.fills == 1 and len(ptrs) == 1, "the stored memory keys were recomputed"
    assert cache.self_attn.seen == T
    assert tuple(cache.memory.k.shape) == (B, num_kv_heads, S, E // H)


def test_memory_cache_call_equals_the_uncached_call():
    """MultiheadAttention with a MemoryCache returns exactly what the call without it returns."""
    torch.manual_seed(0)
    m = sa.nn.MultiheadAttention(E, H, kdim=12, vdim=10, num_kv_heads=2).eval()
    mem_k, mem_v = torch.randn(2, 9, 12), torch.randn(2, 9, 10)
    cache = sa.nn.MemoryCache()
    with torch.no_grad():
        for n in (1, 4, 1):
            q = torch.randn(2, n, E)
            expected = m(q, mem_k, mem_v, need_weights=False)[0]
            torch.testing.assert_close(m(q, mem_k, mem_v, need_weights=False, cache=cache)[0], expected,
                                       rtol=0, atol=0)
            out, w = m(q, mem_k, mem_v, cache=cache)  # the weights path reads the cache too
            torch.testing.assert_close(out, expected)
            assert w.shape == (2, n, 9)
    assert cache.fills == 1 and cache.nbytes() == cache.k.numel() * 4 * 2


def test_memory_cache_refuses_another_memory_until_reset():
    torch.manual_seed(0)
    dec = sa.nn.TransformerDecoderLayer(E, H, 32, 0.0, batch_first=True, attention="causal").eval()
    x, mem = torch.randn(1, 3, E), torch.randn(1, 5, E)
    cache = dec.new_cache()
    with torch.no_grad():
        dec(x[:, :1], mem, cache=cache)
        with pytest.raises(ValueError, match="another key/value"):
            dec(x[:, 1:2], mem.clone(), cache=cache)
        cache.reset()
        other = torch.randn(1, 6, E)
        steps = torch.cat([dec(x[:, s:s + 1], other, cache=cache) for s in range(3)], 1)
        torch.testing.assert_close(steps, dec(x, other))
    assert cache.memory.fills == 2 and cache.self_attn.seen == 3
    no_memory = dec.new_cache(cache_memory=False)
    assert no_memory.memory is None
    with torch.no_grad():
        torch.testing.assert_close(torch.cat([dec(x[:, s:s + 1], mem, cache=no_memory) for s in range(3)], 1),
                                   dec(x, mem))
    with pytest.raises(TypeError, match="DecoderCache"):
        dec(x, mem, cache=sa.nn.MemoryCache())
    with pytest.raises(TypeError, match="KVCache, MemoryCache or"):
        dec.self_attn(x, x, x, cache=object())
    with pytest.raises(TypeError, match="KVCache"):
        sa.nn.DecoderCache(sa.nn.MemoryCache())
