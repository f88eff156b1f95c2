"""The jitted train and eval steps.

A batch is a dict of [B, T] arrays: inputs, targets, weights, segment_ids, positions (train/data.py).
The loss is sum(weights * cross_entropy) / sum(weights) over the whole global batch, so accumulating
over microbatches (sums of unnormalised losses and gradients, divided once at the end) is the same
step as one pass over the whole batch.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

if TYPE_CHECKING:
    from train.config import TrainConfig

BATCH_KEYS = ("inputs", "targets", "weights", "segment_ids", "positions")
BATCH_DTYPES = {"inputs": jnp.int32, "targets": jnp.int32, "weights": jnp.float32,
                "segment_ids": jnp.int32, "positions": jnp.int32}  # fmt: skip


def token_losses(model: nnx.Module, batch: dict) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(logits [B, T, V], cross-entropy [B, T], weights [B, T] float32) for one batch."""
    logits = model(batch["inputs"], positions=batch["positions"], segment_ids=batch["segment_ids"])
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])
    return logits, losses, batch["weights"].astype(jnp.float32)


def weighted_loss_sum(model: nnx.Module, batch: dict) -> tuple[jax.Array, jax.Array]:
    """(sum of weighted token cross-entropies, sum of weights) for one batch."""
    _, losses, weights = token_losses(model, batch)
    return jnp.sum(losses * weights), jnp.sum(weights)


def _model(graphdef, params, rest, rng, *, train: bool):
    # Fresh Variables inside the trace (from plain values), so that reseeding may set them.
    model = nnx.merge(graphdef, nnx.State(params), nnx.State(nnx.to_pure_dict(rest)))
    if train:
        nnx.reseed(model, dropout=rng)
        model.train()
    else:
        model.eval()
    return model


def _split_microbatches(batch: dict, count: int) -> dict:
    """[B, T] -> [count, B / count, T], microbatch m holding rows m, m + count, ... so every device
    keeps a share of every microbatch (rows stay on their data-parallel shard)."""

    def split(x):
        rows = x.shape[0] // count
        return jnp.swapaxes(x.reshape(rows, count, *x.shape[1:]), 0, 1)

    return jax.tree.map(split, batch)


def make_train_step(graphdef, rest, tx: optax.GradientTransformation, schedule, microbatches: int):
    """train_step(state, batch) -> (state, metrics) for jax.jit; metrics: loss, grad_norm (before
    clipping), lr (of this step) and target_tokens (the weight the loss is averaged over)."""

    def train_step(state: dict, batch: dict):
        step_key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])

        def loss_sum(params, micro, index):
            model = _model(graphdef, params, rest, jax.random.fold_in(step_key, index), train=True)
            return weighted_loss_sum(model, micro)

        grad_fn = jax.value_and_grad(loss_sum, has_aux=True)
        if microbatches == 1:
            (loss, weight), grads = grad_fn(state["params"], batch, 0)
        else:

            def accumulate(carry, inputs):
                index, micro = inputs
                (loss, weight), grads = grad_fn(state["params"], micro, index)
                total_loss, total_weight, total_grads = carry
                total_grads = jax.tree.map(jnp.add, total_grads, grads)
                return (total_loss + loss, total_weight + weight, total_grads), None

            zeros = jax.tree.map(jnp.zeros_like, state["params"])
            micro = _split_microbatches(batch, microbatches)
            carry = (jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), zeros)
            loss, weight, grads = jax.lax.scan(accumulate, carry, (jnp.arange(microbatches), micro))[0]

        weight = jnp.maximum(weight, 1.0)
        grads = jax.tree.map(lambda g: g / weight, grads)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        new_state = {
            "params": optax.apply_updates(state["params"], updates),
            "opt_state": opt_state,
            "step": state["step"] + 1,
            "rng": state["rng"],
        }
        metrics = {
            "loss": loss / weight,
            "grad_norm": optax.tree.norm(grads),
            "lr": schedule(state["step"]),
            "target_tokens": weight,
        }
        return new_state, metrics

    return train_step


def make_eval_step(graphdef, rest):
    """eval_step(params, batch) -> sums over the batch, no dropout: loss (weighted cross-entropy),
    weight, correct (weighted tokens whose argmax is the target), wrong_rows (rows with a wrong weighted
    token: the teacher-forced sequence error of the toy task) and rows (rows with any weight)."""

    def eval_step(params: dict, batch: dict):
        logits, losses, weights = token_losses(_model(graphdef, params, rest, None, train=False), batch)
        wrong = (jnp.argmax(logits, axis=-1) != batch["targets"]) & (weights > 0)
        return {
            "loss": jnp.sum(losses * weights),
            "weight": jnp.sum(weights),
            "correct": jnp.sum(jnp.where(wrong, 0.0, weights)),
            "wrong_rows": jnp.sum(jnp.any(wrong, axis=-1)),
            "rows": jnp.sum(jnp.any(weights > 0, axis=-1)),
        }

    return eval_step


def jit_steps(train_step, eval_step, shardings: dict, batch_sharding, metrics_sharding):
    """Both steps under jax.jit with explicit shardings; the train state is donated."""
    batch_shardings = {key: batch_sharding for key in BATCH_KEYS}
    train = jax.jit(
        train_step,
        in_shardings=(shardings, batch_shardings),
        out_shardings=(shardings, metrics_sharding),
        donate_argnums=0,
    )
    evaluate = jax.jit(
        eval_step,
        in_shardings=(shardings["params"], batch_shardings),
        out_shardings=metrics_sharding,
    )
    return train, evaluate


@dataclasses.dataclass(frozen=True)
class RunSteps:
    """What a run trains with on `mesh`: the optimizer, the abstract state (shapes with shardings),
    the state's shardings, and the jitted train and eval steps."""

    tx: optax.GradientTransformation
    abstract_state: dict
    shardings: dict
    train: Any  # jitted train_step(state, batch) -> (state, metrics), the state donated
    evaluate: Any  # jitted eval_step(params, batch) -> sums


def build_steps(cfg: TrainConfig, mesh: jax.sharding.Mesh) -> RunSteps:
    """The train and eval steps of the run `cfg` on `mesh`, as `python -m train` runs them (and
    `python -m train.compile` compiles them)."""
    from train.mesh import batch_sharding, replicated
    from train.optim import learning_rate_schedule, make_optimizer
    from train.state import abstract_model, state_shardings

    tx = make_optimizer(cfg.optimizer, cfg.steps)
    schedule = learning_rate_schedule(cfg.optimizer, cfg.steps)
    graphdef, abstract_params, rest = abstract_model(cfg.model)
    abstract_state, shardings = state_shardings(cfg.model, tx, mesh, abstract_params)
    train, evaluate = jit_steps(
        make_train_step(graphdef, rest, tx, schedule, cfg.microbatches),
        make_eval_step(graphdef, rest),
        shardings,
        batch_sharding(mesh),
        replicated(mesh),
    )
    return RunSteps(tx, abstract_state, shardings, train, evaluate)


def abstract_batch(rows: int, seq_len: int, sharding) -> dict:
    """The shapes of a global batch: BATCH_KEYS -> ShapeDtypeStruct [rows, seq_len] with `sharding`."""
    return {
        key: jax.ShapeDtypeStruct((rows, seq_len), BATCH_DTYPES[key], sharding=sharding) for key in BATCH_KEYS
    }
