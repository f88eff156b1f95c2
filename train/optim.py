"""Optax: AdamW with warm-up then linear/cosine decay and global-norm clipping (the paper's recipe)."""

from __future__ import annotations

import dataclasses

import optax

DECAYS = ("linear", "cosine", "constant")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """Defaults are the paper's (spec section 5): lr 1.5e-4, 375 warm-up steps, linear decay to 0."""

    learning_rate: float = 1.5e-4
    warmup_steps: int = 375
    decay: str = "linear"  # after warm-up, over the remaining steps of the run
    final_lr_fraction: float = 0.0  # the learning rate at the last step, as a fraction of the peak
    b1: float = 0.9
    b2: float = 0.98
    eps: float = 1e-8
    weight_decay: float = 0.05  # on every parameter, MTA kernels included, as the paper
    clip_norm: float | None = 1.0  # global gradient norm; None: no clipping

    def __post_init__(self):
        def bad(field, rule):
            return ValueError(f"optimizer.{field}={getattr(self, field)!r} is invalid: {rule}")

        if not self.learning_rate > 0:
            raise bad("learning_rate", "must be > 0")
        if self.warmup_steps < 0:
            raise bad("warmup_steps", "must be >= 0")
        if self.decay not in DECAYS:
            raise bad("decay", f"must be one of {DECAYS}")
        if not 0 <= self.final_lr_fraction <= 1:
            raise bad("final_lr_fraction", "must be in [0, 1]")
        for field in ("b1", "b2"):
            if not 0 <= getattr(self, field) < 1:
                raise bad(field, "must be in [0, 1)")
        if not self.eps > 0:
            raise bad("eps", "must be > 0")
        if self.weight_decay < 0:
            raise bad("weight_decay", "must be >= 0")
        if self.clip_norm is not None and not self.clip_norm > 0:
            raise bad("clip_norm", "must be > 0 or null")


def learning_rate_schedule(cfg: OptimizerConfig, total_steps: int) -> optax.Schedule:
    """Linear warm-up from 0 to the peak over warmup_steps, then decay until total_steps."""
    peak, end = cfg.learning_rate, cfg.learning_rate * cfg.final_lr_fraction
    warmup = min(cfg.warmup_steps, total_steps)
    decay_steps = max(total_steps - warmup, 1)
    if cfg.decay == "linear":
        after = optax.linear_schedule(peak, end, decay_steps)
    elif cfg.decay == "cosine":
        after = optax.cosine_decay_schedule(peak, decay_steps, alpha=cfg.final_lr_fraction)
    else:
        after = optax.constant_schedule(peak)
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


def make_optimizer(cfg: OptimizerConfig, total_steps: int) -> optax.GradientTransformation:
    """Clip by global norm, then AdamW (decoupled weight decay on every parameter)."""
    adamw = optax.adamw(
        learning_rate_schedule(cfg, total_steps),
        b1=cfg.b1,
        b2=cfg.b2,
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
    )
    if cfg.clip_norm is None:
        return adamw
    return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), adamw)
