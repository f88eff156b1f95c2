"""Model FLOPs per token (against explicit shapes, parameter counts and XLA's cost analysis), peaks, MFU."""

import dataclasses

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from mta_jax.config import ModelConfig, MTAConfig
from mta_jax.model import MTATransformer, count_params
from train.flops import PEAK_FLOPS, flops_breakdown, mfu, peak_flops, training_flops_per_token

# GQA, head_dim != dim / num_heads, untied output: every size enters differently.
TINY = ModelConfig(
    vocab_size=96, dim=48, num_layers=3, num_heads=4, num_kv_heads=2, head_dim=10, tie_embeddings=False
)
MTA = MTAConfig(pre_conv=(3, 5), post_conv=(2, 3), pre_head_mix=2, post_head_mix=4, gate="elementwise")


def _matmul_flops(shapes, tokens):
    """2 FLOPs per multiply-add of [tokens, m] @ [m, n] for each (m, n)."""
    return sum(2 * tokens * m * n for m, n in shapes)


def test_forward_count_from_explicit_matrix_shapes():
    cfg, seq = TINY, 24
    d, h, kv, hd, f, v = 48, 4, 2, 10, cfg.ffn_hidden_dim, 96
    layer = [(d, h * hd), (d, kv * hd), (d, kv * hd), (h * hd, d), (d, f), (d, f), (f, d)]
    matmul = 3 * _matmul_flops(layer, seq) + _matmul_flops([(d, v)], seq)
    # One sequence, per layer: scores [h, seq, seq] each a head_dim dot; out [h, seq, hd] each a seq dot.
    attention = 3 * (2 * h * seq * seq * hd + 2 * h * seq * hd * seq)
    parts = flops_breakdown(cfg, seq, causal=False)
    assert parts == {
        "matmul": matmul / seq,
        "attention": attention / seq,
        "mta_conv": 0.0,
        "mta_head_mix": 0.0,
        "mta_gate": 0.0,
    }
    assert training_flops_per_token(cfg, seq, causal=False) == 3 * (matmul + attention) / seq


def test_matmul_part_is_twice_the_non_norm_parameters():
    """Tied: the embedding doubles as the logit projection; every other weight but norms is a matmul."""
    for cfg in (TINY, dataclasses.replace(TINY, tie_embeddings=True, head_dim=None)):
        norms = (2 * cfg.num_layers + 1) * cfg.dim
        embed = 0 if cfg.tie_embeddings else cfg.vocab_size * cfg.dim
        expected = 2 * (count_params(cfg) - norms - embed)
        assert flops_breakdown(cfg, 2048)["matmul"] == expected


def test_mta_terms_per_score_element_and_only_in_kq_conv_layers():
    seq = 16
    cfg = dataclasses.replace(TINY, mta=MTA, kq_conv_layers=(0, 2))
    parts = flops_breakdown(cfg, seq, causal=False)
    scores_per_token = 4 * seq  # [H, S] per query
    assert parts["mta_conv"] == 2 * (3 * 5 + 2 * 3) * scores_per_token * 2  # two of three layers
    assert parts["mta_head_mix"] == 2 * (2 + 4) * scores_per_token * 3
    assert parts["mta_gate"] == 2 * 4 * 10 * 10 * 3  # Linear(hd, hd) per head
    scalar = dataclasses.replace(cfg, mta=dataclasses.replace(MTA, gate="scalar"))
    assert flops_breakdown(scalar, seq)["mta_gate"] == 2 * 4 * 10 * 3
    base = flops_breakdown(TINY, seq, causal=False)
    assert {k: parts[k] for k in ("matmul", "attention")} == {k: base[k] for k in ("matmul", "attention")}

    longer = flops_breakdown(cfg, 2 * seq, causal=False)  # score terms grow with the span, others not
    for key in ("attention", "mta_conv", "mta_head_mix"):
        assert longer[key] == 2 * parts[key]
    for key in ("matmul", "mta_gate"):
        assert longer[key] == parts[key]


def test_causal_halves_every_score_term_and_nothing_else():
    cfg = dataclasses.replace(TINY, mta=MTA)
    full, causal = flops_breakdown(cfg, 32, causal=False), flops_breakdown(cfg, 32)
    for key in ("attention", "mta_conv", "mta_head_mix"):
        assert causal[key] == full[key] / 2 > 0
    for key in ("matmul", "mta_gate"):
        assert causal[key] == full[key] > 0
    assert training_flops_per_token(cfg, 32) == 3 * sum(causal.values())


def _xla_forward_flops_per_token(cfg, batch, seq):
    """XLA's FLOP count of the lowered (not yet optimised) forward pass, on abstract shapes."""
    model = nnx.eval_shape(lambda: MTATransformer(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)

    def forward(state, tokens):
        return nnx.merge(graphdef, state)(tokens, deterministic=True)

    lowered = jax.jit(forward).lower(state, jax.ShapeDtypeStruct((batch, seq), jnp.int32))
    cost = lowered.cost_analysis() or lowered.compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return cost["flops"] / (batch * seq)


def test_agrees_with_xla_cost_analysis_of_the_model():
    """The reference path computes the full score matrix, so compare with causal=False. XLA also counts
    elementwise ops (norms, softmax, masks, the conv's padding): ours must be a little lower."""
    seq = 64
    base = dataclasses.replace(TINY, dim=128, head_dim=None)
    xla_base = _xla_forward_flops_per_token(base, 2, seq)
    ours = sum(flops_breakdown(base, seq, causal=False).values())
    assert 1.0 <= xla_base / ours < 1.03

    mta = dataclasses.replace(base, mta=MTA)
    xla_extra = _xla_forward_flops_per_token(mta, 2, seq) - xla_base
    parts = flops_breakdown(mta, seq, causal=False)
    ours_extra = parts["mta_conv"] + parts["mta_head_mix"] + parts["mta_gate"]
    assert 1.0 <= xla_extra / ours_extra < 1.15


def test_seq_len_must_be_a_positive_int():
    for bad in (0, -3, 8.0, True):
        with pytest.raises(ValueError, match=f"seq_len={bad!r} is invalid"):
            flops_breakdown(TINY, bad)


@pytest.mark.parametrize(
    "kind, peak",
    [
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 SXM5 80GB", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("nvidia h100-pcie", 756e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA H200 NVL", 835e12),
        ("NVIDIA A100-SXM4-40GB", 312e12),
        ("NVIDIA A100 80GB PCIe", 312e12),
        ("NVIDIA L4", 121e12),
        ("TPU v4", 275e12),
        ("TPU v4 lite", 138e12),
        ("TPU v5 lite", 197e12),
        ("TPU v5e", 197e12),
        ("TPU v5", 459e12),
        ("TPU v5p", 459e12),
        ("TPU v6 lite", 918e12),
        ("TPU v6e", 918e12),
        ("cpu", None),
        ("NVIDIA GeForce GTX 1080", None),
        ("NVIDIA A10G", None),
        ("", None),
    ],
)
def test_peak_lookup(kind, peak):
    assert peak_flops(kind) == peak


def test_every_table_name_maps_to_itself_also_in_another_spelling():
    for kind, peak in PEAK_FLOPS.items():
        assert peak_flops(kind) == peak
        assert peak_flops(f" {kind.upper().replace(' ', '_')} ") == peak


def test_peak_of_this_machine_is_none_on_cpu():
    device = jax.devices()[0]
    if device.platform == "cpu":
        assert peak_flops(device.device_kind) is None
        assert mfu(1000.0, 1e9, peak_flops(device.device_kind)) is None
    else:
        assert peak_flops(device.device_kind) is not None, f"add {device.device_kind!r} to PEAK_FLOPS"


def test_mfu():
    assert mfu(5000.0, 6e9, 1e14) == pytest.approx(0.3)
    assert mfu(0.0, 6e9, 1e14) == 0.0
    assert mfu(5000.0, 6e9, None) is None
    for args, field in (
        ((-1.0, 6e9, 1e14), "tokens_per_second_per_device"),
        ((float("nan"), 6e9, 1e14), "tokens_per_second_per_device"),
        ((1.0, float("inf"), 1e14), "flops_per_token"),
        ((1.0, 6e9, 0.0), "peak"),
    ):
        with pytest.raises(ValueError, match=f"{field}=.* is invalid"):
            mfu(*args)
