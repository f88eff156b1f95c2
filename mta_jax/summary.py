"""Describe a model config and, optionally, run it: `python -m mta_jax.summary --config PATH`.

PATH is a model config (configs/models/*.yaml) or a train config (configs/train/*.yaml: its `model:`
section, resolved as training resolves it). Prints the architecture, which layers get the key-query
convolution and the parameter count (counted on abstract shapes, nothing allocated). With --steps N it
also builds the model and takes N AdamW steps on byte-level text (--data; by default
../shared/data/tinyshakespeare.txt, or this package's own source where that file is absent), printing
the loss: a smoke run of the whole stack on this machine, not the training loop.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from mta_jax.config import ModelConfig, model_config_from_dict
from mta_jax.model import MTATransformer, count_params

DEFAULT_TEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"


def describe(cfg: ModelConfig) -> list[str]:
    lines = [
        f"dim {cfg.dim}, {cfg.num_layers} layers, {cfg.num_heads} heads ({cfg.num_kv_heads} kv), "
        f"head_dim {cfg.head_dim}, ffn {cfg.ffn_hidden_dim}, vocab {cfg.vocab_size}, "
        f"RoPE {cfg.rope_style} theta {cfg.rope_theta:g}, tied embeddings {cfg.tie_embeddings}"
    ]
    if cfg.mta is None:
        return lines + ["MTA: off (baseline Transformer)"]
    m = cfg.mta
    parts = [
        f"pre_conv {m.pre_conv[0]}x{m.pre_conv[1]}" if m.pre_conv else None,
        f"post_conv {m.post_conv[0]}x{m.post_conv[1]}" if m.post_conv else None,
        f"pad_key {m.pad_key}" if m.has_kq_conv else None,
        f"pre_head_mix {m.pre_head_mix}" if m.pre_head_mix else None,
        f"post_head_mix {m.post_head_mix}" if m.post_head_mix else None,
        "group_norm" if m.group_norm else None,
        "depth_scaling" if m.depth_scaling else None,
        f"gate {m.gate}" if m.gate else None,
        f"dropout {m.dropout_rate}" if m.dropout_rate else None,
    ]
    kq_layers = [i for i in range(cfg.num_layers) if cfg.layer_mta(i).has_kq_conv]
    return lines + [
        "MTA: " + ", ".join(p for p in parts if p),
        "layers with the key-query conv: " + (", ".join(map(str, kq_layers)) or "none"),
    ]


def load_config(path: str | Path) -> tuple[ModelConfig, str]:
    """(ModelConfig, what the file is) of a model config file or of a train config's `model:` section."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config={str(path)!r} is invalid: no such file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ValueError(f"config={str(path)!r} is invalid: malformed YAML{where}: {problem}") from None
    if not isinstance(data, dict):
        raise ValueError(f"config={str(path)!r} is invalid: the file must hold a mapping")
    if "model" in data:  # no ModelConfig field is called model: a train config
        from train.config import load_train_config

        return load_train_config(path).model, "the model section of a train config"
    try:
        return model_config_from_dict(data), "a model config"
    except TypeError as error:  # a required field is missing
        raise ValueError(f"config={str(path)!r} is invalid: {error}") from None


def default_text() -> tuple[bytes, str]:
    """tinyshakespeare where the shared data is checked out, else this package's Python source."""
    if DEFAULT_TEXT.exists():
        return DEFAULT_TEXT.read_bytes(), str(DEFAULT_TEXT)
    package = Path(__file__).resolve().parent
    return b"\n".join(p.read_bytes() for p in sorted(package.glob("*.py"))), f"{package}/*.py"


def byte_batches(text: bytes, batch: int, seq_len: int, seed: int):
    """Endless random windows [batch, seq_len + 1] of the text's bytes."""
    data = np.frombuffer(text, np.uint8)
    if len(data) <= seq_len + 1:
        raise ValueError(f"seq={seq_len} is invalid: the text has only {len(data)} bytes")
    rng = np.random.default_rng(seed)
    while True:
        starts = rng.integers(0, len(data) - seq_len - 1, batch)
        yield np.stack([data[s : s + seq_len + 1] for s in starts]).astype(np.int32)


def smoke_train(cfg: ModelConfig, steps: int, batch: int, seq_len: int, text: bytes, seed: int) -> dict:
    if cfg.vocab_size < 256:
        raise ValueError(f"vocab_size={cfg.vocab_size} is invalid here: byte-level text needs >= 256")
    model = MTATransformer(cfg, rngs=nnx.Rngs(seed))
    optimizer = nnx.Optimizer(model, optax.adamw(3e-3, b2=0.98, weight_decay=0.05), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, tokens):
        def loss_fn(model):
            logits = model(tokens[:, :-1])
            return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    batches = byte_batches(text, batch, seq_len, seed)
    losses, start = [], None
    for i in range(steps):
        loss = float(step(model, optimizer, jnp.asarray(next(batches))))
        losses.append(loss)
        if i == 0:
            start = time.perf_counter()  # time after compilation
        print(f"step {i:4d}  loss {loss:.4f}", flush=True)
    seconds = time.perf_counter() - start if steps > 1 else float("nan")
    return {
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "tokens_per_second": (steps - 1) * batch * seq_len / seconds if steps > 1 else None,
        "device": str(jax.devices()[0]),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--config", required=True, help="model or train YAML, e.g. configs/models/880M_mta.yaml"
    )
    parser.add_argument("--steps", type=int, default=0, help="AdamW steps of the smoke run (0: none)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--data", type=Path, help="text file for the smoke run (default: tinyshakespeare)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)

    try:
        cfg, kind = load_config(args.config)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"model {args.config} ({kind})")
    for line in describe(cfg):
        print("  " + line)
    total = count_params(cfg)
    result = {"config": str(args.config), "parameters": total}
    if cfg.mta is not None:
        baseline = count_params(cfg.baseline())
        result["mta_extra_parameters"] = total - baseline
        print(f"parameters: {total:,} (baseline {baseline:,}; MTA adds {total - baseline:,})")
    else:
        print(f"parameters: {total:,}")

    if args.steps > 0:
        if args.data is None:
            text, source = default_text()
        elif args.data.exists():
            text, source = args.data.read_bytes(), str(args.data)
        else:
            print(f"--data {args.data} does not exist", file=sys.stderr)
            return 1
        print(f"smoke run: {args.steps} AdamW steps on the bytes of {source}")
        result["data"] = source
        result.update(smoke_train(cfg, args.steps, args.batch, args.seq, text, args.seed))
        print(f"loss {result['first_loss']:.4f} -> {result['last_loss']:.4f} on {result['device']}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
