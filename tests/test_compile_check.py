"""bench/compile_check.py's bookkeeping and kernels/roofline.py's counts, without a compiler: the goals
computed from synthetic records, the README tables, --recost, ptxas's report parsed from a canned
output, and the roofline counts against hand counts. (The real compiles: test_compile_targets.py.)"""

from __future__ import annotations

import json
import subprocess

import pytest

from bench import compile_check
from bench.compile_check import MARKERS, kernel_summary, readme_table, recost, targets, write_readme
from kernels import aot, roofline
from kernels.chips import get_chip

MIB = 2**20


def _point(layer="kq_conv_mix4", path="pallas", seq=4096, temp=100 * MIB, accepted=True, kernels=None):
    return {
        "layer": layer, "path": path, "head_dim": 128, "seq": seq, "mode": "fwd+bwd", "accepted": accepted,
        "error": None if accepted else "Shared memory size limit exceeded",
        "memory": {"temp_bytes": temp, "argument_bytes": MIB, "output_bytes": MIB} if accepted else None,
        "roofline_estimate": {"estimate_s": 1e-3} if accepted else None, "kernels": kernels or [],
    }  # fmt: skip


def _gpu_kernel(name, smem, regs, spill, serialized=False):
    return {
        "name": name,
        "smem_bytes": smem,
        "ptxas": {"registers": regs, "spill_store_bytes": spill, "wgmma_serialized": serialized},
    }


def _data(points, target="h200"):
    chip = get_chip(target)
    chip_info = {"platform": chip.platform, "device_kind": "NVIDIA H200", "hbm_bytes": chip.hbm_bytes}
    return {"target": target, "chip": chip_info, "versions": {"jax": "0.10.2"}, "date": "2026-12-02",
            "points": points}  # fmt: skip


def test_targets_are_the_issue_ratios():
    data = _data([
        _point(temp=120 * MIB),
        _point(path="blockwise", temp=100 * MIB),
        _point(path="reference", temp=1200 * MIB),
        _point(seq=32768, temp=960 * MIB),
        _point(layer="head_mix", accepted=False),
    ])  # fmt: skip
    out = targets(data)
    assert out["pallas_over_blockwise_temp_at_4096"]["value"] == pytest.approx(1.2)
    assert out["pallas_over_reference_temp_at_4096"]["value"] == pytest.approx(0.1)
    assert out["pallas_temp_32768_over_4096"]["value"] == pytest.approx(8.0)
    assert out["pallas_32768_fits_hbm"]["value"] is True
    assert out["pallas_32768_fits_hbm"]["bytes"] == 962 * MIB
    assert out["pallas_points_rejected"] == 1


def test_targets_without_the_points_are_none():
    out = targets(_data([_point(layer="head_mix")]))
    assert out["pallas_over_blockwise_temp_at_4096"]["value"] is None
    assert "pallas_32768_fits_hbm" not in out


def test_kernel_summary_names_the_largest_spill_and_counts_serialized_wgmma():
    kernels_a = [_gpu_kernel("mta_core_fwd", 96 * 1024, 252, 0, serialized=True),
                 _gpu_kernel("mta_core_bwd_dq", 16 * 1024, 254, 0)]  # fmt: skip
    kernels_b = [_gpu_kernel("mta_core_bwd_dq", 64 * 1024, 255, 60)]
    data = _data([
        _point(layer="kq_conv", kernels=kernels_a),
        _point(layer="head_mix", kernels=kernels_b),
        _point(layer="full", accepted=False),
    ])  # fmt: skip
    row = [line for line in kernel_summary([data]) if line.startswith("| h200")]
    assert row == ["| h200 | 2 / 3 | 3 | 96 KiB | 255 | 60 B (bwd_dq, head_mix D=128) | 1 / 3 |"]


def test_readme_table_marks_rejections_and_labels_estimates():
    refused = {**_point(layer="mix_all", accepted=None), "skipped": "the fused kernels do not support ..."}
    skipped_reference = {**_point(layer="mix_all", path="reference", accepted=None), "skipped": "O(T^2)"}
    rejected = _point(layer="full", accepted=False)
    table = readme_table([_data([_point(), _point(path="blockwise"), rejected, refused, skipped_reference])])
    assert "roofline estimate ms (an estimate, not a measurement)" in table
    assert "| kq_conv_mix4 | 4096 | 100 / 1.00 | 100 / 1.00 |  |  |" in table
    assert "| full | 4096 | x |  |  |  |" in table
    # The kernels refuse mix_all on this chip; its reference point was not compiled.
    assert "| mix_all | 4096 | n/a |  |  |  |" in table


def test_write_readme_replaces_only_the_marked_region(tmp_path):
    out = tmp_path / "results"
    out.mkdir()
    (out / "compile-h200.json").write_text(json.dumps(_data([_point()])))
    readme = tmp_path / "README.md"
    readme.write_text(f"before\n{MARKERS[0]}\nold table\n{MARKERS[1]}\nafter\n")
    write_readme(readme, out)
    text = readme.read_text()
    assert text.startswith(f"before\n{MARKERS[0]}\n") and text.endswith(f"{MARKERS[1]}\nafter\n")
    assert "old table" not in text and "| kq_conv_mix4 | 4096 |" in text


def test_recost_recomputes_the_estimate_from_the_tiles(tmp_path):
    tiles = {name: {"block_q": 64, "block_k": 64, "slab_chunk": 0} for name in ("fwd", "dq", "dkv")}
    point = {**_point(layer="kq_conv", seq=1024), "tiles": tiles, "model_cost": None}
    path = tmp_path / "compile-v5e.json"
    path.write_text(json.dumps(_data([point], target="v5e")))
    recost(path)
    record = json.loads(path.read_text())["points"][0]
    shape = roofline.Shape(1, 16, 16, 1024, 1024, 128)
    layer = roofline.Layer(pre_conv=(6, 11))
    expected = roofline.pallas(layer, shape, "fwd+bwd", {n: (64, 64) for n in tiles}, {n: 1 for n in tiles})
    assert record["model_cost"] == expected
    chip = get_chip("v5e")
    estimate = roofline.estimate_seconds(expected, chip.peak_flops, chip.hbm_bandwidth)
    assert record["roofline_estimate"] == estimate


PTXAS_OUTPUT = """ptxas info    : Compiling entry function 'mta_core_fwd' for 'sm_90a'
ptxas info    : Function properties for mta_core_fwd
    48 bytes stack frame, 32 bytes spill stores, 40 bytes spill loads
ptxas warning : (C7515) Potential Performance Loss: wgmma.mma_async instructions are serialized due to \
insufficient register resources for the wgmma pipeline in the function 'mta_core_fwd'
ptxas info    : Used 255 registers, used 1 barriers
"""


def test_ptxas_report_parses_registers_spills_and_the_wgmma_reason(monkeypatch):
    monkeypatch.setattr(aot.shutil, "which", lambda name: "/usr/bin/ptxas")

    def fake_run(args, **kwargs):
        assert args[1] == "-arch=sm_90a" and "-v" in args
        return subprocess.CompletedProcess(args, 0, stdout="", stderr=PTXAS_OUTPUT)

    monkeypatch.setattr(aot.subprocess, "run", fake_run)
    report = aot.ptxas_report(".version 8.0")
    assert report["registers"] == 255
    spills = (report["spill_store_bytes"], report["spill_load_bytes"], report["stack_frame_bytes"])
    assert spills == (32, 40, 48)
    assert report["wgmma_serialized"] is True
    assert report["wgmma_serialized_reason"].startswith("insufficient register resources")


def test_ptxas_report_without_ptxas_is_none(monkeypatch):
    monkeypatch.setattr(aot.shutil, "which", lambda name: None)
    assert aot.ptxas_report("") is None


def test_causal_tile_pairs_and_visible_scores_by_hand():
    shape = roofline.Shape(1, 1, 1, 256, 256, 64)
    assert roofline._pairs(shape, 128, 128) == 3  # the two diagonal tiles and the one below
    assert roofline._pairs(shape, 64, 128) == 1 + 1 + 2 + 2
    assert shape.visible == 256 * 257 / 2
    longer = roofline.Shape(1, 1, 1, 2, 4, 64)  # bottom-right aligned: query t sees t + 3 keys
    assert longer.visible == 3 + 4


def test_flash_attention_counts_by_hand():
    shape = roofline.Shape(2, 4, 4, 128, 128, 64)
    scores = 2 * 4 * 128 * 129 / 2
    assert roofline.dot_product_attention(shape, "fwd")["flops"] == 4 * 64 * scores
    assert roofline.dot_product_attention(shape, "fwd+bwd")["flops"] == 14 * 64 * scores
    io = 2 * (2 * 4 * 128 * 64 * 2) * 2  # q, k, v, out in bf16
    assert roofline.dot_product_attention(shape, "fwd")["bytes"] == io


def test_pallas_forward_counts_the_wide_contraction_per_tile_pair():
    shape = roofline.Shape(1, 2, 2, 256, 256, 128)
    layer = roofline.Layer(pre_conv=(6, 11))
    tiles = {"fwd": (128, 128)}
    flops = roofline.pallas(layer, shape, "fwd", tiles)["flops"]
    per_score = 2 * 6 * 128 + 2 * 128 + 8  # QK over 6 slabs, PV, softmax
    glue = 2 * 256 * 128 * 2 * 6 * 11  # heads x keys x D x the key conv's multiply-adds
    assert flops == 3 * 128 * 128 * 2 * per_score + glue


def test_an_l2_cached_gpu_reads_less_than_a_tpu_streams():
    shape = roofline.Shape(1, 16, 16, 4096, 4096, 128)
    layer = roofline.Layer(pre_conv=(6, 11))
    tiles = {name: (64, 64) for name in ("fwd", "dq", "dkv")}
    streamed = roofline.pallas(layer, shape, "fwd+bwd", tiles)
    cached = roofline.pallas(layer, shape, "fwd+bwd", tiles, cached=True)
    assert cached["flops"] == streamed["flops"] and cached["bytes"] < streamed["bytes"]


def test_estimate_is_the_binding_bound():
    est = roofline.estimate_seconds({"flops": 2e12, "bytes": 1e9}, peak_flops=1e15, bandwidth=1e12)
    assert est == {"estimate_s": 2e-3, "bound": "compute", "compute_s": 2e-3, "memory_s": 1e-3}


def test_main_recost_touches_only_existing_files(tmp_path):
    assert compile_check.main(["--targets", "v4", "h100", "--recost", "--out", str(tmp_path)]) == 0
    assert list(tmp_path.iterdir()) == []


def test_kernel_summary_of_a_tpu_target_shows_the_vmem_limit():
    kernels = [{"name": "mta_core_fwd", "vmem_limit_bytes": 64 * MIB, "estimate_flops": 1.0}]
    row = [line for line in kernel_summary([_data([_point(kernels=kernels)], target="v5e")]) if "v5e" in line]
    assert row == ["| v5e | 1 / 1 | 1 | 64 MiB | - | - | - |"]
