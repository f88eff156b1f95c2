"""Speed, temporary memory and FLOPs of the attention paths against sequence length, in one process.

    python bench/attention.py [--paths reference blockwise pallas dot_product_attention]
        [--configs kq_conv head_mix full] [--head-dims 64 128] [--min-len 512] [--max-len N]
        [--memory-max-len N] [--iters N] [--warmup N] [--dtype bfloat16] [--heads 16] [--batch 1]
        [--point-seconds S] [--out bench/results] [--append]
    python bench/attention.py --readme [README.md]   # only rewrites the README's table, runs nothing

For every layer config, path and head dim D, T doubles from --min-len: up to --max-len each point is
compiled, run --warmup times and timed --iters times, for "forward" and for "forward+backward" (the
gradient of sum(out * fixed random cotangent) with respect to q, k, v and the MTA parameters). From
--max-len up to --memory-max-len the points are compiled only (the memory curve, cheap on CPU). A path
that runs out of memory gets "oom" at that T and its sweep stops. The paths are the implementations of
multi_token_attention plus "dot_product_attention": jax.nn.dot_product_attention, plain causal
attention without MTA (the speed of light; cuDNN on GPU when it accepts the shapes).

Writes <out>/attention-<device kind slug>.json (after every point, "complete": false until the end)
and .png (the kq_conv layer at D=128: time and temp memory against T) and prints progress, a summary
and the targets. Defaults: on CPU, D=128, timed up to
T=2048 and compiled up to 8192 (minutes on 2 cores); on accelerators, D=64 and 128, timed up to 32768.
Timing a point stops once its runs add up to --point-seconds; on CPU a point whose compiled memory
exceeds the host's available memory is compiled only (XLA:CPU would not fail cleanly).

FLOPs are XLA's cost analysis: loop bodies count once, so the blockwise path's figure is far too low.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import itertools
import json
import math
import shlex
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from anywhere, with or without the package installed
    sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from bench.readme import replace_marked  # noqa: E402
from bench.train_step import device_slug  # noqa: E402
from mta_jax.attention import multi_token_attention  # noqa: E402
from mta_jax.config import IMPLEMENTATIONS, MTAConfig  # noqa: E402
from mta_jax.params import MTAParams, init_mta_params  # noqa: E402
from train.errors import short_error  # noqa: E402
from train.files import write_text_atomic  # noqa: E402

PATHS = ("reference", "blockwise", "pallas", "dot_product_attention")
DPA = "dot_product_attention"
CONFIGS = ("kq_conv", "kq_conv_mix4", "head_mix", "mix_all", "kq_conv_mix_all", "full")
DEFAULT_CONFIGS = ("kq_conv", "head_mix", "full")
MODES = ("forward", "forward+backward")
FWD_BWD = "forward+backward"
MARKERS = ("<!-- attention-table:start -->", "<!-- attention-table:end -->")
CPU_DEFAULTS = {
    "head_dims": [128],
    "max_len": 2048,
    "memory_max_len": 8192,
    "iters": 3,
    "warmup": 1,
    "point_seconds": 10.0,
}
ACCELERATOR_DEFAULTS = {
    "head_dims": [64, 128],
    "max_len": 32768,
    "memory_max_len": None,
    "iters": 10,
    "warmup": 3,
    "point_seconds": 30.0,
}
OOM_SIGNS = ("RESOURCE_EXHAUSTED", "out of memory", "Out of memory", "OOM")


def layer_config(name: str, heads: int) -> MTAConfig:
    """The named layer: "kq_conv" (the issue's 6x11 pre-softmax conv), "kq_conv_mix4" (that conv with
    head mixing in groups of 4 before and after the softmax, the largest groups the kernels fuse),
    "head_mix" (post-softmax head mixing in groups of 4, or of H when H < 4), "mix_all" (the paper's
    layers without a kq-conv: mixing over all heads before and after the softmax, group norm, gate),
    "kq_conv_mix_all" (the paper's kq-conv layer without its post-softmax conv) or "full" (the paper's
    kq-conv layer, configs/models/880M_mta.yaml)."""
    if name == "kq_conv":
        return MTAConfig(pre_conv=(6, 11))
    if name == "kq_conv_mix4":
        size = math.gcd(4, heads)
        return MTAConfig(pre_conv=(6, 11), pre_head_mix=size, post_head_mix=size)
    if name == "head_mix":
        return MTAConfig(post_head_mix=math.gcd(4, heads))
    if name in ("mix_all", "kq_conv_mix_all"):
        return MTAConfig(
            pre_conv=(6, 11) if name == "kq_conv_mix_all" else None,
            pre_head_mix=heads,
            post_head_mix=heads,
            group_norm=True,
            gate="scalar",
        )
    if name == "full":
        return MTAConfig(
            pre_conv=(6, 11),
            post_conv=(6, 11),
            pre_head_mix=heads,
            post_head_mix=heads,
            group_norm=True,
            gate="scalar",
        )
    raise ValueError(f"config={name!r} is invalid: must be one of {CONFIGS}")


def random_params(cfg: MTAConfig, heads: int, head_dim: int, key: jax.Array) -> MTAParams:
    """Identity parameters plus noise (std 0.1), so no part is a no-op that XLA could optimise away."""
    params = init_mta_params(cfg, heads, head_dim, key)
    leaves, treedef = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.fold_in(key, 1), max(len(leaves), 1))
    noisy = [
        leaf + 0.1 * jax.random.normal(k, leaf.shape, leaf.dtype)
        for leaf, k in zip(leaves, keys, strict=True)
    ]
    return jax.tree_util.tree_unflatten(treedef, noisy)


@dataclasses.dataclass(frozen=True)
class Point:
    """One measurement: layer config, path, head dim D, sequence length T and mode."""

    config: str
    path: str
    head_dim: int
    seq: int
    mode: str


def skip_reason(path: str, platform: str) -> str | None:
    """Why a path cannot run here, or None."""
    if path == DPA:
        return None
    if path not in IMPLEMENTATIONS:
        return "not built"
    if path == "pallas" and platform == "cpu":
        return "Pallas runs only in interpret mode on CPU"
    return None


def attention_fn(point: Point, cfg: MTAConfig, dpa_implementation: str | None):
    """f(q, k, v, params) -> [B, T, H, D] for the point's path."""
    if point.path == DPA:
        return lambda q, k, v, params: jax.nn.dot_product_attention(
            q, k, v, is_causal=True, implementation=dpa_implementation
        )
    return lambda q, k, v, params: multi_token_attention(q, k, v, params, cfg, implementation=point.path)


def benchmark_fn(point: Point, cfg: MTAConfig, dpa_implementation: str | None):
    """The function measured: the forward output, or the gradients of sum(out * cotangent) with respect
    to q, k, v and the MTA parameters. Signature (q, k, v, params, cotangent)."""
    attend = attention_fn(point, cfg, dpa_implementation)
    if point.mode == "forward":
        return lambda q, k, v, params, cotangent: attend(q, k, v, params)

    def loss(q, k, v, params, cotangent):
        return jnp.sum(attend(q, k, v, params).astype(jnp.float32) * cotangent.astype(jnp.float32))

    return jax.grad(loss, argnums=(0, 1, 2, 3))


def make_inputs(point: Point, args: argparse.Namespace, cfg: MTAConfig, abstract: bool) -> tuple:
    """(q [B, T, H, D], k, v [B, T, Hkv, D], params, cotangent [B, T, H, D]); ShapeDtypeStructs when
    abstract (compiling only)."""
    key = jax.random.key(0)
    dtype = jnp.dtype(args.dtype)
    q_shape = (args.batch, point.seq, args.heads, point.head_dim)
    kv_shape = (args.batch, point.seq, args.kv_heads, point.head_dim)
    params = random_params(cfg, args.heads, point.head_dim, key) if point.path != DPA else None
    if abstract:
        q, ct = (jax.ShapeDtypeStruct(q_shape, dtype) for _ in range(2))
        k, v = (jax.ShapeDtypeStruct(kv_shape, dtype) for _ in range(2))
        return q, k, v, params, ct
    keys = jax.random.split(key, 4)
    q = jax.random.normal(keys[0], q_shape, dtype)
    k = jax.random.normal(keys[1], kv_shape, dtype)
    v = jax.random.normal(keys[2], kv_shape, dtype)
    ct = jax.random.normal(keys[3], q_shape, dtype)
    return q, k, v, params, ct


def is_oom(error: BaseException) -> bool:
    return any(sign in str(error) for sign in OOM_SIGNS)


def compile_point(point: Point, cfg: MTAConfig, inputs: tuple, dpa_implementation: str | None):
    """Lowers and compiles the point's function; returns (compiled, seconds)."""
    start = time.perf_counter()
    fn = benchmark_fn(point, cfg, dpa_implementation)
    compiled = jax.jit(fn).lower(*inputs).compile()
    return compiled, time.perf_counter() - start


def flops_of(compiled) -> float | None:
    """The "flops" of compiled.cost_analysis(), a dict or (older jax) a list of dicts."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - some backends do not implement it
        return None
    if isinstance(cost, list | tuple):
        values = [c.get("flops") for c in cost if c and c.get("flops") is not None]
        return float(sum(values)) if values else None
    return None if not cost or cost.get("flops") is None else float(cost["flops"])


def memory_of(compiled) -> dict:
    """temp_bytes, argument_bytes and output_bytes of the compiled executable (None if unknown)."""
    try:
        analysis = compiled.memory_analysis()
    except Exception:  # noqa: BLE001
        analysis = None
    fields = {"temp_bytes": "temp_size_in_bytes", "argument_bytes": "argument_size_in_bytes"}
    fields["output_bytes"] = "output_size_in_bytes"
    return {name: getattr(analysis, field, None) for name, field in fields.items()}


def time_compiled(compiled, inputs: tuple, warmup: int, iters: int, budget_s: float) -> list[float]:
    """Wall times in seconds of up to `iters` calls after `warmup` untimed ones; timing stops once the
    timed calls add up to budget_s (one call at least). A warm-up call longer than budget_s is kept as
    the timing (start-up effects are negligible against it) and ends the measurement."""

    def call() -> float:
        start = time.perf_counter()
        jax.block_until_ready(compiled(*inputs))
        return time.perf_counter() - start

    for _ in range(warmup):
        if (seconds := call()) > budget_s:
            return [seconds]
    times = [call()]
    while len(times) < iters and sum(times) < budget_s:
        times.append(call())
    return times


def dpa_choices(platform: str) -> tuple[str | None, ...]:
    """jax.nn.dot_product_attention implementations to try in order: cuDNN first on GPU."""
    return ("cudnn", None) if platform == "gpu" else (None,)


def host_memory_available() -> int | None:
    """MemAvailable of /proc/meminfo in bytes (None where unknown)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def too_big_for_host(record: dict, platform: str) -> str | None:
    """On CPU, why running the compiled point could exhaust the host's memory (temp + arguments + outputs
    above 90% of MemAvailable), or None. XLA:CPU would not fail cleanly: the kernel kills the process."""
    if platform != "cpu":
        return None
    needed = sum(record[name] or 0 for name in ("temp_bytes", "argument_bytes", "output_bytes"))
    available = host_memory_available()
    if available is None or needed <= 0.9 * available:
        return None
    return f"not timed: needs {needed / 2**30:.1f} GiB, the host has {available / 2**30:.1f} GiB available"


def compile_with_fallback(point: Point, cfg: MTAConfig, inputs: tuple, record: dict, platform: str):
    """Compiles the point; dot_product_attention tries cuDNN first on GPU and falls back to XLA (the
    record gets dpa_implementation and dpa_fallback_reason)."""
    choices = dpa_choices(platform) if point.path == DPA else (None,)
    for index, choice in enumerate(choices):
        try:
            compiled, record["compile_s"] = compile_point(point, cfg, inputs, choice)
        except Exception as error:  # noqa: BLE001 - cuDNN refusing the shapes: fall back to XLA
            if is_oom(error) or index == len(choices) - 1:
                raise
            record["dpa_fallback_reason"] = short_error(error, 300)
            continue
        if point.path == DPA:
            record["dpa_implementation"] = choice or "xla"
        return compiled
    raise AssertionError("unreachable")


def measure(point: Point, args: argparse.Namespace, cfg: MTAConfig, timed: bool) -> dict:
    """One record: status "ok" (times when timed and affordable, memory, FLOPs), "oom", or
    "skipped"/"error" with a reason."""
    record = {**dataclasses.asdict(point), "timed": False, "median_s": None, "min_s": None, "times_s": None}
    record.update(temp_bytes=None, argument_bytes=None, output_bytes=None, flops=None)
    record.update(compile_s=None, status="ok", reason=None)
    inputs = make_inputs(point, args, cfg, abstract=not timed)
    try:
        compiled = compile_with_fallback(point, cfg, inputs, record, args.platform)
        record.update(memory_of(compiled))
        record["flops"] = flops_of(compiled)
        if timed and (reason := too_big_for_host(record, args.platform)) is not None:
            record["reason"] = reason
        elif timed:
            times = time_compiled(compiled, inputs, args.warmup, args.iters, args.point_seconds)
            record.update(timed=True, times_s=times, median_s=statistics.median(times), min_s=min(times))
    except ValueError as error:  # multi_token_attention: an option this path does not support
        record.update(status="oom" if is_oom(error) else "skipped", reason=short_error(error, 300))
    except Exception as error:  # noqa: BLE001 - XLA's resource exhausted, or a failure of the path
        record.update(status="oom" if is_oom(error) else "error", reason=short_error(error, 300))
    finally:
        del inputs
        gc.collect()
    return record


def lengths(args: argparse.Namespace) -> list[tuple[int, bool]]:
    """(T, timed) for T = min_len, 2 min_len, ... up to max(max_len, memory_max_len)."""
    out, seq = [], args.min_len
    while seq <= max(args.max_len, args.memory_max_len):
        out.append((seq, seq <= args.max_len))
        seq *= 2
    return out


def sweep(args: argparse.Namespace, on_record=None) -> list[dict]:
    """Every record, config by config, path by path; prints one progress line per record and calls
    on_record(records) after each."""
    records = []
    for config in args.configs:
        cfg = layer_config(config, args.heads)
        for path in args.paths:
            reason = skip_reason(path, args.platform)
            for head_dim in args.head_dims:
                stopped: set[str] = set()
                untimed: set[str] = set()  # modes too big for the host's memory from some T on
                for seq, timed in lengths(args):
                    for mode in MODES:
                        if mode in stopped:
                            continue
                        point = Point(config, path, head_dim, seq, mode)
                        if reason is not None:
                            record = {**dataclasses.asdict(point), "status": "skipped", "reason": reason}
                        else:
                            record = measure(point, args, cfg, timed and mode not in untimed)
                            if timed and not record.get("timed") and record["status"] == "ok":
                                untimed.add(mode)
                        records.append(record)
                        _print_progress(record)
                        if on_record is not None:
                            on_record(records)
                        if record["status"] != "ok":
                            stopped.add(mode)
                    if len(stopped) == len(MODES):
                        break
    return records


def _print_progress(record: dict) -> None:
    where = f"{record['config']:8s} {record['path']:21s} D={record['head_dim']:<4d} T={record['seq']:<6d}"
    where += f" {record['mode']:16s}"
    if record["status"] != "ok":
        print(f"  {where} {record['status']}: {record['reason']}", flush=True)
        return
    time_text = "compiled only" if not record.get("timed") else f"{1e3 * record['median_s']:10.2f} ms"
    flops = "n/a" if record["flops"] is None else f"{record['flops'] / 1e9:.2f} GFLOP"
    note = "" if record.get("reason") is None else f"  ({record['reason']})"
    print(f"  {where} {time_text:>13s}  temp {_mib(record['temp_bytes'])}  {flops}{note}", flush=True)


def _mib(value) -> str:
    return "n/a" if value is None else f"{value / 2**20:.1f} MiB"


# ----------------------------------------------------------------------------- targets


def find(records: list[dict], config: str, path: str, head_dim: int, seq: int, mode: str) -> dict | None:
    for record in records:
        if (record["config"], record["path"], record["head_dim"], record["seq"], record["mode"]) == (
            config,
            path,
            head_dim,
            seq,
            mode,
        ):
            return record
    return None


def _value(records, field, config, path, head_dim, seq, mode=FWD_BWD):
    record = find(records, config, path, head_dim, seq, mode)
    return None if record is None or record["status"] != "ok" else record.get(field)


def _ratio(numerator, denominator) -> float | None:
    return None if numerator is None or not denominator else numerator / denominator


def memory_slope(records: list[dict], config: str, path: str, head_dim: int, mode: str = FWD_BWD):
    """Least-squares slope of log temp memory over log T (1 = linear, 2 = quadratic); None below 2 points."""
    points = [
        (math.log(r["seq"]), math.log(r["temp_bytes"]))
        for r in records
        if (r["config"], r["path"], r["head_dim"], r["mode"]) == (config, path, head_dim, mode)
        and r["status"] == "ok"
        and r.get("temp_bytes")
    ]
    if len(points) < 2:
        return None
    mean_x = sum(x for x, _ in points) / len(points)
    mean_y = sum(y for _, y in points) / len(points)
    var = sum((x - mean_x) ** 2 for x, _ in points)
    return sum((x - mean_x) * (y - mean_y) for x, y in points) / var if var else None


def _first_oom(records, config, path, head_dim, mode=FWD_BWD) -> int | None:
    seqs = [
        r["seq"]
        for r in records
        if (r["config"], r["path"], r["head_dim"], r["mode"]) == (config, path, head_dim, mode)
        and r["status"] == "oom"
    ]
    return min(seqs) if seqs else None


def _target(platform: str, description: str, value, met) -> dict:
    return {"platform": platform, "description": description, "value": value, "met": met}


def _at_most(value, bound):
    return None if value is None else bool(value <= bound)


def compute_targets(records: list[dict], head_dim: int = 128) -> dict:
    """The issue's targets from the records (kq_conv / head_mix, forward+backward, at head_dim, else the
    largest D measured); value and met are None where the records lack the points."""
    dims = sorted({r["head_dim"] for r in records if r.get("head_dim") is not None})
    d = head_dim if head_dim in dims or not dims else dims[-1]
    kq = "kq_conv"

    def val(field, path, seq, config=kq):
        return _value(records, field, config, path, d, seq)

    mem_ratio = _ratio(val("temp_bytes", "blockwise", 8192), val("temp_bytes", "reference", 8192))
    time_ratio = _ratio(val("median_s", "blockwise", 2048), val("median_s", "reference", 2048))
    slope = memory_slope(records, kq, "blockwise", d)
    pallas_dpa = _ratio(val("median_s", "pallas", 4096), val("median_s", DPA, 4096))
    ref_pallas = _ratio(val("median_s", "reference", 4096), val("median_s", "pallas", 4096))
    pallas_long = find(records, kq, "pallas", d, 32768, FWD_BWD)
    ref_oom = _first_oom(records, kq, "reference", d)
    long_value = {
        "pallas_status_at_32768": None if pallas_long is None else pallas_long["status"],
        "reference_first_oom_seq": ref_oom,
    }
    long_met = None
    if pallas_long is not None:
        long_met = pallas_long["status"] == "ok" and ref_oom is not None and ref_oom <= 32768
    mix = _ratio(val("median_s", "pallas", 4096, "head_mix"), val("median_s", DPA, 4096, "head_mix"))
    where = f"kq_conv, D={d}, forward+backward"
    ref_slope = memory_slope(records, kq, "reference", d)
    targets = [
        ("blockwise_over_reference_temp_memory_at_8192", "cpu", "blockwise temp memory at T=8192 <= 1/8 "
         "of reference", mem_ratio, _at_most(mem_ratio, 1 / 8)),
        ("blockwise_over_reference_time_at_2048", "cpu", "blockwise time at T=2048 <= 1.5x reference",
         time_ratio, _at_most(time_ratio, 1.5)),
        ("blockwise_temp_memory_loglog_slope", "cpu", "blockwise temp memory linear in T (log-log slope "
         "<= 1.2)", slope, None if slope is None else bool(slope <= 1.2)),
        ("reference_temp_memory_loglog_slope", "cpu", "reference temp memory log-log slope (for contrast: "
         "~2)", ref_slope, None),
        ("pallas_over_dpa_time_at_4096", "gpu", "pallas time at T=4096 within 3x of cuDNN", pallas_dpa,
         _at_most(pallas_dpa, 3)),
        ("reference_over_pallas_time_at_4096", "gpu", "pallas >= 5x faster than reference at T=4096",
         ref_pallas, None if ref_pallas is None else bool(ref_pallas >= 5)),
        ("pallas_runs_at_32768_where_reference_ooms", "gpu", "pallas runs at T=32768, reference runs out "
         "of memory", long_value, long_met),
    ]  # fmt: skip
    out = {"head_dim": d}
    for name, platform, description, value, met in targets:
        out[name] = _target(platform, f"{where}: {description}", value, met)
    out["head_mix_pallas_over_dpa_time_at_4096"] = _target(
        "gpu", f"head_mix, D={d}, forward+backward: pallas time at T=4096 within 1.5x of cuDNN", mix,
        _at_most(mix, 1.5),
    )  # fmt: skip
    return out


# ----------------------------------------------------------------------------- plot and table


def _pick_config(report: dict, config: str | None) -> str:
    """config, or kq_conv when measured, else the first config measured."""
    if config is not None:
        return config
    configs = report["settings"]["configs"]
    return "kq_conv" if "kq_conv" in configs or not configs else configs[0]


def plot(report: dict, path: Path, config: str | None = None, head_dim: int = 128) -> Path | None:
    """Time and temp memory against T (log-log), one panel per mode and metric, a line per path, for
    config (default kq_conv) at head_dim (else the largest D measured)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    config = _pick_config(report, config)
    records = [r for r in report["records"] if r["config"] == config]
    dims = sorted({r["head_dim"] for r in records})
    if not dims:
        return None
    d = head_dim if head_dim in dims else dims[-1]
    metrics = (("median_s", "median time (ms)", 1e3), ("temp_bytes", "temp memory (MiB)", 2.0**-20))
    fig, axes = plt.subplots(len(metrics), len(MODES), figsize=(11, 8), squeeze=False)
    for row, (field, label, scale) in enumerate(metrics):
        for col, mode in enumerate(MODES):
            ax = axes[row][col]
            for name in report["settings"]["paths"]:
                mine = [r for r in records if (r["path"], r["head_dim"], r["mode"]) == (name, d, mode)]
                ok = [r for r in mine if r["status"] == "ok" and r.get(field) is not None]
                if not ok:
                    continue
                oom = [r["seq"] for r in mine if r["status"] == "oom"]
                tail = f" (oom at T={oom[0]})" if oom else ""
                ax.plot([r["seq"] for r in ok], [scale * r[field] for r in ok], "o-", label=name + tail)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("sequence length T")
            ax.set_ylabel(label)
            ax.set_title(mode)
            ax.grid(True, which="both", alpha=0.3)
            if ax.lines:
                ax.legend(fontsize=8)
    settings = report["settings"]
    fig.suptitle(
        f"{config} attention, D={d}, H={settings['heads']}, B={settings['batch']}, {settings['dtype']} "
        f"on {report['device_kind']} ({report['platform']})"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _cell(record: dict | None) -> str:
    if record is None:
        return ""
    if record["status"] != "ok":
        return record["status"]
    time_text = "-" if record.get("median_s") is None else f"{1e3 * record['median_s']:.1f}"
    return f"{time_text} / {_mib_short(record.get('temp_bytes'))}"


def _mib_short(value) -> str:
    if value is None:
        return "n/a"
    mib = value / 2**20
    return f"{mib:.0f}" if mib >= 10 else f"{mib:.2g}"


def _fmt_ratio(value) -> str:
    return "" if value is None else f"{value:.2f}"


def render_table(report: dict, config: str | None = None, head_dim: int = 128, mode: str = FWD_BWD) -> str:
    """The README's markdown (markers included): per T, each path's time (ms) / temp memory (MiB), then
    ratios, for one config (default kq_conv), head dim (else the largest measured) and mode."""
    config = _pick_config(report, config)
    records = [r for r in report["records"] if r["config"] == config and r["mode"] == mode]
    dims = sorted({r["head_dim"] for r in records})
    d = head_dim if head_dim in dims or not dims else dims[-1]
    records = [r for r in records if r["head_dim"] == d]
    paths = [p for p in report["settings"]["paths"] if any(r["path"] == p and r["status"] != "skipped"
                                                           for r in records)]  # fmt: skip
    skipped = {r["path"]: r["reason"] for r in records if r["status"] == "skipped" and r["path"] not in paths}
    ratios = []
    if {"blockwise", "reference"} <= set(paths):
        ratios += [("blockwise / reference time", "median_s", "blockwise", "reference")]
        ratios += [("blockwise / reference memory", "temp_bytes", "blockwise", "reference")]
    if {"pallas", DPA} <= set(paths):
        ratios += [(f"pallas / {_dpa_label(records)} time", "median_s", "pallas", DPA)]
    settings = report["settings"]
    lines = [
        f"`{config}` layer, {mode}, D={d}, H={settings['heads']}, Hkv={settings['kv_heads']}, "
        f"B={settings['batch']}, {settings['dtype']}, causal; measured on {report['device_kind']} "
        f"({report['platform']}), jax {report['jax_version']}, {report['timestamp_utc'][:10]}. "
        "Cells: median time in ms / compiled temp memory in MiB (`-`: compiled only, not timed)."
        + ("" if report.get("complete", True) else " **Incomplete run.**"),
        "",
        "| T | " + " | ".join([*(_path_label(p, records) for p in paths), *(r[0] for r in ratios)]) + " |",
        "|---:|" + "---:|" * (len(paths) + len(ratios)),
    ]  # fmt: skip
    for seq in sorted({r["seq"] for r in records}):
        cells = [_cell(find(records, config, p, d, seq, mode)) for p in paths]
        for _, field, num, den in ratios:
            cells.append(_fmt_ratio(_ratio(_value(records, field, config, num, d, seq, mode),
                                           _value(records, field, config, den, d, seq, mode))))  # fmt: skip
        lines.append(f"| {seq} | " + " | ".join(cells) + " |")
    if skipped:
        lines += ["", "Not measured: " + "; ".join(f"{p} ({reason})" for p, reason in skipped.items()) + "."]
    lines += ["", f"Full results: `bench/results/attention-{report['device']}.json` and `.png`."]
    return "\n".join(lines)


def _dpa_label(records: list[dict]) -> str:
    used = {r.get("dpa_implementation") for r in records if r["path"] == DPA and r["status"] == "ok"}
    return "cudnn" if used == {"cudnn"} else DPA


def _path_label(path: str, records: list[dict]) -> str:
    return f"{DPA} ({_dpa_label(records)})" if path == DPA and _dpa_label(records) == "cudnn" else path


def newest_report(folder: Path) -> Path:
    """The attention-*.json in folder with the latest timestamp_utc."""
    files = sorted(folder.glob("attention-*.json"))
    if not files:
        raise FileNotFoundError(f"no attention-*.json in {folder}")
    return max(files, key=lambda f: (json.loads(f.read_text()).get("timestamp_utc", ""), f.stat().st_mtime))


def write_readme(readme: Path, report: dict) -> None:
    """Replaces the region between the attention-table markers of readme (markers kept) by the table."""
    replace_marked(readme, MARKERS, render_table(report))


# ----------------------------------------------------------------------------- command line


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench/attention.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--paths", nargs="+", default=list(PATHS), choices=PATHS, metavar="PATH")
    parser.add_argument(
        "--configs", nargs="+", default=list(DEFAULT_CONFIGS), choices=CONFIGS, metavar="CONFIG"
    )
    parser.add_argument(
        "--head-dims",
        nargs="+",
        type=int,
        metavar="D",
        help="head dims D (default: 128 on CPU, 64 128 otherwise)",
    )
    parser.add_argument("--min-len", type=int, default=512, help="first T (doubling from there)")
    parser.add_argument("--max-len", type=int, help="last timed T (default: 2048 on CPU, 32768 otherwise)")
    parser.add_argument(
        "--memory-max-len", type=int, help="last compiled-only T (default: 8192 on CPU, --max-len otherwise)"
    )
    parser.add_argument("--iters", type=int, help="timed runs per point (default: 3 on CPU, 10 otherwise)")
    parser.add_argument("--warmup", type=int, help="untimed runs per point (default: 1 on CPU, 3 otherwise)")
    parser.add_argument(
        "--point-seconds",
        type=float,
        help="stop timing a point once its timed runs add up to this (default: 10 on CPU, 30 otherwise)",
    )
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32", "float16"))
    parser.add_argument("--heads", type=int, default=16, help="query heads H")
    parser.add_argument("--kv-heads", type=int, help="key/value heads Hkv (default: H)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"), help="folder for JSON and PNG")
    parser.add_argument(
        "--append",
        action="store_true",
        help="keep the records of the existing JSON for this device whose (config, path, D, T) this run "
        "does not measure (e.g. a sweep split into several shorter runs)",
    )
    parser.add_argument(
        "--readme",
        nargs="?",
        const=str(ROOT / "README.md"),
        help="only rewrite the table in this README (default README.md) from the newest JSON in --out",
    )
    args = parser.parse_args(argv)
    args.platform = jax.default_backend()
    defaults = CPU_DEFAULTS if args.platform == "cpu" else ACCELERATOR_DEFAULTS
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.memory_max_len is None:
        args.memory_max_len = args.max_len
    if args.kv_heads is None:
        args.kv_heads = args.heads
    for name in ("min_len", "max_len", "memory_max_len", "iters", "heads", "kv_heads", "batch"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}={getattr(args, name)} is invalid: must be >= 1")
    if args.point_seconds <= 0:
        parser.error(f"--point-seconds={args.point_seconds} is invalid: must be > 0")
    if args.warmup < 0:
        parser.error(f"--warmup={args.warmup} is invalid: must be >= 0")
    if any(d < 1 for d in args.head_dims):
        parser.error(f"--head-dims={args.head_dims} is invalid: must be >= 1")
    if args.heads % args.kv_heads:
        parser.error(f"--kv-heads={args.kv_heads} is invalid: must divide --heads={args.heads}")
    return args


def settings_of(args: argparse.Namespace) -> dict:
    names = ("paths", "configs", "head_dims", "min_len", "max_len", "memory_max_len", "iters", "warmup")
    names += ("point_seconds",)
    settings = {name: getattr(args, name) for name in names}
    settings.update(dtype=args.dtype, heads=args.heads, kv_heads=args.kv_heads, batch=args.batch, causal=True)
    settings["layer_configs"] = {
        name: dataclasses.asdict(layer_config(name, args.heads)) for name in args.configs
    }
    settings["implementations_built"] = list(IMPLEMENTATIONS)
    settings["flops_source"] = (
        "XLA's cost_analysis of the compiled executable; a loop body (lax.map, scan: the blockwise path) "
        "counts once, so looped paths are undercounted, and custom kernels count what they declare"
    )
    return settings


COMPARABLE = ("dtype", "heads", "kv_heads", "batch", "causal")


def appended_to(report: dict, json_path: Path) -> list[dict]:
    """With --append: the records of the existing json_path that this run does not replace (another
    config, path, D or T); merges its settings and runs into report. Raises SystemExit if its settings
    are not comparable."""
    if not json_path.is_file():
        report["runs"] = [{"command": report["command"], "timestamp_utc": report["timestamp_utc"]}]
        return []
    previous = json.loads(json_path.read_text())
    old, new = previous["settings"], report["settings"]
    if any(old.get(name) != new[name] for name in COMPARABLE):
        diff = {name: (old.get(name), new[name]) for name in COMPARABLE if old.get(name) != new[name]}
        raise SystemExit(f"--append: {json_path} was measured with other settings (old, new): {diff}")
    seqs = [seq for seq, _ in lengths(argparse.Namespace(**new))]
    measured = set(itertools.product(new["configs"], new["paths"], new["head_dims"], seqs))
    kept = [
        r for r in previous["records"] if (r["config"], r["path"], r["head_dim"], r["seq"]) not in measured
    ]
    for name, order in (("paths", PATHS), ("configs", CONFIGS), ("head_dims", None)):
        values = set(old[name]) | set(new[name])
        new[name] = sorted(values, key=order.index) if order else sorted(values)
    new["layer_configs"] = {**old.get("layer_configs", {}), **new["layer_configs"]}
    runs = previous.get("runs") or [
        {"command": previous["command"], "timestamp_utc": previous["timestamp_utc"]}
    ]
    report["runs"] = [*runs, {"command": report["command"], "timestamp_utc": report["timestamp_utc"]}]
    return kept


def main(argv: list[str] | None = None) -> dict:
    """Runs the sweep (or, with --readme, only rewrites the README table); returns the report."""
    args = parse_args(argv)
    if args.readme is not None:
        report_path = newest_report(Path(args.out))
        report = json.loads(report_path.read_text())
        try:
            write_readme(Path(args.readme), report)
        except ValueError as error:
            raise SystemExit(f"error: {error}") from None
        print(f"wrote the attention table of {args.readme} from {report_path}")
        return report
    device = jax.devices()[0]
    print(
        f"{device.device_kind} ({args.platform}), jax {jax.__version__}; lengths {lengths(args)}", flush=True
    )
    start = time.perf_counter()
    report = {
        "device": device_slug(device.device_kind),
        "device_kind": device.device_kind,
        "platform": device.platform,
        "jax_version": jax.__version__,
        "command": shlex.join(sys.orig_argv if argv is None else ["bench/attention.py", *argv]),
        "timestamp_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "complete": False,
        "total_seconds": None,
        "settings": settings_of(args),
        "targets": None,
        "records": [],
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / f"attention-{report['device']}.json"

    kept = appended_to(report, json_path) if args.append else []

    def save(records: list[dict]) -> None:  # after every record: a run cut short keeps what it measured
        records = kept + records
        report.update(
            records=records, targets=compute_targets(records), total_seconds=time.perf_counter() - start
        )
        write_text_atomic(json_path, json.dumps(report, indent=2) + "\n")

    records = sweep(args, save)
    report["complete"] = True
    save(records)
    png_path = plot(report, out / f"attention-{report['device']}.png")
    _print_summary(report, [json_path, png_path])
    return report


def _print_summary(report: dict, paths: list) -> None:
    print(f"\n{report['device_kind']}: {report['total_seconds']:.0f} s")
    print(render_table(report))
    print("\nTargets:")
    for name, target in report["targets"].items():
        if name == "head_dim":
            continue
        value = target["value"]
        shown = f"{value:.3f}" if isinstance(value, float) else json.dumps(value)
        met = {None: "n/a", True: "met", False: "NOT met"}[target["met"]]
        print(f"  [{target['platform']}] {target['description']}: {shown} ({met})")
    for path in paths:
        if path is not None:
            print(f"wrote {path}")


if __name__ == "__main__":
    main()
