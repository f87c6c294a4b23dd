"""A GPU to compile for on a machine without one (XLA's deviceless AOT).

XLA's CUDA plugin can describe a GPU from a target configuration alone
(``GpuTargetConfigProto``: core count, memory, bandwidth, compute
capability, cuDNN version) and compile for it without a driver: the
executable's ``memory_analysis()`` is the GPU buffer assignment's, and
``as_text()`` is the optimized GPU program (its fusions, cuDNN and GEMM
calls), which ``hlo_roofline.py`` reads. Nothing can run on such a device.
What this needs is the CUDA plugin beside the CPU jaxlib, not a GPU::

  pip install "jax[cuda13]==0.10.2"      # the plugin and the CUDA libraries
  JAX_PLATFORMS=cpu python benchmarks/accelerator_step.py --memory_only \\
      --target h200 --sizes gpt2_medium --variants packed --hlo_dir /tmp/hlo

Without autotuning (there is no device to time candidates on), XLA picks its
GEMM tilings by heuristics: the fusion structure and the memory footprint are
what the GPU would get, the kernels' own speed is not measured.

``TARGETS`` holds the H200 and H100 SXM datasheet figures (132 SMs, 141 and
80 GB of HBM at 4.8 and 3.35 TB/s, compute capability 9.0, cuDNN 9.10).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import jax

# Datasheet figures: streaming multiprocessors, their limits, memory and clocks.
_HOPPER = dict(
    threads_per_block_limit=1024, threads_per_warp=32, shared_memory_per_block=49152,
    shared_memory_per_core=233472, threads_per_core_limit=2048, core_count=132,
    fpus_per_core=128, block_dim_limit_x=2147483647, block_dim_limit_y=65535,
    block_dim_limit_z=65535, l2_cache_size=52428800, clock_rate_ghz=1.98,
    shared_memory_per_block_optin=232448, registers_per_core_limit=65536,
    registers_per_block_limit=65536)
TARGETS = {
    "h200": dict(_HOPPER, memory_bandwidth=4_800_000_000_000,
                 device_memory_size=151_397_597_184, name="NVIDIA H200 141GB HBM3e"),
    "h100": dict(_HOPPER, memory_bandwidth=3_352_320_000_000,
                 device_memory_size=84_942_979_072, name="NVIDIA H100 80GB HBM3"),
}
COMPUTE_CAPABILITY = (9, 0)
CUDNN_VERSION = (9, 10, 0)


def target_config(target: str) -> str:
  """The ``GpuTargetConfigProto`` text of a known GPU (``TARGETS``)."""
  if target not in TARGETS:
    raise ValueError(f"unknown GPU target {target!r}; known: {sorted(TARGETS)}")
  spec = dict(TARGETS[target])
  name = spec.pop("name")
  fields = "\n".join(f"  {key}: {value}" for key, value in spec.items())
  major, minor = COMPUTE_CAPABILITY
  cudnn_major, cudnn_minor, cudnn_patch = CUDNN_VERSION
  return (f"gpu_device_info {{\n{fields}\n"
          f"  cuda_compute_capability {{ major: {major} minor: {minor} }}\n}}\n"
          f'platform_name: "CUDA"\n'
          f"dnn_version_info {{ major: {cudnn_major} minor: {cudnn_minor} "
          f"patch: {cudnn_patch} }}\n"
          f'device_description_str: "{name}"\n')


def compile_only_device(target: str) -> jax.Device:
  """One compile-only device of ``target``; needs the CUDA plugin (module docstring)."""
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  try:
    topology = topologies.get_topology_desc(target, "cuda", target_config=target_config(target),
                                            topology="1x1x1")
  except Exception as error:  # pylint: disable=broad-except  (say what is missing)
    raise RuntimeError(
        f"cannot describe a {target} without a GPU: {type(error).__name__}: {error}. "
        "Compiling for a GPU needs jax's CUDA plugin: pip install "
        f'"jax[cuda13]=={jax.__version__}"') from error
  return topology.devices[0]


@contextlib.contextmanager
def cudnn_capability_of(device: jax.Device) -> Iterator[None]:
  """Answers jax's cuDNN compute-capability checks from ``device``, not the live backend.

  ``jax.nn.dot_product_attention(implementation="cudnn")`` checks what the
  running backend's first GPU can do (Hopper for the packed layout); with
  compile-only devices the running backend is the CPU, so those checks would
  refuse. Inside this context they read ``device.compute_capability``.
  """
  from jax._src.cudnn import fused_attention_stablehlo as cudnn  # pylint: disable=g-import-not-at-top
  current = _version(device.compute_capability)
  saved = cudnn.check_compute_capability, cudnn.is_cuda_compute_capability_equal
  cudnn.check_compute_capability = lambda capability: current >= _version(capability)
  cudnn.is_cuda_compute_capability_equal = lambda capability: current == _version(capability)
  try:
    yield
  finally:
    cudnn.check_compute_capability, cudnn.is_cuda_compute_capability_equal = saved


def _version(text: str) -> tuple[int, ...]:
  return tuple(int(x) for x in text.split("."))
