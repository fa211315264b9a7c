"""``python -m sparse_attention`` is the ``sparse-attention`` command."""

import sys

from .cli import main

sys.exit(main())
