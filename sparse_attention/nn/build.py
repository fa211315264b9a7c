"""``build_attention``: a MultiheadAttention for any registered mechanism, by name."""

from __future__ import annotations

from .. import registry
from .multihead import MultiheadAttention

_LAYER_OPTIONS = ("num_kv_heads", "dropout", "bias", "kdim", "vdim", "batch_first", "device", "dtype")


def build_attention(name: str, embed_dim: int, num_heads: int, **options) -> MultiheadAttention:
    """``sa.nn.MultiheadAttention`` running the registered mechanism ``name``.

    ``options`` are the mechanism's (``sa.mechanisms()`` lists them with their defaults)
    plus the layer's own (num_kv_heads, dropout, bias, kdim, vdim, batch_first, device,
    dtype). Unknown names or options raise ValueError listing the valid ones.
    """
    mech = registry.get(name)
    layer = {k: options.pop(k) for k in list(options) if k in _LAYER_OPTIONS}
    unknown = set(options) - set(mech.defaults)
    if unknown:
        raise ValueError(f"unknown option(s) {sorted(unknown)} for {name!r}; valid: "
                         f"{sorted(mech.defaults) + sorted(_LAYER_OPTIONS)}")
    return MultiheadAttention(embed_dim, num_heads, attention=mech.make(**options), **layer)
