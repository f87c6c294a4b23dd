"""Test-wide setup, before jax loads.

- 8 fake CPU devices for the sharding tests.
- Cheaper XLA CPU compilation: the suite compiles many tiny programs, and
  backend optimisation buys them nothing (numerics are unchanged).
- One data dir for the whole run, so the smoke corpus is built once (its
  preparation holds a file lock, so parallel workers wait for each other).
"""

import os
import tempfile

os.environ.setdefault(
    "XLA_FLAGS",
    "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 "
    "--xla_llvm_disable_expensive_passes=true")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("SLD_DATA_DIR", os.path.join(tempfile.gettempdir(), "sld_jax_test_data"))
