"""Where a toy-task run fails: per answer position, and by whether each query letter alone names the block.

    python bench/toy_diagnose.py RUN_DIR [--step S] [--samples 512]

A model that finds the target block from ONE query letter (what ordinary attention does) is right when that
letter is in no other block and guesses among the blocks holding it otherwise: about 25% sequence error
for N = 3 in 32 tokens (6 blocks). MTA's key-query convolution lets it use both letters at once. The report
splits the held-out error by which query letters also occur in another block, and by whether a decoy
exists: the query letters within one key-conv window (c_k consecutive tokens), not all of them from the
target block, e.g. "..xya.bzw.." for the query "ab" with c_k = 5, which a window across the "." sees as a
two-letter match; then it prints the learned pre-softmax kernels (identity at initialisation: 1 at the
current query and key).
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from train.config import load_train_config  # noqa: E402
from train.data import TOY_EVAL_START  # noqa: E402
from train.params_io import load_model, load_params  # noqa: E402


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--step", type=int)
    parser.add_argument("--samples", type=int, default=512)
    args = parser.parse_args(argv)
    cfg = load_train_config(Path(args.run_dir) / "config.yaml")
    task = cfg.data.toy_task()
    model = load_model(args.run_dir, step=args.step)
    indices = range(TOY_EVAL_START, TOY_EVAL_START + args.samples)
    rows = [task.sample(cfg.seed, i) for i in indices]
    batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
    logits = np.concatenate(
        [
            np.asarray(model(batch["inputs"][i : i + 64], segment_ids=batch["segment_ids"][i : i + 64]))
            for i in range(0, len(rows), 64)
        ]
    )
    wrong_tok = (logits.argmax(-1) != batch["targets"]) & (batch["weights"] > 0)
    counted = batch["weights"] > 0
    answer_wrong = np.stack([w[np.flatnonzero(m)] for w, m in zip(wrong_tok, counted, strict=True)])
    wrong = answer_wrong.any(axis=1)
    print(f"{args.run_dir} step {args.step or 'latest'}: sequence error {100 * wrong.mean():.1f}%")
    per_token = " ".join(f"{100 * e:.1f}%" for e in answer_wrong.mean(0))
    print("error per answer token (the last is EOS):", per_token)
    draws = [task.blocks(cfg.seed, i) for i in indices]  # (letters, target, query) of each sample
    shared = []  # for each sample: does query letter j (in query order) also occur in another block?
    for letters, target, query in draws:
        others = np.delete(letters, target, axis=0)
        shared.append(tuple(bool(np.isin(q, others).any()) for q in query))
    shared = np.asarray(shared)
    report = {
        "sequence_error": float(wrong.mean()),
        "token_error": float(answer_wrong.mean()),  # over every answer token and EOS
        "error_per_token": answer_wrong.mean(0).tolist(),
        "by_shared": {},
        "by_decoy": {},
    }
    for first in (False, True):
        for last in (False, True):
            m = (shared[:, 0] == first) & (shared[:, -1] == last)
            kinds = ("shared" if first else "unique", "shared" if last else "unique")
            _split(report["by_shared"], "first query letter {}, last {}".format(*kinds), m, wrong)
    width = cfg.model.mta.pre_conv[1] if cfg.model.mta and cfg.model.mta.pre_conv else 1
    decoys = np.asarray([has_decoy(*draw, width) for draw in draws])
    for flag in (False, True):
        name = f"{'a' if flag else 'no'} decoy within {width} tokens"
        _split(report["by_decoy"], name, decoys == flag, wrong)
    _, params = load_params(args.run_dir, step=args.step)
    for layer, p in enumerate(_pre_conv(params)):
        print(f"layer {layer} pre_conv [head, c_q, c_k]:\n{np.round(np.asarray(p), 2)}")
    return report


def _split(section: dict, name: str, mask: np.ndarray, wrong: np.ndarray) -> None:
    """Records and prints (samples, sequence error) of the samples in mask, if there are any."""
    if mask.any():
        section[name] = (int(mask.sum()), float(wrong[mask].mean()))
        print(f"  {name}: {mask.sum():4d} samples, error {100 * wrong[mask].mean():.1f}%")


def has_decoy(letters: np.ndarray, target: int, query: np.ndarray, width: int) -> bool:
    """Whether one occurrence of each query letter, not all of them in the target block, lie within
    `width` consecutive tokens of the blocks' text ("abc.def...", N + 1 tokens per block)."""
    n = letters.shape[1]
    occurrences = [np.argwhere(letters == q) for q in query]  # rows (block, slot) for each query letter
    for choice in itertools.product(*occurrences):
        blocks = [int(b) for b, _ in choice]
        pos = [b * (n + 1) + s for b, s in choice]
        if any(b != target for b in blocks) and max(pos) - min(pos) < width:
            return True
    return False


def _pre_conv(params) -> list:
    found = []

    def walk(tree, path=""):
        if isinstance(tree, dict):
            for key in sorted(tree, key=lambda k: (len(str(k)), str(k))):
                walk(tree[key], f"{path}/{key}")
        elif path.endswith("pre_conv"):
            found.append(tree)

    walk(params)
    return found


if __name__ == "__main__":
    main()
