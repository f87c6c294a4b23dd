"""Mini-batch k-means in JAX: fit a codebook on frame features, assign units.

``fit_kmeans`` follows sklearn's ``MiniBatchKMeans`` (which fairseq's
``learn_kmeans.py`` uses for HuBERT units): greedy k-means++ initialisation on
a random subset, then Sculley-style mini-batch steps where every center keeps
the count ``v_c`` of points it has absorbed and moves to the running mean::

  batch x [B, D] -> nearest center c(x)
  n_c = #{x in batch: c(x) = c},  s_c = sum of those x
  center_c <- (center_c * v_c + s_c) / (v_c + n_c);   v_c <- v_c + n_c

(the per-center learning rate is 1 / (v_c + n_c)). No low-count center
reassignment (fairseq runs sklearn with ``reassignment_ratio=0``).

Data parallel: each mini-batch is sharded along its rows over a 1-D view of
all devices in ``mesh`` (default: every device); centers and counts are
replicated, and the per-center sums ``one_hot(c(x)).T @ x`` reduce across
devices inside the jitted step. A batch is padded with zero-weight rows up to
a multiple of the device count, so any batch size works.

Single-process: mini-batches are sampled on this host and placed with
``jax.device_put`` (multi-host fitting is not supported; k-means on ~10% of the
training frames fits one host).

Deterministic for a seed: the k-means++ init uses ``jax.random`` with
``seed``; mini-batch indices come from ``numpy.random.default_rng(seed)``.
Different device counts agree up to float summation order.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

_HIGHEST = jax.lax.Precision.HIGHEST


def _squared_distances(x: jax.Array, centers: jax.Array) -> jax.Array:
  """||x_i - c_k||^2 as [N, K], clamped at 0."""
  cross = jnp.dot(x, centers.T, precision=_HIGHEST)
  d2 = (jnp.sum(x * x, axis=1, keepdims=True) - 2.0 * cross
        + jnp.sum(centers * centers, axis=1)[None, :])
  return jnp.maximum(d2, 0.0)


@jax.jit
def _nearest(x: jax.Array, centers: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(index of the nearest center [N] int32, its squared distance [N])."""
  d2 = _squared_distances(x, centers)
  return jnp.argmin(d2, axis=1).astype(jnp.int32), jnp.min(d2, axis=1)


def _kmeans_plus_plus(points: jax.Array, num_clusters: int, key: jax.Array,
                      num_trials: int) -> jax.Array:
  """Greedy k-means++ (sklearn's ``_kmeans_plusplus``) over points [M, D].

  Each new center is the best of ``num_trials`` candidates sampled with
  probability proportional to the squared distance to the closest chosen
  center, "best" meaning the one that lowers the total potential most.
  """
  num_points = points.shape[0]
  key, first_key = jax.random.split(key)
  first = jax.random.randint(first_key, (), 0, num_points)
  centers = jnp.zeros((num_clusters, points.shape[1]), points.dtype)
  centers = centers.at[0].set(points[first])
  closest = _squared_distances(points, points[first][None])[:, 0]

  def add_center(i, carry):
    centers, closest, key = carry
    key, sample_key = jax.random.split(key)
    cumulative = jnp.cumsum(closest)
    targets = jax.random.uniform(sample_key, (num_trials,)) * cumulative[-1]
    candidates = jnp.clip(jnp.searchsorted(cumulative, targets), 0,
                          num_points - 1)
    candidate_d2 = _squared_distances(points, points[candidates])  # [M, T]
    new_closest = jnp.minimum(closest[:, None], candidate_d2)
    best = jnp.argmin(jnp.sum(new_closest, axis=0))
    centers = centers.at[i].set(points[candidates[best]])
    return centers, new_closest[:, best], key

  centers, _, _ = jax.lax.fori_loop(1, num_clusters, add_center,
                                    (centers, closest, key))
  return centers


def _minibatch_step(centers, counts, batch, weights):
  """One Sculley update; returns (centers, counts, weighted batch inertia)."""
  d2 = _squared_distances(batch, centers)
  nearest = jnp.argmin(d2, axis=1)
  assign = jax.nn.one_hot(nearest, centers.shape[0], dtype=batch.dtype)
  assign = assign * weights[:, None]
  batch_counts = jnp.sum(assign, axis=0)
  batch_sums = jnp.dot(assign.T, batch, precision=_HIGHEST)
  new_counts = counts + batch_counts
  rate = jnp.where(new_counts > 0, 1.0 / jnp.maximum(new_counts, 1e-12), 0.0)
  step = (batch_sums - batch_counts[:, None] * centers) * rate[:, None]
  centers = centers + step
  inertia = jnp.sum(jnp.min(d2, axis=1) * weights)
  return centers, new_counts, inertia


@dataclasses.dataclass(frozen=True, eq=False)
class Codebook:
  """K-means centers [K, D] with the name of the features they were fit on.

  Attributes:
    centers: float32 [K, D].
    extractor_name: feature extractor registry name ("whisper", "logmel",
      "npy", ...) or None when unknown.
    metadata: extra JSON-serialisable facts (seed, steps, batch size, ...).
  """

  centers: np.ndarray
  extractor_name: str | None = None
  metadata: dict[str, Any] = dataclasses.field(default_factory=dict)

  ASSIGN_CHUNK = 8192

  def __post_init__(self):
    centers = np.asarray(self.centers, np.float32)
    if centers.ndim != 2 or centers.shape[0] < 1:
      raise ValueError(f"Codebook centers must be [K, D] with K >= 1, got "
                       f"shape {centers.shape}")
    if not np.all(np.isfinite(centers)):
      raise ValueError("Codebook centers contain NaN or Inf")
    object.__setattr__(self, "centers", centers)

  @property
  def num_clusters(self) -> int:
    return int(self.centers.shape[0])

  @property
  def dim(self) -> int:
    return int(self.centers.shape[1])

  def _check(self, features: np.ndarray) -> np.ndarray:
    features = np.asarray(features, np.float32)
    if features.ndim != 2 or features.shape[1] != self.dim:
      raise ValueError(
          f"features of shape {features.shape} do not match the codebook "
          f"(dim {self.dim}, extractor {self.extractor_name!r})")
    return features

  def _nearest_chunked(self, features: np.ndarray):
    """Runs the jitted nearest-center search in fixed-size chunks.

    Inputs are padded up to a power of two (at most ``ASSIGN_CHUNK`` rows) so
    only a handful of shapes ever compile.
    """
    features = self._check(features)
    num = features.shape[0]
    if num == 0:
      return np.zeros((0,), np.int32), np.zeros((0,), np.float32)
    chunk = min(self.ASSIGN_CHUNK, 1 << max(4, (num - 1).bit_length()))
    centers = jnp.asarray(self.centers)
    indices, dists = [], []
    for start in range(0, num, chunk):
      part = features[start:start + chunk]
      rows = part.shape[0]
      if rows < chunk:
        part = np.pad(part, ((0, chunk - rows), (0, 0)))
      idx, d2 = _nearest(jnp.asarray(part), centers)
      indices.append(np.asarray(idx)[:rows])
      dists.append(np.asarray(d2)[:rows])
    return np.concatenate(indices), np.concatenate(dists)

  def assign(self, features: np.ndarray) -> np.ndarray:
    """Nearest center per frame: [T, D] -> int32 [T] in [0, K)."""
    return self._nearest_chunked(features)[0]

  def inertia(self, features: np.ndarray) -> float:
    """Sum over frames of the squared distance to the nearest center."""
    return float(np.sum(self._nearest_chunked(features)[1], dtype=np.float64))

  def save(self, path: str) -> None:
    """Writes ``.npz`` (centers + metadata) or ``.npy`` (centers only)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if path.endswith(".npy"):
      np.save(path, self.centers)
      return
    if not path.endswith(".npz"):
      raise ValueError(f"codebook path must end in .npz or .npy: {path}")
    meta = dict(self.metadata, extractor_name=self.extractor_name,
                num_clusters=self.num_clusters, dim=self.dim)
    np.savez(path, centers=self.centers, metadata=np.array(json.dumps(meta)))

  @classmethod
  def load(cls, path: str) -> Codebook:
    """Reads a codebook written by ``save`` (or a bare [K, D] ``.npy``)."""
    try:
      loaded = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as e:
      raise ValueError(f"cannot read codebook {path}: {e}") from e
    if isinstance(loaded, np.ndarray):
      return cls(loaded)
    with loaded:
      if "centers" not in loaded:
        raise ValueError(f"codebook {path} has no 'centers' array")
      centers = loaded["centers"]
      meta = json.loads(str(loaded["metadata"])) if "metadata" in loaded else {}
    extractor_name = meta.pop("extractor_name", None)
    for key, actual in (("num_clusters", centers.shape[0]),
                        ("dim", centers.shape[-1])):
      if key in meta and meta.pop(key) != actual:
        raise ValueError(f"codebook {path}: metadata {key} does not match the "
                         f"centers of shape {centers.shape}")
    return cls(centers, extractor_name=extractor_name, metadata=meta)


def _data_mesh(mesh: jax.sharding.Mesh | None) -> jax.sharding.Mesh:
  if mesh is not None:
    return mesh
  return jax.make_mesh((jax.device_count(),), ("data",),
                       axis_types=(jax.sharding.AxisType.Auto,))


def fit_kmeans(features: np.ndarray, num_clusters: int, *, seed: int = 0,
               batch_size: int = 10000, num_steps: int = 300,
               init_size: int | None = None,
               mesh: jax.sharding.Mesh | None = None,
               extractor_name: str | None = None,
               log_every: int = 50) -> Codebook:
  """Fits K centers to frame features [N, D] by mini-batch k-means.

  Args:
    features: [N, D] frames (e.g. pooled from ~10% of training utterances).
    num_clusters: K (the paper uses 2000).
    seed: fixes the k-means++ init and the mini-batch sample order.
    batch_size: frames per step, sampled with replacement (fairseq: 10000).
    num_steps: mini-batch steps.
    init_size: frames sampled (without replacement) for k-means++;
      default ``max(3 * batch_size, 3 * K)`` capped at N, as in sklearn.
    mesh: devices to shard each mini-batch over (all of its axes together);
      default a 1-D mesh of all devices. Pass a 1-device mesh to run unsharded.
    extractor_name: stored in the codebook's metadata.
    log_every: log the mini-batch inertia every this many steps.

  Returns:
    A ``Codebook`` with float32 centers [K, D].
  """
  features = np.asarray(features, np.float32)
  if features.ndim != 2:
    raise ValueError(
        f"fit_kmeans: features must be [N, D], got {features.shape}")
  num_points, dim = features.shape
  if num_clusters < 1 or num_points < num_clusters:
    raise ValueError(f"fit_kmeans: need 1 <= num_clusters <= N, got "
                     f"num_clusters={num_clusters}, N={num_points}")
  if batch_size < 1 or num_steps < 0:
    raise ValueError(f"fit_kmeans: bad batch_size={batch_size} or "
                     f"num_steps={num_steps}")
  for start in range(0, num_points, 1 << 20):  # no [N, D] boolean temporary
    if not np.all(np.isfinite(features[start:start + (1 << 20)])):
      raise ValueError("fit_kmeans: features contain NaN or Inf")

  rng = np.random.default_rng(seed)
  init_size = init_size or max(3 * batch_size, 3 * num_clusters)
  init_size = min(max(init_size, num_clusters), num_points)
  init_points = features[np.sort(rng.choice(num_points, init_size,
                                            replace=False))]
  num_trials = 2 + int(math.log(num_clusters))
  init_fn = jax.jit(_kmeans_plus_plus, static_argnums=(1, 3))
  centers = init_fn(jnp.asarray(init_points), num_clusters,
                    jax.random.key(seed), num_trials)

  mesh = _data_mesh(mesh)
  spec = jax.sharding.PartitionSpec
  replicated = jax.sharding.NamedSharding(mesh, spec())
  rows = jax.sharding.NamedSharding(mesh, spec(tuple(mesh.axis_names)))
  step_fn = jax.jit(
      _minibatch_step,
      in_shardings=(replicated, replicated, rows, rows),
      out_shardings=(replicated, replicated, replicated),
      donate_argnums=(0, 1))
  num_shards = mesh.devices.size
  padded_batch = -(-batch_size // num_shards) * num_shards
  weights = np.zeros((padded_batch,), np.float32)
  weights[:batch_size] = 1.0
  weights = jax.device_put(weights, rows)
  centers = jax.device_put(centers, replicated)
  counts = jax.device_put(np.zeros((num_clusters,), np.float32), replicated)
  padding = np.zeros((padded_batch - batch_size, dim), np.float32)
  for step in range(num_steps):
    # A fresh host array every step: on CPU device_put may alias host memory,
    # so a reused buffer could change under a step still in flight.
    batch = np.concatenate(
        [features[rng.integers(0, num_points, batch_size)], padding])
    centers, counts, inertia = step_fn(centers, counts,
                                       jax.device_put(batch, rows), weights)
    if log_every and (step + 1) % log_every == 0:
      logging.info("kmeans step %d/%d: mean batch inertia %.4f", step + 1,
                   num_steps, float(inertia) / batch_size)
  counts = np.asarray(counts)
  logging.info("kmeans done: K=%d, %d centers never updated", num_clusters,
               int(np.sum(counts == 0)))
  return Codebook(
      np.asarray(centers), extractor_name=extractor_name,
      metadata={"seed": seed, "batch_size": batch_size,
                "num_steps": num_steps, "init_size": init_size,
                "num_training_frames": num_points})
