"""Running a one-device attention kernel: under a device mesh, and as a
kernel or interpreted by the platform compiled for.

A Pallas kernel is one device's program: XLA cannot split it over a mesh.
Under a mesh (``jax.set_mesh``, as the trainer traces) it runs in
``jax.shard_map`` with the activations' own layout from the logical axis
rules: each device attends over its rows and its heads, e.g. rules
``batch -> (data, fsdp)``, ``heads -> model`` on a ``(2, 2, 2)`` mesh give
each device 1/4 of the rows and 1/2 of the heads, and no data moves. The
length axis must not be sharded (no sequence parallelism here).
"""

from __future__ import annotations

import functools
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp


def on_each_device(kernel: Callable[..., jax.Array], query: jax.Array, key: jax.Array,
                   value: jax.Array, segment_ids: jax.Array,
                   logical_axes: tuple[str, ...], name: str) -> jax.Array:
  """``kernel(query, key, value, segment_ids)`` (``[B, L, H, D]`` and ``[B, L]``),
  on each device's rows and heads under the current mesh, or as is without one.

  ``name`` (the ``attention_implementation``) goes into the error for a
  sharded length axis.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.size == 1:
    return kernel(query, key, value, segment_ids)
  spec = nn.logical_to_mesh_axes(logical_axes)
  if spec[1] is not None:
    raise ValueError(
        f"attention_implementation={name!r}: the length axis is sharded ({spec[1]!r} by the "
        f"logical axis rules); the kernel needs whole rows on each device")
  rows = jax.sharding.PartitionSpec(spec[0], None)
  return jax.shard_map(kernel, mesh=mesh, in_specs=(spec, spec, spec, rows), out_specs=spec,
                       check_vma=False)(query, key, value, segment_ids)


def kernel_or_interpreter(attend: Callable[..., jax.Array], platform: str, query: jax.Array,
                          key: jax.Array, value: jax.Array, segment_ids: jax.Array
                          ) -> jax.Array:
  """``attend(interpret, query, key, value, segment_ids)`` with
  ``interpret=False`` where the program is compiled for ``platform``
  ("cuda" for Triton, "tpu" for Mosaic; also ahead of time, without such a
  device: ``benchmarks/compile_only_gpu.py``), Pallas' interpreter elsewhere.
  The choice follows the compiled-for platform (``jax.lax.platform_dependent``),
  not the process's default backend. ``segment_ids`` go in as int32.
  """
  return jax.lax.platform_dependent(
      query, key, value, segment_ids.astype(jnp.int32),
      **{platform: functools.partial(attend, False)},
      default=functools.partial(attend, True))
