"""Slow, explicit float64 loops of the MTA spec, written from ../shared/spec/MTA_SPEC.md alone.

Independent of mta_jax: numpy only, one score at a time. Packed documents are handled the obvious
way (each document cut out and run on its own), not with masks.
"""

from __future__ import annotations

import math

import numpy as np


def key_pad_left(c_k: int, pad_key: str) -> int:
    return {"both": (c_k - 1) // 2, "left": c_k - 1, "right": 0}[pad_key]


def conv_loop(masked: np.ndarray, kernel: np.ndarray, pad_key: str) -> np.ndarray:
    """Z[i, j] = sum_{a, c} W[a, c] * S0[i - (c_q - 1) + a, j - pad_left + c], out of range = 0.

    masked: [T, S] scores already zeroed where invisible; kernel: [c_q, c_k]."""
    c_q, c_k = kernel.shape
    q_len, kv_len = masked.shape
    left = key_pad_left(c_k, pad_key)
    out = np.zeros_like(masked)
    for i in range(q_len):
        for j in range(kv_len):
            total = 0.0
            for a in range(c_q):
                for c in range(c_k):
                    ii, jj = i - (c_q - 1) + a, j - left + c
                    if 0 <= ii < q_len and 0 <= jj < kv_len:
                        total += kernel[a, c] * masked[ii, jj]
            out[i, j] = total
    return out


def mix_loop(x: np.ndarray, mix: np.ndarray) -> np.ndarray:
    """x: [H, T, S]; mix: [H / g, g, g] (in, out) inside contiguous head groups."""
    groups, size, _ = mix.shape
    out = np.zeros_like(x)
    for g in range(groups):
        for o in range(size):
            for h in range(size):
                out[g * size + o] += mix[g, h, o] * x[g * size + h]
    return out


def softmax_rows(z: np.ndarray, visible: np.ndarray) -> np.ndarray:
    out = np.zeros_like(z)
    for i in range(z.shape[0]):
        row = z[i][visible[i]]
        if row.size:
            e = np.exp(row - row.max())
            out[i][visible[i]] = e / e.sum()
    return out


def attention_loop(q, k, v, params: dict, cfg, *, layer_index: int | None = None) -> np.ndarray:
    """One sequence. q: [T, H, D], k, v: [S, Hkv, D]; params: MTAParams fields as numpy (or None).

    Returns [T, H, D] after norm, depth scaling and gate (float64)."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    q_len, num_heads, head_dim = q.shape
    kv_len, num_kv_heads, _ = k.shape
    group = num_heads // num_kv_heads
    p = {name: None if val is None else np.asarray(val, np.float64) for name, val in params.items()}
    visible = np.zeros((q_len, kv_len), bool)
    for i in range(q_len):
        for j in range(kv_len):
            visible[i, j] = (j <= i + kv_len - q_len) if cfg.causal else True

    scores = np.stack([q[:, h] @ k[:, h // group].T / math.sqrt(head_dim) for h in range(num_heads)])
    if p["pre_conv"] is not None:
        scores = np.stack(
            [
                conv_loop(np.where(visible, s, 0.0), w, cfg.pad_key)
                for s, w in zip(scores, p["pre_conv"], strict=True)
            ]
        )
    if p["pre_head_mix"] is not None:
        scores = mix_loop(scores, p["pre_head_mix"])
    probs = np.stack([softmax_rows(s, visible) for s in scores])
    if p["post_conv"] is not None:
        probs = np.stack(
            [
                np.where(visible, conv_loop(s, w, cfg.pad_key), 0.0)
                for s, w in zip(probs, p["post_conv"], strict=True)
            ]
        )
    if p["post_head_mix"] is not None:
        probs = mix_loop(probs, p["post_head_mix"])
    out = np.stack([probs[h] @ v[:, h // group] for h in range(num_heads)], axis=1)  # [T, H, D]

    for t in range(q_len):
        for h in range(num_heads):
            x = out[t, h]
            if p["norm_scale"] is not None:
                x = x / math.sqrt(np.mean(x * x) + cfg.norm_eps) * p["norm_scale"]
            if cfg.depth_scaling:
                x = x * (1.0 - (0.8 - 0.6 * math.exp(-0.3 * layer_index)))
            if p["gate_kernel"] is not None:
                x = x * (1.0 / (1.0 + np.exp(-(x @ p["gate_kernel"] + p["gate_bias"]))))
            out[t, h] = x
    return out


def packed_attention_loop(q, k, v, params, cfg, segment_ids, **kwargs) -> np.ndarray:
    """[T, H, D] for one packed row (T == S): every document run on its own by attention_loop."""
    segment_ids = np.asarray(segment_ids)
    out = np.zeros(q.shape, np.float64)
    for doc in np.unique(segment_ids):
        rows = np.nonzero(segment_ids == doc)[0]
        out[rows] = attention_loop(q[rows], k[rows], v[rows], params, cfg, **kwargs)
    return out
