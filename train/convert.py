"""Conversions between checkpoints: python -m train.convert COMMAND ...

    add-mta       --from RUN_OR_PARAMS_DIR --to OUT_DIR --mta SPEC [--kq-conv-layers 2,6]
    import-llama  --hf-dir HF_DIR --to OUT_DIR [--dtype float32] [--add-mta SPEC [--kq-conv-layers 2,6]]
    export-llama  --from RUN_OR_PARAMS_DIR --to HF_DIR [--overwrite]

SPEC is a YAML file of MTAConfig fields (see configs/mta/), a YAML/JSON mapping on the command line
('{"pre_conv": [6, 11], "post_head_mix": 2}'), or a model config file with an `mta:` section. add-mta and
import-llama write a parameter directory (train/params_io.py) and print the train-config lines that
continue training from it (init_from); export-llama writes config.json and model.safetensors (into an
empty or new directory, a non-empty one only with --overwrite, never into --from).
A bad argument or checkpoint exits 2 with its message.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml


def parse_mta_spec(spec: str) -> tuple[dict[str, Any], list[int] | None]:
    """(MTAConfig fields, kq_conv_layers from the file or None) of a --mta argument."""
    path = Path(spec)
    if path.is_file():
        data = yaml.safe_load(path.read_text())
    else:
        try:
            data = yaml.safe_load(spec)
        except yaml.YAMLError as error:
            raise ValueError(
                f"--mta={spec!r} is invalid: neither a file nor a YAML mapping ({error})"
            ) from None
    if not isinstance(data, Mapping):
        raise ValueError(f"--mta={spec!r} is invalid: must be a file or a mapping of MTAConfig fields")
    if isinstance(data.get("mta"), Mapping):  # a model config: its mta section and kq_conv_layers
        return dict(data["mta"]), data.get("kq_conv_layers")
    return dict(data), None


def parse_layers(text: str | None) -> list[int] | None:
    """'2,6' -> [2, 6]; None stays None."""
    if text is None:
        return None
    try:
        return [int(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise ValueError(f"--kq-conv-layers={text!r} is invalid: must be comma-separated integers") from None


def continue_snippet(directory: Path) -> str:
    """The lines of a train config that continue training from the parameter directory."""
    return (
        "# continue training from these parameters: put these lines in a train config (see\n"
        "# configs/train/continue_mta.yaml) and run python -m train --config <it>\n"
        f"model: {directory / 'model.yaml'}\n"
        f"init_from: {directory}\n"
    )


def _with_mta(cfg, params, spec: str | None, layers_text: str | None, args):
    from mta_jax.convert import FunctionChangeError, add_mta

    if spec is None:
        if layers_text is not None:
            raise ValueError("--kq-conv-layers is invalid without an MTA spec (--mta / --add-mta)")
        return cfg, params
    mta, file_layers = parse_mta_spec(spec)
    layers = parse_layers(layers_text) if layers_text is not None else file_layers
    try:
        return add_mta(
            cfg,
            params,
            mta,
            kq_conv_layers=layers,
            seed=args.seed,
            allow_function_change=args.allow_function_change,
        )
    except FunctionChangeError as error:
        raise error.for_option("--allow-function-change") from None


def _save(directory: str, cfg, params, overwrite: bool) -> Path:
    from train.params_io import ParamsExistError, save_params

    try:
        out = save_params(directory, cfg, params, overwrite=overwrite)
    except ParamsExistError as error:
        raise error.for_option("--overwrite") from None
    print(f"wrote {out}")
    print(continue_snippet(out), end="", flush=True)
    return out


def add_mta_command(args) -> None:
    from train.params_io import load_params

    cfg, params = load_params(args.source, step=args.step)
    cfg, params = _with_mta(cfg, params, args.mta, args.kq_conv_layers, args)
    _save(args.to, cfg, params, args.overwrite)


def import_llama_command(args) -> None:
    from mta_jax.hf_llama import load_llama

    cfg, params = load_llama(args.hf_dir, dtype=args.dtype)
    cfg, params = _with_mta(cfg, params, args.add_mta, args.kq_conv_layers, args)
    _save(args.to, cfg, params, args.overwrite)


def check_export_dir(to: str, source: str, overwrite: bool) -> None:
    """Refuses to write into the input directory, and into a non-empty directory without --overwrite."""
    out = Path(to)
    if out.exists() and out.resolve() == Path(source).resolve():
        raise ValueError(f"--to={to!r} is invalid: it is the input directory (--from); write elsewhere")
    if out.exists() and not out.is_dir():
        raise ValueError(f"--to={to!r} is invalid: it is a file, not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ValueError(
            f"--to={to!r} is invalid: the directory is not empty; pass --overwrite to replace its "
            "config.json and model.safetensors"
        )


def export_llama_command(args) -> None:
    from mta_jax.hf_llama import save_llama
    from train.params_io import load_params

    check_export_dir(args.to, args.source, args.overwrite)
    cfg, params = load_params(args.source, step=args.step)
    out = save_llama(args.to, cfg, params, max_position_embeddings=args.max_position_embeddings)
    print(f"wrote {out / 'config.json'} and {out / 'model.safetensors'}", flush=True)


def _mta_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--kq-conv-layers", help="0-based layers with the key-query convolution, e.g. 2,6")
    parser.add_argument("--seed", type=int, default=0, help="key of random MTA parts (the gate)")
    parser.add_argument(
        "--allow-function-change",
        action="store_true",
        help="accept group_norm, depth_scaling, gate, causal=false (the converted logits differ)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m train.convert", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    add = commands.add_parser("add-mta", help="a baseline checkpoint with identity MTA parameters")
    add.add_argument("--from", dest="source", required=True, help="a run or parameter directory")
    add.add_argument("--step", type=int, help="which checkpoint of a run (default: the newest)")
    add.add_argument("--to", required=True, help="the parameter directory to write")
    add.add_argument("--mta", required=True, help="MTA spec: a YAML file or an inline mapping")
    add.add_argument("--overwrite", action="store_true", help="replace the parameters a --to already holds")
    _mta_options(add)
    add.set_defaults(handler=add_mta_command)

    imp = commands.add_parser("import-llama", help="a local Hugging Face LlamaForCausalLM checkpoint")
    imp.add_argument("--hf-dir", required=True, help="directory with config.json and safetensors")
    imp.add_argument("--to", required=True, help="the parameter directory to write")
    imp.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    imp.add_argument("--add-mta", help="MTA spec to add at the identity (see add-mta --mta)")
    imp.add_argument("--overwrite", action="store_true", help="replace the parameters a --to already holds")
    _mta_options(imp)
    imp.set_defaults(handler=import_llama_command)

    exp = commands.add_parser("export-llama", help="a model without MTA as a LlamaForCausalLM checkpoint")
    exp.add_argument("--from", dest="source", required=True, help="a run or parameter directory")
    exp.add_argument("--step", type=int, help="which checkpoint of a run (default: the newest)")
    exp.add_argument("--to", required=True, help="the Hugging Face directory to write")
    exp.add_argument("--max-position-embeddings", type=int, help="recorded in config.json only")
    exp.add_argument("--overwrite", action="store_true", help="write into a non-empty directory (not --from)")
    exp.set_defaults(handler=export_llama_command)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    try:
        args.handler(args)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
