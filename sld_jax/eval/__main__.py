"""``python -m sld_jax.eval``: the eval command (``sld_jax.eval``)."""

from sld_jax import eval as eval_command

eval_command.run()
