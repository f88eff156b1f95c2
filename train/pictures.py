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
Without --text a toy-task checkpoint draws a held-out toy sample (--toy-sample, default 0).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mta_jax.attention import MASK_VALUE, head_output
from mta_jax.conv import key_query_conv, mix_heads
from mta_jax.layers import MultiTokenAttention
from mta_jax.masks import default_positions, visibility_mask
from mta_jax.model import MTATransformer
from mta_jax.params import MTAParams, key_padding
from mta_jax.rope import apply_rope
from train import toy

LABELLED_MAX_TOKENS = 64  # token labels on the attention maps' axes up to this many tokens
PARAM_DIR_TOY_SEQ_LEN = 64  # toy samples for a parameter directory (no data config): this row length


# ------------------------------------------------------------------------------------------- attention maps


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AttentionMaps:
    """One layer's attention weights for one input. before, after: [B, H, T, S] float32.

    before: softmax(q k^T / sqrt(D)) with the causal mask, no MTA part; after: the weights that
    multiply V in the layer (pre conv -> pre head mix -> softmax -> post conv -> post head mix).
    """

    before: jax.Array
    after: jax.Array


def attention_inputs(model: MTATransformer, tokens: jax.Array) -> list[jax.Array]:
    """The input of every layer's attention, attention_norm(h): a list of [B, T, dim], one per layer.

    tokens: [B, T] ints, one document per row (RoPE positions 0..T-1). Dropout off.
    """
    positions = default_positions(tokens.shape[1], None)
    hidden = model.tok_embeddings(tokens)
    inputs = []
    for block in model.layers:
        inputs.append(block.attention_norm(hidden))
        hidden = block(hidden, positions=positions, segment_ids=None, deterministic=True)
    return inputs


def queries_keys_values(
    attention: MultiTokenAttention, x: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """q [B, T, H, D], k and v [B, T, Hkv, D] of one layer for its input x [B, T, dim], RoPE applied."""
    batch, seq_len, _ = x.shape
    positions = default_positions(seq_len, None)
    q = attention.wq(x).reshape(batch, seq_len, attention.num_heads, attention.head_dim)
    k = attention.wk(x).reshape(batch, seq_len, attention.num_kv_heads, attention.head_dim)
    v = attention.wv(x).reshape(batch, seq_len, attention.num_kv_heads, attention.head_dim)
    rope = (attention.rope_theta, attention.rope_style, attention.rope_scaling)
    return apply_rope(q, positions, *rope), apply_rope(k, positions, *rope), v


def raw_scores(q: jax.Array, k: jax.Array) -> jax.Array:
    """q k^T / sqrt(D) in float32: [B, H, T, S]; query head h reads kv head h // (H / Hkv)."""
    group = q.shape[2] // k.shape[2]
    k = jnp.repeat(k, group, axis=2)
    scores = jnp.einsum("bthd,bshd->bhts", q.astype(jnp.float32), k.astype(jnp.float32))
    return scores * q.shape[-1] ** -0.5


def attention_maps(
    q: jax.Array, k: jax.Array, params: MTAParams, causal: bool, pad_key: str
) -> AttentionMaps:
    """Plain and MTA attention weights (spec sections 1-2) from q [B, T, H, D] and k [B, S, Hkv, D].

    params: the layer's MTAParams (parts that are None are skipped); causal, pad_key: its MTAConfig's.
    """
    scores = raw_scores(q, k)
    visible = visibility_mask(q.shape[1], k.shape[1], causal=causal)[:, None]  # [1, 1, T, S]

    def softmax(x):
        return jnp.where(visible, jax.nn.softmax(jnp.where(visible, x, MASK_VALUE), axis=-1), 0.0)

    before = softmax(scores)
    if params.pre_conv is not None:
        scores = key_query_conv(scores, params.pre_conv.astype(jnp.float32), visible[:, 0], pad_key)
    if params.pre_head_mix is not None:
        scores = mix_heads(scores, params.pre_head_mix)
    after = softmax(scores)
    if params.post_conv is not None:
        after = key_query_conv(after, params.post_conv.astype(jnp.float32), visible[:, 0], pad_key)
        after = jnp.where(visible, after, 0.0)
    if params.post_head_mix is not None:
        after = mix_heads(after, params.post_head_mix)
    return AttentionMaps(before=before, after=after)


def layer_attention_maps(attention: MultiTokenAttention, x: jax.Array) -> AttentionMaps:
    """AttentionMaps of one MultiTokenAttention layer for its input x [B, T, dim]."""
    q, k, _ = queries_keys_values(attention, x)
    return attention_maps(q, k, attention.mta_params(), attention.mta.causal, attention.mta.pad_key)


def output_from_weights(attention: MultiTokenAttention, x: jax.Array, weights: jax.Array) -> jax.Array:
    """What the layer returns for input x [B, T, dim] when its attention weights are weights [B, H, T, S]:
    weights @ V, then the per-head norm / scaling / gate and wo. [B, T, dim]."""
    _, _, v = queries_keys_values(attention, x)
    v = jnp.repeat(v, attention.num_heads // attention.num_kv_heads, axis=2).astype(jnp.float32)
    out = jnp.einsum("bhts,bshd->bthd", weights, v)
    out = head_output(out, attention.mta_params(), attention.mta, attention.layer_index)
    batch, seq_len = x.shape[:2]
    return attention.wo(out.astype(x.dtype).reshape(batch, seq_len, -1))


def model_attention_maps(model: MTATransformer, tokens: jax.Array, layers: Sequence[int]) -> dict:
    """{layer index: AttentionMaps} for tokens [B, T], computed by one compiled program."""
    return _model_attention_maps(model, tokens, tuple(layers))


@nnx.jit(static_argnums=2)
def _model_attention_maps(model: MTATransformer, tokens: jax.Array, layers: tuple[int, ...]) -> dict:
    inputs = attention_inputs(model, tokens)
    return {i: layer_attention_maps(model.layers[i].attention, inputs[i]) for i in layers}


# ---------------------------------------------------------------------------------------------- the input


@dataclasses.dataclass(frozen=True)
class PictureInput:
    """The token sequence to draw attention maps for: ids int32 [T], one label per token, and a note."""

    ids: np.ndarray
    labels: list[str]
    note: str


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
    """The token sequence from --text, or a held-out toy sample (index TOY_EVAL_START + toy_sample)."""
    from train.data import TOY_EVAL_START, DataConfig

    if text is not None and toy_sample is not None:
        raise ValueError(f"toy_sample={toy_sample} is invalid together with text: give one of them")
    if text is None:
        if not isinstance(tokens, ToyTokens):
            raise ValueError("text=None is invalid: the checkpoint is not a toy-task model; pass --text")
        toy_sample = 0 if toy_sample is None else toy_sample
        if toy_sample < 0:
            raise ValueError(f"toy_sample={toy_sample} is invalid: must be >= 0")
        cfg = run_config(checkpoint)
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


# ------------------------------------------------------------------------------------------------ drawing


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


@dataclasses.dataclass(frozen=True)
class Grid:
    """A figure of rows x cols panels, each with a colorbar on its right, at fixed sizes in inches.

    Placing axes by hand keeps drawing cheap (no layout engine measuring every tick label twice).
    left / bottom: room for tick and axis labels; gap: room between rows for titles and x tick labels.
    """

    rows: int
    cols: int
    panel_w: float
    panel_h: float
    left: float = 0.7
    bottom: float = 0.6
    gap: float = 0.8
    top: float = 0.7
    colorbar_w: float = 0.1
    colorbar_room: float = 0.55  # colorbar, its tick labels and the space to the next panel

    @property
    def cell_w(self) -> float:
        return self.left + self.panel_w + 0.08 + self.colorbar_w + self.colorbar_room

    @property
    def size(self) -> tuple[float, float]:
        return self.cols * self.cell_w, self.top + self.rows * self.panel_h + (
            self.rows - 1
        ) * self.gap + self.bottom

    def make(self, plt):
        """(figure, axes [rows, cols], colorbar axes [rows, cols])."""
        width, height = self.size
        fig = plt.figure(figsize=(width, height))
        axes = np.empty((self.rows, self.cols), object)
        bars = np.empty((self.rows, self.cols), object)
        for row in range(self.rows):
            y = height - self.top - (row + 1) * self.panel_h - row * self.gap
            for col in range(self.cols):
                x = col * self.cell_w + self.left
                axes[row, col] = fig.add_axes(
                    (x / width, y / height, self.panel_w / width, self.panel_h / height)
                )
                bar_x = (x + self.panel_w + 0.08) / width
                bars[row, col] = fig.add_axes(
                    (bar_x, y / height, self.colorbar_w / width, self.panel_h / height)
                )
        return fig, axes, bars


def _symmetric_limit(x: np.ndarray) -> float:
    limit = float(np.max(np.abs(x))) if x.size else 0.0
    return limit if limit > 0 else 1.0


def _colorbar(fig, image, bar) -> None:
    fig.colorbar(image, cax=bar).ax.tick_params(labelsize=6)


def _save(fig, plt, title: str, path: Path) -> None:
    width, height = fig.get_size_inches()
    fig.suptitle(title, fontsize=9, y=1 - 0.15 / height, va="top")
    fig.savefig(path, dpi=100)
    plt.close(fig)


def draw_kernels(kernels: dict[int, np.ndarray], heads: Sequence[int], pad_key: str, title: str, path: Path):
    """kernels: {layer: [H, c_q, c_k]}; a grid of heatmaps, rows = layers, columns = heads."""
    from matplotlib.patches import Rectangle

    plt = _pyplot()
    layers = sorted(kernels)
    c_q, c_k = next(iter(kernels.values())).shape[1:]
    pad_left = key_padding(c_k, pad_key)[0]
    cell = min(0.4, 4.0 / max(c_q, c_k))  # inches per kernel tap
    grid = Grid(len(layers), len(heads), max(1.2, cell * c_k), cell * c_q, gap=0.75, top=0.75)
    fig, axes, bars = grid.make(plt)
    for row, layer in enumerate(layers):
        for col, head in enumerate(heads):
            ax, kernel = axes[row, col], np.asarray(kernels[layer][head], np.float32)
            limit = _symmetric_limit(kernel)
            image = ax.imshow(kernel, cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto")
            _colorbar(fig, image, bars[row, col])
            ax.set_xticks(range(c_k), [str(c - pad_left) for c in range(c_k)], fontsize=6)
            ax.set_yticks(range(c_q), [str(a - (c_q - 1)) for a in range(c_q)], fontsize=6)
            ax.set_xlabel("key offset", fontsize=7, labelpad=1)
            ax.set_ylabel("query offset", fontsize=7, labelpad=1)
            ax.set_title(f"layer {layer}, head {head}", fontsize=8)
            ax.add_patch(Rectangle((pad_left - 0.5, c_q - 1.5), 1, 1, fill=False, lw=1.5, ec="black"))
            if c_q * c_k <= 66:
                for (a, c), value in np.ndenumerate(kernel):
                    shade = "white" if abs(value) > 0.6 * limit else "black"
                    ax.text(c, a, f"{value:.2f}", ha="center", va="center", fontsize=5, color=shade)
    _save(fig, plt, f"{title}\noutlined: the identity tap (current query, current key)", path)


def full_head_mix(blocks: np.ndarray) -> np.ndarray:
    """[H / g, g, g] group blocks (in, out) -> the block-diagonal [H, H] matrix M[in, out]."""
    groups, size, _ = blocks.shape
    full = np.zeros((groups * size, groups * size), np.float32)
    for g in range(groups):
        full[g * size : (g + 1) * size, g * size : (g + 1) * size] = blocks[g]
    return full


def draw_head_mix(mixes: dict[int, dict[str, np.ndarray]], path: Path):
    """mixes: {layer: {"pre"/"post": [H / g, g, g]}}; rows = layers, columns = pre / post matrices."""
    plt = _pyplot()
    layers = sorted(mixes)
    kinds = [k for k in ("pre", "post") if any(k in mixes[layer] for layer in layers)]
    num_heads = full_head_mix(next(iter(mixes[layers[0]].values()))).shape[0]
    side = min(6.0, max(1.6, 0.25 * num_heads))
    fig, axes, bars = Grid(len(layers), len(kinds), side, side, gap=0.8).make(plt)
    ticks = [str(h) for h in range(num_heads)]
    for row, layer in enumerate(layers):
        for col, kind in enumerate(kinds):
            ax = axes[row, col]
            if kind not in mixes[layer]:
                ax.axis("off")
                bars[row, col].axis("off")
                continue
            matrix = full_head_mix(np.asarray(mixes[layer][kind], np.float32)).T  # rows: output head
            limit = _symmetric_limit(matrix)
            image = ax.imshow(matrix, cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto")
            _colorbar(fig, image, bars[row, col])
            ax.set_xticks(range(num_heads), ticks, fontsize=6)
            ax.set_yticks(range(num_heads), ticks, fontsize=6)
            ax.set_xlabel("input head", fontsize=7, labelpad=1)
            ax.set_ylabel("output head", fontsize=7, labelpad=1)
            ax.set_title(f"layer {layer}, {kind}-softmax", fontsize=8)
    _save(fig, plt, "head mixing (the identity is the diagonal)", path)


def draw_attention(
    maps: AttentionMaps,
    layer: int,
    heads: Sequence[int],
    picture: PictureInput,
    mixes: bool,
    path: Path,
    *,
    causal: bool = True,
):
    """One layer's maps of batch row 0: rows = heads, columns = before / after (only one when the layer
    has no MTA mixing, so both are the same). With causal, the entries above the diagonal (future keys)
    are grey."""
    plt = _pyplot()
    panels = [("before: softmax(q k^T / sqrt(D))", maps.before), ("after: MTA attention weights", maps.after)]
    if not mixes:
        panels = [("attention (no MTA mixing in this layer)", maps.before)]
    seq_len = picture.ids.size
    labelled = seq_len <= LABELLED_MAX_TOKENS
    labels = [label if len(label) <= 10 else label[:9] + "\u2026" for label in picture.labels]
    font = max(4.0, min(7.0, 260 / seq_len))
    label_room = 0.25 + (0.6 * font / 72 * max(map(len, labels)) if labelled else 0.15)  # inches
    side = min(8.0, max(2.6, 0.12 * seq_len + 1.2))
    grid = Grid(len(heads), len(panels), side, side, left=label_room + 0.25, bottom=label_room + 0.25)
    grid = dataclasses.replace(grid, gap=label_room + 0.55, top=0.95)
    fig, axes, bars = grid.make(plt)
    hidden = np.triu(np.ones((seq_len, seq_len), bool), 1) & causal
    for row, head in enumerate(heads):
        for col, (name, weights) in enumerate(panels):
            ax, values = axes[row, col], np.asarray(weights[0, head], np.float32)
            negative = values[~hidden].min(initial=0.0) < 0
            limit = _symmetric_limit(values[~hidden])
            cmap = plt.get_cmap("RdBu_r" if negative else "magma").with_extremes(bad="#d9d9d9")
            bounds = dict(vmin=-limit, vmax=limit) if negative else dict(vmin=0.0, vmax=limit)
            image = ax.imshow(
                np.ma.masked_where(hidden, values),
                cmap=cmap,
                interpolation="nearest",
                aspect="auto",
                **bounds,
            )
            _colorbar(fig, image, bars[row, col])
            ax.set_title(f"layer {layer}, head {head}: {name}", fontsize=8)
            ax.set_xlabel("key", fontsize=7, labelpad=1)
            ax.set_ylabel("query", fontsize=7, labelpad=1)
            if labelled:
                ax.set_xticks(range(seq_len), labels, fontsize=font, rotation=90)
                ax.set_yticks(range(seq_len), labels, fontsize=font)
            else:
                ax.tick_params(labelsize=6)
    note = textwrap.shorten(picture.note, 240, placeholder=" ...")
    width = grid.size[0]
    _save(fig, plt, "\n".join(textwrap.wrap(f"input: {note}", max(40, int(width * 15)))[:3]), path)


# ------------------------------------------------------------------------------------------------- driver


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
                "diverging colours centred on 0; the identity tap outlined",
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
    (out / "index.json").write_text(json.dumps(index, indent=2, ensure_ascii=False) + "\n")
    return index


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.pictures", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="a run directory or a parameter directory")
    parser.add_argument("--out", required=True, help="directory for the PNG files and index.json")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--text", help="the input whose attention maps are drawn")
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
