"""``build_attention``: a MultiheadAttention for any registered mechanism, by name."""

from __future__ import annotations

from .. import registry
from .multihead import MultiheadAttention, check_heads

_LAYER_OPTIONS = ("num_kv_heads", "dropout", "bias", "kdim", "vdim", "batch_first", "device", "dtype")


def build_attention(name: str, embed_dim: int, num_heads: int, **options) -> MultiheadAttention:
    """``sa.nn.MultiheadAttention`` running the registered mechanism ``name``.

    ``options`` are the mechanism's (``sa.mechanisms()`` lists them with their defaults)
    plus the layer's own (num_kv_heads, dropout, bias, kdim, vdim, batch_first, device,
    dtype). Unknown names or options raise ValueError listing the valid ones.

    A "module" mechanism (Performer, Linformer, Routing, ...) is built for the layer's head
    dim E // H, H and Hkv, e.g. ``build_attention("linformer", 512, 8, seq_len=4096, k=256)``.
    """
    mech = registry.get(name)
    layer = {k: options.pop(k) for k in list(options) if k in _LAYER_OPTIONS}
    unknown = set(options) - set(mech.defaults)
    if unknown:
        raise ValueError(f"unknown option(s) {sorted(unknown)} for {name!r}; valid: "
                         f"{sorted(mech.defaults) + sorted(_LAYER_OPTIONS)}")
    if mech.kind != "module":
        return MultiheadAttention(embed_dim, num_heads, attention=mech.make(**options), **layer)
    head_dim, kv_heads = check_heads(embed_dim, num_heads, layer.get("num_kv_heads"))
    module = mech.make(head_dim=head_dim, num_heads=num_heads, num_kv_heads=kv_heads, **options)
    if layer.get("device") is not None or layer.get("dtype") is not None:
        module.to(device=layer.get("device"), dtype=layer.get("dtype"))
    return MultiheadAttention(embed_dim, num_heads, attention=module, **layer)
