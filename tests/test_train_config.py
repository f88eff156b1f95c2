"""Run configs: every shipped YAML loads, overrides apply, the saved config loads back equal, and bad
keys or values fail with a message that names them and what is allowed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.train_helpers import ROOT, TINY, cli_env, write_config
from train import data as data_lib
from train.__main__ import main
from train.config import (
    TrainConfig,
    check_resumable,
    dump,
    load_train_config,
    train_config_from_dict,
)

CONFIGS = sorted((ROOT / "configs" / "train").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_shipped_config_loads(path):
    cfg = load_train_config(path)
    assert isinstance(cfg, TrainConfig)
    if cfg.data.kind != "text" or cfg.data.tokenizer == "byte":  # other tokenizers may be absent here
        assert cfg.model.vocab_size >= data_lib.vocab_size(cfg.data)


def test_paper_configs_have_the_paper_recipe():
    cfg = load_train_config(ROOT / "configs/train/880M_mta.yaml")
    assert (cfg.model.dim, cfg.model.num_layers, cfg.model.dtype, cfg.model.param_dtype) == (
        1536,
        24,
        "bfloat16",
        "float32",
    )
    opt = cfg.optimizer
    assert (opt.learning_rate, opt.warmup_steps, opt.decay, opt.b1, opt.b2, opt.eps, opt.weight_decay) == (
        1.5e-4,
        375,
        "linear",
        0.9,
        0.98,
        1e-8,
        0.05,
    )
    assert opt.clip_norm == 1.0 and cfg.data.seq_len == 2048
    assert cfg.global_batch_size * cfg.data.seq_len == 262_144 and cfg.steps == 400_000
    big = load_train_config(ROOT / "configs/train/1B_baseline.yaml")
    assert (
        big.global_batch_size * big.data.seq_len == 524_288 and big.steps == 200_000 and big.model.mta is None
    )


def test_overrides_replace_nested_values_and_parse_yaml(tmp_path):
    path = write_config(tmp_path)
    cfg = load_train_config(
        path,
        [
            "optimizer.learning_rate=3e-4",
            "model.mta.pre_conv=[3, 5]",
            "mesh.fsdp=-1",
            "mesh.data=1",
            "progress=null",
            "data.toy_answer=last",
        ],
    )
    assert cfg.optimizer.learning_rate == 3e-4 and cfg.model.mta.pre_conv == (3, 5)
    assert (cfg.mesh.data, cfg.mesh.fsdp, cfg.progress, cfg.data.toy_answer) == (1, -1, None, "last")
    assert cfg.model.dim == TINY["model"]["dim"]


def test_the_dumped_config_loads_back_equal(tmp_path):
    cfg = load_train_config(ROOT / "configs/train/tiny_lm.yaml", ["steps=7"])
    saved = tmp_path / "config.yaml"
    saved.write_text(dump(cfg))
    assert load_train_config(saved) == cfg
    assert train_config_from_dict(yaml.safe_load(dump(cfg))) == cfg


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["stepz=3"], r"unknown key\(s\) \['stepz'\]; allowed keys are \['model', 'data'"),
        (["optimizer.lr=1"], r"optimizer: unknown key\(s\) \['lr'\]; allowed keys are \['learning_rate'"),
        (["steps=many"], r"steps='many' is invalid: must be int"),
        (["steps=0"], r"steps=0 is invalid: must be an integer >= 1"),
        (["optimizer.decay=step"], r"optimizer.decay='step' is invalid: must be one of"),
        (["checkpoint.every=0"], r"checkpoint.every=0 is invalid"),
        (["mesh.data=-1", "mesh.fsdp=-1"], r"at most one axis may be -1"),
        (["data.kind=video"], r"data.kind='video' is invalid"),
        (["model.dim=-4"], r"dim=-4 is invalid"),
        # the full dotted path of a field of the model's mta section
        (["model.mta.pre_conv=[2]"], r"^model\.mta\.pre_conv=\[2\] is invalid: must be None or a pair"),
        (["model.mta.pre_conv=[2, 4]"], r"^model\.mta\.pre_conv\[1\] \(c_k\)=4 is invalid: must be odd"),
        (["model.mta.pre_head_mix=3"], r"^model\.mta\.pre_head_mix=3 is invalid: must divide num_heads=4"),
        (["model.mta.kernel=3"], r"^model\.mta=\['kernel'\] is invalid: unknown field"),
        (["microbatches=3"], r"microbatches=3 is invalid: must divide global_batch_size=8"),
        (["steps"], r"override 'steps' is invalid: must be key.sub=value"),
        (["steps.x=1"], r"steps is not a section"),
    ],
)
def test_bad_keys_and_values_are_named(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        load_train_config(write_config(tmp_path), overrides)


def test_missing_files_are_named(tmp_path):
    with pytest.raises(ValueError, match="config='.*nope.yaml' is invalid: no such file"):
        load_train_config(tmp_path / "nope.yaml")
    path = write_config(tmp_path, model="models/none.yaml")
    with pytest.raises(ValueError, match="model='models/none.yaml' is invalid: no such file"):
        load_train_config(path)


def test_cli_prints_the_resolved_config_and_rejects_bad_ones(tmp_path, capsys):
    path = write_config(tmp_path)
    assert main(["--config", str(path), "--print-config", "steps=11"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["steps"] == 11 and printed["model"]["mta"]["pre_conv"] == [2, 3]
    assert main(["--config", str(path), "optimizer.warmup=3"]) == 2
    assert "allowed keys are" in capsys.readouterr().err
    assert not Path(tmp_path / "run").exists()  # nothing was started


def test_resuming_refuses_another_model_and_allows_other_changes(tmp_path):
    run_dir = tmp_path / "run"
    saved = load_train_config(write_config(tmp_path))
    (run_dir / "checkpoints" / "2").mkdir(parents=True)
    (run_dir / "config.yaml").write_text(dump(saved))
    again = ["steps=3000", "model.attention_implementation=reference", "model.dtype=bfloat16"]
    check_resumable(load_train_config(tmp_path / "train.yaml", again), run_dir)
    changed = load_train_config(tmp_path / "train.yaml", ["model.mta.pre_conv=[2, 5]"])
    with pytest.raises(ValueError, match=r"model.mta.pre_conv: saved \[2, 3\], requested \[2, 5\]"):
        check_resumable(changed, run_dir)
    with pytest.raises(ValueError, match="model.mta: saved {.*}, requested None"):
        check_resumable(load_train_config(tmp_path / "train.yaml", ["model.mta=null"]), run_dir)
    (run_dir / "checkpoints" / "2").rmdir()  # no checkpoint yet: a new model starts afresh
    check_resumable(load_train_config(tmp_path / "train.yaml", ["model.mta=null"]), run_dir)


def test_malformed_yaml_is_named_by_file_and_line_without_a_traceback(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("steps: 3\nmodel: {dim: 32\nrun_dir: x\n")  # the flow mapping is never closed
    with pytest.raises(ValueError, match=r"config='.*bad.yaml' is invalid: malformed YAML at line 3"):
        load_train_config(path)
    model = tmp_path / "model.yaml"
    model.write_text("dim: 32\n  heads: [4\n")
    with pytest.raises(ValueError, match=r"model='.*model.yaml' is invalid: malformed YAML at line 2"):
        load_train_config(write_config(tmp_path, model=str(model)))
    command = [sys.executable, "-m", "train", "--config", str(path), "--print-config"]
    proc = subprocess.run(command, cwd=ROOT, env=cli_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "error: config=" in proc.stderr and "malformed YAML at line 3" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    assert [line for line in proc.stderr.splitlines() if "YAML" in line] == [
        f"error: config={str(path)!r} is invalid: malformed YAML at line 3, column 8: expected ',' or '}}', "
        "but got ':'"
    ]
