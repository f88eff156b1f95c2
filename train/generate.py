"""Generate text from a checkpoint: python -m train.generate --checkpoint DIR --prompt "text" [options]

DIR is a training run directory (its config.yaml names the tokenizer; the toy vocabulary when
data.kind is toy) or a parameter directory of train/params_io.py (then pass --tokenizer: "toy",
"byte", a tokenizer.json or a SentencePiece *.model). Prints the continuation (up to the first EOS) on
stdout. Greedy by default; --temperature > 0 samples, optionally restricted by --top-k and --top-p.
Exits 2 with a message for a missing checkpoint, a prompt the tokenizer cannot encode or a bad option.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

from train import toy


class ToyVocabulary:
    """The toy task's character vocabulary as a tokenizer: prompts start with BOS ("^")."""

    bos_id, eos_id = toy.BOS_ID, toy.EOS_ID

    def encode(self, text: str) -> np.ndarray:
        return toy.encode(text if text.startswith(toy.BOS_CHAR) else toy.BOS_CHAR + text)

    def decode(self, ids: Any) -> str:
        return toy.decode(ids)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m train.generate", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="a run directory or a parameter directory")
    parser.add_argument("--prompt", required=True, help="the text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="how many tokens to generate at most")
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default); > 0: sample")
    parser.add_argument("--top-k", type=int, help="sample among the k most probable tokens")
    parser.add_argument("--top-p", type=float, help="sample in the smallest set with probability mass >= p")
    parser.add_argument("--seed", type=int, default=0, help="PRNG seed of the sampling")
    parser.add_argument("--step", type=int, help="checkpoint step of a run directory (default: newest)")
    parser.add_argument(
        "--tokenizer", help='"toy", "byte", a tokenizer.json or a *.model (default: the run\'s)'
    )
    return parser.parse_args(argv)


def load_tokenizer_for(checkpoint: Path, name: str | None):
    """The tokenizer named on the command line, else the one the run was trained with."""
    from train.data import DataConfig, load_tokenizer

    if name is None:
        config = checkpoint / "config.yaml"
        if not config.is_file():
            raise ValueError(
                f"--tokenizer=None is invalid: {checkpoint} has no config.yaml (a parameter directory), so "
                'name the tokenizer: "toy", "byte", a tokenizer.json or a SentencePiece *.model'
            )
        from train.config import load_train_config

        data = load_train_config(config).data
        return ToyVocabulary() if data.kind == "toy" else load_tokenizer(data)
    if name == "toy":
        return ToyVocabulary()
    try:
        return load_tokenizer(DataConfig(kind="text", tokenizer=name))
    except ValueError as error:
        raise ValueError(str(error).replace("data.tokenizer", "--tokenizer")) from None


def prompt_ids(tokenizer, text: str, vocab_size: int) -> np.ndarray:
    """int32 [n] ids of the prompt: BOS and the text's tokens, without a closing EOS."""
    ids = np.asarray(tokenizer.encode(text), np.int32)
    if not isinstance(tokenizer, ToyVocabulary) and tokenizer.eos_id is not None:
        ids = ids[:-1]  # the data tokenizers close every text with EOS
    if ids.size == 0:
        raise ValueError(f"--prompt={text!r} is invalid: it encodes to no tokens")
    outside = sorted({int(i) for i in ids if i >= vocab_size})
    if outside:
        raise ValueError(
            f"--prompt={text!r} is invalid: token ids {outside} lie outside the model's vocabulary "
            f"of {vocab_size}"
        )
    return ids


def continuation(tokenizer, new_ids: np.ndarray) -> str:
    """The text of the generated ids up to (not including) the first EOS."""
    new_ids = np.asarray(new_ids)
    if tokenizer.eos_id is not None and (new_ids == tokenizer.eos_id).any():
        new_ids = new_ids[: int(np.argmax(new_ids == tokenizer.eos_id))]
    return tokenizer.decode(new_ids)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    checkpoint = Path(args.checkpoint)
    try:
        if not checkpoint.is_dir():
            raise ValueError(f"--checkpoint={args.checkpoint!r} is invalid: no such directory")
        if args.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens={args.max_new_tokens} is invalid: must be >= 1")
        tokenizer = load_tokenizer_for(checkpoint, args.tokenizer)

        import jax

        from mta_jax.generate import check_sampling, generate
        from train.params_io import load_model

        check_sampling(args.temperature, args.top_k, args.top_p)
        model = load_model(checkpoint, step=args.step)
        ids = prompt_ids(tokenizer, args.prompt, model.cfg.vocab_size)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    tokens = generate(
        model,
        jax.numpy.asarray(ids[None]),
        args.max_new_tokens,
        rng=jax.random.key(args.seed),
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        eos_id=tokenizer.eos_id,
    )
    print(continuation(tokenizer, np.asarray(tokens[0, ids.size :])), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
