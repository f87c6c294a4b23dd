"""``python -m sld_jax.comparison``: see ``sld_jax.comparison.main``."""

from sld_jax.comparison import main

main.run()
