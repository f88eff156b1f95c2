"""The training state and where each piece of it lives on the mesh.

state = {"params": nested dict of arrays (the model's nnx.Param values),
         "opt_state": the Optax state, "step": int32 [], "rng": uint32 [2] (the run's base key data)}

Plain pytrees, so Orbax saves and restores them onto any mesh, and jax.jit shards them by the
shardings computed here (parameters by the logical axis rules, optimizer moments like their parameter).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from mta_jax.config import ModelConfig
from mta_jax.model import MTATransformer
from train.mesh import param_shardings, replicated


def build_model(cfg: ModelConfig, seed: int) -> MTATransformer:
    """The model with its parameters drawn from `seed` (dropout keys are reseeded every step)."""
    return MTATransformer(cfg, rngs=nnx.Rngs(params=seed, dropout=seed))


def abstract_model(cfg: ModelConfig) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """(graphdef, params, rest): params with shapes only (nothing allocated); rest, the small non-parameter
    state (dropout RNG streams, reseeded every step), as concrete arrays."""
    model = nnx.eval_shape(lambda: build_model(cfg, 0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    if jax.tree.leaves(rest):  # computed under jit, so the unused parameters are never materialised
        rest = jax.jit(lambda: nnx.split(build_model(cfg, 0), nnx.Param, ...)[2])()
    return graphdef, params, rest


def state_shardings(
    cfg: ModelConfig, tx: optax.GradientTransformation, mesh: jax.sharding.Mesh, abstract_params=None
):
    """(abstract state with shardings attached, tree of shardings) for the state dict above.
    abstract_params: the params of abstract_model(cfg), when the caller already has them."""
    if abstract_params is None:
        _, abstract_params, _ = abstract_model(cfg)
    params_sharding = param_shardings(abstract_params, mesh)
    params_shapes = nnx.to_pure_dict(abstract_params)
    opt_shapes = jax.eval_shape(tx.init, params_shapes)
    opt_sharding = optax.tree_map_params(
        tx,
        lambda _, sharding: sharding,
        opt_shapes,
        params_sharding,
        transform_non_params=lambda _: replicated(mesh),
        is_leaf=lambda x: isinstance(x, jax.sharding.Sharding),
    )
    shardings = {
        "params": params_sharding,
        "opt_state": opt_sharding,
        "step": replicated(mesh),
        "rng": replicated(mesh),
    }
    shapes = {
        "params": params_shapes,
        "opt_state": opt_shapes,
        "step": jax.ShapeDtypeStruct((), jnp.int32),
        "rng": jax.ShapeDtypeStruct((2,), jnp.uint32),
    }
    abstract = jax.tree.map(
        lambda shape, sharding: jax.ShapeDtypeStruct(shape.shape, shape.dtype, sharding=sharding),
        shapes,
        shardings,
    )
    return abstract, shardings


def init_state(cfg: ModelConfig, tx: optax.GradientTransformation, seed: int, shardings, params=None) -> dict:
    """A fresh state, created directly in its shards (jit with out_shardings: no host copy).
    params: start from these parameters (nested dict, e.g. from params_io.load_params) instead of
    drawing them from `seed`; they are cast to the model's param_dtype."""

    def init(given):
        if given is None:
            model = build_model(cfg, seed)
            params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        else:
            params = jax.tree.map(lambda x: x.astype(cfg.param_dtype), given)
        return {
            "params": params,
            "opt_state": tx.init(params),
            "step": jnp.zeros((), jnp.int32),
            "rng": jax.random.key_data(jax.random.key(seed)).astype(jnp.uint32),
        }

    return jax.jit(init, out_shardings=shardings)(params)
