"""python -m train.compile: a run's steps compiled for TPU slices on this CPU (libtpu's compile-only
devices): the tiny model on a v5e 2x2 (fsdp x tensor) and on two slices, the compiled shardings of
the state against the mesh rules, and a run that does not fit refused with its numbers.

The compiles need libtpu (the `compile` extra; skipped without it). The Pallas path under a mesh of
several devices (a shard_map over the batch) is checked on fake CPU devices, without libtpu.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import textwrap

import jax
import pytest
import yaml

from kernels.chips import get_pod
from tests.train_helpers import ROOT, TINY, cli_env
from train.config import train_config_from_dict


def _tiny(**top) -> dict:
    """TINY without dropout (so that "auto" takes the fused kernels where they apply), bf16 compute."""
    raw = copy.deepcopy({k: v for k, v in TINY.items() if k not in ("checkpoint", "progress")})
    raw["model"]["mta"]["dropout_rate"] = 0.0
    raw["model"]["dtype"] = "bfloat16"
    raw.update(top)
    return raw


def _require_libtpu():
    try:
        import libtpu  # noqa: F401
    except ImportError:
        pytest.skip("libtpu is not installed (pip install -e '.[compile]')")


@pytest.fixture(scope="module")
def fsdp_tensor():
    """The tiny run compiled for a v5e-4 (2x2) with fsdp=2 x tensor=2: (cfg, report, compiled)."""
    _require_libtpu()
    from kernels import aot
    from train.aot_step import compile_steps

    cfg = train_config_from_dict(_tiny(mesh={"data": 1, "fsdp": 2, "tensor": 2}, microbatches=2))
    return cfg, compile_steps(cfg, aot.pod_devices(get_pod("v5e-4")))


def test_topology_names_map_to_slices():
    assert get_pod("v5p-64").topology == "v5p:2x4x4" and get_pod("v5p-64").chips == 32
    assert get_pod("v6e-64").topology == "v6e:8x8"
    assert get_pod("v4-8").topology == "v4:2x2x1"
    assert get_pod("v5e-8").topology == "v5e:2x4"
    for bad, message in (("v7-64", "must be <chip>-<count>"), ("v5p-12", "a power of two from 8")):
        with pytest.raises(ValueError, match=message):
            get_pod(bad)


def test_bad_topology_exits_2_with_its_name(tmp_path, capsys):
    from train.compile import main

    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(_tiny()))
    assert main(["--config", str(config), "--topology", "v9x-4"]) == 2
    assert "topology='v9x-4' is invalid" in capsys.readouterr().err


def test_fsdp_x_tensor_compiles_with_the_mesh_rules_shardings(fsdp_tensor):
    from train.mesh import LOGICAL_AXIS_RULES  # noqa: F401  (the rules the shardings come from)

    cfg, result = fsdp_tensor
    assert dict(result.mesh.shape) == {"data": 1, "fsdp": 2, "tensor": 2}
    state_in, _batch_in = result.train.input_shardings[0]
    expected = result.abstract_state
    flat_in = jax.tree.leaves(state_in)
    flat_expected = jax.tree.leaves(expected)
    assert len(flat_in) == len(flat_expected)
    for got, want in zip(flat_in, flat_expected, strict=True):
        assert got.is_equivalent_to(want.sharding, len(want.shape)), (got, want.sharding)
    params = state_in["params"]
    # embed -> fsdp, q_heads -> tensor; the AdamW moments (mu, nu) like their parameter
    wq = params["layers"][0]["attention"]["wq"]["kernel"]
    assert tuple(wq.spec) == ("fsdp", "tensor")
    moments = [s for s in jax.tree.leaves(state_in["opt_state"]) if tuple(s.spec) == ("fsdp", "tensor")]
    assert len(moments) >= 2 * sum(tuple(s.spec) == ("fsdp", "tensor") for s in jax.tree.leaves(params))
    # the train state is donated: its outputs alias its inputs
    assert result.train.memory_analysis().alias_size_in_bytes > 0
    # both layers take the Mosaic kernels: layer 0 head mixing only, layer 1 the post-softmax conv too
    assert "tpu_custom_call" in result.train.as_text()


def test_report_names_the_attention_path_per_layer_and_fits(fsdp_tensor):
    from kernels.chips import CHIPS
    from train.aot_step import attention_paths

    cfg, _ = fsdp_tensor
    assert attention_paths(cfg.model, cfg.data.seq_len, "tpu") == {"pallas": [0, 1]}
    assert CHIPS["v5e"].hbm_bytes == 16 * 2**30


def test_two_slices_put_the_data_axis_across_slices():
    _require_libtpu()
    from kernels import aot
    from train.aot_step import compile_steps

    cfg = train_config_from_dict(_tiny(mesh={"data": 2, "fsdp": 2, "tensor": 1, "num_slices": 2}))
    devices = aot.pod_devices(get_pod("v5e-2"), 2)
    result = compile_steps(cfg, devices)
    grid = result.mesh.devices  # [data, fsdp, tensor]
    for d in range(2):
        assert {device.slice_index for device in grid[d].ravel()} == {d}
    assert result.train is not None and result.evaluate is not None


def test_a_run_that_does_not_fit_is_refused_with_its_numbers(tmp_path, capsys):
    _require_libtpu()
    from train.compile import main

    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(_tiny(mesh={"data": 4, "fsdp": 1, "tensor": 1})))
    out = tmp_path / "report.json"
    code = main(["--config", str(config), "--topology", "v5e-4", "--hbm-gib", "0.001", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 1
    assert "DOES NOT FIT" in printed
    report = json.loads(out.read_text())
    assert not report["fits"] and report["needed_bytes"] > report["hbm_bytes"] == int(0.001 * 2**30)
    for hint in ("microbatches=2", "mesh.data=1 mesh.fsdp=-1", "global_batch_size=4", "GiB"):
        assert hint in report["advice"], report["advice"]
    assert "ESTIMATE" in printed and report["estimate"]["step_time_s"] > 0


PALLAS_UNDER_A_MESH = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np
    from flax.core import spmd
    from jax.sharding import NamedSharding, PartitionSpec as P
    from mta_jax.attention import multi_token_attention
    from mta_jax.config import MTAConfig
    from mta_jax.params import init_mta_params
    from train.mesh import LOGICAL_AXIS_RULES, MeshConfig, make_mesh

    cfg = MTAConfig(pre_conv=(2, 3), pad_key="both", pre_head_mix=2, post_head_mix=2)
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (4, 16, 4, 16))
    k = jax.random.normal(keys[1], (4, 16, 2, 16))
    v = jax.random.normal(keys[2], (4, 16, 2, 16))
    params = init_mta_params(cfg, 4, 16, keys[3])
    run = lambda q, k, v: multi_token_attention(q, k, v, params, cfg, implementation="pallas")
    single = jax.jit(run)(q, k, v)
    mesh = make_mesh(MeshConfig(data=2, fsdp=2), jax.devices())
    rows = NamedSharding(mesh, P(("data", "fsdp")))
    with jax.set_mesh(mesh), spmd.logical_axis_rules(LOGICAL_AXIS_RULES):
        text = jax.jit(run).lower(q, k, v).as_text()
        sharded = jax.jit(run)(*(jax.device_put(x, rows) for x in (q, k, v)))
    assert "shard_map" in text or "manual" in text, text[:2000]
    np.testing.assert_allclose(np.asarray(sharded), np.asarray(single), rtol=1e-5, atol=1e-5)
    print("OK")
    """
)


def test_the_pallas_path_runs_per_batch_shard_under_a_mesh():
    """Mosaic calls cannot be partitioned by XLA: under a mesh of 4 devices the kernels run in a
    shard_map over the batch axes and give what one device gives (interpreted, on fake CPU devices)."""
    result = subprocess.run(
        [sys.executable, "-c", PALLAS_UNDER_A_MESH],
        cwd=ROOT,
        env=cli_env(4, JAX_PLATFORMS="cpu"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0 and "OK" in result.stdout, result.stderr[-4000:]
