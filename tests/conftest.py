"""Shared test set-up: fresh random seeds, one per session shared by xdist workers (reproducible with
MTA_TEST_SEED, printed in the header and the summary), and the slow marker."""

import os
import secrets
import zlib

import numpy as np
import pytest

# With the `compile` extra installed: test processes (xdist workers, CLI subprocesses) may load libtpu
# side by side, and the CUDA plugin must not print a traceback for the CUDA runtime this host lacks.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")

SEED_KEY = "mta_test_seed"
BASE_SEED: int | None = None  # one per test session: drawn by the controller, sent to xdist workers


def _session_seed(config) -> int:
    """The worker's seed from the controller; on the controller MTA_TEST_SEED, else a fresh one."""
    workerinput = getattr(config, "workerinput", None)
    if workerinput is not None and SEED_KEY in workerinput:
        return int(workerinput[SEED_KEY])
    text = os.environ.get("MTA_TEST_SEED")
    if text is None:
        return secrets.randbelow(2**31)
    try:
        return int(text)
    except ValueError:
        raise pytest.UsageError(f"MTA_TEST_SEED={text!r} is invalid: must be an integer") from None


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")


def pytest_configure(config):
    global BASE_SEED
    BASE_SEED = _session_seed(config)


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node):
    """(pytest-xdist, on the controller) every worker gets the session's seed."""
    node.workerinput[SEED_KEY] = BASE_SEED


def _seed_line() -> str:
    return f"MTA_TEST_SEED={BASE_SEED} (set it to replay these random inputs)"


def pytest_report_header(config):
    return _seed_line()


def pytest_terminal_summary(terminalreporter):
    """The seed at the end too, where -q shows it."""
    terminalreporter.write_line(_seed_line())


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
