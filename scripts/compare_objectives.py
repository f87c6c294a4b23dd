#!/usr/bin/env python3
"""Loss Masking vs Multimodal CE vs SLD: ``python -m sld_jax.comparison``.

Kept as the documented entry point; the implementation is the
``sld_jax.comparison`` package (see ``sld_jax/comparison/main.py`` for the
flags and examples).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sld_jax.comparison import main  # pylint: disable=wrong-import-position

if __name__ == "__main__":
  main.run()
