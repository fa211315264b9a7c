"""Put our attention into pretrained BERT-family models of HF transformers, keeping the weights.

    from sparse_attention.integrations.huggingface import sparsify
    model = transformers.AutoModel.from_pretrained(path)
    sparsify(model, attention=sa.SlidingWindow(32))  # in place; returns the model

:func:`sparsify` swaps every supported self-attention module (``model....attention.self``)
for a :class:`SparseSelfAttention` that holds the **same** ``query``/``key``/``value``
``nn.Linear`` objects (so the parameters, their names in ``state_dict`` and anything
already pointing at them are unchanged) and computes
``sparse_attention.attention(q, k, v, pattern, key_padding_mask=...)`` instead of HF's
eager/SDPA attention. Everything else (embeddings, output projection, LayerNorm, MLP,
pooler, heads) stays HF's. With ``attention="full"`` the model computes the same function
(up to float rounding); with a sparse pattern it is the pretrained model evaluated with
a sparse mask it was not trained with: how close its outputs stay is a measurement
(``benchmarks/hf_fidelity.py``), not a guarantee.

Requires ``transformers>=5,<6`` (the ``hf`` extra: ``pip install "sparse-attention[hf]"``),
imported only when :func:`sparsify` runs. Patterns are position-based: in a padded batch
(padding on the right, as HF tokenizers do) a pattern that depends on the sequence end,
such as BigBird's last global block, sees the padded length, so padded and unpadded
inputs can differ; SlidingWindow, Longformer with leading globals and Full do not.
"""

from __future__ import annotations

import torch

from .. import registry
from ..dynamic.base import DynamicPattern
from ..functional import attention as sparse_attention
from ..nn.multihead import resolve_attention
from ..patterns import Pattern

#: self-attention classes of transformers 5.x whose math is BertSelfAttention's: ``query``/``key``/``value``
#: Linear layers of width H·D, ``num_attention_heads`` H, ``attention_head_size`` D, ``scaling`` = D**-0.5,
#: an ``nn.Dropout`` on the weights and an additive/boolean attention mask. The first group is a verbatim copy
#: of BertSelfAttention (decoder and cache code included, refused here); the second, the encoder-only copy.
SUPPORTED_CLASSES: frozenset[str] = frozenset({
    "BertSelfAttention", "RobertaSelfAttention", "XLMRobertaSelfAttention", "XLMRobertaXLSelfAttention",
    "CamembertSelfAttention", "Data2VecTextSelfAttention", "ElectraSelfAttention", "ErnieSelfAttention",
    "RobertaPreLayerNormSelfAttention", "XmodSelfAttention", "RoCBertSelfAttention", "BertGenerationSelfAttention",
    "LayoutLMSelfAttention", "MarkupLMSelfAttention", "SplinterSelfAttention",
})

#: float mask values at or below this are "masked" (HF fills with finfo(dtype).min; older code used -10000).
_MASKED_BELOW = -1e4

_INSTALL_HINT = 'pip install "sparse-attention[hf]"  (transformers>=5,<6)'


def _require_transformers():
    try:
        import transformers
    except ImportError as e:
        raise ImportError(f"sparse_attention.integrations.huggingface needs HF transformers, the optional 'hf' "
                          f"extra; install it with: {_INSTALL_HINT}") from e
    major = int(transformers.__version__.split(".")[0])
    if major != 5:
        raise ImportError(f"sparse_attention.integrations.huggingface supports transformers 5.x (the structure of "
                          f"BertSelfAttention changed in 5.0), found {transformers.__version__}; {_INSTALL_HINT}")
    return transformers


def key_padding_mask_from_hf(attention_mask: object, *, batch: int, heads: int, n_q: int, n_k: int
                             ) -> torch.Tensor | None:
    """HF's self-attention mask -> our ``key_padding_mask`` (B, S) bool, True = padding; None = no padding.

    Accepted forms (what transformers 5.x passes to a self-attention module):

    * None: nothing masked.
    * (B, S) of 0/1 (bool, int or float), **1 = attend** (the tokenizer's ``attention_mask``).
    * (b, h, n, S) with b in {1, B}, h in {1, H}, n in {1, N}: bool **True = attend** (the SDPA
      form) or float **added to the scores**: 0 = attend, <= -1e4 (HF uses ``finfo.min``) = masked.

    A 4-D mask must be the same for every query and head (a padding mask); a causal,
    block-diagonal or other per-query mask, or a float mask holding other values (a bias),
    cannot become a key padding mask and raises ValueError.
    """
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"attention_mask must be a tensor or None, got {type(attention_mask).__name__} (a flex "
                        "BlockMask? sparsified models need model.set_attn_implementation('sdpa') or 'eager')")
    m = attention_mask
    if m.dim() == 2:
        if tuple(m.shape) != (batch, n_k):
            raise ValueError(f"a 2-D attention_mask must be (B, S) = {(batch, n_k)}, got {tuple(m.shape)}")
        if m.dtype != torch.bool and not bool(((m == 0) | (m == 1)).all()):
            raise ValueError(f"a 2-D attention_mask must hold 0/1 (1 = attend), got values "
                             f"{torch.unique(m)[:8].tolist()} (dtype {m.dtype})")
        keep = m.bool()
    elif m.dim() == 4:
        b, h, n, s = m.shape
        if b not in (1, batch) or h not in (1, heads) or n not in (1, n_q) or s != n_k:
            raise ValueError(f"a 4-D attention_mask must broadcast to (B, H, N, S) = {(batch, heads, n_q, n_k)} "
                             f"with the last dimension exactly S, got {tuple(m.shape)}")
        if m.dtype == torch.bool:
            keep = m
        elif m.is_floating_point():
            keep = m == 0
            if not bool((keep | (m <= _MASKED_BELOW)).all()):
                other = torch.unique(m[~keep & (m > _MASKED_BELOW)])[:8].tolist()
                raise ValueError(f"a float attention_mask can only hold 0 (attend) and large negative values "
                                 f"(masked, <= {_MASKED_BELOW:g}); got also {other}: an additive bias cannot become "
                                 "a key padding mask")
        else:
            raise TypeError(f"a 4-D attention_mask must be bool (True = attend) or float (added to the scores), "
                            f"got dtype {m.dtype}")
        row = keep[:, :1, :1, :]  # (b, 1, 1, S)
        if not torch.equal(keep, row.expand_as(keep)):
            raise ValueError(f"attention_mask of shape {tuple(m.shape)} differs between queries or heads (a causal, "
                             "block-diagonal or custom mask), so it cannot be converted to a key padding mask; "
                             "sparsified models take padding masks only")
        keep = row[:, 0, 0, :].expand(batch, n_k)  # (B, S)
    else:
        raise ValueError(f"attention_mask must be (B, S) or 4-D (B, 1, N, S), got shape {tuple(m.shape)}")
    if bool(keep.all()):
        return None
    return ~keep.to(torch.bool)


def mean_pool(last_hidden_state: torch.Tensor, attention_mask: torch.Tensor, *, normalize: bool = True
              ) -> torch.Tensor:
    """Sentence embeddings as sentence-transformers' all-MiniLM-L6-v2 computes them.

    Args:
        last_hidden_state: (B, N, E) token states.
        attention_mask: (B, N) 0/1, 1 = real token (the tokenizer's mask).
        normalize: L2-normalise each embedding (default True, as all-MiniLM-L6-v2 does).
    Returns:
        (B, E): the mean of the real tokens' states.
    """
    w = attention_mask.to(last_hidden_state.dtype).unsqueeze(-1)  # (B, N, 1)
    pooled = (last_hidden_state * w).sum(1) / w.sum(1).clamp_min(1)  # (B, E)
    return torch.nn.functional.normalize(pooled, dim=-1) if normalize else pooled


class SparseSelfAttention(torch.nn.Module):
    """A BERT-family self-attention computed by :func:`sparse_attention.attention`.

    Built by :func:`sparsify` from an HF module (``original``); it holds the original's
    ``query``, ``key``, ``value`` (nn.Linear E -> H·D) and ``dropout`` modules themselves,
    so ``state_dict`` keys and values are unchanged.

    forward(hidden_states, attention_mask=None, **kwargs) -> (output, None):
        hidden_states (B, N, E); attention_mask: see :func:`key_padding_mask_from_hf`.
        Output (B, N, H·D). No attention weights (always None). Attention dropout with
        ``dropout.p`` in training mode, none in eval mode. Raises ValueError for what it
        cannot honour: ``output_attentions``, ``head_mask``, a KV cache
        (``past_key_values``), cross-attention (``encoder_hidden_states``), packed
        sequences (``cu_seq_lens_*``), ``is_causal=True``, a non-padding mask.
        Keys with padding are never attended; a sequence with every key padded gets 0
        (HF's eager path would give the mean of V).
    """

    def __init__(self, original: torch.nn.Module, pattern: Pattern | DynamicPattern | None):
        super().__init__()
        self.query = original.query
        self.key = original.key
        self.value = original.value
        self.dropout = original.dropout
        self.num_attention_heads = int(original.num_attention_heads)
        self.attention_head_size = int(original.attention_head_size)
        self.all_head_size = self.num_attention_heads * self.attention_head_size
        self.scaling = float(getattr(original, "scaling", self.attention_head_size ** -0.5))
        self.config = getattr(original, "config", None)
        self.layer_idx = getattr(original, "layer_idx", None)
        self.is_causal = False
        self.pattern = pattern
        #: the HF class this module replaced (for repr and error messages)
        self.replaced = type(original).__name__
        self.train(original.training)  # a new Module starts in training mode; keep the model's mode

    def extra_repr(self) -> str:
        pattern = "Full()" if self.pattern is None else repr(self.pattern)
        return f"pattern={pattern}, replaced={self.replaced}"

    def _refuse(self, kwargs: dict) -> None:
        config_wants = bool(getattr(self.config, "output_attentions", False))
        if kwargs.get("output_attentions", config_wants):
            raise ValueError("output_attentions=True: a sparsified model returns no attention weights (HF records "
                             "them from its own attention classes); run the original model to inspect weights, or "
                             "sa.explain / Pattern.mask for which pairs are attended")
        for name in ("head_mask", "past_key_values", "encoder_hidden_states", "encoder_attention_mask",
                     "cu_seq_lens_q", "cu_seq_lens_k", "seq_idx"):
            if kwargs.get(name) is not None:
                what = {"head_mask": "head masking", "past_key_values": "a KV cache (decoder use)",
                        "encoder_hidden_states": "cross-attention", "encoder_attention_mask": "cross-attention",
                        }.get(name, "packed (padding-free) sequences")
                raise ValueError(f"{name} given ({type(kwargs[name]).__name__}): {what} is not supported by the "
                                 f"sparsified {self.replaced}")
        if kwargs.get("is_causal"):
            raise ValueError("is_causal=True: sparsified models are bidirectional encoders; pass a causal pattern "
                             "(sa.Causal(), sa.SlidingWindow(w, causal=True)) to sparsify instead")

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                **kwargs) -> tuple[torch.Tensor, None]:
        self._refuse(kwargs)
        B, N, _ = hidden_states.shape
        H, D = self.num_attention_heads, self.attention_head_size
        # (B, N, H·D) -> (B, N, H, D) -> (B, H, N, D)
        q = self.query(hidden_states).view(B, N, H, D).transpose(1, 2)
        k = self.key(hidden_states).view(B, N, H, D).transpose(1, 2)
        v = self.value(hidden_states).view(B, N, H, D).transpose(1, 2)
        key_padding_mask = key_padding_mask_from_hf(attention_mask, batch=B, heads=H, n_q=N, n_k=N)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.to(q.device)
        out = sparse_attention(q, k, v, self.pattern, key_padding_mask=key_padding_mask, scale=self.scaling,
                               dropout_p=self.dropout.p if self.training else 0.0)  # (B, H, N, D)
        return out.transpose(1, 2).reshape(B, N, H * D), None


def _resolve(attention: object, options: dict) -> Pattern | DynamicPattern | None:
    if isinstance(attention, str):
        mech = registry.get(attention)
        if mech.kind == "module":  # (its own error would point at MultiheadAttention, which sparsify does not use)
            raise ValueError(f"attention={attention!r} is a module mechanism (its own weights, sized per layer), "
                             "which sparsify cannot place in a pretrained layer; it takes 'full', a pattern or a "
                             "content-based mechanism: "
                             f"{sorted(m.name for m in registry.mechanisms() if m.kind != 'module')}")
        attention = mech.make(**options)
    elif options:
        raise TypeError(f"options {sorted(options)} apply to a mechanism given by name; got attention of type "
                        f"{type(attention).__name__}, which is already configured")
    if isinstance(attention, torch.nn.Module):
        raise TypeError(f"attention={type(attention).__name__}: sparsify takes 'full', a mechanism name "
                        f"({sorted(registry.REGISTRY)}), a Pattern or a content-based DynamicPattern; a module "
                        "would be shared by every layer")
    return resolve_attention(attention)


def _check_convertible(name: str, module: torch.nn.Module, pattern: Pattern | DynamicPattern | None) -> None:
    config = getattr(module, "config", None)
    where = f"{name} ({type(module).__name__})"
    pe = getattr(config, "position_embedding_type", "absolute")
    if pe not in (None, "absolute"):
        raise ValueError(f"{where}: position_embedding_type={pe!r} (relative position scores inside attention) is "
                         "not supported; only 'absolute' position embeddings")
    if getattr(config, "is_decoder", False) or getattr(module, "is_causal", False):
        raise ValueError(f"{where}: config.is_decoder=True (causal decoder with a KV cache) is not supported; "
                         "sparsify converts bidirectional encoders")
    if getattr(config, "add_cross_attention", False):
        raise ValueError(f"{where}: config.add_cross_attention=True (cross-attention) is not supported")
    for attr in ("query", "key", "value"):
        if type(getattr(module, attr, None)) is not torch.nn.Linear:
            raise ValueError(f"{where}: expected an nn.Linear {attr!r}, got "
                             f"{type(getattr(module, attr, None)).__name__}")
    if not isinstance(getattr(module, "dropout", None), torch.nn.Dropout):
        raise ValueError(f"{where}: expected an nn.Dropout 'dropout', got {type(getattr(module, 'dropout', None))}")
    H = getattr(module, "num_attention_heads", None)
    D = getattr(module, "attention_head_size", None)
    if not isinstance(H, int) or not isinstance(D, int) or module.query.out_features != H * D:
        raise ValueError(f"{where}: expected num_attention_heads * attention_head_size == query.out_features, got "
                         f"H={H}, D={D}, query.out_features={module.query.out_features}")
    _check_heads(where, pattern, H)


def _check_heads(where: str, pattern: Pattern | DynamicPattern | None, H: int) -> None:
    static = pattern.restrict if isinstance(pattern, DynamicPattern) else pattern
    heads = getattr(static, "num_heads", None)
    if heads is not None and heads != H:
        raise ValueError(f"{where}: the per-head pattern has {heads} heads, the model has num_attention_heads={H}")


def sparsify(model: torch.nn.Module, attention: object = "full", **options) -> torch.nn.Module:
    """Replace every BERT-family self-attention of ``model`` by :class:`SparseSelfAttention`, in place.

    Args:
        model: an HF transformers 5.x model (``BertModel``, ``RobertaForMaskedLM``, a
            sentence-transformers' inner ``AutoModel``, ...) or any module containing such
            self-attention modules. Supported classes (:data:`SUPPORTED_CLASSES`):
            BertSelfAttention, RobertaSelfAttention, XLMRobertaSelfAttention,
            XLMRobertaXLSelfAttention, CamembertSelfAttention, Data2VecTextSelfAttention,
            ElectraSelfAttention, ErnieSelfAttention, RobertaPreLayerNormSelfAttention,
            XmodSelfAttention, RoCBertSelfAttention, BertGenerationSelfAttention,
            LayoutLMSelfAttention, MarkupLMSelfAttention,
            SplinterSelfAttention; modules already converted get the new mechanism.
        attention: "full" (default: same function as before), a registry name
            (``sa.mechanisms()``) configured by ``**options``
            (``sparsify(m, "sliding_window", window=32)``), a
            :class:`~sparse_attention.Pattern` (``sa.BigBird(block=16)``) or a content-based
            ``DynamicPattern`` (``sa.TopK(32)``). One mechanism object is shared by every layer.
        **options: options of a mechanism given by name (TypeError otherwise).

    Returns:
        ``model`` itself, modified in place (``copy.deepcopy`` it first to keep the
        original). Parameters are the same objects, so ``state_dict()`` is unchanged.

    Raises:
        ImportError: transformers 5.x is not installed (names the ``hf`` extra).
        ValueError: no supported self-attention in ``model`` (the message lists the
            attention-like modules found); a decoder (``is_decoder``), cross-attention
            (``add_cross_attention``) or relative position embeddings
            (``position_embedding_type`` other than "absolute"); a model whose
            ``config._attn_implementation`` builds masks we cannot read (anything but
            "eager" and "sdpa"); a per-head pattern with the wrong number of heads.
            At run time (see :class:`SparseSelfAttention`): ``output_attentions``,
            ``head_mask``, a KV cache, a mask that is not a padding mask.
        TypeError: ``attention`` of another type, or ``options`` with a configured mechanism.

    The attention mask HF builds for the model (a dense (B, 1, N, S) mask when a batch
    has padding) is converted to ``key_padding_mask`` in every layer.
    """
    _require_transformers()
    pattern = _resolve(attention, options)
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if impl not in (None, "eager", "sdpa"):
        raise ValueError(f"model.config._attn_implementation={impl!r}: its attention masks cannot be converted to "
                         "key padding masks; call model.set_attn_implementation('sdpa') before sparsify")
    targets = []
    for name, module in model.named_modules():
        cls = type(module)
        if isinstance(module, SparseSelfAttention):
            _check_heads(f"{name} (SparseSelfAttention)", pattern, module.num_attention_heads)
            targets.append((name, module))
        elif cls.__name__ in SUPPORTED_CLASSES and cls.__module__.startswith("transformers."):
            _check_convertible(name, module, pattern)
            targets.append((name, module))
    if not targets:
        seen = sorted({type(m).__name__ for m in model.modules() if "Attention" in type(m).__name__})
        raise ValueError(f"{type(model).__name__} has no supported self-attention (supported: "
                         f"{sorted(SUPPORTED_CLASSES)}); attention modules found: {seen or 'none'}")
    for name, module in targets:
        if isinstance(module, SparseSelfAttention):
            module.pattern = pattern
            continue
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, SparseSelfAttention(module, pattern))
    return model
