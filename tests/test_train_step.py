"""The jitted train step: its loss against an independent computation, gradient accumulation, and
sharded runs (8 fake CPU devices in a subprocess) against a single device."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from mta_jax.config import model_config_from_dict
from tests.train_helpers import ROOT, TINY, cli_env
from train.data import DataConfig, train_iterator
from train.mesh import MeshConfig, batch_sharding, make_mesh, replicated
from train.optim import OptimizerConfig, learning_rate_schedule, make_optimizer
from train.state import abstract_model, init_state, state_shardings
from train.step import jit_steps, make_eval_step, make_train_step

# Without dropout: these tests compare steps whose dropout keys differ (microbatches, an unmasked loss).
MODEL = model_config_from_dict({**TINY["model"], "mta": {**TINY["model"]["mta"], "dropout_rate": 0.0}})
DATA = DataConfig(**TINY["data"])


def _setup(microbatches: int, mesh, steps: int = 3, tx=None):
    opt = OptimizerConfig(learning_rate=3e-3, warmup_steps=1)
    tx = make_optimizer(opt, steps) if tx is None else tx
    _, shardings = state_shardings(MODEL, tx, mesh)
    graphdef, _, rest = abstract_model(MODEL)
    train, evaluate = jit_steps(
        make_train_step(graphdef, rest, tx, learning_rate_schedule(opt, steps), microbatches),
        make_eval_step(graphdef, rest),
        shardings,
        batch_sharding(mesh),
        replicated(mesh),
    )
    return init_state(MODEL, tx, 0, shardings), train, evaluate, graphdef, rest


def _batches(seed: int, count: int, batch: int = 8) -> list[dict]:
    it = train_iterator(DATA, batch, seed=seed)
    return [next(it) for _ in range(count)]


def test_loss_and_eval_sums_match_an_independent_computation(seed):
    mesh = make_mesh(MeshConfig(data=1), jax.devices()[:1])
    state, train, evaluate, graphdef, rest = _setup(1, mesh)
    batch = _batches(seed, 1)[0]
    model = nnx.merge(graphdef, nnx.State(jax.device_get(state["params"])), rest)
    logits = np.asarray(
        model(
            jnp.asarray(batch["inputs"]),
            positions=jnp.asarray(batch["positions"]),
            segment_ids=jnp.asarray(batch["segment_ids"]),
        ),
        np.float64,
    )
    logp = (
        logits
        - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
        - logits.max(-1, keepdims=True)
    )
    nll = -np.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
    want = (nll * batch["weights"]).sum() / batch["weights"].sum()
    sums = jax.device_get(evaluate(state["params"], batch))
    _, metrics = train(state, batch)
    np.testing.assert_allclose(float(metrics["loss"]), want, rtol=1e-5)
    assert float(metrics["target_tokens"]) == batch["weights"].sum() > 0
    # The eval sums: the same loss, and argmax accuracy / wrong rows counted here by hand.
    np.testing.assert_allclose(sums["loss"] / sums["weight"], want, rtol=1e-5)
    wrong = (logits.argmax(-1) != batch["targets"]) & (batch["weights"] > 0)
    assert sums["correct"] == (batch["weights"] * ~wrong).sum()
    assert sums["wrong_rows"] == wrong.any(-1).sum() and sums["rows"] == (batch["weights"] > 0).any(-1).sum()


def test_accumulating_four_microbatches_equals_one_step_on_the_whole_batch(seed):
    mesh = make_mesh(MeshConfig(data=1), jax.devices()[:1])
    batches = _batches(seed, 2)
    results = []
    # Plain SGD with rate 1: the parameters move by exactly the gradient (Adam would amplify float noise
    # in near-zero gradient entries into visible parameter differences).
    for microbatches in (1, 4):
        state, train, _, _, _ = _setup(microbatches, mesh, tx=optax.sgd(1.0))
        losses = []
        for batch in batches:
            state, metrics = train(state, batch)
            losses.append(float(metrics["loss"]))
        results.append((losses, jax.device_get(state["params"]), float(metrics["grad_norm"])))
    (losses1, params1, norm1), (losses4, params4, norm4) = results
    np.testing.assert_allclose(losses4, losses1, rtol=1e-6)
    np.testing.assert_allclose(norm4, norm1, rtol=1e-5)
    # float32 sums in another order, over two steps: relative differences up to ~3e-5 were seen.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), params4, params1)
    # The parameters did move: the comparison is not between two untouched initialisations.
    fresh = jax.device_get(_setup(1, mesh, tx=optax.sgd(1.0))[0]["params"])
    moved = jax.tree.leaves(jax.tree.map(lambda a, b: np.abs(a - b).max(), params1, fresh))
    assert max(moved) > 1e-4


SHARDED = textwrap.dedent(
    """
    import jax, numpy as np
    from tests.test_train_step import _setup, _batches
    from train.mesh import MeshConfig, make_mesh, sharding_context
    assert jax.device_count() == 8
    batches = _batches({seed}, 3)
    def losses(mesh_cfg, devices, microbatches):
        mesh = make_mesh(mesh_cfg, devices)
        state, train, evaluate, _, _ = _setup(microbatches, mesh)
        out = []
        with sharding_context(mesh):  # activation constraints on, as in the training loop
            for batch in batches:
                state, metrics = train(state, batch)
                out.append(float(metrics["loss"]))
        specs = {{str(leaf.sharding.spec) for leaf in jax.tree.leaves(state["params"])}}
        return out, jax.device_get(state["params"]), specs
    single, p1, _ = losses(MeshConfig(data=1), jax.devices()[:1], 1)
    for cfg, micro in [(MeshConfig(data=1, fsdp=4, tensor=2), 1), (MeshConfig(data=2, fsdp=2, tensor=2), 2)]:
        sharded, p8, specs = losses(cfg, jax.devices(), micro)
        np.testing.assert_allclose(sharded, single, rtol=1e-5)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), p8, p1)
        assert "P('fsdp', 'tensor')" in specs, specs  # really sharded
        print(cfg, sharded, single)
    # The paper's 880M MTA run lowers on an fsdp x tensor mesh (shapes only; nothing is allocated).
    import jax.numpy as jnp
    from train.config import load_train_config
    from train.mesh import batch_sharding, replicated
    from train.optim import learning_rate_schedule, make_optimizer
    from train.state import abstract_model, state_shardings
    from train.step import BATCH_KEYS, jit_steps, make_eval_step, make_train_step
    overrides = ["mesh.fsdp=4", "mesh.tensor=2", "data.seq_len=128"]
    paper = load_train_config("configs/train/880M_mta.yaml", overrides)
    mesh = make_mesh(paper.mesh)
    tx = make_optimizer(paper.optimizer, paper.steps)
    abstract, shardings = state_shardings(paper.model, tx, mesh)
    graphdef, _, rest = abstract_model(paper.model)
    step = make_train_step(graphdef, rest, tx, learning_rate_schedule(paper.optimizer, paper.steps), 2)
    evaluate = make_eval_step(graphdef, rest)
    train, _ = jit_steps(step, evaluate, shardings, batch_sharding(mesh), replicated(mesh))
    batch = {{key: jax.ShapeDtypeStruct((16, 128), jnp.float32 if key == "weights" else jnp.int32,
                                       sharding=batch_sharding(mesh)) for key in BATCH_KEYS}}
    with sharding_context(mesh):
        train.lower(abstract, batch)
    assert str(shardings["params"]["layers"][2]["attention"]["wq"]["kernel"].spec) == "P('fsdp', 'tensor')"
    print("OK")
    """
)


def test_fsdp_and_tensor_sharded_runs_equal_a_single_device_and_the_880m_run_lowers(seed):
    result = subprocess.run(
        [sys.executable, "-c", SHARDED.format(seed=seed)],
        cwd=ROOT,
        env=cli_env(devices=8),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0 and "OK" in result.stdout, result.stdout + result.stderr


def test_an_optax_schedule_warms_up_then_decays():
    opt = OptimizerConfig(learning_rate=1.0, warmup_steps=10, decay="linear", final_lr_fraction=0.1)
    schedule = learning_rate_schedule(opt, 110)
    np.testing.assert_allclose(
        [schedule(s) for s in (0, 5, 10, 60, 110)], [0, 0.5, 1.0, 0.55, 0.1], atol=1e-6
    )
    cosine = learning_rate_schedule(OptimizerConfig(learning_rate=2.0, warmup_steps=0, decay="cosine"), 100)
    np.testing.assert_allclose([cosine(0), cosine(50), cosine(100)], [2.0, 1.0, 0.0], atol=1e-6)
    assert isinstance(make_optimizer(opt, 110), optax.GradientTransformation)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("learning_rate", 0.0, "optimizer.learning_rate=0.0 is invalid"),
        ("decay", "step", "optimizer.decay='step' is invalid: must be one of"),
        ("b2", 1.0, "optimizer.b2=1.0 is invalid"),
        ("clip_norm", -1.0, "optimizer.clip_norm=-1.0 is invalid"),
    ],
)
def test_bad_optimizer_values_are_named(field, value, message):
    with pytest.raises(ValueError, match=message):
        OptimizerConfig(**{field: value})


def test_bfloat16_compute_keeps_float32_parameters_and_the_loss(seed):
    mesh = make_mesh(MeshConfig(data=1), jax.devices()[:1])
    batch = _batches(seed, 1)[0]
    losses = {}
    for dtype in ("float32", "bfloat16"):
        opt = OptimizerConfig(learning_rate=3e-3, warmup_steps=1)
        model = model_config_from_dict({**dataclasses.asdict(MODEL), "dtype": dtype})
        tx = make_optimizer(opt, 3)
        _, shardings = state_shardings(model, tx, mesh)
        graphdef, _, rest = abstract_model(model)
        train, _ = jit_steps(
            make_train_step(graphdef, rest, tx, learning_rate_schedule(opt, 3), 1),
            make_eval_step(graphdef, rest),
            shardings,
            batch_sharding(mesh),
            replicated(mesh),
        )
        state, metrics = train(init_state(model, tx, 0, shardings), batch)
        assert {leaf.dtype for leaf in jax.tree.leaves(state["params"])} == {jnp.dtype(jnp.float32)}
        losses[dtype] = float(metrics["loss"])
    np.testing.assert_allclose(losses["bfloat16"], losses["float32"], rtol=2e-2)
