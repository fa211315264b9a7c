"""Bridges to other libraries. Each submodule imports its library only when called.

* :mod:`sparse_attention.integrations.huggingface`: ``sparsify(model, attention=...)`` puts
  our attention into the BERT-family models of HF transformers (the ``hf`` extra:
  ``pip install "sparse-attention[hf]"``).

Importing this package (or a submodule) never imports the third-party library, so
``import sparse_attention`` works without any extra installed.
"""

from __future__ import annotations

import importlib

__all__ = ["huggingface"]


def __getattr__(name: str):
    # lazy: ``sparse_attention.integrations.huggingface`` without an explicit submodule import
    if name in __all__:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
