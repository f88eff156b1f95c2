"""Checkpointer: exact round trips, Grain iterator resumption, retention, corrupt checkpoints, resharding."""

import logging
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from train.checkpoint import CheckpointConfig, Checkpointer, CheckpointRestoreError

REPO = Path(__file__).resolve().parents[1]


def make_state(rng: np.random.Generator) -> dict:
    params = {
        "w": jnp.asarray(rng.standard_normal((4, 6)), jnp.float32),
        "emb": jnp.asarray(rng.standard_normal((5, 3)), jnp.bfloat16),
        "ids": jnp.asarray(rng.integers(-100, 100, (7,)), jnp.int32),
    }
    opt = optax.adamw(1e-3).init(params)
    opt = jax.tree.map(lambda x: x + jnp.asarray(rng.standard_normal(x.shape), x.dtype), opt)  # not zeros
    key = jax.random.key_data(jax.random.key(int(rng.integers(2**31))))
    return {"params": params, "opt": opt, "key": key, "step": jnp.asarray(17, jnp.int32)}


def abstract(state):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def assert_same(actual, expected) -> None:
    assert jax.tree.structure(actual) == jax.tree.structure(expected)
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        assert a.dtype == e.dtype and a.shape == e.shape
        np.testing.assert_array_equal(np.asarray(a), np.asarray(e))


def make_iterator():
    return iter(grain.MapDataset.range(1000).shuffle(seed=1).batch(4).to_iter_dataset())


@pytest.mark.parametrize("async_save", [True, False])
def test_round_trip_is_exact(tmp_path, rng, async_save):
    state = make_state(rng)
    with Checkpointer(tmp_path, CheckpointConfig(every=5, async_save=async_save)) as ckpt:
        assert ckpt.restore_latest(abstract(state)) is None  # empty directory
        assert ckpt.save(10, state)
    with Checkpointer(tmp_path, CheckpointConfig(every=5)) as ckpt:
        step, restored = ckpt.restore_latest(abstract(state))
    assert step == 10
    assert type(restored["opt"][0]) is type(state["opt"][0])  # optax ScaleByAdamState namedtuple
    assert_same(restored, state)


def test_state_may_be_donated_right_after_an_async_save(tmp_path, rng):
    state = make_state(rng)
    expected = jax.tree.map(np.asarray, state)
    update = jax.jit(lambda s: jax.tree.map(lambda x: x + 1, s), donate_argnums=0)
    with Checkpointer(tmp_path, CheckpointConfig(every=1, async_save=True)) as ckpt:
        assert ckpt.save(1, state)
        state = update(state)  # the saved buffers are reused while the write may still be running
        jax.block_until_ready(state)
        ckpt.wait()
        _, restored = ckpt.restore_latest(abstract(state))
    assert_same(restored, expected)


def test_iterator_resumes_with_the_same_batches(tmp_path, rng):
    state = make_state(rng)
    it = make_iterator()
    k = int(rng.integers(1, 20))
    for _ in range(k):
        next(it)
    with Checkpointer(tmp_path, CheckpointConfig(every=1)) as ckpt:
        ckpt.save(k, state, it)
        expected = [next(it) for _ in range(5)]  # advancing right after an async save must not leak in
    fresh = make_iterator()
    assert not np.array_equal(next(iter(make_iterator())), expected[0])
    with Checkpointer(tmp_path, CheckpointConfig(every=1)) as ckpt:
        step, _ = ckpt.restore_latest(abstract(state), fresh)
    assert step == k
    for batch in expected:
        np.testing.assert_array_equal(next(fresh), batch)


def test_every_keep_and_saving_a_step_twice(tmp_path, rng):
    state = make_state(rng)
    with Checkpointer(tmp_path, CheckpointConfig(every=3, keep=2)) as ckpt:
        saved = [step for step in range(1, 11) if ckpt.save(step, state)]
        assert saved == [3, 6, 9]
        assert ckpt.save(10, state, force=True)
        assert not ckpt.save(10, state, force=True)  # final forced save after a save of the same step
        assert not ckpt.save(9, state, force=True)
        ckpt.wait()
        assert ckpt.latest_step() == 10
    assert sorted(int(p.name) for p in tmp_path.iterdir() if p.name.isdigit()) == [9, 10]


def test_corrupt_latest_falls_back_and_half_written_is_ignored(tmp_path, rng, caplog):
    old, new = make_state(rng), make_state(rng)
    with Checkpointer(tmp_path, CheckpointConfig(every=1)) as ckpt:
        ckpt.save(1, old)
        ckpt.save(2, new)
    for path in (tmp_path / "2" / "state").rglob("*"):
        if path.is_file():
            path.write_bytes(os.urandom(max(path.stat().st_size // 2, 1)))
    (tmp_path / "3.orbax-checkpoint-tmp-1234" / "state").mkdir(parents=True)  # an interrupted save
    with Checkpointer(tmp_path, CheckpointConfig(every=1)) as ckpt:
        assert ckpt.latest_step() == 2
        with caplog.at_level(logging.WARNING, logger="train.checkpoint"):
            step, restored = ckpt.restore_latest(abstract(old))
        assert step == 1
        assert_same(restored, old)
        assert any("step 2" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
        assert ckpt.save(2, restored)  # the unreadable step 2 is replaced by the resumed run
    assert not list(tmp_path.glob("*orbax-checkpoint-tmp*"))
    with Checkpointer(tmp_path, CheckpointConfig(every=1)) as ckpt:
        step, restored = ckpt.restore_latest(abstract(old))
    assert step == 2
    assert_same(restored, old)


def test_none_restorable_raises(tmp_path, rng):
    state = make_state(rng)
    with Checkpointer(tmp_path, CheckpointConfig(every=1)) as ckpt:
        ckpt.save(1, state)
    for path in (tmp_path / "1" / "state").rglob("*"):
        if path.is_file():
            path.unlink()
    with Checkpointer(tmp_path, CheckpointConfig(every=1)) as ckpt:
        with pytest.raises(CheckpointRestoreError, match="step 1"):
            ckpt.restore_latest(abstract(state))


@pytest.mark.parametrize(
    "kwargs", [{"every": 0}, {"keep": 0}, {"every": 2.0}, {"keep": True}, {"async_save": "yes"}]
)
def test_bad_config(kwargs):
    ((field, value),) = kwargs.items()
    with pytest.raises(ValueError, match=re.escape(f"{field}={value!r} is invalid")):
        CheckpointConfig(**kwargs)


RESHARD = """
import sys
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from train.checkpoint import CheckpointConfig, Checkpointer

assert jax.device_count() == 8
devices = np.asarray(jax.devices())
x = np.arange(8 * 24, dtype=np.float32).reshape(8, 24) * 0.5
source = NamedSharding(Mesh(devices.reshape(2, 4), ("fsdp", "tensor")), P("fsdp", "tensor"))
state = {"w": jax.device_put(x, source), "b": jax.device_put(x[0], NamedSharding(source.mesh, P("tensor")))}
with Checkpointer(sys.argv[1], CheckpointConfig(every=1)) as ckpt:
    ckpt.save(7, state)
for shape in [(4, 2), (8, 1)]:
    mesh = Mesh(devices.reshape(shape), ("fsdp", "tensor"))
    target = {"w": NamedSharding(mesh, P("fsdp", "tensor")), "b": NamedSharding(mesh, P("fsdp"))}
    abstract = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=target[k]) for k, v in state.items()}
    with Checkpointer(sys.argv[1], CheckpointConfig(every=1)) as ckpt:
        step, restored = ckpt.restore_latest(abstract)
    assert step == 7
    for k in state:
        assert restored[k].sharding == target[k], (k, restored[k].sharding)
        np.testing.assert_array_equal(np.asarray(restored[k]), np.asarray(state[k]))
    assert restored["w"].addressable_shards[0].data.shape == (8 // shape[0], 24 // shape[1])
print("RESHARD OK")
"""


def test_restore_onto_a_different_mesh(tmp_path):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(RESHARD), str(tmp_path)],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0 and "RESHARD OK" in result.stdout, result.stderr[-4000:]
