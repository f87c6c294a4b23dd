"""Reading a local Hugging Face GPT-2 directory: ``config.json`` and the weights.

``read_hf_config`` checks that the architecture is one the sld_jax decoder
runs (GPT-2, tanh GELU, scaled attention, no cross attention);
``read_hf_state`` returns every tensor as float32 numpy, named without the
``transformer.`` prefix, from ``model.safetensors``, a sharded
``model.safetensors.index.json`` or ``pytorch_model.bin`` (torch is imported
only for the latter). ``take_tensor`` pops one tensor, checking its shape,
with an error naming the tensor and the file.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Optional

import numpy as np
import safetensors.numpy

SUPPORTED_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
# Buffers some GPT-2 checkpoints carry; not parameters.
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")


@dataclasses.dataclass(frozen=True)
class HfGpt2Config:
  """The fields of a HF GPT-2 ``config.json`` that shape the weights."""

  n_layer: int
  n_head: int
  n_embd: int
  n_positions: int
  n_inner: int
  layer_norm_epsilon: float
  vocab_size: int
  eos_token_id: Optional[int]
  tie_word_embeddings: bool
  dropout: float


def read_json(path: str) -> dict:
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from e


def read_hf_config(model_dir: str) -> HfGpt2Config:
  """Reads and checks ``model_dir/config.json`` (a GPT-2 sld_jax can run)."""
  path = os.path.join(model_dir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"no HF GPT-2 config: {path} does not exist")
  raw = read_json(path)
  if raw.get("model_type") != "gpt2":
    raise ValueError(f"{path}: model_type is {raw.get('model_type')!r}, expected 'gpt2'")
  activation = raw.get("activation_function", "gelu_new")
  if activation not in SUPPORTED_ACTIVATIONS:
    raise ValueError(
        f"{path}: unsupported activation_function {activation!r}; the sld_jax MLP is "
        f"the tanh GELU, one of {SUPPORTED_ACTIVATIONS}")
  for field, supported in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                           ("add_cross_attention", False)):
    if raw.get(field, supported) != supported:
      raise ValueError(f"{path}: {field}={raw[field]!r} is not supported (need {supported})")
  try:
    n_embd = int(raw.get("n_embd", 768))
    eos = raw.get("eos_token_id", 50256)
    if isinstance(eos, list):
      eos = eos[0] if len(eos) == 1 else None
    return HfGpt2Config(
        n_layer=int(raw.get("n_layer", 12)), n_head=int(raw.get("n_head", 12)), n_embd=n_embd,
        n_positions=int(raw.get("n_positions", 1024)),
        n_inner=int(raw.get("n_inner") or 4 * n_embd),
        layer_norm_epsilon=float(raw.get("layer_norm_epsilon", 1e-5)),
        vocab_size=int(raw.get("vocab_size", 50257)),
        eos_token_id=None if eos is None else int(eos),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", True)),
        dropout=float(raw.get("resid_pdrop", 0.1)))
  except (TypeError, ValueError) as e:
    raise ValueError(f"{path}: bad GPT-2 config value: {e}") from e


def _torch_state(path: str) -> dict[str, np.ndarray]:
  import torch  # pylint: disable=g-import-not-at-top  # only for .bin checkpoints
  state = torch.load(path, map_location="cpu", weights_only=True)
  return {name: tensor.detach().float().numpy() for name, tensor in state.items()}


def read_hf_state(model_dir: str) -> tuple[dict[str, np.ndarray], str]:
  """All tensors of a HF GPT-2 checkpoint, names without ``transformer.``.

  Returns ``(tensors, source)``: float32 numpy arrays and the file(s) they
  came from (for error messages).
  """
  single = os.path.join(model_dir, "model.safetensors")
  index = os.path.join(model_dir, "model.safetensors.index.json")
  torch_file = os.path.join(model_dir, "pytorch_model.bin")
  if os.path.exists(single):
    files, source = [single], single
  elif os.path.exists(index):
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict):
      raise ValueError(f"{index}: no 'weight_map' object")
    files = [os.path.join(model_dir, name) for name in sorted(set(weight_map.values()))]
    source = index
  elif os.path.exists(torch_file):
    files, source = [torch_file], torch_file
  else:
    raise FileNotFoundError(
        f"no GPT-2 weights in {model_dir}: need model.safetensors, "
        "model.safetensors.index.json or pytorch_model.bin")
  state = {}
  for path in files:
    if not os.path.exists(path):
      raise FileNotFoundError(f"{source} names {path}, which does not exist")
    if path.endswith(".bin"):
      tensors = _torch_state(path)
    else:
      try:
        tensors = safetensors.numpy.load_file(path)
      except Exception as e:  # safetensors raises its own error types.
        raise ValueError(f"cannot read {path}: {e}") from e
    for name, value in tensors.items():
      state[name.removeprefix("transformer.")] = np.asarray(value, np.float32)
  return state, source


def take_tensor(state: dict[str, np.ndarray], name: str, shape: tuple[int, ...],
          source: str) -> np.ndarray:
  if name not in state:
    raise ValueError(
        f"GPT-2 checkpoint {source} lacks tensor {name!r} (looked for it with and "
        "without the 'transformer.' prefix)")
  value = state.pop(name)
  if value.shape != tuple(shape):
    raise ValueError(
        f"GPT-2 checkpoint {source}: tensor {name!r} has shape {value.shape}, "
        f"config.json implies {tuple(shape)}")
  return value
