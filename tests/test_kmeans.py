"""Tests for sld_jax.speech.kmeans: fit, assign, sharding, save/load."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from sld_jax.speech.kmeans import Codebook
from sld_jax.speech.kmeans import fit_kmeans

NUM_BLOBS = 8
DIM = 16


def _one_device_mesh():
  return jax.make_mesh((1,), ("data",), axis_types=(jax.sharding.AxisType.Auto,),
                       devices=jax.devices()[:1])


@pytest.fixture(scope="module")
def blobs():
  rng = np.random.default_rng(1)
  means = rng.normal(size=(NUM_BLOBS, DIM)) * 8.0
  labels = rng.integers(0, NUM_BLOBS, size=4000)
  points = means[labels] + rng.normal(size=(4000, DIM))
  return points.astype(np.float32), labels, means


def _naive_lloyd(points, init, iterations=50):
  centers = init.astype(np.float64).copy()
  for _ in range(iterations):
    d2 = ((points[:, None, :] - centers[None]) ** 2).sum(-1)
    nearest = d2.argmin(1)
    for k in range(len(centers)):
      if np.any(nearest == k):
        centers[k] = points[nearest == k].mean(0)
  return centers


def _brute_force_nearest(points, centers):
  d2 = ((points[:, None, :].astype(np.float64) - centers[None]) ** 2).sum(-1)
  return d2.argmin(1), d2.min(1)


@pytest.fixture(scope="module")
def codebook(blobs):
  points, _, _ = blobs
  return fit_kmeans(points, NUM_BLOBS, seed=0, batch_size=256, num_steps=60,
                    extractor_name="logmel")


def test_recovers_blobs_like_lloyd(blobs, codebook):
  points, labels, means = blobs
  # Lloyd's from one point of each blob: the global optimum on these blobs.
  lloyd = _naive_lloyd(points, points[[np.flatnonzero(labels == k)[0]
                                       for k in range(NUM_BLOBS)]])
  assert codebook.centers.shape == (NUM_BLOBS, DIM)
  # Every true blob owns exactly one center, close to its mean and to Lloyd's.
  ours_to_true = _brute_force_nearest(codebook.centers, means)[0]
  assert sorted(ours_to_true) == list(range(NUM_BLOBS))
  order = np.argsort(ours_to_true)
  np.testing.assert_allclose(codebook.centers[order], means, atol=0.3)
  np.testing.assert_allclose(codebook.centers[order], lloyd, atol=0.15)
  # The partition is the true one.
  assigned = codebook.assign(points)
  np.testing.assert_array_equal(ours_to_true[assigned], labels)
  assert codebook.extractor_name == "logmel"


def test_assign_and_inertia_equal_brute_force(codebook):
  rng = np.random.default_rng(5)
  # Points anywhere, including between blobs; longer than one assign chunk.
  queries = (rng.normal(size=(Codebook.ASSIGN_CHUNK + 1000, DIM)) * 10).astype(
      np.float32)
  nearest, d2 = _brute_force_nearest(queries, codebook.centers)
  got = codebook.assign(queries)
  assert got.dtype == np.int32 and got.shape == (len(queries),)
  np.testing.assert_array_equal(got, nearest)
  np.testing.assert_allclose(codebook.inertia(queries), d2.sum(), rtol=1e-4)
  assert codebook.assign(queries[:0]).shape == (0,)
  with pytest.raises(ValueError, match=r"shape \(3, 5\) do not match.*dim 16"):
    codebook.assign(np.zeros((3, 5), np.float32))


def test_deterministic_for_a_seed(blobs, codebook):
  points, _, _ = blobs
  again = fit_kmeans(points, NUM_BLOBS, seed=0, batch_size=256, num_steps=60)
  np.testing.assert_array_equal(again.centers, codebook.centers)
  other = fit_kmeans(points, NUM_BLOBS, seed=1, batch_size=256, num_steps=60)
  assert not np.array_equal(other.centers, codebook.centers)


@pytest.mark.parametrize("batch_size", [256, 100])  # 100 is padded to 104
def test_sharded_over_8_devices_equals_one_device(blobs, batch_size):
  assert jax.device_count() == 8, "tests/conftest.py sets 8 fake CPU devices"
  points, _, _ = blobs
  sharded = fit_kmeans(points[:1500], 12, seed=3, batch_size=batch_size,
                       num_steps=40)
  single = fit_kmeans(points[:1500], 12, seed=3, batch_size=batch_size,
                      num_steps=40, mesh=_one_device_mesh())
  np.testing.assert_allclose(sharded.centers, single.centers, atol=1e-4)


def test_save_load_round_trip(tmp_path, codebook):
  path = str(tmp_path / "sub" / "codebook.npz")
  codebook.save(path)
  loaded = Codebook.load(path)
  np.testing.assert_array_equal(loaded.centers, codebook.centers)
  assert loaded.extractor_name == "logmel"
  assert (loaded.num_clusters, loaded.dim) == (NUM_BLOBS, DIM)
  assert loaded.metadata["seed"] == 0 and loaded.metadata["num_steps"] == 60

  npy = str(tmp_path / "centers.npy")
  codebook.save(npy)
  bare = Codebook.load(npy)
  np.testing.assert_array_equal(bare.centers, codebook.centers)
  assert bare.extractor_name is None


def test_bad_inputs(tmp_path, blobs):
  points, _, _ = blobs
  with pytest.raises(ValueError, match="num_clusters <= N"):
    fit_kmeans(points[:5], 8)
  with pytest.raises(ValueError, match="NaN"):
    fit_kmeans(np.full((20, 2), np.nan, np.float32), 2)
  with pytest.raises(ValueError, match=r"must be \[N, D\]"):
    fit_kmeans(points[:, 0], 2)
  junk = tmp_path / "junk.npz"
  junk.write_bytes(b"garbage")
  with pytest.raises(ValueError, match="cannot read codebook .*junk.npz"):
    Codebook.load(str(junk))
  with pytest.raises(ValueError, match="must end in .npz or .npy"):
    Codebook(np.zeros((2, 2))).save(str(tmp_path / "c.txt"))
  with pytest.raises(ValueError, match=r"\[K, D\]"):
    Codebook(np.zeros((3,)))
