"""Decoder hyper-parameters as frozen dataclasses, with the named sizes.

``tiny`` is for CPU tests and the demo, ``gpt2_small`` (124M) and
``gpt2_medium`` (355M, the paper's model) match Hugging Face GPT-2 so that
pretrained weights map one to one.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import gin
import jax.numpy as jnp

_NORMS = ("layernorm", "rmsnorm")
_POSITIONS = ("learned", "rope")
_MLPS = ("gelu", "swiglu")
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# "einsum": attention written out (scores [B, H, L, L] in float32), with
# attention dropout. "xla" / "cudnn": ``jax.nn.dot_product_attention`` with the
# packed causal mask; "cudnn" is cuDNN's fused flash attention (GPU only, no
# [L, L] score tensor in memory). "cudnn_packed": cuDNN's packed layout, which
# computes attention inside each segment only (Hopper GPUs,
# ``model/packed_attention.py``). "splash": Pallas splash attention with
# segment ids (TPU; interpret mode elsewhere, ``model/splash.py``). "triton":
# FlashAttention-2 in Pallas for Triton with segment ids (GPUs; interpret mode
# elsewhere, ``model/triton_attention.py``). The fused ones take no attention
# dropout.
ATTENTION_IMPLEMENTATIONS = ("einsum", "xla", "cudnn", "cudnn_packed", "splash", "triton")
# The implementations that take segment ids instead of a dense [B, 1, L, L] mask.
SEGMENT_ID_ATTENTION = ("cudnn_packed", "splash", "triton")
# What a rematerialised layer (remat=True) keeps from its forward pass; the
# rest is recomputed in the backward pass. MaxText's names: "full" keeps
# nothing, "minimal" the outputs of the weight matmuls
# (jax.checkpoint_policies.dots_with_no_batch_dims_saveable), "save_attention_out"
# only the attention output (the layer's most expensive op to recompute with
# a fused kernel), "minimal_attention_out" both (MaxText's "minimal_flash").
REMAT_POLICIES = ("full", "minimal", "save_attention_out", "minimal_attention_out")


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  """Shape and switches of the decoder-only Transformer.

  Defaults are the GPT-2 family: pre-LayerNorm, learned absolute positions,
  GELU MLP, tied input/output embeddings.
  """

  vocab_size: int
  num_layers: int = 2
  num_heads: int = 4
  embed_dim: int = 128
  mlp_dim: int = 512
  max_length: int = 1024
  dropout_rate: float = 0.1
  attention_dropout_rate: Optional[float] = None   # None: dropout_rate
  attention_implementation: str = "einsum"
  # "cudnn_packed": segments declared per row. cuDNN's cost grows with it
  # (empty slots too) and a batch with a row of more segments takes the
  # dense-mask path. H200, 16 x 1024 rows of 7-10 utterances, gpt2_medium's
  # heads, one layer's forward+backward: 16 -> 0.96 ms, 32 -> 1.47 ms,
  # 64 -> 2.19 ms; dense mask 1.35 ms (docs/benchmarks.md).
  max_segments_per_row: int = 16
  # "cudnn_packed" in training: the slots the host declares per batch are its
  # rows' most segments rounded up to a power of two (0), or to a multiple of
  # this (e.g. 4: 8, 12, 16, 20, ...): fewer empty slots, so less cuDNN work,
  # for more distinct slot counts, each compiling the step once.
  segment_slot_multiple: int = 0
  # "triton": the forward kernel's query and key block, the backward
  # kernel's (powers of two >= 16 dividing max_length; Triton's dots need 16).
  # Smaller blocks skip more of a packed row's cross-segment work (at 1024
  # tokens of 55-170-token utterances: 128 -> 42.6% of causal attention's
  # block pairs, 64 -> 27.7%) for less work per program.
  triton_block: int = 128
  triton_backward_block: int = 64
  norm: str = "layernorm"
  position: str = "learned"
  mlp: str = "gelu"
  layer_norm_epsilon: float = 1e-5
  rope_max_wavelength: float = 10_000.0
  tie_embeddings: bool = True
  dtype: str = "float32"          # compute dtype: "float32" or "bfloat16"
  param_dtype: str = "float32"
  remat: bool = False             # rematerialise each layer in the backward pass
  remat_policy: str = "full"      # what remat keeps (REMAT_POLICIES)
  scan_layers: bool = False       # nn.scan over layers (one compiled layer)
  logits_via_embedding_dtype: Optional[str] = None

  def __post_init__(self):
    if self.norm not in _NORMS:
      raise ValueError(f"DecoderConfig.norm must be one of {_NORMS}, got {self.norm!r}")
    if self.position not in _POSITIONS:
      raise ValueError(
          f"DecoderConfig.position must be one of {_POSITIONS}, got {self.position!r}")
    if self.mlp not in _MLPS:
      raise ValueError(f"DecoderConfig.mlp must be one of {_MLPS}, got {self.mlp!r}")
    for field in ("dtype", "param_dtype", "logits_via_embedding_dtype"):
      if field == "logits_via_embedding_dtype" and self.logits_via_embedding_dtype is None:
        continue
      if getattr(self, field) not in _DTYPES:
        raise ValueError(
            f"DecoderConfig.{field} must be one of {tuple(_DTYPES)}, "
            f"got {getattr(self, field)!r}")
    if self.attention_implementation not in ATTENTION_IMPLEMENTATIONS:
      raise ValueError(
          f"DecoderConfig.attention_implementation must be one of "
          f"{ATTENTION_IMPLEMENTATIONS}, got {self.attention_implementation!r}")
    if self.attention_implementation != "einsum" and self.attention_dropout > 0:
      raise ValueError(
          f"DecoderConfig.attention_implementation={self.attention_implementation!r} "
          f"has no attention dropout, but the attention dropout rate is "
          f"{self.attention_dropout} (attention_dropout_rate, else dropout_rate); "
          "set attention_dropout_rate=0.0 or use attention_implementation='einsum'")
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f"DecoderConfig.remat_policy must be one of {REMAT_POLICIES}, "
                       f"got {self.remat_policy!r}")
    if self.max_segments_per_row < 1:
      raise ValueError(
          f"DecoderConfig.max_segments_per_row must be >= 1, got {self.max_segments_per_row}")
    if self.segment_slot_multiple < 0:
      raise ValueError(f"DecoderConfig.segment_slot_multiple must be >= 0 (0: powers of "
                       f"two), got {self.segment_slot_multiple}")
    for field in ("triton_block", "triton_backward_block"):
      value = getattr(self, field)
      if value < 16 or value & (value - 1):
        raise ValueError(f"DecoderConfig.{field} must be a power of two >= 16, got {value}")
    if self.embed_dim % self.num_heads:
      raise ValueError(
          f"DecoderConfig.embed_dim={self.embed_dim} is not divisible by "
          f"num_heads={self.num_heads}")

  @property
  def head_dim(self) -> int:
    return self.embed_dim // self.num_heads

  @property
  def attention_dropout(self) -> float:
    """Dropout on attention probabilities (``dropout_rate`` unless overridden)."""
    if self.attention_dropout_rate is None:
      return self.dropout_rate
    return self.attention_dropout_rate

  @property
  def compute_dtype(self):
    return _DTYPES[self.dtype]

  @property
  def params_dtype(self):
    return _DTYPES[self.param_dtype]

  @property
  def logits_dtype(self):
    """The output projection's dtype (``logits_via_embedding_dtype``, else float32)."""
    return _DTYPES[self.logits_via_embedding_dtype or "float32"]

  def replace(self, **changes) -> "DecoderConfig":
    return dataclasses.replace(self, **changes)


_SIZES = {
    "tiny": dict(num_layers=4, num_heads=4, embed_dim=256, mlp_dim=1024, max_length=512),
    "gpt2_small": dict(num_layers=12, num_heads=12, embed_dim=768, mlp_dim=3072),
    "gpt2_medium": dict(num_layers=24, num_heads=16, embed_dim=1024, mlp_dim=4096),
}


@gin.configurable
def decoder_config(size: str = "tiny", vocab_size: int = gin.REQUIRED, **overrides) -> DecoderConfig:
  """Builds a named size ("tiny", "gpt2_small", "gpt2_medium") with overrides."""
  if size not in _SIZES:
    raise ValueError(f"unknown model size {size!r}; known: {sorted(_SIZES)}")
  return DecoderConfig(vocab_size=vocab_size, **{**_SIZES[size], **overrides})
