"""sld_jax: decoder-only Transformer ASR over discrete speech tokens, with SLD."""

__version__ = "0.1.0"
