"""Test setup, before jax is imported anywhere: 8 CPU devices, and XLA's backend
optimisations off -- tests run a few steps of many models, so compiling, not
running, is what they spend their time on (this halves it)."""
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8"
                           " --xla_backend_optimization_level=0").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402  (after the flags above)

jax.config.update("jax_threefry_partitionable", True)
