"""Device mesh, logical axis rules and shardings derived from abstract state.

The mesh has three axes, MaxText style::

  'data'   pure data parallelism (batch split, parameters replicated)
  'fsdp'   batch split and parameters sharded along 'embed' (ZeRO-3 like)
  'model'  tensor parallelism over heads / mlp / vocab

Model code names array axes logically ('batch', 'embed', 'heads', ...);
``DEFAULT_LOGICAL_AXIS_RULES`` maps them to mesh axes. With mesh
``(data=2, fsdp=2, model=2)`` the token embedding ``[V, E]`` with axes
``('vocab', 'embed')`` gets ``PartitionSpec('model', 'fsdp')``, and a batch
``[B, L]`` gets ``PartitionSpec(('data', 'fsdp'), None)``.

Shardings come from an abstract init (nothing is allocated)::

  abstract, shardings = abstract_state(partial(decoder.init_params, config),
                                       jax.random.key(0), mesh=mesh, rules=rules)
  abstract['token_embedder']['embedding']
      # ShapeDtypeStruct(shape=(V, E), dtype=float32,
      #                  sharding=NamedSharding(mesh, PartitionSpec('model', 'fsdp')))
  params = jax.jit(lambda key: nn.meta.unbox(decoder.init_params(config, key)),
                   out_shardings=shardings)(jax.random.key(0))
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Mapping, Optional, Sequence

import flax.linen as nn
import gin
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "model")
BATCH_MESH_AXES = ("data", "fsdp")

LogicalRules = Sequence[tuple[str, Any]]

DEFAULT_LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "model"),
    ("heads", "model"),
    ("vocab", "model"),
    ("kv", None),
    ("length", None),
    ("abspos", None),
    ("layers", None),
    ("cache_batch", ("data", "fsdp")),
    ("cache_heads", "model"),
    ("cache_length", None),
    ("cache_kv", None),
)
gin.constant("sld_jax.partitioning.DEFAULT_LOGICAL_AXIS_RULES", DEFAULT_LOGICAL_AXIS_RULES)


@gin.configurable
def logical_axis_rules(overrides: LogicalRules = (),
                       base: LogicalRules = DEFAULT_LOGICAL_AXIS_RULES) -> tuple:
  """``overrides`` first (they take precedence), then ``base``.

  Gin: ``logical_axis_rules.overrides = [('embed', None)]`` turns FSDP off for
  parameters while keeping the batch split.
  """
  rules = tuple((name, tuple(axes) if isinstance(axes, list) else axes)
                for name, axes in (*overrides, *base))
  for name, axes in rules:
    mesh_axes = axes if isinstance(axes, tuple) else (axes,)
    unknown = [a for a in mesh_axes if a is not None and a not in MESH_AXES]
    if unknown:
      raise ValueError(
          f"logical axis rule {name!r} -> {axes!r} names unknown mesh axes {unknown}; "
          f"the mesh axes are {MESH_AXES}")
  return rules


@gin.configurable
def make_mesh(data: int = -1, fsdp: int = 1, model: int = 1,
              devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
  """A ``('data', 'fsdp', 'model')`` mesh; one size may be -1 (fill the rest).

  ``make_mesh(data=-1, model=2)`` on 8 devices is ``(4, 1, 2)``.
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = [data, fsdp, model]
  for name, size in zip(MESH_AXES, shape):
    if size == 0 or size < -1:
      raise ValueError(f"make_mesh: {name}={size}; sizes must be >= 1 or -1 (fill)")
  fills = [name for name, size in zip(MESH_AXES, shape) if size == -1]
  if len(fills) > 1:
    raise ValueError(f"make_mesh: only one axis may be -1, got {fills}")
  known = math.prod(size for size in shape if size != -1)
  if fills:
    if len(devices) % known:
      raise ValueError(
          f"make_mesh: {len(devices)} devices are not divisible by the fixed axes "
          f"{dict(zip(MESH_AXES, shape))} (product {known})")
    shape[shape.index(-1)] = len(devices) // known
  if math.prod(shape) != len(devices):
    raise ValueError(
        f"make_mesh: mesh {dict(zip(MESH_AXES, shape))} needs {math.prod(shape)} devices, "
        f"have {len(devices)}")
  return jax.make_mesh(tuple(shape), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


@contextlib.contextmanager
def sharding_context(mesh: Mesh, rules: LogicalRules = DEFAULT_LOGICAL_AXIS_RULES):
  """``jax.set_mesh(mesh)`` and ``nn.logical_axis_rules(rules)``: trace inside it.

  ``nn.with_logical_constraint`` in the model is a no-op outside; inside, it
  becomes a sharding constraint on ``mesh``.
  """
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield


def _check_rules_cover(specs: Any, rules: LogicalRules) -> None:
  known = {name for name, _ in rules}
  used = set()
  for spec in jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, PartitionSpec)):
    used.update(name for name in spec if isinstance(name, str))
  missing = sorted(used - known)
  if missing:
    raise ValueError(
        f"logical axes {missing} have no rule in the logical axis rules; add them "
        "(map to None to replicate)")


def logical_shardings(abstract_tree: Any, mesh: Mesh,
                      rules: LogicalRules = DEFAULT_LOGICAL_AXIS_RULES) -> Any:
  """``NamedSharding``s for a tree of ``LogicallyPartitioned`` boxes.

  The result has the structure of the *unboxed* tree; leaves without a box
  are replicated. Every logical axis name must appear in ``rules``.
  """
  specs = nn.get_partition_spec(abstract_tree)
  _check_rules_cover(specs, rules)
  return nn.logical_to_mesh_sharding(specs, mesh, rules)


def with_shardings(abstract_tree: Any, shardings: Any) -> Any:
  """``ShapeDtypeStruct``s of ``abstract_tree``'s shapes/dtypes carrying ``shardings``.

  Both trees have the same structure; the result is what ``jax.jit`` lowers
  against and what orbax restores into (any mesh shape).
  """
  return jax.tree.map(
      lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
      abstract_tree, shardings)


def abstract_state(init_fn: Callable[..., Any], *args, mesh: Optional[Mesh] = None,
                   rules: LogicalRules = DEFAULT_LOGICAL_AXIS_RULES) -> tuple[Any, Any]:
  """Shapes, dtypes and shardings of ``init_fn(*args)``; nothing is allocated.

  ``init_fn`` returns a tree boxed in ``nn.LogicallyPartitioned`` (e.g.
  ``decoder.init_params`` or a ``TrainState`` around it). It is traced with
  ``jax.eval_shape`` inside ``sharding_context(mesh, rules)`` and its logical
  axes become ``NamedSharding``s (``logical_shardings``).

  Returns:
    ``(abstract, shardings)``: the unboxed tree as ``jax.ShapeDtypeStruct``s
    carrying their shardings, and the ``NamedSharding`` tree (same
    structure) for ``jax.jit``'s in/out shardings. Without a ``mesh`` the
    structs carry no sharding and ``shardings`` is None (shapes only).
  """
  if mesh is None:
    boxed = jax.eval_shape(init_fn, *args)
    return jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype),
                        nn.meta.unbox(boxed)), None
  with sharding_context(mesh, rules):
    boxed = jax.eval_shape(init_fn, *args)
    shardings = logical_shardings(boxed, mesh, rules)
  return with_shardings(nn.meta.unbox(boxed), shardings), shardings


def data_sharding(mesh: Mesh, rank: int = 2) -> NamedSharding:
  """Batch axis over ``('data', 'fsdp')``, all other axes replicated."""
  if rank < 1:
    raise ValueError(f"data_sharding: rank must be >= 1, got {rank}")
  return NamedSharding(mesh, PartitionSpec(BATCH_MESH_AXES, *([None] * (rank - 1))))


def batch_shards(mesh: Mesh) -> int:
  """How many ways the batch axis is split."""
  return math.prod(mesh.shape[axis] for axis in BATCH_MESH_AXES)


def shard_host_batch(batch: Mapping[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
  """Host numpy features ``{name: [local_B, ...]}`` -> global sharded arrays.

  Each process passes its own rows; the global batch is the concatenation over
  processes, split over ``('data', 'fsdp')``.
  """
  local_shards = batch_shards(mesh) // jax.process_count() or 1
  out = {}
  for name, value in batch.items():
    value = np.asarray(value)
    if value.ndim < 1:
      raise ValueError(f"shard_host_batch: feature {name!r} is a scalar; need [batch, ...]")
    if value.shape[0] % local_shards:
      raise ValueError(
          f"shard_host_batch: feature {name!r} has local batch {value.shape[0]}, not "
          f"divisible by the {local_shards} local batch shards of mesh {dict(mesh.shape)}")
    out[name] = jax.make_array_from_process_local_data(data_sharding(mesh, value.ndim), value)
  return out
