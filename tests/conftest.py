"""Shared test set-up: fresh random seeds, one per session shared by xdist workers (reproducible with
MTA_TEST_SEED, printed in the header and the summary), and the slow marker."""

import os
import re
import secrets
import shutil
import tempfile
import zlib

import numpy as np
import pytest

# With the `compile` extra installed: test processes (xdist workers, CLI subprocesses) may load libtpu
# side by side, and the CUDA plugin must not print a traceback for the CUDA runtime this host lacks.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
# The tests' programs are tiny, so their time is XLA's compiling, not running: LLVM's cheapest code
# generation halves the CPU compiles (the HLO, and so every result up to float rounding, is the same).
FAST_COMPILE_FLAG = "--xla_backend_optimization_level=0"
if FAST_COMPILE_FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {FAST_COMPILE_FLAG}".strip()

SEED_KEY = "mta_test_seed"
BASE_SEED: int | None = None  # one per test session: drawn by the controller, sent to xdist workers
# A persistent XLA compilation cache for the session's `python -m train` subprocesses
# (tests/train_helpers.py): the same tiny model's steps compile once, not once per process.
XLA_CACHE_KEY = "MTA_TEST_XLA_CACHE"


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
    parser.addoption(
        "--seeded-only",
        action="store_true",
        default=False,
        help="keep only the tests that draw random inputs (the seed or rng fixture): for seed sweeps",
    )
    parser.addoption(
        "--sweep-seeds",
        default=None,
        metavar="FIRST-LAST",
        help="run every test that draws random inputs once per MTA_TEST_SEED in FIRST..LAST, in one "
        "process (compiles are shared); a failing [..sweepS] case replays with MTA_TEST_SEED=S",
    )


def pytest_configure(config):
    global BASE_SEED
    BASE_SEED = _session_seed(config)
    _sweep_seeds(config)  # a bad range is a usage error before collection
    workerinput = getattr(config, "workerinput", None)
    if workerinput is not None and XLA_CACHE_KEY in workerinput:
        os.environ[XLA_CACHE_KEY] = workerinput[XLA_CACHE_KEY]
    elif workerinput is None:  # the controller (or a run without xdist): one fresh cache per session
        config._mta_xla_cache = tempfile.mkdtemp(prefix="mta-test-xla-cache-")
        os.environ[XLA_CACHE_KEY] = config._mta_xla_cache


def pytest_unconfigure(config):
    cache = getattr(config, "_mta_xla_cache", None)
    if cache is not None:
        shutil.rmtree(cache, ignore_errors=True)


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node):
    """(pytest-xdist, on the controller) every worker gets the session's seed and compile cache."""
    node.workerinput[SEED_KEY] = BASE_SEED
    node.workerinput[XLA_CACHE_KEY] = os.environ[XLA_CACHE_KEY]


def _seed_line() -> str:
    return f"MTA_TEST_SEED={BASE_SEED} (set it to replay these random inputs)"


def pytest_report_header(config):
    return _seed_line()


def pytest_terminal_summary(terminalreporter):
    """The seed at the end too, where -q shows it."""
    terminalreporter.write_line(_seed_line())


def pytest_collection_modifyitems(config, items):
    if config.getoption("--seeded-only"):
        seeded = [item for item in items if "session_seed" in getattr(item, "fixturenames", ())]
        kept = {id(item) for item in seeded}
        config.hook.pytest_deselected(items=[item for item in items if id(item) not in kept])
        items[:] = seeded
    if config.getoption("--runslow"):
        return
    skip_slow = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip_slow)


def _sweep_seeds(config) -> list[int]:
    text = config.getoption("--sweep-seeds")
    if text is None:
        return []
    match = re.fullmatch(r"(\d+)-(\d+)", text)
    if not match or int(match[1]) > int(match[2]):
        raise pytest.UsageError(f"--sweep-seeds={text!r} is invalid: must be FIRST-LAST, e.g. 1-20")
    return list(range(int(match[1]), int(match[2]) + 1))


def pytest_generate_tests(metafunc):
    """With --sweep-seeds, every test that uses the session seed runs once per seed of the range."""
    seeds = _sweep_seeds(metafunc.config)
    if seeds and "session_seed" in metafunc.fixturenames:
        metafunc.parametrize("session_seed", seeds, indirect=True, ids=[f"sweep{s}" for s in seeds])


@pytest.fixture
def session_seed(request) -> int:
    """MTA_TEST_SEED (or the drawn one); under --sweep-seeds, this case's seed of the sweep."""
    return getattr(request, "param", BASE_SEED)


def _unswept_nodeid(nodeid: str) -> str:
    """The node id without --sweep-seeds' id, so a swept case replays under MTA_TEST_SEED alone."""
    nodeid = re.sub(r"\[sweep\d+\]$", "", nodeid)
    return re.sub(r"-sweep\d+(?=[-\]])|sweep\d+-", "", nodeid)


@pytest.fixture
def seed(request, session_seed) -> int:
    """A fresh seed per test and run; failures print it for replay."""
    value = (session_seed + zlib.crc32(_unswept_nodeid(request.node.nodeid).encode())) % 2**31
    request.node.user_properties.append(("seed", value))
    print(f"seed={value} (MTA_TEST_SEED={session_seed})")
    return value


@pytest.fixture
def rng(seed) -> np.random.Generator:
    return np.random.default_rng(seed)
