"""Evaluate a checkpoint: perplexity and bits per byte, LAMBADA-style last word, needle in a haystack.

    python -m train.evaluate perplexity --checkpoint runs/tiny_lm [--text FILE|DIR|GLOB] [--seq-len 128]
        [--stride 64] [--batch 8] [--max-tokens 100000] [--output ppl.json]
    python -m train.evaluate lambada --checkpoint runs/tiny_lm --file lambada.jsonl [--output l.json]
    python -m train.evaluate needles --checkpoint runs/needles_small [--haystack FILE] \\
        --context-lens 64 128 --depths 0 0.5 1 --needles 2 4 6 --samples 20 [--output n.json]

--checkpoint is a training run directory or a parameter directory (train/params_io.py); --step picks a
checkpoint of a run. The tokenizer is --tokenizer ("byte", a tokenizer.json or a SentencePiece *.model),
else the run's data.tokenizer, else bytes. Every number is from teacher forcing, one forward pass per row.
--seq-len defaults to the run's data.seq_len (the length it was trained at; for a parameter directory, which
has no data config: 256 for perplexity, 1024 for lambada).

perplexity: the text (default: the run's held-out documents) is split into documents at --doc-separator
  (as training does), each encoded as BOS + tokens + EOS. Every token after BOS is scored, EOS included;
  BOS only gives context. Windows: rows of --seq-len inputs; without --stride they do not overlap, the
  first input of each window being the last target of the one before (scored there, context only here);
  with --stride S each window after the first scores the next S targets with the up to seq_len - S tokens
  before them as extra context. nats/token = total nats / scored tokens; perplexity = exp(nats/token);
  bits/byte = total nats / ln 2 / bytes, bytes = UTF-8 bytes of the scored documents' text (of the scored
  tokens' decoded text for a document cut by --max-tokens). With the byte tokenizer the scored tokens are
  the bytes plus one EOS per document, so bits/byte = bits/token * tokens / bytes. The printout says what
  was scored (text, documents, tokens, windows, seq_len, stride): nats/token is comparable to a loss the
  run logged only on the same documents at the same seq_len (the run's eval loss: its held-out documents at
  data.seq_len; its training loss is on the other documents).
lambada: a JSON Lines file, one object per line with a "text" string (the format of OpenAI's
  lambada_test.jsonl): {"text": "... she said, holding out the"} ... The target is the last
  whitespace-separated word (punctuation included) with the whitespace before it, the context everything
  before that, as lm-eval-harness does. Context and target are tokenized apart (BOS + context, then the
  target without BOS/EOS), contexts longer than --seq-len lose their oldest tokens. accuracy: every target
  token is the argmax given the true tokens before it (greedy decoding reproduces the word); perplexity:
  exp(total target nats / words).
needles: see train/needles.py for the placement rule. With --haystack (any text model) needle i is the
  sentence " The key K is V." (K: --key-len random lowercase letters, distinct; V: --value-len digits),
  filler is a window of the tokenized haystack file from a random place (wrapping around), and the
  question " What is the key K? The key K is" is followed by the answer " V". Without --haystack the
  synthetic task of train/needles.py (a run of data.kind=needles, or --synthetic) is used. Context length =
  the row's input tokens T: BOS up to the answer's last token but one (text), or up to the answer's last
  token, EOS being the last target (synthetic). A sample is right when every answer token is the argmax.
  Cells: --needles x --context-lens x --depths, --samples each (sample i is (--seed, i)).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from train import needles as needles_lib
from train.files import write_text_atomic
from train.needle_eval import SyntheticNeedles, TextNeedles, needle_grid, needle_table
from train.scoring import invalid, lambada, model_scorer, pad_id_of, perplexity, read_lambada


def _run_data_config(checkpoint: str):
    """The DataConfig of a run directory, or None for a parameter directory."""
    path = Path(checkpoint) / "config.yaml"
    if not path.is_file():
        return None
    from train.config import load_train_config

    return load_train_config(path).data


# --seq-len without a run config to take data.seq_len from
DEFAULT_SEQ_LEN = {"perplexity": 256, "lambada": 1024}


def _seq_len(args, data_cfg) -> tuple[int, str]:
    """(seq_len, where it comes from): --seq-len, else the run's data.seq_len, else DEFAULT_SEQ_LEN."""
    if args.seq_len is not None:
        return args.seq_len, "--seq-len"
    if data_cfg is not None:
        return data_cfg.seq_len, "the run's data.seq_len"
    return DEFAULT_SEQ_LEN[args.command], "the default for a parameter directory"


def _tokenizer(args, data_cfg, vocab_size: int):
    from train.data import DataConfig, load_tokenizer

    if args.tokenizer is not None:
        tokenizer = load_tokenizer(DataConfig(kind="text", tokenizer=args.tokenizer))
    elif data_cfg is not None and data_cfg.kind == "text":
        tokenizer = load_tokenizer(data_cfg)
    elif data_cfg is not None:
        rule = f"the run trained on data.kind={data_cfg.kind!r}, not text; give --tokenizer to force one"
        raise invalid("checkpoint", args.checkpoint, rule)
    else:
        tokenizer = load_tokenizer(DataConfig(kind="text"))
    if tokenizer.vocab_size > vocab_size:
        rule = f"emits {tokenizer.vocab_size} token ids, the model's vocab_size is {vocab_size}"
        raise invalid("tokenizer", args.tokenizer or getattr(data_cfg, "tokenizer", "byte"), rule)
    return tokenizer


def _documents(args, data_cfg) -> tuple[list[str], str]:
    """(documents, what they are)."""
    from train.data import DataConfig, read_documents, split_documents

    if args.text is not None:
        cfg = DataConfig(kind="text", path=args.text, doc_separator=args.doc_separator)
        return read_documents(cfg, name="--text"), f"--text {args.text}"
    if data_cfg is not None and data_cfg.kind == "text":
        percent = 100 * data_cfg.eval_fraction
        what = f"the run's held-out documents (the last {percent:g}% of data.path={data_cfg.path})"
        return split_documents(data_cfg)[1], what
    raise invalid(
        "text", None, "give --text FILE|DIR|GLOB (only a text run has held-out documents to default to)"
    )


def _needle_source(args, data_cfg, tokenizer_fn):
    if args.haystack is not None:
        path = Path(args.haystack)
        if not path.is_file():
            raise invalid("haystack", args.haystack, "no such file")
        lens = {k: v for k, v in (("key_len", args.key_len), ("value_len", args.value_len)) if v is not None}
        return TextNeedles(tokenizer_fn(), path.read_text(encoding="utf-8"), **lens)
    if data_cfg is not None and data_cfg.kind == "needles":
        key_len = args.key_len or data_cfg.needles_key_len
        return SyntheticNeedles(key_len, args.value_len or data_cfg.needles_value_len)
    if args.synthetic:
        return SyntheticNeedles(args.key_len or 2, args.value_len or 2)
    rule = "give --haystack FILE for a text model, or --synthetic for a model of the synthetic needle task"
    raise invalid("checkpoint", args.checkpoint, rule)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m train.evaluate", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--checkpoint", required=True, help="a run directory or a parameter directory")
    common.add_argument("--step", type=int, default=None, help="which checkpoint of a run (default: newest)")
    common.add_argument("--tokenizer", default=None, help='"byte", a tokenizer.json or a *.model file')
    common.add_argument("--batch", type=int, default=8, help="rows per forward pass")
    common.add_argument("--attention", default=None, help="attention_implementation override, e.g. reference")
    common.add_argument("--output", default=None, help="also write the results here as JSON")

    ppl = commands.add_parser(
        "perplexity", parents=[common], help="nats per token, perplexity, bits per byte"
    )
    ppl.add_argument(
        "--text", default=None, help="a file, a directory of *.txt or a glob (default: held out)"
    )
    ppl.add_argument("--doc-separator", default="\n\n", help="splits the text into documents")
    ppl.add_argument(
        "--seq-len",
        type=int,
        default=None,
        help="inputs per window (default: the run's data.seq_len, else 256)",
    )
    ppl.add_argument("--stride", type=int, default=None, help="targets per later window (default: seq-len)")
    ppl.add_argument("--max-tokens", type=int, default=None, help="stop after this many scored tokens")

    lam = commands.add_parser("lambada", parents=[common], help="last-word accuracy and perplexity")
    lam.add_argument("--file", required=True, help='JSON Lines, one {"text": ...} per line')
    lam.add_argument(
        "--seq-len",
        type=int,
        default=None,
        help="the most input tokens per example (default: the run's data.seq_len, else 1024)",
    )

    ndl = commands.add_parser("needles", parents=[common], help="needle-in-a-haystack accuracy grid")
    ndl.add_argument("--haystack", default=None, help="a text file of filler (text models)")
    ndl.add_argument("--synthetic", action="store_true", help="the synthetic task of train/needles.py")
    ndl.add_argument("--context-lens", type=int, nargs="+", default=[64], help="input tokens per row")
    ndl.add_argument("--depths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    ndl.add_argument("--needles", type=int, nargs="+", default=[2, 4, 6], help="needles per sample")
    ndl.add_argument("--samples", type=int, default=10, help="samples per cell")
    ndl.add_argument("--seed", type=int, default=0)
    ndl.add_argument("--key-len", type=int, default=None, help="key letters (synthetic: the run's; text: 6)")
    ndl.add_argument(
        "--value-len", type=int, default=None, help="value digits (synthetic: the run's; text: 4)"
    )
    return parser


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Runs one evaluation from parsed arguments; returns what it prints and writes."""
    from train.params_io import load_model

    overrides = {} if args.attention is None else {"attention_implementation": args.attention}
    model = load_model(args.checkpoint, step=args.step, **overrides)
    vocab = model.cfg.vocab_size
    data_cfg = _run_data_config(args.checkpoint)
    scorer = model_scorer(model)
    result: dict[str, Any] = {"command": args.command, "checkpoint": str(args.checkpoint), "step": args.step}
    if args.command == "perplexity":
        tokenizer = _tokenizer(args, data_cfg, vocab)
        docs, text = _documents(args, data_cfg)
        seq_len, seq_len_from = _seq_len(args, data_cfg)
        kw = dict(seq_len=seq_len, batch=args.batch, stride=args.stride, max_tokens=args.max_tokens)
        result.update(perplexity(scorer, docs, tokenizer, **kw))
        result.update({"text": text, "seq_len_from": seq_len_from})
        result["note"] = _comparable(args, data_cfg, seq_len)
    elif args.command == "lambada":
        tokenizer = _tokenizer(args, data_cfg, vocab)
        seq_len, seq_len_from = _seq_len(args, data_cfg)
        result.update(lambada(scorer, read_lambada(args.file), tokenizer, seq_len=seq_len, batch=args.batch))
        result.update({"seq_len": seq_len, "seq_len_from": seq_len_from})
    else:
        source = _needle_source(args, data_cfg, lambda: _tokenizer(args, data_cfg, vocab))
        if source.kind == "synthetic" and vocab < needles_lib.VOCAB_SIZE:
            raise invalid(
                "checkpoint", args.checkpoint, f"vocab_size {vocab} < the task's {needles_lib.VOCAB_SIZE}"
            )
        pad = needles_lib.PAD_ID if source.kind == "synthetic" else pad_id_of(source.tokenizer)
        cells = needle_grid(
            scorer,
            source,
            context_lens=args.context_lens,
            depths=args.depths,
            needle_counts=args.needles,
            samples=args.samples,
            seed=args.seed,
            batch=args.batch,
            pad_id=pad,
        )
        result.update({"task": source.kind, "key_len": source.key_len, "value_len": source.value_len})
        result["cells"] = cells
    return result


def _comparable(args, data_cfg, seq_len: int) -> str:
    """When nats/token may be compared with a loss the run logged, said for this evaluation."""
    rule = "nats/token is comparable to a loss of the run only on the same documents at the same seq_len"
    if data_cfg is None:
        return f"{rule} (a parameter directory: no training data config to compare with)"
    trained = f"data.seq_len={data_cfg.seq_len}"
    if args.text is not None or data_cfg.kind != "text":
        return f"{rule}: this is --text, not the run's data split (it trained at {trained})"
    if seq_len != data_cfg.seq_len:
        return f"{rule}: these are the run's held-out documents, but at seq_len {seq_len}, not its {trained}"
    return (
        f"{rule}: these are the run's held-out documents at its {trained}, as its eval loss (its training "
        "loss is on the other documents)"
    )


def _summary(result: dict[str, Any]) -> str:
    if result["command"] == "needles":
        return needle_table(result["cells"])
    skip = ("command", "checkpoint", "step", "note")
    lines = []
    if result["command"] == "perplexity":
        lines.append(
            f"scored: {result['tokens']} tokens of {result['documents']} documents of {result['text']}, in "
            f"{result['windows']} windows of seq_len {result['seq_len']} ({result['seq_len_from']}), "
            f"stride {result['stride']}"
        )
        skip += ("text", "seq_len_from")
    for k, v in result.items():
        if k not in skip:
            lines.append(f"{k:<24}{v:.6g}" if isinstance(v, float) else f"{k:<24}{v}")
    if "note" in result:
        lines.append(f"note: {result['note']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        result = run(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(_summary(result), flush=True)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(args.output, json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
