"""Test setup: eight host CPU devices for the data-parallel tests (set before jax is imported)."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

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
