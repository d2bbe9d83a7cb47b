"""Test setup shared by every test file.

Forces 8 host (CPU) devices so sharding paths run on any machine. XLA reads the flag when the
backend starts, so it is set here, before any test module imports jax. The environment set here
is inherited by pytest-xdist's workers and the processes tests start.
"""

import os
import shutil
import tempfile

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
# One folder for the session's caches, removed when the session ends.
if 'FEDJAX_LITE_TEST_CACHES' not in os.environ:
  os.environ['FEDJAX_LITE_TEST_CACHES'] = tempfile.mkdtemp(prefix='fedjax-lite-')
_ROOT = os.environ['FEDJAX_LITE_TEST_CACHES']
# Measuring the client chunk compiles several candidates per round shape: tests that check it
# turn it on; the others run the default chunk, as `--no-tune` does, and never read or write the
# user's layout cache.
os.environ['FEDJAX_LITE_TUNE'] = '0'
os.environ.setdefault('FEDJAX_LITE_CACHE_DIR', os.path.join(_ROOT, 'layouts'))
# Many tests compile the same rounds (the command's default job, a resumed run's program): one
# persistent compilation cache for the session loads them instead of compiling them again (a
# third of the suite's time). They are the same programs, so results are unchanged, and
# `jax_log_compiles` still logs each load as a compilation, so compile-count tests hold.
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', os.path.join(_ROOT, 'jax'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')


def pytest_sessionfinish(session):
  if not hasattr(session.config, 'workerinput'):  # the controller, once its workers are done
    shutil.rmtree(_ROOT, ignore_errors=True)
