"""Test setup: eight host CPU devices for the data-parallel tests (set before jax is imported)."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import shutil  # noqa: E402
import tempfile  # noqa: E402

# One persistent XLA compilation cache for this test session, inherited by the pytest-xdist
# workers and by every training run the tests start in a subprocess: the same tiny steps are
# compiled once, not in each of ~60 processes (a cached executable is the compiled program itself,
# so results are unchanged). The process that made it (the xdist controller, or the one pytest
# process under -n 0) removes it at the session's end; a cache the user set is left alone.
_OWN_XLA_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_XLA_CACHE:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="bert_jax_tests_xla_cache_")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import pathlib  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402

# The shipped configs (`from configs import classify`) import in any test, whatever ran before.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

SHARED_DATA = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> pathlib.Path:
  """../shared/data beside the checkout; tests that need it skip, saying why, without it."""
  if not SHARED_DATA.is_dir():
    pytest.skip(f"shared data sets not found at {SHARED_DATA} (they live beside the checkout "
                "as ../shared/data on the developers' machines and in CI)")
  return SHARED_DATA


@pytest.fixture
def shard_small_arrays(monkeypatch):
  """Shard every array the fsdp width divides, so that the tiny test models really are split."""
  from bert_jax import sharding
  monkeypatch.setattr(sharding, "MIN_SHARDED_SIZE", 0)


def pytest_sessionfinish(session, exitstatus):
  if _OWN_XLA_CACHE:
    shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
