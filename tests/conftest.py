"""Shared test set-up: fresh random seeds (reproducible with MTA_TEST_SEED) and the slow marker."""

import os
import secrets
import zlib

import numpy as np
import pytest

# With the `compile` extra installed: test processes (xdist workers, CLI subprocesses) may load libtpu
# side by side, and the CUDA plugin must not print a traceback for the CUDA runtime this host lacks.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")

BASE_SEED = int(os.environ.get("MTA_TEST_SEED", secrets.randbelow(2**31)))


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


def pytest_report_header(config):
    return f"MTA_TEST_SEED={BASE_SEED} (set it to replay these random inputs)"


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip_slow = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip_slow)


@pytest.fixture
def seed(request) -> int:
    """A fresh seed per test and run; failures print it for replay."""
    value = (BASE_SEED + zlib.crc32(request.node.nodeid.encode())) % 2**31
    request.node.user_properties.append(("seed", value))
    print(f"seed={value} (MTA_TEST_SEED={BASE_SEED})")
    return value


@pytest.fixture
def rng(seed) -> np.random.Generator:
    return np.random.default_rng(seed)
