"""Compile the attention paths for TPUs and GPUs with the real compilers, on a host without the chips.

    python -m bench.compile_check [--targets v4 v5e v5p v6e h100 h200] [--layers kq_conv kq_conv_mix4
        head_mix mix_all kq_conv_mix_all full] [--head-dims 64 128] [--lengths 1024 4096 32768] [--modes fwd fwd+bwd]
        [--paths pallas blockwise reference dot_product_attention] [--out bench/results]
    python -m bench.compile_check --readme [README.md]   # rewrites the README's table from the JSON

For every target, layer, head dim D, length T and mode it compiles the layer (multi_token_attention
with the given implementation, or jax.nn.dot_product_attention: cuDNN on GPU when XLA accepts it, XLA
otherwise) for a compile-only device (kernels/aot.py: libtpu topologies, the CUDA plugin with the GPU
descriptions of kernels/targets/) and records: accepted or the compiler's message; for the fused
kernels each kernel's tiles and, on GPU, its shared memory (XLA's Triton) and registers / spills
(ptxas -v, when on PATH), on TPU its scoped VMEM and XLA's view of its cost; the compiled
memory_analysis() (temp, argument, output bytes) and cost_analysis() where the compiler gives one
(TPU); and a ROOFLINE ESTIMATE, max(FLOPs / peak, bytes / HBM bandwidth), from kernels/roofline.py's
analytical counts and kernels/chips.py's published peaks. Nothing runs: no time here is measured.

Writes <out>/compile-<target>.json, merging with what is there (a point is replaced by its rerun),
so a long matrix can be split over several commands. B=1, H=16, Hkv=16, bfloat16, causal.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import itertools
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from bench.attention import DPA, layer_config  # noqa: E402
from bench.readme import replace_marked  # noqa: E402
from kernels import aot, roofline  # noqa: E402  (aot sets the plugins' environment before any backend starts)
from kernels.chips import CHIPS, get_chip  # noqa: E402
from kernels.ops import default_block_sizes, unsupported_option  # noqa: E402
from mta_jax.attention import multi_token_attention  # noqa: E402
from mta_jax.params import init_mta_params  # noqa: E402
from train.errors import short_error  # noqa: E402
from train.files import write_text_atomic  # noqa: E402

LAYERS = ("kq_conv", "kq_conv_mix4", "head_mix", "mix_all", "kq_conv_mix_all", "full")
PATHS = ("pallas", "blockwise", "reference", DPA)
MODES = (roofline.FWD, roofline.FWD_BWD)
MARKERS = ("<!-- compile-table:start -->", "<!-- compile-table:end -->")
HEADS, BATCH, DTYPE = 16, 1, jnp.bfloat16
REFERENCE_MAX_LEN = 8192  # the reference path's [B, H, T, S] arrays: compiled up to here


@dataclasses.dataclass(frozen=True)
class Point:
    layer: str
    path: str
    head_dim: int
    seq: int
    mode: str

    def key(self) -> tuple:
        return (self.layer, self.path, self.head_dim, self.seq, self.mode)


def _layer_of(cfg) -> roofline.Layer:
    return roofline.Layer(cfg.pre_conv, cfg.post_conv, cfg.pre_head_mix or 0, cfg.post_head_mix or 0)


def _function(point: Point, cfg, dpa_implementation: str | None):
    """f(q, k, v, params, cotangent): the layer's output, or the gradients of sum(out * cotangent)."""
    if point.path == DPA:

        def attend(q, k, v, params):
            return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=dpa_implementation)
    else:

        def attend(q, k, v, params):
            return multi_token_attention(q, k, v, params, cfg, implementation=point.path)

    if point.mode == roofline.FWD:
        return lambda q, k, v, params, cotangent: attend(q, k, v, params)

    def loss(q, k, v, params, cotangent):
        return jnp.sum(attend(q, k, v, params).astype(jnp.float32) * cotangent.astype(jnp.float32))

    return jax.grad(loss, argnums=(0, 1, 2, 3))


def abstract_inputs(device, shape: tuple[int, int, int, int], cfg, dtype=DTYPE):
    """q, k, v, the layer's MTA parameters and the output cotangent, as abstract arrays on `device`
    (a compile-only chip); shape = (batch, seq, heads, head_dim)."""
    _, _, heads, head_dim = shape
    params = jax.eval_shape(lambda: init_mta_params(cfg, heads, head_dim, jax.random.key(0)))
    params = jax.tree.map(lambda p: aot.abstract(device, p.shape, p.dtype), params)
    q, k, v, cotangent = (aot.abstract(device, shape, dtype) for _ in range(4))
    return q, k, v, params, cotangent


def _inputs(device, point: Point, cfg):
    return abstract_inputs(device, (BATCH, point.seq, HEADS, point.head_dim), cfg)


@dataclasses.dataclass
class _CudnnVersion:
    """jax asks the (absent) cuDNN library for its version at trace time; answer with the target's."""

    version: int = 91000

    def __enter__(self):
        from jax._src.cudnn import fused_attention_stablehlo as cudnn

        self._module, self._saved = cudnn, cudnn.check_cudnn_version
        cudnn.check_cudnn_version = lambda: self.version
        return self

    def __exit__(self, *exc):
        self._module.check_cudnn_version = self._saved


def tpu_kernels(lowered) -> list[dict]:
    """Each Mosaic kernel of a lowered TPU computation: name, scoped VMEM asked for, its cost estimate."""
    from jax._src.lib.mlir import ir

    found = []

    def walk(op):
        for region in op.regions:
            for block in region.blocks:
                for inner in block.operations:
                    if inner.operation.name == "stablehlo.custom_call" and (
                        ir.StringAttr(inner.attributes["call_target_name"]).value == "tpu_custom_call"
                    ):
                        config = json.loads(ir.StringAttr(inner.attributes["backend_config"]).value)
                        name = ir.StringAttr(inner.attributes["kernel_name"]).value
                        scoped = config.get("scoped_memory_configs") or [{}]
                        estimate = config["custom_call_config"].get("cost_estimate") or {}
                        kernel = {"name": name, "vmem_limit_bytes": scoped[0].get("size")}
                        for k in ("flops", "bytes_accessed"):
                            kernel[f"estimate_{k}"] = estimate.get(k)
                        found.append(kernel)
                    walk(inner.operation)

    walk(lowered.compiler_ir("stablehlo").operation)
    return found


def _gpu_kernels(lowered) -> list[dict]:
    """Each Triton kernel: XLA's Triton compile (shared memory, or its error) and ptxas's registers."""
    reports = []
    for kernel in aot.triton_kernels(lowered):
        report = {
            "name": kernel["name"],
            "num_warps": kernel["num_warps"],
            "num_stages": kernel["num_stages"],
        }
        try:
            compiled = aot.compile_triton(kernel)
        except Exception as error:  # noqa: BLE001 - the compiler's refusal is the finding
            report.update(accepted=False, error=short_error(error))
        else:
            report.update(accepted=True, smem_bytes=compiled["smem_bytes"])
            report["ptxas"] = aot.ptxas_report(compiled["ptx"])
        reports.append(report)
    return reports


def _tiles(chip, point: Point, cfg) -> dict | None:
    """The fused kernels' tiles for this point (what the pallas path picks for the chip)."""
    q = jax.ShapeDtypeStruct((BATCH, point.seq, HEADS, point.head_dim), DTYPE)
    blocks = default_block_sizes("tpu" if chip.platform == "tpu" else "triton", chip, q, q, cfg)
    return {name: dataclasses.asdict(getattr(blocks, name)) for name in ("fwd", "dq", "dkv")}


def _model_cost(point: Point, cfg, tiles: dict | None, dpa_implementation: str | None, chip) -> dict:
    shape = roofline.Shape(BATCH, HEADS, HEADS, point.seq, point.seq, point.head_dim)
    if point.path == DPA:
        return roofline.dot_product_attention(shape, point.mode, fused=dpa_implementation == "cudnn")
    layer = _layer_of(cfg)
    if point.path == "reference":
        return roofline.reference(layer, shape, point.mode)
    if point.path == "blockwise":
        return roofline.blockwise(layer, shape, point.mode)
    pairs = {name: (t["block_q"], t["block_k"]) for name, t in tiles.items()}
    slabs = (cfg.pre_conv or (1, 1))[0]
    chunks = {name: slabs // (t.get("slab_chunk") or slabs) for name, t in tiles.items()}
    return roofline.pallas(layer, shape, point.mode, pairs, chunks, cached=chip.platform == "cuda")


def _xla_cost(compiled) -> dict | None:
    try:
        cost = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - GPU targets give none
        return None
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else None
    if not cost or cost.get("flops") is None:
        return None
    return {"flops": float(cost["flops"]), "bytes": float(cost.get("bytes accessed", 0.0))}


def _memory(compiled) -> dict:
    analysis = compiled.memory_analysis()
    return {
        "temp_bytes": analysis.temp_size_in_bytes,
        "argument_bytes": analysis.argument_size_in_bytes,
        "output_bytes": analysis.output_size_in_bytes,
    }


def check_point(chip, device, point: Point) -> dict:
    """Compile one point for `chip`; the record (never raises for a compiler's refusal)."""
    cfg = layer_config(point.layer, HEADS)
    record = {**dataclasses.asdict(point), "accepted": None, "error": None}
    missing = unsupported_option(cfg, dtype=DTYPE, head_dim=point.head_dim, platform=chip.platform, chip=chip)
    if point.path == "pallas" and missing:
        return {**record, "accepted": None, "skipped": f"the fused kernels do not support {missing}"}
    if point.path == "reference" and point.seq > REFERENCE_MAX_LEN:
        return {**record, "skipped": f"O(T^2) memory: compiled up to T={REFERENCE_MAX_LEN}"}
    choices = ("cudnn", "xla") if point.path == DPA and chip.platform == "cuda" else (None,)
    if point.path == DPA and chip.platform != "cuda":
        choices = ("xla",)
    start = time.perf_counter()
    kernels: list[dict] = []
    for index, choice in enumerate(choices):
        try:
            with aot.target_mesh(device), _CudnnVersion():
                fn = _function(point, cfg, choice)
                lowered = jax.jit(fn).trace(*_inputs(device, point, cfg)).lower()
                kernels = []
                if point.path == "pallas":
                    kernels = _gpu_kernels(lowered) if chip.platform == "cuda" else tpu_kernels(lowered)
                compiled = lowered.compile()
        except Exception as error:  # noqa: BLE001 - the compiler's message is the record
            if index + 1 < len(choices):
                record["dpa_fallback_reason"] = short_error(error)
                continue
            record.update(accepted=False, error=short_error(error))
            if point.path == "pallas":
                record["kernels"] = kernels
            return record
        record["dpa_implementation"] = choice
        break
    tiles = _tiles(chip, point, cfg) if point.path == "pallas" else None
    model = _model_cost(point, cfg, tiles, record.get("dpa_implementation"), chip)
    record.update(
        accepted=True,
        compile_s=round(time.perf_counter() - start, 1),
        memory=_memory(compiled),
        xla_cost=_xla_cost(compiled),
        model_cost=model,
        roofline_estimate=roofline.estimate_seconds(model, chip.peak_flops, chip.hbm_bandwidth),
    )
    if point.path == "pallas":
        record.update(tiles=tiles, kernels=kernels)
    return record


# ----------------------------------------------------------------------------------------------------------
# Results file, targets, README table


def _versions(chip) -> dict:
    from importlib import metadata

    def version(name):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    out = {"jax": jax.__version__, "jaxlib": version("jaxlib")}
    if chip.platform == "tpu":
        out["libtpu"] = version("libtpu")
    else:
        out["jax-cuda12-plugin"] = version("jax-cuda12-plugin")
        import shutil
        import subprocess

        if ptxas := shutil.which("ptxas"):
            text = subprocess.run([ptxas, "--version"], capture_output=True, text=True).stdout
            out["ptxas"] = text.strip().splitlines()[-1] if text.strip() else None
    return out


def load(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def merge(old: dict, new_points: list[dict], header: dict) -> dict:
    points = {
        tuple(p[k] for k in ("layer", "path", "head_dim", "seq", "mode")): p for p in old.get("points", [])
    }
    for p in new_points:
        points[tuple(p[k] for k in ("layer", "path", "head_dim", "seq", "mode"))] = p
    ordered = sorted(
        points.values(), key=lambda p: (p["layer"], p["head_dim"], p["mode"], p["path"], p["seq"])
    )
    result = {**header, "points": ordered}
    result["targets"] = targets(result)
    return result


def _find(data: dict, **match) -> dict | None:
    for p in data.get("points", []):
        if all(p.get(k) == v for k, v in match.items()):
            return p
    return None


def _temp(p: dict | None) -> float | None:
    return p["memory"]["temp_bytes"] if p and p.get("accepted") else None


def targets(data: dict) -> dict:
    """The issue's goals, from the points present (None where a point is missing)."""
    out = {}
    base = dict(layer="kq_conv_mix4", head_dim=128, mode=roofline.FWD_BWD)
    pallas4k = _temp(_find(data, path="pallas", seq=4096, **base))
    block4k = _temp(_find(data, path="blockwise", seq=4096, **base))
    ref4k = _temp(_find(data, path="reference", seq=4096, **base))
    pallas32k = _find(data, path="pallas", seq=32768, **base)

    def ratio(a, b):
        return None if a is None or b is None else a / b

    out["pallas_over_blockwise_temp_at_4096"] = {"value": ratio(pallas4k, block4k), "goal": "<= 1.5"}
    out["pallas_over_reference_temp_at_4096"] = {"value": ratio(pallas4k, ref4k), "goal": "<= 0.125"}
    out["pallas_temp_32768_over_4096"] = {"value": ratio(_temp(pallas32k), pallas4k), "goal": "<= 9"}
    if pallas32k is not None:
        hbm = data.get("chip", {}).get("hbm_bytes")
        mem = pallas32k.get("memory") or {}
        total = sum(mem.get(k) or 0 for k in ("temp_bytes", "argument_bytes", "output_bytes"))
        out["pallas_32768_fits_hbm"] = {"value": bool(pallas32k.get("accepted")) and total <= (hbm or 0),
                                        "bytes": total, "hbm_bytes": hbm}  # fmt: skip
    kernels = [k for p in data.get("points", []) if p["path"] == "pallas" for k in p.get("kernels") or []]
    rejected = [p for p in data.get("points", []) if p["path"] == "pallas" and p.get("accepted") is False]
    spills = [k["ptxas"]["spill_store_bytes"] for k in kernels if (k.get("ptxas") or {}).get("registers")]
    out["pallas_points_rejected"] = len(rejected)
    if spills:
        out["max_spill_store_bytes"] = max(spills)
    return out


def gb(n) -> str:
    return "-" if n is None else f"{n / 2**20:.0f}"


def kernel_summary(results: list[dict]) -> list[str]:
    """Markdown rows: per target, the fused kernels the compiler accepted and their largest resources."""
    lines = [
        "Fused kernels at their default tiles (every layer, D, T and mode compiled for the target): "
        "accepted / compiled points; on GPU the largest shared memory of one kernel (XLA's Triton), "
        "registers and spill stores (ptxas -v), on TPU the largest VMEM limit a kernel asked for.",
        "",
        "| target | pallas points accepted | kernels | largest smem / VMEM limit | max registers | "
        "max spill stores (kernel) | kernels with serialized wgmma |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for data in results:
        points = [p for p in data["points"] if p["path"] == "pallas" and not p.get("skipped")]
        accepted = [p for p in points if p.get("accepted")]
        kernels = [k for p in accepted for k in p.get("kernels") or []]
        memory = max((k.get("smem_bytes") or k.get("vmem_limit_bytes") or 0 for k in kernels), default=0)
        ptxas = [(k.get("ptxas"), k["name"], p) for p in accepted for k in p.get("kernels") or []]
        ptxas = [entry for entry in ptxas if entry[0]]
        regs = max((r["registers"] or 0 for r, _, _ in ptxas), default=None)
        spill, where = 0, ""
        for r, name, p in ptxas:
            if (r.get("spill_store_bytes") or 0) > spill:
                spill = r["spill_store_bytes"]
                where = f" ({name.removeprefix('mta_core_')}, {p['layer']} D={p['head_dim']})"
        serial = sum(bool(r.get("wgmma_serialized")) for r, _, _ in ptxas)
        unit = "KiB" if data["chip"]["platform"] == "cuda" else "MiB"
        size = memory / (2**10 if unit == "KiB" else 2**20)
        lines.append(
            f"| {data['target']} | {len(accepted)} / {len(points)} | {len(kernels)} | {size:.0f} {unit} | "
            f"{'-' if regs is None else regs} | {'-' if regs is None else f'{spill} B{where}'} | "
            f"{'-' if regs is None else f'{serial} / {len(ptxas)}'} |"
        )
    return lines + [""]


def readme_table(results: list[dict]) -> str:
    """Markdown: the kernel summary, then per target temp memory (MiB) and roofline ESTIMATE (ms) per
    path at D=128, fwd+bwd."""
    lines = kernel_summary(results)
    for data in results:
        chip = data["chip"]
        lines.append(
            f"**{data['target']}** ({chip['device_kind']}; compiled {data['date']} with "
            + ", ".join(f"{k} {v}" for k, v in data["versions"].items() if v)
            + "). Forward+backward, D=128, H=16, B=1, bf16, causal. Cells: compiled temp memory MiB / "
            "roofline estimate ms (an estimate, not a measurement); `x` = rejected by the compiler; `n/a` = "
            "the fused kernels refuse the layer on this chip (auto runs it blockwise; the JSON says why)."
        )
        lines.append("")
        lines.append("| layer | T | pallas | blockwise | reference | dot_product_attention |")
        lines.append("|---|---:|---:|---:|---:|---:|")
        seen = sorted(
            {
                (p["layer"], p["seq"])
                for p in data["points"]
                if p["head_dim"] == 128 and p["mode"] == roofline.FWD_BWD
            }
        )
        for layer, seq in seen:
            cells = []
            for path in PATHS:
                p = _find(data, layer=layer, seq=seq, path=path, head_dim=128, mode=roofline.FWD_BWD)
                if p is not None and p.get("skipped") and path == "pallas":
                    cells.append("n/a")
                elif p is None or p.get("skipped"):
                    cells.append("")
                elif not p["accepted"]:
                    cells.append("x")
                else:
                    est = p["roofline_estimate"]["estimate_s"] * 1e3
                    cells.append(f"{gb(p['memory']['temp_bytes'])} / {est:.2f}")
            lines.append(f"| {layer} | {seq} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def recost(path: Path) -> None:
    """Recompute the analytical costs and roofline estimates of a results file in place (they need no
    compiler: the point, the tiles it compiled with and the chip table)."""
    data = load(path)
    chip = get_chip(data["target"])
    for record in data.get("points", []):
        if not record.get("accepted"):
            continue
        point = Point(record["layer"], record["path"], record["head_dim"], record["seq"], record["mode"])
        cfg = layer_config(point.layer, HEADS)
        model = _model_cost(point, cfg, record.get("tiles"), record.get("dpa_implementation"), chip)
        record["model_cost"] = model
        record["roofline_estimate"] = roofline.estimate_seconds(model, chip.peak_flops, chip.hbm_bandwidth)
    write_text_atomic(path, json.dumps(data, indent=1) + "\n")


def write_readme(readme: Path, out: Path) -> None:
    results = [load(out / f"compile-{name}.json") for name in CHIPS]
    results = [r for r in results if r.get("points")]
    replace_marked(readme, MARKERS, readme_table(results))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", nargs="+", default=list(CHIPS), choices=list(CHIPS))
    parser.add_argument("--layers", nargs="+", default=list(LAYERS), choices=LAYERS)
    parser.add_argument("--paths", nargs="+", default=list(PATHS), choices=PATHS)
    parser.add_argument("--head-dims", nargs="+", type=int, default=[64, 128])
    parser.add_argument("--lengths", nargs="+", type=int, default=[1024, 2048, 4096, 8192, 16384, 32768])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--out", default=str(ROOT / "bench" / "results"))
    parser.add_argument("--readme", nargs="?", const=str(ROOT / "README.md"), help="only rewrite the table")
    parser.add_argument("--recost", action="store_true", help="only recompute the estimates in the JSON")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if args.recost:
        for name in args.targets:
            if (out / f"compile-{name}.json").exists():
                recost(out / f"compile-{name}.json")
        return 0
    if args.readme:
        try:
            write_readme(Path(args.readme), out)
        except ValueError as error:
            raise SystemExit(f"error: {error}") from None
        return 0
    out.mkdir(parents=True, exist_ok=True)
    for name in args.targets:
        chip = get_chip(name)
        try:
            device = aot.compile_only_device(chip)
        except aot.CompilerUnavailable as error:
            print(f"{name}: skipped: {error}", flush=True)
            continue
        path = out / f"compile-{name}.json"
        header = {
            "target": name,
            "chip": {**dataclasses.asdict(chip), "device_kind": device.device_kind},
            "versions": _versions(chip),
            "date": datetime.date.today().isoformat(),
            "note": "Nothing ran: memory is the compiler's, *_estimate values are roofline estimates.",
            "command": "python -m bench.compile_check "
            + " ".join(argv if argv is not None else sys.argv[1:]),
        }
        done = []
        grid = itertools.product(args.layers, args.head_dims, args.modes, args.lengths, args.paths)
        for layer, d, mode, seq, p in grid:
            record = check_point(chip, device, Point(layer, p, d, seq, mode))
            done.append(record)
            _print(name, record)
            write_text_atomic(path, json.dumps(merge(load(path), done, header), indent=1) + "\n")
        print(f"{name}: wrote {path}; targets: {json.dumps(load(path).get('targets'))}", flush=True)
    return 0


def _print(target: str, r: dict) -> None:
    head = f"{target} {r['layer']} {r['path']} D={r['head_dim']} T={r['seq']} {r['mode']}:"
    if r.get("skipped"):
        print(f"{head} skipped ({r['skipped']})", flush=True)
    elif not r["accepted"]:
        print(f"{head} REJECTED: {r['error']}", flush=True)
    else:
        est = r["roofline_estimate"]["estimate_s"] * 1e3
        extra = ""
        for k in r.get("kernels") or []:
            ptx = k.get("ptxas") or {}
            if "smem_bytes" in k:
                regs, spill = ptx.get("registers"), ptx.get("spill_store_bytes")
                extra += f" [{k['name']} smem {k['smem_bytes'] // 1024}K regs {regs} spill {spill}]"
            elif "vmem_limit_bytes" in k:
                extra += f" [{k['name']} vmem {(k['vmem_limit_bytes'] or 0) // 2**20}M]"
        print(f"{head} ok, temp {gb(r['memory']['temp_bytes'])} MiB, estimate {est:.2f} ms, "
              f"compiled in {r['compile_s']} s{extra}", flush=True)  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
