"""Analytical FLOP and HBM-byte counts of one attention layer, per path, and the roofline estimate.

    estimate_seconds = max(flops / peak FLOP/s, bytes / HBM bandwidth)      (an ESTIMATE, never a timing)

XLA's cost_analysis() counts the Pallas TPU kernels through their CostEstimate but gives nothing for a
GPU target, and counts a loop body once; so the compile check uses these counts for every target and
reports XLA's numbers beside them where the compiler has some. Counts are for one layer call:
B batches, H query heads (Hkv key/value heads), T queries, S keys, head dim D, causal or not.

- "dot_product_attention": a fused flash kernel (cuDNN on GPU): QK^T and PV forward (4 D per visible
  score), the backward recomputes QK^T and adds dP, dS K, dS^T Q, P^T dO (10 D per visible score
  forward+backward in all); bytes: q, k, v, out (+ their gradients and dout) once each.
- "pallas" (this project's kernels): per kernel the (q tile, kv tile) pairs it computes times the
  per-score work of its loops (the C-slab QK contraction, PV, the backward's recomputation in every
  slab chunk, head mixing), bytes: every streamed tile read once per pair (no cache reuse assumed)
  plus the glue's qp / kp / band writes and reads.
- "reference" and "blockwise": the score-plane computations (QK, the convolutions, mixing, softmax,
  PV) on every score, the reference with its [B, H, T, S] float32 arrays in HBM (several passes), the
  blockwise path with tiles kept on chip and the queries' halo recomputed.
"""

from __future__ import annotations

import dataclasses

FWD, FWD_BWD = "fwd", "fwd+bwd"


@dataclasses.dataclass(frozen=True)
class Shape:
    batch: int
    heads: int
    kv_heads: int
    q_len: int
    kv_len: int
    head_dim: int
    causal: bool = True
    itemsize: int = 2

    @property
    def visible(self) -> float:
        """Visible (query, key) pairs per head: bottom-right causal or all."""
        if not self.causal:
            return float(self.q_len * self.kv_len)
        t, s = self.q_len, self.kv_len
        return float(sum(max(0, min(s, i + 1 + s - t)) for i in range(t))) if t <= 65536 else t * s / 2

    def io_bytes(self, mode: str) -> float:
        """q, k, v and out once (forward), plus dout and the three gradients (backward)."""
        b, h, hkv, t, s, d, isz = (self.batch, self.heads, self.kv_heads, self.q_len, self.kv_len,
                                   self.head_dim, self.itemsize)  # fmt: skip
        fwd = b * (2 * h * t * d + 2 * hkv * s * d) * isz
        return fwd if mode == FWD else 2 * fwd + b * h * t * d * isz


@dataclasses.dataclass(frozen=True)
class Layer:
    """What the score plane does: c_q x c_k conv before / after the softmax, mixing group sizes."""

    pre_conv: tuple[int, int] | None = None
    post_conv: tuple[int, int] | None = None
    pre_mix: int = 0
    post_mix: int = 0


def cost(flops: float, nbytes: float) -> dict:
    return {"flops": float(flops), "bytes": float(nbytes)}


def dot_product_attention(shape: Shape, mode: str, fused: bool = True) -> dict:
    """A fused flash kernel; fused=False: XLA's, which writes [B, H, T, S] scores and probabilities."""
    scores = shape.batch * shape.heads * (shape.visible if fused else shape.q_len * shape.kv_len)
    flops = (4 if mode == FWD else 14) * shape.head_dim * scores
    nbytes = shape.io_bytes(mode)
    if not fused:
        nbytes += (3 if mode == FWD else 8) * 4 * shape.batch * shape.heads * shape.q_len * shape.kv_len
    return cost(flops, nbytes)


def _score_plane_flops(layer: Layer, shape: Shape) -> float:
    """Vector work per score of the MTA parts (multiply-adds count 2)."""
    flops = 8.0  # scale, mask, softmax (exp, max, sum, divide)
    for conv in (layer.pre_conv, layer.post_conv):
        if conv:
            flops += 2 * conv[0] * conv[1]
    flops += 2 * (layer.pre_mix + layer.post_mix)
    return flops


def reference(layer: Layer, shape: Shape, mode: str) -> dict:
    scores = shape.batch * shape.heads * shape.q_len * shape.kv_len
    per_score = 4 * shape.head_dim + _score_plane_flops(layer, shape)
    passes = 6 + 2 * sum(bool(x) for x in (layer.pre_conv, layer.post_conv, layer.pre_mix, layer.post_mix))
    if mode == FWD:
        return cost(scores * per_score, shape.io_bytes(mode) + passes * 4 * scores)
    return cost(scores * (3.5 * per_score), shape.io_bytes(mode) + 3 * passes * 4 * scores)


def blockwise(layer: Layer, shape: Shape, mode: str, block_q: int = 512) -> dict:
    halo = 1.0 + (((layer.pre_conv or (1, 1))[0] - 1) / block_q)
    scores = shape.batch * shape.heads * shape.visible * halo
    per_score = 4 * shape.head_dim + _score_plane_flops(layer, shape)
    passes = 2 if (layer.post_conv or layer.post_mix) else 1
    flops = scores * per_score * passes * (1 if mode == FWD else 3.5)
    reads = shape.io_bytes(mode) * (shape.q_len / block_q if mode == FWD else 2 * shape.q_len / block_q)
    return cost(flops, reads)


def pallas(
    layer: Layer, shape: Shape, mode: str, tiles: dict, chunks: dict | None = None, cached: bool = False
) -> dict:
    """tiles: kernel -> (block_q, block_k) for "fwd", "dq", "dkv"; chunks: kernel -> slab chunks (the
    backward kernels recompute the score tiles once per chunk). cached: a GPU, whose L2 (50 MB on
    H100 / H200) holds a head group's operands while its programs stream them, so every pass reads
    them from HBM once; else a TPU, whose kernels DMA every streamed tile from HBM."""
    chunks = chunks or {}
    c_q, c_k = layer.pre_conv or (1, 1)
    d, isz = shape.head_dim, shape.itemsize
    wide = c_q * d  # the QK contraction
    vector = 2 * (layer.pre_mix + layer.post_mix) + 8  # mixing, mask, exp, row sums
    post = bool(layer.post_mix)
    heads = shape.batch * shape.heads

    def kernel(name: str, passes: float, per_pass_flops: float, once_flops: float) -> tuple[float, float]:
        """FLOPs and HBM bytes of one kernel over all its (q tile, kv tile) pairs and heads."""
        bq, bk = tiles[name]
        n = _pairs(shape, bq, bk) * heads
        flops = n * bq * bk * (passes * (per_pass_flops + vector) + once_flops)
        if cached:  # qp, kp, v (and dout in the backward) once a pass
            unique = heads * (wide * (shape.q_len + shape.kv_len) + d * shape.kv_len)
            unique += heads * d * shape.q_len if name != "fwd" else 0
            return flops, passes * unique * isz
        own, other = (bq, bk) if name != "dkv" else (bk, bq)
        per_pass = other * (wide + d) + (wide * own if c_q > 1 else 0) + (bq * d if name != "fwd" else 0)
        return flops, n * passes * per_pass * isz

    # The post-softmax conv (tpu_post_conv*.py) costs conv_vector per score each time it (or its transpose,
    # or dW's sum) runs; the backward rebuilds dPcm on three key tiles (a D-wide product each), and dK/dV
    # also P on three key tiles (its QK work three times) and reads both neighbours' kp and v.
    conv_vector = 2 * layer.post_conv[0] * layer.post_conv[1] if layer.post_conv else 0
    post = post or bool(layer.post_conv)
    fwd_passes = 2 if post else 1  # with post-softmax parts: an lse pass, then P V
    flops, nbytes = kernel("fwd", fwd_passes, 2 * wide, 2 * d + conv_vector)
    glue_bytes = heads * c_q * (shape.q_len + shape.kv_len) * d * isz * 2 if c_q > 1 else 0
    glue_flops = heads * shape.kv_len * d * 2 * c_q * c_k if c_q > 1 else 0.0
    if mode == FWD:
        return cost(flops + glue_flops, nbytes + shape.io_bytes(mode) + glue_bytes)
    nq = chunks.get("dq", 1) + (1 if post else 0)  # + the delta pass
    dp_flops = 6 * d + conv_vector if conv_vector else 2 * d  # dP: on three key tiles, transposed conv
    q_flops, q_bytes = kernel("dq", nq, 2 * wide + dp_flops, 2 * wide)  # recompute s and dP; dS kp
    nk = chunks.get("dkv", 1)
    if conv_vector:  # P of three key tiles, the conv and dW, dP as in dQ, dV; dS^T qp
        k_flops, k_bytes = kernel("dkv", nk, 6 * wide + 2 * conv_vector + dp_flops + 2 * d, 2 * wide)
        bq, bk = tiles["dkv"]
        k_bytes += 2 * _pairs(shape, bq, bk) * heads * (wide + d) * bk * isz * nk  # neighbours' kp, v
        q_bytes += 2 * _pairs(shape, *tiles["dq"]) * heads * d * tiles["dq"][1] * isz * nq  # their v
    else:
        k_flops, k_bytes = kernel("dkv", nk, 2 * wide + 4 * d, 2 * wide)  # recompute s, dP, dV; dS^T qp
    flops += q_flops + k_flops + 3 * glue_flops
    nbytes += q_bytes + k_bytes + shape.io_bytes(mode) + 3 * glue_bytes
    return cost(flops, nbytes)


def _pairs(shape: Shape, block_q: int, block_k: int) -> float:
    """(q tile, kv tile) pairs a kernel computes, causal tiles above the diagonal skipped."""
    t = -(-shape.q_len // block_q) * block_q
    s = -(-shape.kv_len // block_k) * block_k
    n_q, n_k = t // block_q, s // block_k
    if not shape.causal:
        return float(n_q * n_k)
    shift = s - t
    total = 0
    for qi in range(n_q):
        row = qi * block_q + block_q - 1 + shift
        total += 0 if row < 0 else min(row // block_k, n_k - 1) + 1
    return float(total)


def estimate_seconds(c: dict, peak_flops: float, bandwidth: float) -> dict:
    """The roofline estimate of one cost: which bound binds and the time it gives (an estimate)."""
    compute, memory = c["flops"] / peak_flops, c["bytes"] / bandwidth
    return {
        "estimate_s": max(compute, memory),
        "bound": "compute" if compute >= memory else "memory",
        "compute_s": compute,
        "memory_s": memory,
    }
