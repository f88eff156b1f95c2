"""Model FLOPs per token for training, peak FLOP/s per device kind, and MFU.

Conventions (the usual "model FLOPs" of MFU, as in PaLM appendix B):
- a multiply-add is 2 FLOPs; training = forward + backward = 3 x forward;
- counted: every matmul (q, k, v, o projections with GQA sizes, SwiGLU w1/w2/w3, the logit
  projection, MTA's gate), the attention products QK^T and PV, and MTA's key-query convolutions
  and head mixing on the [H, T, S] score / probability matrices;
- ignored: embedding lookup (a gather), norms, RoPE, softmax, masking and other elementwise ops;
- causal: every term on the score matrix counts half of it (the visible triangle, taken as exactly
  half), although the reference path computes the full matrix;
- rematerialisation is not counted (it is hardware work, not model work).
"""

from __future__ import annotations

import re

from mta_jax.config import ModelConfig


def _check_seq_len(seq_len: int) -> None:
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len={seq_len!r} is invalid: must be a positive integer")


def flops_breakdown(cfg: ModelConfig, seq_len: int, *, causal: bool = True) -> dict[str, float]:
    """FORWARD FLOPs per token, by part, for sequences (and attention spans) of seq_len tokens.

    Keys: "matmul" (projections, SwiGLU, logits), "attention" (QK^T and PV), "mta_conv" (key-query
    convolutions, 2 c_q c_k per score element), "mta_head_mix" (2 x group size per score element),
    "mta_gate" (the gate's Linear(head_dim, 1 or head_dim) per head). Training FLOPs = 3 x the sum.
    """
    _check_seq_len(seq_len)
    dim, heads, kv_heads, head_dim = cfg.dim, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    # Score elements [H, S] per query token per layer; the causal mask keeps half of them.
    score_elements = heads * seq_len * (0.5 if causal else 1.0)
    per_layer_matmul = 2 * (
        dim * heads * head_dim  # wq
        + 2 * dim * kv_heads * head_dim  # wk, wv
        + heads * head_dim * dim  # wo
        + 3 * dim * cfg.ffn_hidden_dim  # w1, w3, w2
    )
    parts = {
        "matmul": float(cfg.num_layers * per_layer_matmul + 2 * dim * cfg.vocab_size),
        "attention": float(cfg.num_layers * 2 * 2 * head_dim * score_elements),  # QK^T and PV
        "mta_conv": 0.0,
        "mta_head_mix": 0.0,
        "mta_gate": 0.0,
    }
    for layer in range(cfg.num_layers):
        mta = cfg.layer_mta(layer)
        if mta is None:
            continue
        for conv in (mta.pre_conv, mta.post_conv):
            if conv is not None:
                parts["mta_conv"] += 2 * conv[0] * conv[1] * score_elements
        for group in (mta.pre_head_mix, mta.post_head_mix):
            if group is not None:
                parts["mta_head_mix"] += 2 * group * score_elements
        gate_width = {None: 0, "scalar": 1, "elementwise": head_dim}[mta.gate]
        parts["mta_gate"] += 2 * heads * head_dim * gate_width
    return parts


def training_flops_per_token(cfg: ModelConfig, seq_len: int, *, causal: bool = True) -> float:
    """Model FLOPs of one training step (forward + backward = 3 x forward) per token."""
    return 3.0 * sum(flops_breakdown(cfg, seq_len, causal=causal).values())


# Dense (no sparsity) bf16 peak FLOP/s of ONE jax device, keyed by jax's `device.device_kind`.
# NVIDIA: datasheet tensor-core bf16 figures (half the "with sparsity" numbers). TPU: per chip;
# v2/v3 have one jax device per TensorCore (2 per chip), v4/v5p per chip (megacore).
PEAK_FLOPS: dict[str, float] = {
    "NVIDIA B200": 2250e12,
    "NVIDIA H200": 989e12,
    "NVIDIA H200 NVL": 835e12,
    "NVIDIA GH200 480GB": 989e12,
    "NVIDIA H100 80GB HBM3": 989e12,  # SXM
    "NVIDIA H100 PCIe": 756e12,
    "NVIDIA H100 NVL": 835e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-SXM4-40GB": 312e12,
    "NVIDIA A100 80GB PCIe": 312e12,
    "NVIDIA A100-PCIE-40GB": 312e12,
    "NVIDIA L40S": 362e12,
    "NVIDIA L4": 121e12,
    "NVIDIA A10": 125e12,
    "TPU v2": 22.5e12,
    "TPU v3": 61.5e12,
    "TPU v4": 275e12,
    "TPU v4 lite": 138e12,  # v4i
    "TPU v5 lite": 197e12,  # v5e
    "TPU v5": 459e12,  # v5p (jax reports "TPU v5")
    "TPU v6 lite": 918e12,  # v6e, Trillium
    "TPU7x": 2307e12,  # Ironwood
}

# Variants of the names above, checked in order (the most specific first) on the lower-cased kind
# with runs of spaces, "-" and "_" turned into one space.
_ALIASES: tuple[tuple[str, str], ...] = (
    (r"\bb200\b", "NVIDIA B200"),
    (r"\bgh200\b", "NVIDIA GH200 480GB"),
    (r"\bh200 nvl\b", "NVIDIA H200 NVL"),
    (r"\bh200\b", "NVIDIA H200"),
    (r"\bh100 (pcie|pci e)\b", "NVIDIA H100 PCIe"),
    (r"\bh100 nvl\b", "NVIDIA H100 NVL"),
    (r"\bh100\b", "NVIDIA H100 80GB HBM3"),
    (r"\ba100\b", "NVIDIA A100-SXM4-80GB"),
    (r"\bl40s\b", "NVIDIA L40S"),
    (r"\bl4\b", "NVIDIA L4"),
    (r"\ba10\b", "NVIDIA A10"),
    (r"^tpu v2\b", "TPU v2"),
    (r"^tpu v3\b", "TPU v3"),
    (r"^tpu v4 ?(lite|i)\b", "TPU v4 lite"),
    (r"^tpu v4\b", "TPU v4"),
    (r"^tpu v5 ?(lite|e)\b", "TPU v5 lite"),
    (r"^tpu v5 ?p?\b", "TPU v5"),
    (r"^tpu v6 ?(lite|e)\b", "TPU v6 lite"),
    (r"^tpu ?v?7 ?x\b", "TPU7x"),
)


def peak_flops(device_kind: str) -> float | None:
    """Dense bf16 peak FLOP/s of one device of this jax `device_kind`; None when unknown (e.g. "cpu").

    Exact names first, then variants ("TPU v5p", "TPU v6e", "NVIDIA H100 SXM5 80GB", "h100-pcie").
    """
    if not isinstance(device_kind, str):
        raise ValueError(f"device_kind={device_kind!r} is invalid: must be a string")
    if device_kind in PEAK_FLOPS:
        return PEAK_FLOPS[device_kind]
    normal = re.sub(r"[\s_-]+", " ", device_kind.strip().lower())
    for pattern, name in _ALIASES:
        if re.search(pattern, normal):
            return PEAK_FLOPS[name]
    return None


def mfu(tokens_per_second_per_device: float, flops_per_token: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation, a fraction (0.31 = 31%): tokens/s x FLOPs/token / peak FLOP/s.

    All per device. None when peak is None (unknown device, CPU): MFU is then absent, not 0.
    """
    for field, value in (
        ("tokens_per_second_per_device", tokens_per_second_per_device),
        ("flops_per_token", flops_per_token),
    ):
        if not 0 <= value < float("inf"):
            raise ValueError(f"{field}={value!r} is invalid: must be finite and >= 0")
    if peak is None:
        return None
    if not 0 < peak < float("inf"):
        raise ValueError(f"peak={peak!r} is invalid: must be finite and > 0, or None")
    return float(tokens_per_second_per_device) * float(flops_per_token) / float(peak)
