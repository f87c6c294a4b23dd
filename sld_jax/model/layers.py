"""Building blocks of the decoder: projections, norms, embeddings, RoPE, MLP.

Every parameter is created through ``nn.with_logical_partitioning`` so that
``sld_jax.partitioning`` can derive shardings from an abstract init. Shapes
follow Hugging Face GPT-2 one to one (``wte [V, E]``, ``wpe [max_length, E]``,
``c_fc [E, M]``, ``c_proj [M, E]``, ``ln_*`` scale and bias ``[E]``); the
attention projections are in ``attention.py``.

dtype policy: parameters are stored in ``config.params_dtype``; matmuls run
in ``config.compute_dtype``; norms and RoPE compute in float32 and cast back.
"""

from __future__ import annotations

import functools
import math
import string
from typing import Any, Callable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from sld_jax.model.config import DecoderConfig

Array = jnp.ndarray
Dtype = Any

# GPT-2's initializer_range.
INIT_STDDEV = 0.02

EMBED_ACTIVATION_AXES = ("batch", "length", "embed")
MLP_ACTIVATION_AXES = ("batch", "length", "mlp")


def normal_init(stddev: float) -> Callable[..., Array]:
  return nn.initializers.normal(stddev=stddev)


def residual_init_stddev(config: DecoderConfig) -> float:
  """GPT-2 scales projections into the residual stream by 1/sqrt(2 layers)."""
  return INIT_STDDEV / math.sqrt(2 * config.num_layers)


class Projection(nn.Module):
  """``y = x @ kernel + bias`` over the trailing ``len(in_shape)`` axes of x.

  The kernel is ``in_shape + out_shape`` with ``kernel_axes`` naming every
  axis; the bias is ``out_shape`` named by the trailing kernel axes. For the
  query projection ``in_shape=(E,)``, ``out_shape=(H, D)``,
  ``kernel_axes=('embed', 'heads', 'kv')``: kernel ``[E, H, D]``, bias
  ``[H, D]`` with axes ``('heads', 'kv')``, and ``x [B, L, E] -> y [B, L, H, D]``.

  ``epilogue(product, bias) -> y``, if given, replaces the bias add (the
  MLP's ``gelu(product + bias)``, recomputed in the backward pass).
  """

  in_shape: Sequence[int]
  out_shape: Sequence[int]
  kernel_axes: Sequence[str]
  use_bias: bool = True
  init_stddev: float = INIT_STDDEV
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  epilogue: Optional[Callable[[Array, Array], Array]] = None

  @nn.compact
  def __call__(self, x: Array) -> Array:
    in_shape, out_shape = tuple(self.in_shape), tuple(self.out_shape)
    if len(self.kernel_axes) != len(in_shape) + len(out_shape):
      raise ValueError(
          f"{self.name}: kernel_axes {self.kernel_axes} must name "
          f"{len(in_shape) + len(out_shape)} axes of kernel {in_shape + out_shape}")
    if x.shape[x.ndim - len(in_shape):] != in_shape:
      raise ValueError(
          f"{self.name}: input trailing shape {x.shape} does not match {in_shape}")
    kernel = self.param(
        "kernel",
        nn.with_logical_partitioning(normal_init(self.init_stddev), tuple(self.kernel_axes)),
        in_shape + out_shape, self.param_dtype)
    letters = string.ascii_letters
    batch = letters[:x.ndim - len(in_shape)]
    contracted = letters[len(batch):len(batch) + len(in_shape)]
    produced = letters[len(batch) + len(in_shape):][:len(out_shape)]
    equation = f"{batch}{contracted},{contracted}{produced}->{batch}{produced}"
    y = jnp.einsum(equation, x.astype(self.dtype), kernel.astype(self.dtype))
    if self.use_bias:
      bias = self.param(
          "bias",
          nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                       tuple(self.kernel_axes[len(in_shape):])),
          out_shape, self.param_dtype)
      y = (y + bias.astype(self.dtype) if self.epilogue is None
           else self.epilogue(y, bias.astype(self.dtype)))
    return y


def _embed_vector(module: nn.Module, name: str, init: Callable[..., Array],
                  features: int) -> Array:
  return module.param(name, nn.with_logical_partitioning(init, ("embed",)), (features,),
                      module.param_dtype)


def _layer_norm_statistics(x: Array, epsilon: float) -> tuple[Array, Array]:
  """float32 ``mean`` and ``1 / sqrt(var + epsilon)`` over the last axis, ``[..., 1]``.

  ``var = mean(x^2) - mean^2`` (flax's ``use_fast_variance``): both sums in
  one pass over ``x``, where ``mean((x - mean)^2)`` needs a second (XLA:GPU,
  gpt2_medium: one forward kernel less per norm, -1.6 GB moved per step).
  Like flax's, it loses precision where a row's mean dwarfs its spread
  (float32, rows of 256: output errors of 2e-4 at ``|mean| / std = 30``,
  4e-2 at 300); a residual stream's few very large dimensions raise a row's
  spread far more than its mean.
  """
  x32 = x.astype(jnp.float32)
  mean = jnp.mean(x32, axis=-1, keepdims=True)
  var = jnp.maximum(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) - jnp.square(mean), 0.0)
  return mean, jax.lax.rsqrt(var + epsilon)


def _normalized(x, scale, bias, mean, rstd):
  return ((x.astype(jnp.float32) - mean) * rstd * scale.astype(jnp.float32)
          + bias.astype(jnp.float32))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def layer_norm(x: Array, scale: Array, bias: Array, epsilon: float, dtype: Dtype) -> Array:
  """LayerNorm over the last axis in float32, returned in ``dtype``.

  Its backward pass reads the row statistics the forward pass made::

    xhat   = (x - mean) * rstd
    g      = dy * scale
    dx     = rstd * (g - mean(g) - xhat * mean(g * xhat))    (means over the row)
    dscale = sum over rows of dy * xhat,  dbias = sum over rows of dy

  through an optimization barrier: left to itself XLA recomputes them inside
  the backward kernels, and then the column sum for ``dscale`` cannot share
  a kernel with them, so a float32 ``dy * xhat`` the size of ``x`` is written
  and read again (XLA:GPU, gpt2_medium: 134 MB per norm and step).
  """
  return _layer_norm_forward(x, scale, bias, epsilon, dtype)[0]


def _layer_norm_forward(x, scale, bias, epsilon, dtype):
  mean, rstd = _layer_norm_statistics(x, epsilon)
  return _normalized(x, scale, bias, mean, rstd).astype(dtype), (x, scale, bias, mean, rstd)


def _layer_norm_backward(epsilon, dtype, residuals, dy):
  del epsilon, dtype
  x, scale, bias, mean, rstd = residuals
  mean, rstd = jax.lax.optimization_barrier((mean, rstd))
  xhat = (x.astype(jnp.float32) - mean) * rstd
  dy32 = dy.astype(jnp.float32)
  rows = tuple(range(x.ndim - 1))
  g = dy32 * scale.astype(jnp.float32)
  dx = rstd * (g - jnp.mean(g, axis=-1, keepdims=True)
               - xhat * jnp.mean(g * xhat, axis=-1, keepdims=True))
  return (dx.astype(x.dtype), jnp.sum(dy32 * xhat, axis=rows).astype(scale.dtype),
          jnp.sum(dy32, axis=rows).astype(bias.dtype))


layer_norm.defvjp(_layer_norm_forward, _layer_norm_backward)


class LayerNorm(nn.Module):
  """GPT-2 LayerNorm over the last axis: scale and bias ``[E]`` ('embed',),
  computed in float32 (``layer_norm``)."""

  epsilon: float = 1e-5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = _embed_vector(self, "scale", nn.initializers.ones_init(), x.shape[-1])
    bias = _embed_vector(self, "bias", nn.initializers.zeros_init(), x.shape[-1])
    return layer_norm(x, scale, bias, self.epsilon, self.dtype)


class RMSNorm(nn.Module):
  """Root-mean-square norm (LLaMA style): scale ``[E]`` ('embed',), no bias."""

  epsilon: float = 1e-5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = _embed_vector(self, "scale", nn.initializers.ones_init(), x.shape[-1])
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.epsilon)
    return (y * scale.astype(jnp.float32)).astype(self.dtype)


def make_norm(config: DecoderConfig, name: str) -> nn.Module:
  cls = LayerNorm if config.norm == "layernorm" else RMSNorm
  return cls(epsilon=config.layer_norm_epsilon, dtype=config.compute_dtype,
             param_dtype=config.params_dtype, name=name)


class Embed(nn.Module):
  """A table ``[num_embeddings, features]`` looked up by integer ids.

  Out-of-range ids give NaN rows (``jnp.take``'s fill mode) rather than being
  clamped silently, so a bad id shows up as NaN logits.
  """

  num_embeddings: int
  features: int
  axes: tuple[str, str] = ("vocab", "embed")
  init_stddev: float = INIT_STDDEV
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    self.embedding = self.param(
        "embedding", nn.with_logical_partitioning(normal_init(self.init_stddev), self.axes),
        (self.num_embeddings, self.features), self.param_dtype)

  def __call__(self, ids: Array) -> Array:
    if not jnp.issubdtype(ids.dtype, jnp.integer):
      raise ValueError(f"{self.name}: ids must be integers, got {ids.dtype}")
    return jnp.take(self.embedding, ids, axis=0).astype(self.dtype)

  def attend(self, x: Array, dtype: Dtype = jnp.float32) -> Array:
    """Tied output projection: ``x [..., E] @ embedding.T -> [..., V]`` in ``dtype``."""
    return jnp.einsum("...e,ve->...v", x.astype(dtype), self.embedding.astype(dtype))


def apply_rope(x: Array, positions: Array, max_wavelength: float) -> Array:
  """Rotary position embedding (rotate-half layout, as in LLaMA / MaxText).

  Args:
    x: ``[batch, length, heads, head_dim]`` queries or keys; head_dim even.
    positions: ``[batch, length]`` integer positions (restart per segment).
    max_wavelength: base of the geometric frequency ladder.

  Channel pair ``(i, i + head_dim/2)`` is rotated by angle
  ``position / max_wavelength ** (2i / head_dim)``; computed in float32.
  """
  head_dim = x.shape[-1]
  if head_dim % 2:
    raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
  half = head_dim // 2
  timescale = max_wavelength ** (2.0 * jnp.arange(half, dtype=jnp.float32) / head_dim)
  angle = positions.astype(jnp.float32)[:, :, None, None] / timescale  # [B, L, 1, half]
  sin, cos = jnp.sin(angle), jnp.cos(angle)
  x32 = x.astype(jnp.float32)
  first, second = x32[..., :half], x32[..., half:]
  rotated = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
  return rotated.astype(x.dtype)


def _activation_recomputed(function: Callable[..., Array]) -> Callable[..., Array]:
  """``function`` with nothing of its own kept for the backward pass.

  Differentiating ``gelu_tanh(product + bias)`` keeps ``tanh(...)`` and
  ``product + bias`` beside the matmul's own ``product``: two more ``[B, L,
  M]`` arrays written in the forward pass and read in the backward pass
  (XLA:GPU, gpt2_medium: 6.4 GB of traffic and 3.2 GB of memory per step).
  The backward pass recomputes the elementwise function from the matmul
  outputs instead, which it reads anyway. Values and gradients unchanged.
  """
  return jax.checkpoint(function, policy=jax.checkpoint_policies.nothing_saveable)


def _gelu_of_sum(product: Array, bias: Array) -> Array:
  return nn.gelu(product + bias, approximate=True)


class Mlp(nn.Module):
  """Feed-forward block: GPT-2 ``gelu_new`` with biases, or bias-free SwiGLU.

  gelu:   ``wo(gelu_tanh(wi(x)))``, wi ``[E, M]`` ('embed', 'mlp') + bias
          ``[M]``, wo ``[M, E]`` ('mlp', 'embed') + bias ``[E]``.
  swiglu: ``wo(silu(wi_gate(x)) * wi_up(x))``, no biases.
  """

  config: DecoderConfig
  deterministic: bool = True

  @nn.compact
  def __call__(self, x: Array) -> Array:
    cfg = self.config
    use_bias = cfg.mlp == "gelu"

    def projection(in_dim, out_dim, axes, name, stddev=INIT_STDDEV, epilogue=None):
      return Projection(in_shape=(in_dim,), out_shape=(out_dim,), kernel_axes=axes,
                        use_bias=use_bias, init_stddev=stddev, dtype=cfg.compute_dtype,
                        param_dtype=cfg.params_dtype, epilogue=epilogue, name=name)

    if cfg.mlp == "gelu":
      hidden = projection(cfg.embed_dim, cfg.mlp_dim, ("embed", "mlp"), "wi",
                          epilogue=_activation_recomputed(_gelu_of_sum))(x)
    else:
      gate = projection(cfg.embed_dim, cfg.mlp_dim, ("embed", "mlp"), "wi_gate")(x)
      up = projection(cfg.embed_dim, cfg.mlp_dim, ("embed", "mlp"), "wi_up")(x)
      hidden = _activation_recomputed(lambda gate, up: nn.silu(gate) * up)(gate, up)
    hidden = nn.with_logical_constraint(hidden, MLP_ACTIVATION_AXES)
    out = projection(cfg.mlp_dim, cfg.embed_dim, ("mlp", "embed"), "wo",
                     residual_init_stddev(cfg))(hidden)
    out = nn.Dropout(rate=cfg.dropout_rate)(out, deterministic=self.deterministic)
    return nn.with_logical_constraint(out, EMBED_ACTIVATION_AXES)
