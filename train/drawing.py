"""Matplotlib figures for train/pictures.py: key-query kernels, head-mixing matrices and attention maps,
laid out on a fixed grid of panels (no layout engine) and saved as PNG."""

from __future__ import annotations

import dataclasses
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from mta_jax.params import key_padding

if TYPE_CHECKING:
    from train.attention_maps import AttentionMaps


LABELLED_MAX_TOKENS = 64  # token labels on the attention maps' axes up to this many tokens


@dataclasses.dataclass(frozen=True)
class PictureInput:
    """The token sequence to draw attention maps for: ids int32 [T], one label per token, and a note."""

    ids: np.ndarray
    labels: list[str]
    note: str


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
    """kernels: {layer: [H, c_q, c_k]}; a grid of heatmaps, rows = layers, columns = heads, all on one
    diverging colour map with one scale symmetric about 0 (so that panels compare by colour)."""
    from matplotlib.patches import Rectangle

    plt = _pyplot()
    layers = sorted(kernels)
    c_q, c_k = next(iter(kernels.values())).shape[1:]
    pad_left = key_padding(c_k, pad_key)[0]
    cell = min(0.4, 4.0 / max(c_q, c_k))  # inches per kernel tap
    grid = Grid(len(layers), len(heads), max(1.2, cell * c_k), cell * c_q, gap=0.75, top=0.75)
    fig, axes, bars = grid.make(plt)
    limit = _symmetric_limit(np.stack([np.asarray(kernels[layer])[list(heads)] for layer in layers]))
    for row, layer in enumerate(layers):
        for col, head in enumerate(heads):
            ax, kernel = axes[row, col], np.asarray(kernels[layer][head], np.float32)
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
    """mixes: {layer: {"pre"/"post": [H / g, g, g]}}; rows = layers, columns = pre / post matrices, on one
    diverging colour map with one scale symmetric about 0."""
    plt = _pyplot()
    layers = sorted(mixes)
    kinds = [k for k in ("pre", "post") if any(k in mixes[layer] for layer in layers)]
    num_heads = full_head_mix(next(iter(mixes[layers[0]].values()))).shape[0]
    side = min(6.0, max(1.6, 0.25 * num_heads))
    fig, axes, bars = Grid(len(layers), len(kinds), side, side, gap=0.8).make(plt)
    ticks = [str(h) for h in range(num_heads)]
    limit = _symmetric_limit(np.concatenate([np.ravel(m) for part in mixes.values() for m in part.values()]))
    for row, layer in enumerate(layers):
        for col, kind in enumerate(kinds):
            ax = axes[row, col]
            if kind not in mixes[layer]:
                ax.axis("off")
                bars[row, col].axis("off")
                continue
            matrix = full_head_mix(np.asarray(mixes[layer][kind], np.float32)).T  # rows: output head
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
    are grey. Every panel has one colour map and scale: magma from 0 when no weight is negative, else a
    diverging map symmetric about 0 (post-softmax mixing can make weights negative)."""
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
    shown = np.stack([np.asarray(w[0, head], np.float32)[~hidden] for head in heads for _, w in panels])
    negative = shown.min(initial=0.0) < 0
    limit = _symmetric_limit(shown)
    cmap = plt.get_cmap("RdBu_r" if negative else "magma").with_extremes(bad="#d9d9d9")
    bounds = dict(vmin=-limit, vmax=limit) if negative else dict(vmin=0.0, vmax=limit)
    for row, head in enumerate(heads):
        for col, (name, weights) in enumerate(panels):
            ax, values = axes[row, col], np.asarray(weights[0, head], np.float32)
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
