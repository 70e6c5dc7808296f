"""Test setup: 8 fake CPU devices (set before JAX is imported) and parsed absl flags
(Grain reads absl flags; under pytest nobody parses them)."""
import atexit
import os
import shutil
import tempfile

# LLVM optimisation level 0: the tests' programs are tiny, so compiling dominates; this
# halved the D2iT sharding test (64 s -> 39 s) on the 2-core dev machine.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8"
                           " --xla_backend_optimization_level=0").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402
from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()
jax.config.update("jax_threefry_partitionable", True)
# Compiled programs are cached for the session (a fresh directory each run, shared through
# the environment by the xdist workers and every subprocess a test starts): tests that build
# the same model and shapes again (a second data source, a resumed CLI run, the second
# process pair of the multi-host test) skip the compile.
_OWN_CACHE = "JAXDIT_TEST_XLA_CACHE" not in os.environ  # the pytest controller makes it
os.environ.setdefault("JAXDIT_TEST_XLA_CACHE", tempfile.mkdtemp(prefix="jaxdit_xla_cache_"))
if _OWN_CACHE:
    atexit.register(shutil.rmtree, os.environ["JAXDIT_TEST_XLA_CACHE"], ignore_errors=True)
os.environ["JAX_COMPILATION_CACHE_DIR"] = os.environ["JAXDIT_TEST_XLA_CACHE"]
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0.5"
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


@pytest.fixture(scope="session", autouse=True)
def _check_devices():
    assert jax.device_count() == 8, "tests need 8 fake CPU devices (XLA_FLAGS set too late?)"
