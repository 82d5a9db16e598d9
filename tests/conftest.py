"""Test setup: 8 virtual CPU devices for sharding tests, float32 matmuls."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import jax  # noqa: E402
from absl import flags  # noqa: E402

# pytest is not an absl app: parse (no) flags so that grain's worker processes,
# which read absl flags, start as they do under launch/'s absl entry points.
flags.FLAGS(["pytest"])

jax.config.update("jax_default_matmul_precision", "highest")
