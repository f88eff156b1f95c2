"""bench/tile_bytes.py: the TPU kernels' declared HBM bytes at chosen tiles, lowered for a compile-only
TPU on this CPU (needs the `compile` extra; skipped without it)."""

from __future__ import annotations

import json

import pytest

from bench.tile_bytes import main, parse_tiles
from kernels import aot
from kernels.chips import get_chip
from kernels.tpu_tiles import TpuBlockSizes, TpuTiles


def test_parse_tiles_reads_forward_dq_and_dkv():
    assert parse_tiles("256x128,128x128,64x256") == TpuBlockSizes(
        TpuTiles(256, 128), TpuTiles(128, 128), TpuTiles(64, 256)
    )
    for bad in ("256x128", "256x128,128,64x256", "ax1,1x1,1x1"):
        with pytest.raises(ValueError, match="must be FWDQxFWDK,DQQxDQK,DKVQxDKVK"):
            parse_tiles(bad)


def test_a_gpu_target_is_refused():
    with pytest.raises(SystemExit):
        main(["--target", "h200"])


def test_taller_forward_tiles_re_read_the_keys_fewer_times(tmp_path, capsys):
    try:
        aot.compile_only_device(get_chip("v5e"))
    except aot.CompilerUnavailable as error:
        pytest.skip(str(error))
    out = tmp_path / "bytes.json"
    shape = ["--batch", "1", "--seq", "1024", "--heads", "4", "--head-dim", "64"]
    tiles = ["--tiles", "128x128,128x128,128x128", "256x128,128x128,128x128"]
    assert main(["--target", "v5e", "--layer", "head_mix", *shape, *tiles, "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert (report["target"], report["layer"], report["seq"], report["heads"]) == ("v5e", "head_mix", 1024, 4)
    default, square, tall = report["rows"]
    assert default["default"] and not square["default"] and "accepted" not in square  # no --compile
    for row in report["rows"]:
        assert row["kernel_bytes"] == sum(k["estimate_bytes_accessed"] for k in row["kernels"]) > 0
        assert row["kernel_flops"] > 0
    assert square["fwd"] == {"block_q": 128, "block_k": 128} and tall["fwd"]["block_q"] == 256

    def by_name(row):
        return {k["name"]: k["estimate_bytes_accessed"] for k in row["kernels"]}

    # head_mix runs the lse and post-mix forward passes at the forward tiles, delta / dQ / dK/dV at theirs:
    # halving the q tiles must cut the forward passes' k/v re-reads and leave the rest alone
    forward = ("mta_core_lse", "mta_core_fwd_post")
    square_bytes, tall_bytes = by_name(square), by_name(tall)
    assert set(forward) < set(square_bytes) and square_bytes.keys() == tall_bytes.keys()
    for name in square_bytes:
        if name in forward:
            assert tall_bytes[name] < square_bytes[name], name
        else:
            assert tall_bytes[name] == square_bytes[name], name
    assert "kernels move" in capsys.readouterr().out
