"""Pictures of a trained model, as in the MTA paper's figures: the learned key-query kernels of every layer
and head, the head-mixing matrices, and attention maps of one input before and after the MTA mixing.

    python -m train.pictures --checkpoint runs/toy_small --out pictures/toy_small
    python -m train.pictures --checkpoint ckpt/mta --out pics --text "some text" --layers 0,2 --heads 0,1

--checkpoint is a training run directory (config.yaml + checkpoints/) or a parameter directory
(model.yaml + params/, train/params_io.py). Written into --out:
  kernels.png             rows = layers with a key-query conv, columns = heads: each c_q x c_k kernel
                          (query offset vertically, key offset horizontally, the identity tap outlined);
                          kernels_pre.png and kernels_post.png instead when both convolutions exist
  head_mix.png            the pre- and post-softmax head-mixing matrices, when the model has head mixing
  attention_layer<i>.png  per layer, per head: plain causal softmax(q k^T / sqrt(D)) ("before") next to
                          the MTA attention weights after conv / softmax / conv / head mixing ("after")
  index.json              the files and what each shows, the input text and the notes
Without --text a text run draws the first of its held-out documents (of its data.path) and a toy-task
checkpoint a held-out toy sample (--toy-sample, default 0). One colour scale per figure: the kernels on
one diverging map symmetric about 0, the attention weights before and after on one map.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from train import toy
from train.attention_maps import model_attention_maps
from train.drawing import PictureInput, draw_attention, draw_head_mix, draw_kernels
from train.files import write_text_atomic

PARAM_DIR_TOY_SEQ_LEN = 64  # toy samples for a parameter directory (no data config): this row length


class ToyTokens:
    """The toy task's character vocabulary (train/toy.py); a text gets BOS prepended unless it has one."""

    def encode(self, text: str) -> np.ndarray:
        ids = toy.encode(text)
        return ids if text.startswith(toy.BOS_CHAR) else np.concatenate([[toy.BOS_ID], ids]).astype(np.int32)

    def label(self, token_id: int) -> str:
        return toy.VOCAB[token_id]


class TokenizerLabels:
    """A tokenizer of train/data.py with a readable label per token id."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer

    def encode(self, text: str) -> np.ndarray:
        return self.tokenizer.encode(text)

    def label(self, token_id: int) -> str:
        tok = self.tokenizer
        special = {getattr(tok, "bos_id", None): "<s>", getattr(tok, "eos_id", None): "</s>"}
        if token_id in special:
            return special[token_id]
        text = tok.decode([token_id])
        return text.replace("\n", "\\n").replace("\t", "\\t").replace(" ", "\u2423") or f"#{token_id}"


def run_config(checkpoint: Path) -> Any | None:
    """The TrainConfig of a run directory, None for a parameter directory."""
    from train.config import load_train_config

    path = checkpoint / "config.yaml"
    return load_train_config(path) if path.is_file() else None


def choose_tokens(checkpoint: Path, tokenizer: str | None, vocab_size: int) -> ToyTokens | TokenizerLabels:
    """The tokenizer: --tokenizer (toy, byte or a file), else the run's data config, else guessed for a
    parameter directory (a tokenizer.json inside it, the toy or byte vocabulary by its size)."""
    from train.data import BYTE_VOCAB_SIZE, ByteTokenizer, DataConfig, load_tokenizer

    if tokenizer == "toy":
        return ToyTokens()
    if tokenizer is not None:
        return TokenizerLabels(load_tokenizer(DataConfig(kind="text", tokenizer=tokenizer)))
    cfg = run_config(checkpoint)
    if cfg is not None:
        return ToyTokens() if cfg.data.kind == "toy" else TokenizerLabels(load_tokenizer(cfg.data))
    if (checkpoint / "tokenizer.json").is_file():
        return TokenizerLabels(
            load_tokenizer(DataConfig(kind="text", tokenizer=str(checkpoint / "tokenizer.json")))
        )
    if vocab_size == toy.VOCAB_SIZE:
        return ToyTokens()
    if vocab_size == BYTE_VOCAB_SIZE:
        return TokenizerLabels(ByteTokenizer())
    raise ValueError(
        f"tokenizer=None is invalid: {checkpoint} is a parameter directory with vocab_size={vocab_size} and "
        "no tokenizer.json; pass --tokenizer (toy, byte, a tokenizer.json or a SentencePiece *.model)"
    )


def picture_input(
    checkpoint: Path,
    tokens: ToyTokens | TokenizerLabels,
    vocab_size: int,
    *,
    text: str | None,
    toy_sample: int | None,
    max_tokens: int,
) -> PictureInput:
    """The token sequence from --text; else for a text run the first of its held-out documents (data.path,
    as training split it), for a toy-task model a held-out toy sample (index TOY_EVAL_START + toy_sample)."""
    from train.data import TOY_EVAL_START, DataConfig, split_documents

    if text is not None and toy_sample is not None:
        raise ValueError(f"toy_sample={toy_sample} is invalid together with text: give one of them")
    cfg = run_config(checkpoint)
    if text is None and toy_sample is None and cfg is not None and cfg.data.kind == "text":
        document = split_documents(cfg.data)[1][0]
        ids, note = tokens.encode(document), f"held-out document 0 of data.path={cfg.data.path}: {document}"
    elif text is None:
        if not isinstance(tokens, ToyTokens):
            raise ValueError(
                "text=None is invalid: the checkpoint is neither a toy-task model nor a text run (whose "
                "held-out text is the default); pass --text"
            )
        toy_sample = 0 if toy_sample is None else toy_sample
        if toy_sample < 0:
            raise ValueError(f"toy_sample={toy_sample} is invalid: must be >= 0")
        data = cfg.data if cfg is not None else DataConfig(kind="toy", seq_len=PARAM_DIR_TOY_SEQ_LEN)
        seed = cfg.seed if cfg is not None else 0
        sample_text = data.toy_task().text(seed, TOY_EVAL_START + toy_sample)
        ids, note = tokens.encode(sample_text), f"toy sample {toy_sample}: {sample_text}"
    else:
        if not text:
            raise ValueError("text='' is invalid: must hold at least one character")
        ids, note = tokens.encode(text), text
    ids = np.asarray(ids, np.int32)
    if ids.size == 0:
        raise ValueError(f"text={text!r} is invalid: the tokenizer gives no tokens for it")
    if ids.max() >= vocab_size:
        raise ValueError(
            f"text={text!r} is invalid: token id {int(ids.max())} is outside the model's "
            f"vocab_size={vocab_size}"
        )
    if ids.size > max_tokens:
        note = f"{note} (first {max_tokens} of {ids.size} tokens)"
        ids = ids[:max_tokens]
    return PictureInput(ids=ids, labels=[tokens.label(int(i)) for i in ids], note=note)


def parse_indices(name: str, text: str | None, count: int, what: str) -> list[int]:
    """'0,2' -> [0, 2], each checked against [0, count); None -> all of them."""
    if text is None:
        return list(range(count))
    try:
        indices = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"{name}={text!r} is invalid: must be comma-separated integers, e.g. 0,2") from None
    if not indices:
        raise ValueError(f"{name}={text!r} is invalid: names no {what}")
    for index in indices:
        if not 0 <= index < count:
            raise ValueError(
                f"{name}={text!r} is invalid: {what} index {index} is out of range [0, {count}) "
                "for this model"
            )
    return sorted(set(indices))


def resolve_step(checkpoint: Path, step: int | None) -> int | None:
    """The checkpoint step that load_params reads: the newest of a run unless given; None for a parameter
    directory."""
    if step is not None or not (checkpoint / "config.yaml").is_file():
        return step
    steps = sorted(
        int(p.name) for p in (checkpoint / "checkpoints").glob("*") if p.name.isdigit() and p.is_dir()
    )
    return steps[-1] if steps else None


def make_pictures(
    checkpoint: str | Path,
    out: str | Path,
    *,
    text: str | None = None,
    toy_sample: int | None = None,
    layers: str | None = None,
    heads: str | None = None,
    step: int | None = None,
    tokenizer: str | None = None,
    max_tokens: int = 256,
) -> dict:
    """Writes the pictures of `checkpoint` into `out` (see the module doc); returns the index.json data.

    layers, heads: comma-separated indices ("0,2"), None for all; they select the kernels, head mixing
    and attention maps drawn. tokenizer: "toy", "byte" or a tokenizer file (default: see choose_tokens).
    """
    from train.params_io import load_model

    checkpoint = Path(checkpoint)
    if not checkpoint.is_dir():
        raise ValueError(f"checkpoint={str(checkpoint)!r} is invalid: no such directory")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"max_tokens={max_tokens!r} is invalid: must be a positive integer")
    model = load_model(checkpoint, step=step, dtype="float32", attention_implementation="reference")
    cfg = model.cfg
    layer_ids = parse_indices("layers", layers, cfg.num_layers, "layer")
    head_ids = parse_indices("heads", heads, cfg.num_heads, "head")
    tokens = choose_tokens(checkpoint, tokenizer, cfg.vocab_size)
    picture = picture_input(
        checkpoint, tokens, cfg.vocab_size, text=text, toy_sample=toy_sample, max_tokens=max_tokens
    )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files, notes = [], []

    attentions = {i: model.layers[i].attention for i in layer_ids}
    params = {i: jax.tree.map(np.asarray, a.mta_params()) for i, a in attentions.items()}
    convs = {
        kind: {
            i: getattr(p, f"{kind}_conv") for i, p in params.items() if getattr(p, f"{kind}_conv") is not None
        }
        for kind in ("pre", "post")
    }
    present = [kind for kind in ("pre", "post") if convs[kind]]
    if not present:
        notes.append(
            "no key-query convolution in the drawn layers: "
            + ("a baseline model (no MTA)" if cfg.mta is None else f"kq_conv_layers={cfg.kq_conv_layers}")
        )
    for kind in present:
        name = "kernels.png" if len(present) == 1 else f"kernels_{kind}.png"
        c_q, c_k = next(iter(convs[kind].values())).shape[1:]
        title = f"{kind}-softmax key-query kernels (c_q={c_q}, c_k={c_k})"
        draw_kernels(convs[kind], head_ids, cfg.mta.pad_key, title, out / name)
        files.append(
            {
                "file": name,
                "shows": f"{title}: rows = layers {sorted(convs[kind])}, columns = heads {head_ids}; query "
                "offset vertically (0 = current query), key offset horizontally (0 = current key); "
                "diverging colours on one scale symmetric about 0; the identity tap outlined",
            }
        )

    mixes = {}
    for i, p in params.items():
        parts = {kind: getattr(p, f"{kind}_head_mix") for kind in ("pre", "post")}
        parts = {kind: value for kind, value in parts.items() if value is not None}
        if parts:
            mixes[i] = parts
    if mixes:
        draw_head_mix(mixes, out / "head_mix.png")
        files.append(
            {
                "file": "head_mix.png",
                "shows": f"head-mixing matrices of layers {sorted(mixes)}: entry (output head, input head); "
                "the identity is the diagonal",
            }
        )

    maps = model_attention_maps(model, jnp.asarray(picture.ids)[None], layer_ids)
    for i in layer_ids:
        p = params[i]
        mixing = any(x is not None for x in (p.pre_conv, p.post_conv, p.pre_head_mix, p.post_head_mix))
        name = f"attention_layer{i}.png"
        draw_attention(maps[i], i, head_ids, picture, mixing, out / name, causal=attentions[i].mta.causal)
        shows = (
            "before (plain causal softmax of q k^T / sqrt(D)) and after (the MTA weights that multiply V)"
            if mixing
            else "the attention weights (this layer has no MTA mixing: before = after)"
        )
        files.append(
            {"file": name, "shows": f"layer {i}, heads {head_ids}: {shows}; rows query, columns key"}
        )

    index = {
        "checkpoint": str(checkpoint),
        "step": resolve_step(checkpoint, step),
        "input": picture.note,
        "num_tokens": int(picture.ids.size),
        "tokens": picture.labels,
        "layers": layer_ids,
        "heads": head_ids,
        "files": files,
        "notes": notes,
    }
    write_text_atomic(out / "index.json", json.dumps(index, indent=2, ensure_ascii=False) + "\n")
    return index


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.pictures", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="a run directory or a parameter directory")
    parser.add_argument("--out", required=True, help="directory for the PNG files and index.json")
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--text", help="the input whose attention maps are drawn (default: a text run's held-out text)"
    )
    source.add_argument("--toy-sample", type=int, help="index of a held-out toy sample (default 0)")
    parser.add_argument("--layers", help="comma-separated layer indices (default: all)")
    parser.add_argument("--heads", help="comma-separated head indices (default: all)")
    parser.add_argument("--step", type=int, help="checkpoint step of a run (default: the newest)")
    parser.add_argument("--tokenizer", help="toy, byte or a tokenizer file (default: the run's)")
    parser.add_argument("--max-tokens", type=int, default=256, help="longer inputs are cut (default 256)")
    args = parser.parse_args(argv)
    try:
        index = make_pictures(
            args.checkpoint,
            args.out,
            text=args.text,
            toy_sample=args.toy_sample,
            layers=args.layers,
            heads=args.heads,
            step=args.step,
            tokenizer=args.tokenizer,
            max_tokens=args.max_tokens,
        )
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for entry in index["files"]:
        print(f"{Path(args.out) / entry['file']}: {entry['shows']}")
    for note in index["notes"]:
        print(f"note: {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
