"""Learning-rate schedules as plain functions of the optimizer step, ready to plot.

Symbols: t = optimizer step, counted from 1 (the first update is t = 1); w = warm-up steps;
T = total steps (``max_steps``); lr_max = the peak (base) learning rate; lr_min = the floor.

* ``constant_lr``: linear warm-up to lr_max, then flat.
* ``cosine_lr``: linear warm-up to lr_max, then half a cosine down to lr_min at step T
  (GPT-2/3, Llama, nanoGPT).
* ``noam_lr``: the schedule of "Attention Is All You Need" (Vaswani et al., 2017, eq. 3):
  linear warm-up, then decay as 1/sqrt(t); its peak is set by d_model and w alone.

Why warm up at all: Adam divides by a running estimate of the gradient's second moment, and
in the first steps that estimate rests on a handful of gradients, so full-size steps would be
noisy and large; ramping the rate up gives the estimates time to settle.

``labkit.train`` turns these into a ``torch.optim.lr_scheduler.LambdaLR``; a notebook plots
them directly: ``[cosine_lr(t, 3e-4, 100, 1000) for t in range(1, 1001)]``.
"""

from __future__ import annotations

import math


def _check_step(step: int) -> None:
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise ValueError(f"step counts optimizer updates from 1, got {step!r}")


def _check_warmup(warmup: int, minimum: int = 0) -> None:
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < minimum:
        raise ValueError(f"warmup must be an int >= {minimum}, got {warmup!r}")


def _check_rate(name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
        raise ValueError(f"{name} must be a number >= 0, got {value!r}")


def constant_lr(step: int, base_lr: float, warmup: int = 0) -> float:
    """Linear warm-up, then constant::

        lr(t) = lr_max * min(1, t / w)        (lr(t) = lr_max for every t when w = 0)

    Step w is the first at the full rate.
    """
    _check_step(step)
    _check_rate("base_lr", base_lr)
    _check_warmup(warmup)
    if step < warmup:
        return base_lr * step / warmup
    return base_lr


def cosine_lr(step: int, base_lr: float, warmup: int, max_steps: int, min_lr: float = 0.0) -> float:
    """Linear warm-up, then cosine decay to ``min_lr`` at ``max_steps``::

        lr(t) = lr_max * t / w                                           t <= w
        lr(t) = lr_min + (lr_max - lr_min) * (1 + cos(pi * p)) / 2       w < t <= T,
                where p = (t - w) / (T - w) goes from 0 to 1
        lr(t) = lr_min                                                   t > T

    The peak lr_max is reached at t = w, and lr(T) = lr_min exactly. The cosine spends
    long stretches near the peak and near the floor and moves quickly in between, which
    in practice beats a linear decay.
    """
    _check_step(step)
    _check_rate("base_lr", base_lr)
    _check_rate("min_lr", min_lr)
    _check_warmup(warmup)
    if isinstance(max_steps, bool) or not isinstance(max_steps, int) or max_steps < warmup:
        raise ValueError(f"max_steps must be an int >= warmup={warmup}, got {max_steps!r}")
    if step <= warmup:
        return base_lr * step / warmup
    if step > max_steps:
        return min_lr
    progress = (step - warmup) / (max_steps - warmup)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def noam_lr(step: int, d_model: int, warmup: int) -> float:
    """The Transformer paper's schedule (Vaswani et al., 2017, eq. 3)::

        lr(t) = d_model^-0.5 * min(t^-0.5, t * w^-1.5)

    The two terms are equal at t = w: before it the second one rules (a linear ramp), after it
    the first (decay as 1/sqrt(t)), so the peak is lr(w) = (d_model * w)^-0.5, e.g. 7.0e-4
    for d_model = 512, w = 4000. The result is the learning rate itself, not a multiplier;
    wider models get smaller steps.
    """
    _check_step(step)
    _check_warmup(warmup, minimum=1)
    if isinstance(d_model, bool) or not isinstance(d_model, int) or d_model < 1:
        raise ValueError(f"d_model must be a positive int, got {d_model!r}")
    return d_model**-0.5 * min(step**-0.5, step * warmup**-1.5)
