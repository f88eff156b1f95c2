"""implementation="pallas": the fused kernels behind multi_token_attention's signature.

    q, k, v --(dspace.py: conv folded into operands, band correction)--> qp, kp, band
            --(triton_core.py on GPU / tpu_core.py on TPU / the Triton kernels interpreted on CPU)--> out

The kernel is chosen for the platform being compiled for (kernels/platform.py), not the host's, and
its tiles for the chip (triton_tiles.py, tpu_tiles.py). What the kernels support: the pre-softmax
key-query conv (any c_q, c_k, pad_key), head mixing before and after the softmax (groups of up to 16
heads on TPU, whose VMEM holds every head's tile; up to 4 on GPU, where more do not fit a Hopper
SM's registers), the post-softmax conv on TPU (tpu_post_conv.py; interpreted on CPU, the TPU kernels
run for it), attention dropout in training (mta_jax/dropout.py's mask, drawn in-kernel), causal
or not, packed documents (segment ids), grouped-query attention, T != S, float32 and bfloat16
(float16) inputs. Anything else (the post-softmax conv on GPU, wider head mixing, float64, a layer
whose smallest tiles overflow the TPU's VMEM: tpu_tiles.no_fit) is a ValueError naming the option;
implementation="auto" then picks the blockwise path.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from flax.core import spmd
from jax.sharding import PartitionSpec

from kernels import tpu_tiles, triton_tiles
from kernels.dspace import dspace_operands
from kernels.platform import Target, chip_of, known_chip, per_platform, traced_target
from kernels.tpu_core import mta_core_tpu
from kernels.triton_core import mta_core_triton
from mta_jax.config import MTAConfig
from mta_jax.dropout import head_seeds
from mta_jax.params import MTAParams, key_padding

# The largest head-mixing group the kernels fuse, per platform: on TPU the 16 heads' score tiles fit
# VMEM at 256 x 128 (libtpu compiles the paper's layer, bench/results/compile-v5e.json); on GPU a
# group of 4 already needs the smallest tiles (triton_tiles.py), and 16 did not finish compiling for
# an H200 in 35 minutes. Interpreted (CPU) the kernels take any group up to the TPU's.
MAX_MIX_GROUP = {"tpu": 16, "cuda": 4, "gpu": 4, "cpu": 16}
KERNELS = ("triton", "tpu")
_PAD_Q_SEGMENT = jnp.iinfo(jnp.int32).min  # padded query rows see nothing
_PAD_KV_SEGMENT = jnp.iinfo(jnp.int32).min + 1  # padded keys are seen by nobody


def unsupported_option(
    cfg: MTAConfig, *, dtype=None, head_dim: int | None = None, platform=None, chip=None
) -> str | None:
    """Why the kernels cannot run this configuration on `platform` ("tpu", "cuda" / "gpu", "cpu";
    None: on any of them), naming the option, or None if they can. On GPU the Triton kernels also
    need a head dim that is a multiple of 16; on a TPU `chip` (kernels.chips.Chip) with head_dim given,
    the layer's smallest tiles must fit its VMEM (tpu_tiles.no_fit: on a v4, 16-head mixing with the
    6 x 11 conv does not)."""
    if cfg.post_conv is not None and platform in ("cuda", "gpu"):
        return f"post_conv={cfg.post_conv} on {platform} (the post-softmax conv is in the TPU kernels only)"
    largest = MAX_MIX_GROUP.get(platform, max(MAX_MIX_GROUP.values()))
    where = f" on {platform}" if platform in MAX_MIX_GROUP else ""
    for name in ("pre_head_mix", "post_head_mix"):
        size = getattr(cfg, name)
        if size is not None and size > largest:
            return f"{name}={size}{where} (head mixing in groups of more than {largest})"
    sizes = [s for s in (cfg.pre_head_mix, cfg.post_head_mix) if s is not None]
    if len(sizes) == 2 and max(sizes) % min(sizes):
        return f"pre_head_mix={sizes[0]} with post_head_mix={sizes[1]} (one group size must divide the other)"
    if dtype is not None and jnp.dtype(dtype) == jnp.float64:
        return "float64 inputs (the kernels compute in float32 at most)"
    if platform in ("cuda", "gpu") and head_dim is not None and head_dim % 16:
        return f"head_dim={head_dim} on GPU (the Triton kernels need a multiple of 16)"
    if chip is not None and chip.platform == "tpu" and head_dim is not None:
        return tpu_tiles.no_fit(chip, _tpu_problem(cfg, head_dim, dtype or jnp.bfloat16))
    return None


def _cpu_kernel(cfg: MTAConfig) -> str:
    """The kernels interpreted on CPU: the Triton ones; the TPU ones for the post-softmax conv."""
    return "tpu" if cfg.post_conv is not None else "triton"


def _refuse(reason: str | None) -> None:
    if reason:
        raise ValueError(f'implementation="pallas" does not support {reason}; use "blockwise" or "reference"')


def _pad_front(x: jax.Array, amount: int, value=0) -> jax.Array:
    pad = [(0, 0)] * x.ndim
    pad[1] = (amount, 0)
    return jnp.pad(x, pad, constant_values=value)


def _problem(cfg: MTAConfig):
    """(G, C, width) of this layer: heads per program, slabs of the QK contraction, band width."""
    group = max([s for s in (cfg.pre_head_mix, cfg.post_head_mix) if s is not None], default=1)
    if cfg.pre_conv is None:
        return group, 1, 0
    c_q, c_k = cfg.pre_conv
    pad_left, _ = key_padding(c_k, cfg.pad_key)
    width = (c_k - 1 - pad_left) + c_q - 1 if cfg.causal else 0
    return group, c_q, width


def _tpu_problem(cfg: MTAConfig, head_dim: int, dtype) -> tpu_tiles.Problem:
    group, slabs, width = _problem(cfg)
    conv_q = cfg.post_conv[0] if cfg.post_conv else 0
    return tpu_tiles.Problem(group, slabs, head_dim, head_dim, width, jnp.dtype(dtype).itemsize, conv_q)


def default_block_sizes(kernel: str, chip, q, k, cfg: MTAConfig):
    """The kernel's tiles for this layer on `chip` (None: the kernel's own defaults)."""
    if chip is None:
        return None
    if kernel == "triton":
        group, slabs, width = _problem(cfg)
        head_dim, itemsize = q.shape[-1], jnp.dtype(q.dtype).itemsize
        problem = triton_tiles.Problem(group, slabs, head_dim, head_dim, itemsize)
        return triton_tiles.default_block_sizes(chip, problem, width)
    return tpu_tiles.default_block_sizes(chip, _tpu_problem(cfg, q.shape[-1], q.dtype))


def _fit_to_lengths(blocks, q_len: int, kv_len: int, smallest: int):
    """blocks with every tile clipped to the sequences: at most the power of two >= T (S), at least
    `smallest`. All tiles stay powers of two, so T and S are padded to multiples of the largest."""

    def at_most(block: int, length: int) -> int:
        return min(block, max(smallest, 1 << max(0, length - 1).bit_length()))

    def fit(tiles):
        return dataclasses.replace(
            tiles, block_q=at_most(tiles.block_q, q_len), block_k=at_most(tiles.block_k, kv_len)
        )

    return dataclasses.replace(blocks, fwd=fit(blocks.fwd), dq=fit(blocks.dq), dkv=fit(blocks.dkv))


def pallas_attention_core(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    params: MTAParams,
    cfg: MTAConfig,
    *,
    q_segment_ids: jax.Array | None,
    kv_segment_ids: jax.Array | None,
    dropout_rng: jax.Array | None,
    block_q: int | None = None,
    block_k: int | None = None,
    kernel: str | None = None,
    interpret: bool | None = None,
    block_sizes=None,
    target: Target | None = None,
) -> jax.Array:
    """The attention core through the fused kernels: q [B, T, H, D], k/v [B, S, Hkv, D] -> [B, T, H, D]
    float32, like reference_attention_core.

    kernel: "triton" or "tpu" to force one (default: the platform's, per platform when the target is
    not known at trace time); interpret: run it in the Pallas interpreter (default: only on CPU).
    block_sizes: a TritonBlockSizes / TpuBlockSizes (default: from the chip's resource model);
    block_q / block_k override the tiles of every kernel. target: the platform (and device kind) to
    compile for, when the caller knows it (implementation="auto" does). Both sequences are padded at
    the front to whole tiles, which keeps the bottom-right causal alignment; padded keys belong to no
    document.
    """
    _refuse(unsupported_option(cfg, dtype=q.dtype))
    if kernel is not None and kernel not in KERNELS:
        raise ValueError(f"kernel={kernel!r} is invalid: must be one of {KERNELS}")
    options = dict(block_q=block_q, block_k=block_k, block_sizes=block_sizes)
    # Dropout seeds of every (batch row, head) of the whole batch, so that under a shard_map each
    # device's rows draw the mask of their global index.
    seeds = None
    if dropout_rng is not None:
        seeds = jax.lax.bitcast_convert_type(head_seeds(dropout_rng, q.shape[0], q.shape[2]), jnp.int32)
    args = (q, k, v, params, q_segment_ids, kv_segment_ids, seeds)
    if target is not None and kernel is None:
        kernel = {"tpu": "tpu", "cpu": _cpu_kernel(cfg)}.get(target.platform, "triton")
        interpret = target.platform == "cpu" if interpret is None else interpret
        return _run(*args, cfg=cfg, kernel=kernel, interpret=interpret, target=target, **options)
    if kernel is not None:
        interpret = jax.default_backend() == "cpu" if interpret is None else interpret
        platform = "cpu" if interpret else ("tpu" if kernel == "tpu" else "cuda")
        return _run(
            *args, cfg=cfg, kernel=kernel, interpret=interpret, target=Target(platform, None), **options
        )

    def branch(kernel_name: str, interpreted: bool):
        def run(*a, target: Target):
            return _run(*a, cfg=cfg, kernel=kernel_name, interpret=interpreted, target=target, **options)

        return run

    branches = dict(
        tpu=branch("tpu", bool(interpret)), cuda=branch("triton", bool(interpret)),
        cpu=branch(_cpu_kernel(cfg), True if interpret is None else interpret),
    )  # fmt: skip
    lacking = any(unsupported_option(cfg, dtype=q.dtype, head_dim=q.shape[-1], platform=p) for p in branches)
    if lacking and traced_target(q) is None:
        # Staging every platform's branch would fail in the one that lacks the option, and nothing names
        # the target: the host's alone. (A known target, e.g. a compile-only TPU, gets its own kernels.)
        host = "cuda" if jax.default_backend() == "gpu" else jax.default_backend()
        return branches[host](*args, target=Target(host, None))
    return per_platform(args, q, **branches)


def _batch_axes(mesh) -> tuple[str, ...]:
    """The mesh axes that split the batch: those of the logical axis "batch" in the active rules
    (flax.core.spmd.logical_axis_rules, as train/mesh.py sets them), else none."""
    rules = dict(spmd.get_logical_axis_rules() or ())
    axes = rules.get("batch")
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    return tuple(a for a in axes if a in mesh.axis_names and a not in mesh.manual_axes)


def _run(q, k, v, params, q_segment_ids, kv_segment_ids, seeds, **options):
    """_run_local on every device's rows: under a mesh of several devices the kernels run in a
    shard_map (Mosaic and Triton calls cannot be partitioned by XLA), split over the batch axes;
    other axes (tensor) hold every head, gathered if they were split."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1 or set(mesh.manual_axes) == set(mesh.axis_names):
        return _run_local(q, k, v, params, q_segment_ids, kv_segment_ids, seeds, **options)
    if q_segment_ids is None:
        q_segment_ids = jnp.zeros(q.shape[:2], jnp.int32)
        kv_segment_ids = jnp.zeros(k.shape[:2], jnp.int32)
    axes = _batch_axes(mesh)
    if q.shape[0] % math.prod(mesh.shape[a] for a in axes):
        axes = ()
    rows = PartitionSpec(axes or None)
    local = functools.partial(_run_local, **options)
    return jax.shard_map(
        local,
        in_specs=(rows, rows, rows, PartitionSpec(), rows, rows, rows),
        out_specs=rows,
        axis_names=set(mesh.axis_names) - set(mesh.manual_axes),
        check_vma=False,
    )(q, k, v, params, q_segment_ids, kv_segment_ids, seeds)


def _run_local(
    q, k, v, params, q_segment_ids, kv_segment_ids, seeds, *, cfg, kernel, interpret, target, **options
):
    """One kernel on one platform: glue, padding, tiles, kernel call."""
    # The VMEM check needs the chip; with tiles given, the compiler is the judge.
    tiles_given = options["block_sizes"] or options["block_q"] or options["block_k"]
    vmem_chip = None if tiles_given else known_chip(target.platform, target.device_kind)
    _refuse(
        unsupported_option(cfg, dtype=q.dtype, head_dim=q.shape[-1], platform=target.platform, chip=vmem_chip)
    )
    if cfg.post_conv is not None and kernel == "triton":
        _refuse(
            f"post_conv={cfg.post_conv} with the Triton kernels (the post-softmax conv is in the TPU ones)"
        )
    batch, q_len, num_heads, head_dim = q.shape
    kv_len = k.shape[1]
    # Tiles for the chip compiled for; interpreted on the CPU, the kernels' plain defaults (fewer steps).
    chip = None if target.platform == "cpu" else chip_of(target.platform, target.device_kind)
    blocks = options["block_sizes"] or default_block_sizes(kernel, chip, q, k, cfg)
    if blocks is None:
        blocks = triton_tiles.TritonBlockSizes() if kernel == "triton" else tpu_tiles.TpuBlockSizes()
    blocks = blocks.with_blocks(options["block_q"], options["block_k"])
    blocks = _fit_to_lengths(blocks, q_len, kv_len, 16 if kernel == "triton" else 8)
    bq, bk = blocks.max_blocks()
    q_pad, kv_pad = -q_len % bq, -kv_len % bk
    if q_segment_ids is None:
        q_segment_ids = jnp.zeros((batch, q_len), jnp.int32)
        kv_segment_ids = jnp.zeros((batch, kv_len), jnp.int32)
    q_ids = _pad_front(q_segment_ids.astype(jnp.int32), q_pad, _PAD_Q_SEGMENT)
    kv_ids = _pad_front(kv_segment_ids.astype(jnp.int32), kv_pad, _PAD_KV_SEGMENT)
    q, k, v = _pad_front(q, q_pad), _pad_front(k, kv_pad), _pad_front(v, kv_pad)

    if params.pre_conv is not None:
        qp, kp, band = dspace_operands(q, k, params.pre_conv, q_ids, kv_ids, cfg.pad_key, cfg.causal)
    else:
        qp = (q * head_dim**-0.5).astype(q.dtype).transpose(0, 2, 1, 3)[:, :, None]  # [B, H, 1, T, D]
        kp = jnp.repeat(k.transpose(0, 2, 1, 3), num_heads // k.shape[2], axis=1)[:, :, None]
        band = None
    operands = (
        qp,
        kp,
        v.transpose(0, 2, 1, 3),
        band,
        q_ids,
        kv_ids,
        params.pre_head_mix,
        params.post_head_mix,
    )
    dropout = {}
    if seeds is not None:  # the hashed positions are the unpadded ones
        dropout = dict(dropout_seeds=seeds, dropout_rate=cfg.dropout_rate, q_offset=q_pad, kv_offset=kv_pad)
    if kernel == "triton":
        out = mta_core_triton(
            *operands, causal=cfg.causal, block_sizes=blocks, interpret=interpret, **dropout
        )
    else:
        vmem = chip.vmem_bytes if chip is not None else 16 * 2**20
        conv = dict(post_conv=params.post_conv, pad_key=cfg.pad_key) if cfg.post_conv else {}
        out = mta_core_tpu(
            *operands, causal=cfg.causal, block_sizes=blocks, vmem_bytes=vmem, interpret=interpret,
            **dropout, **conv,
        )  # fmt: skip
    return out.transpose(0, 2, 1, 3)[:, q_pad:]
