"""Test setup shared by every test file.

Forces 8 host (CPU) devices so sharding paths run on any machine. XLA reads the flag when the
backend starts, so it is set here, before any test module imports jax.
"""

import os

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
