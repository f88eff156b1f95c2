"""A run's train and eval steps compiled for a TPU slice on this host, without the chips.

    report = compile_run(cfg, get_pod("v5p-64"), num_slices=1)   # cfg: train.config.TrainConfig

The steps are train/step.py's build_steps (what `python -m train` runs: microbatches, donation, in/out
shardings), traced under the run's mesh of compile-only devices (kernels/aot.py's pod_devices), so
attention "auto" picks the TPU's path. The report holds, PER CHIP: the compiler's memory analysis, the
state's bytes from its shardings, FLOPs from the compiled cost analysis beside train/flops.py's count,
and a roofline ESTIMATE (compute or HBM bound, no communication) of step time, tokens/s and MFU.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import jax
import numpy as np

from kernels import aot
from kernels.chips import Chip, Pod
from mta_jax.attention import choose_implementation
from mta_jax.config import ModelConfig, MTAConfig
from train import flops as flops_lib
from train.config import TrainConfig
from train.loop import check_batch_layout
from train.mesh import batch_sharding, make_mesh, sharding_context
from train.step import abstract_batch, build_steps

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Compiled:
    """Both steps of a run, compiled for `mesh` (train is None when its compile was refused)."""

    mesh: jax.sharding.Mesh
    abstract_state: dict
    train: Any  # jax.stages.Compiled | None
    evaluate: Any  # jax.stages.Compiled | None
    error: str | None  # the compiler's refusal (e.g. out of HBM), else None


def compile_steps(cfg: TrainConfig, devices) -> Compiled:
    """Trace, lower and compile the run's train step (state, batch) and eval step (params, batch) on
    a mesh of `devices` built from cfg.mesh. A compiler refusal (RESOURCE_EXHAUSTED: the step does
    not fit the chip) is returned as `error`, not raised."""
    mesh = make_mesh(cfg.mesh, list(devices))
    check_batch_layout(cfg, mesh)
    steps = build_steps(cfg, mesh)
    batch = abstract_batch(cfg.global_batch_size, cfg.data.seq_len, batch_sharding(mesh))
    compiled = {}
    with sharding_context(mesh):
        for name, fn, args in (
            ("train", steps.train, (steps.abstract_state, batch)),
            ("evaluate", steps.evaluate, (steps.abstract_state["params"], batch)),
        ):
            try:
                compiled[name] = fn.trace(*args).lower().compile()
            except jax.errors.JaxRuntimeError as error:
                if "RESOURCE_EXHAUSTED" not in str(error):
                    raise
                return Compiled(mesh, steps.abstract_state, compiled.get("train"), None, f"{name}: {error}")
    return Compiled(mesh, steps.abstract_state, compiled["train"], compiled["evaluate"], None)


def shard_bytes(tree) -> int:
    """Bytes one device holds of a tree of ShapeDtypeStructs with shardings (the largest shard)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shard = leaf.sharding.shard_shape(leaf.shape)
        total += math.prod(shard) * np.dtype(leaf.dtype).itemsize
    return total


def memory(compiled) -> dict[str, int]:
    """The compiler's per-device memory analysis; peak = arguments + outputs - aliased + temp + code."""
    analysis = compiled.memory_analysis()
    fields = {
        "arguments": analysis.argument_size_in_bytes,
        "outputs": analysis.output_size_in_bytes,
        "aliased": analysis.alias_size_in_bytes,
        "temp": analysis.temp_size_in_bytes,
        "code": analysis.generated_code_size_in_bytes,
    }
    fields["peak"] = (
        fields["arguments"] + fields["outputs"] - fields["aliased"] + fields["temp"] + fields["code"]
    )
    return {name: int(value) for name, value in fields.items()}


def cost(compiled) -> dict[str, float]:
    """flops and bytes accessed of one device's program, from the compiled cost analysis."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list | tuple):
        analysis = analysis[0] if analysis else {}
    return {
        "flops": float(analysis.get("flops", 0.0)),
        "bytes_accessed": float(analysis.get("bytes accessed", 0.0)),
    }


def attention_paths(model: ModelConfig, seq_len: int, platform: str, chip=None) -> dict[str, list[int]]:
    """Which attention path each layer's training pass takes: {"pallas": [0, 1, ...], ...}, by the same
    choice "auto" makes at trace time for `platform` and `chip` (a kernels.chips.Chip; None: not known)
    (or the configured implementation)."""
    paths: dict[str, list[int]] = {}
    for layer in range(model.num_layers):
        mta = model.layer_mta(layer) or MTAConfig()
        name = model.attention_implementation
        if name == "auto":
            name = choose_implementation(
                mta, seq_len, seq_len, platform, dtype=model.dtype, head_dim=model.head_dim, chip=chip
            )
        paths.setdefault(name, []).append(layer)
    return paths


def roofline(flops: float, bytes_accessed: float, chip: Chip) -> dict[str, float]:
    """ESTIMATED step time of one chip: the longer of compute at peak FLOP/s and traffic at peak HBM
    bandwidth (no communication, no overlap losses)."""
    compute, traffic = flops / chip.peak_flops, bytes_accessed / chip.hbm_bandwidth
    return {
        "compute_s": compute,
        "hbm_s": traffic,
        "step_time_s": max(compute, traffic),
        "bound": "compute" if compute >= traffic else "HBM",
    }


def step_estimate(report: dict, chip: Chip) -> dict:
    """The roofline ESTIMATE of one train step from a report's FLOPs and bytes per chip: tokens/s per
    chip and MFU beside it. Compute time takes the larger of the compiled and the model FLOP count
    (train/flops.py): XLA's cost analysis counts a loop's body once and Mosaic kernels by their own
    CostEstimate, and on TPU it came out about 20% under the model count (880M baseline on v5p-64:
    3.69e13 against 4.68e13), which alone would put MFU above 100%."""
    flops = report["flops_per_chip"]
    used = "compiled" if flops["compiled"] >= flops["analytical_model"] else "analytical_model"
    estimate = roofline(flops[used], report["bytes_accessed_per_chip"], chip)
    estimate["flops_used"] = used
    step_time = estimate["step_time_s"]
    tokens_per_chip = report["tokens_per_step"] / report["chips"] / step_time if step_time else float("inf")
    flops_per_token = flops["analytical_model"] * report["chips"] / report["tokens_per_step"]
    estimate["tokens_per_s_per_chip"] = tokens_per_chip
    estimate["mfu"] = flops_lib.mfu(tokens_per_chip, flops_per_token, chip.peak_flops)
    return estimate


def compile_run(cfg: TrainConfig, pod: Pod, num_slices: int = 1, hbm_bytes: int | None = None) -> dict:
    """Compile the run `cfg` for `num_slices` slices of `pod` and report per chip (JSON-safe dict):
    mesh, attention paths, memory (fits against hbm_bytes, default the chip's HBM), FLOPs and the
    roofline estimate. `report["fits"]` is False with `report["advice"]` when it does not fit."""
    chip = pod.chip
    hbm = chip.hbm_bytes if hbm_bytes is None else hbm_bytes
    cfg = dataclasses.replace(cfg, mesh=dataclasses.replace(cfg.mesh, num_slices=num_slices))
    devices = aot.pod_devices(pod, num_slices)
    result = compile_steps(cfg, devices)
    mesh, seq_len = result.mesh, cfg.data.seq_len
    chips = mesh.size
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    rows_per_chip = cfg.global_batch_size // cfg.microbatches / shards
    tokens_per_step = cfg.global_batch_size * seq_len
    flops_per_token = flops_lib.training_flops_per_token(cfg.model, seq_len)
    state = result.abstract_state
    report: dict[str, Any] = {
        "topology": pod.name,
        "compiler_topology": pod.topology,  # libtpu's ("v5p:2x4x4") or the CUDA plugin's ("1x1x8")
        "num_slices": num_slices,
        "chip": chip.name,
        "device_kind": devices[0].device_kind,
        "chips": chips,
        "mesh": dict(mesh.shape),
        "global_batch_size": cfg.global_batch_size,
        "seq_len": seq_len,
        "microbatches": cfg.microbatches,
        "rows_per_chip_per_microbatch": rows_per_chip,
        "tokens_per_step": tokens_per_step,
        "attention": attention_paths(cfg.model, seq_len, chip.platform, chip),
        "hbm_bytes": hbm,
        "params_bytes": shard_bytes(state["params"]),
        "opt_state_bytes": shard_bytes(state["opt_state"]),
        "compiler_error": result.error,
    }
    report["state_bytes"] = report["params_bytes"] + report["opt_state_bytes"]
    if result.train is not None:
        text = result.train.as_text()
        report["mosaic_kernels_in_train_step"] = text.count("tpu_custom_call")
        train_memory = memory(result.train)
        report["train_memory"] = train_memory
        report["temp_bytes"] = train_memory["temp"]
        report["train_peak_bytes"] = train_memory["peak"]
        # XLA's cost analysis counts a loop's body once: the microbatch scan is scaled by its trip
        # count (the optimizer update outside it is then overcounted, a small share of the FLOPs).
        compiled_cost = {name: value * cfg.microbatches for name, value in cost(result.train).items()}
        analytic = flops_per_token * tokens_per_step / chips
        report["flops_per_chip"] = {
            "compiled": compiled_cost["flops"],
            "compiled_loop_body_once": compiled_cost["flops"] / cfg.microbatches,
            "analytical_model": analytic,
        }
        report["bytes_accessed_per_chip"] = compiled_cost["bytes_accessed"]
        report["estimate"] = step_estimate(report, chip)
    if result.evaluate is not None:
        eval_memory = memory(result.evaluate)
        report["eval_memory"] = eval_memory
        # the optimizer state stays in HBM while the loop evaluates
        report["eval_peak_bytes"] = eval_memory["peak"] + report["opt_state_bytes"]
    needed = max(report.get("train_peak_bytes", 0), report.get("eval_peak_bytes", 0))
    report["needed_bytes"] = needed
    report["fits"] = result.error is None and needed <= hbm
    if not report["fits"]:
        report["advice"] = advice(cfg, report)
    return report


def compiler_usage(error: str) -> tuple[float, float] | None:
    """(used, capacity) in bytes from XLA's "Used 20.5G of 15.75G hbm" refusal, when it says so."""
    match = re.search(r"Used ([\d.]+)([KMGT]) of ([\d.]+)([KMGT]) hbm", error)
    if not match:
        return None
    scale = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    return float(match.group(1)) * scale[match.group(2)], float(match.group(3)) * scale[match.group(4)]


def advice(cfg: TrainConfig, report: dict) -> str:
    """Why the run does not fit one chip, with its numbers, and what to change."""
    hbm = report["hbm_bytes"]
    parts = [f"the run does not fit the {report['chip']}'s {hbm / GiB:.2f} GiB of HBM per chip:"]
    if report["compiler_error"]:
        usage = compiler_usage(report["compiler_error"])
        used = f" (it needs {usage[0] / GiB:.2f} GiB of {usage[1] / GiB:.2f} GiB)" if usage else ""
        parts.append(f"the compiler refused the step{used};")
    else:
        parts.append(
            f"it needs {report['needed_bytes'] / GiB:.2f} GiB (train step peak "
            f"{report['train_peak_bytes'] / GiB:.2f} GiB, eval {report['eval_peak_bytes'] / GiB:.2f} GiB);"
        )
    parts.append(
        f"state {report['state_bytes'] / GiB:.2f} GiB (parameters {report['params_bytes'] / GiB:.2f}, "
        f"optimizer {report['opt_state_bytes'] / GiB:.2f})"
        + (f", temp {report['temp_bytes'] / GiB:.2f} GiB" if "temp_bytes" in report else "")
        + f" for {report['rows_per_chip_per_microbatch']:g} rows x {report['seq_len']} tokens per chip "
        "per microbatch. Try:"
    )
    shards = report["mesh"]["data"] * report["mesh"]["fsdp"]
    more = cfg.microbatches * 2
    tries = []
    if cfg.global_batch_size % (more * shards) == 0:
        tries.append(f"microbatches={more} (halves the activations)")
    slices = report["num_slices"]
    if report["mesh"]["data"] > slices:
        tries.append(
            f"mesh.data={slices} mesh.fsdp=-1 (splits the state over all {report['chips'] // slices} "
            "chips of a slice instead of replicating it)"
        )
    tries.append(f"global_batch_size={cfg.global_batch_size // 2} (a smaller batch)")
    tries.append("a larger topology")
    return " ".join(parts) + " " + "; ".join(tries) + "."
