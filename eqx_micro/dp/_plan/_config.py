"""What every plan config checks and derives: the relation, the calibrated noise
multiplier, the callable's sensitivity, and a secret noise seed."""

import math
import secrets
from typing import Any

import dp_accounting
import jax
import jax.tree_util as jtu
import numpy as np

from .._accounting import (
    calibrate_noise_multiplier,
    check_accountant,
    check_delta,
    check_relation,
    NeighboringRelation,
    Real,
)
from .._clipping._adaptive import QuantileAdaptiveClipping
from .._clipping._callable import BoundedSensitivityCallable
from .._clipping._contract import AbstractBoundedSensitivityCallable


def _check_open_unit(name: str, value: Real, *, closed_high: bool) -> None:
    high_ok = value <= 1 if closed_high else value < 1
    if not (value > 0 and high_ok) or math.isnan(value):
        interval = "(0, 1]" if closed_high else "(0, 1)"
        raise ValueError(f"`{name}` must be in {interval}, got {value}.")


def check_config(config: Any) -> None:
    """The checks shared by every plan config."""
    if not isinstance(config.iterations, int | np.integer) or isinstance(
        config.iterations, bool
    ):
        raise TypeError(
            f"`iterations` must be a positive int (the number of noisy updates), got "
            f"{config.iterations!r} of type {type(config.iterations).__name__}."
        )
    if config.iterations < 1:
        raise ValueError(f"`iterations` must be a positive int, got {config.iterations}.")
    check_accountant(config.accountant)
    if config.neighboring_relation is not None:
        check_relation(config.neighboring_relation)
    _check_open_unit("sampling_prob", config.sampling_prob, closed_high=True)
    if config.noise_multiplier is None and config.epsilon is None:
        raise ValueError(
            "Give a target `epsilon` (with `delta`) to calibrate the noise, or a "
            "`noise_multiplier`; got neither."
        )
    if config.noise_multiplier is not None and config.epsilon is not None:
        raise ValueError(
            "Give either a target `epsilon` (with `delta`) or a `noise_multiplier`, "
            f"not both (got epsilon={config.epsilon}, "
            f"noise_multiplier={config.noise_multiplier})."
        )
    if config.epsilon is not None:
        if not (config.epsilon > 0 and math.isfinite(config.epsilon)):
            raise ValueError(f"`epsilon` must be finite and > 0, got {config.epsilon}.")
        if config.delta is None:
            raise ValueError(
                f"A target `epsilon={config.epsilon}` needs a `delta` too: the "
                "guarantee is (epsilon, delta); pass e.g. `delta=1e-5` (well below "
                "1 / num_examples)."
            )
    if config.delta is not None:
        if config.epsilon is None:
            raise ValueError(
                f"Got `delta={config.delta}` without a target `epsilon`: the config "
                "uses `delta` only to calibrate the noise to `(epsilon, delta)`. With a "
                "`noise_multiplier`, leave `delta` out and ask for the epsilon at any "
                "delta with `plan.epsilon(delta)`."
            )
        check_delta(config.delta)
    if config.noise_multiplier is not None and not (
        config.noise_multiplier >= 0 and math.isfinite(config.noise_multiplier)
    ):
        raise ValueError(
            f"`noise_multiplier` must be finite and >= 0, got {config.noise_multiplier}."
        )
    adaptive = config.adaptive_clipping
    if adaptive is not None and not isinstance(adaptive, QuantileAdaptiveClipping):
        raise TypeError(
            "`adaptive_clipping` must be a `dp.QuantileAdaptiveClipping` (or None for a "
            f"fixed clip norm), got {adaptive!r}."
        )
    if config.num_examples is not None and config.num_examples < 1:
        raise ValueError(f"`num_examples` must be >= 1, got {config.num_examples}.")
    if config.truncated_batch_size is not None:
        if config.num_examples is None:
            raise ValueError(
                "`truncated_batch_size` needs `num_examples`: accounting for "
                "truncated Poisson sampling depends on the dataset size."
            )
        if config.truncated_batch_size < 1:
            raise ValueError(
                f"`truncated_batch_size` must be >= 1, got {config.truncated_batch_size}."
            )


def relation_of(config: Any) -> NeighboringRelation:
    """The configured neighboring relation, or the default for the config."""
    if config.neighboring_relation is not None:
        return config.neighboring_relation
    if isinstance(config.accountant, dp_accounting.PrivacyAccountant):
        return config.accountant.neighboring_relation
    if config.num_examples is None:
        return NeighboringRelation.ADD_OR_REMOVE_ONE
    return NeighboringRelation.REPLACE_SPECIAL


def noise_multiplier_of(config: Any) -> float:
    """The configured noise multiplier, or the one calibrated to `(epsilon, delta)`."""
    if config.noise_multiplier is not None:
        return float(config.noise_multiplier)
    return calibrate_noise_multiplier(
        config._make_event,
        config.epsilon,
        config.delta,
        accountant=config.accountant,
        neighboring_relation=relation_of(config),
    )


def sensitivity_of(fn: Any, relation: NeighboringRelation) -> float:
    """The callable's finite sensitivity under `relation`, or a loud error."""
    if not isinstance(fn, AbstractBoundedSensitivityCallable):
        raise TypeError(
            "`make` needs `clipped_aggregation_fn` to be a bounded-sensitivity "
            "callable such as the output of `dp.clipped_grad`, got "
            f"{type(fn).__name__}: without a known sensitivity the noise cannot be "
            "calibrated."
        )
    sensitivity = fn.sensitivity(relation)
    if not math.isfinite(sensitivity):
        raise ValueError(
            f"The callable's sensitivity is {sensitivity}; a DP plan needs a finite "
            "clip norm and a positive `normalize_by`."
        )
    return sensitivity


def noise_seed_of(noise_seed: int | None) -> int:
    # Noise an adversary can predict protects nothing: by default, a secret seed.
    return secrets.randbits(63) if noise_seed is None else noise_seed


def adaptive_parts(
    config: Any,
    fn: AbstractBoundedSensitivityCallable,
    noise_multiplier: float,
    relation: NeighboringRelation,
    noise_seed: int,
) -> tuple[AbstractBoundedSensitivityCallable, float, QuantileAdaptiveClipping | None]:
    """`(callable, gradient noise multiplier, keyed adaptive module)` of a plan: with
    `adaptive_clipping`, the callable also returns its gradient norms, the gradient
    keeps the part of the noise the count does not take, and the count noise gets a
    key from the plan's seed (a stream of its own)."""
    adaptive = config.adaptive_clipping
    if adaptive is None:
        return fn, noise_multiplier, None
    if not isinstance(fn, BoundedSensitivityCallable):
        raise TypeError(
            "`adaptive_clipping` sets the clip norm of the callable at every step, so it "
            "needs one from `dp.clipped_grad`, `dp.ghost_clipped_grad` or "
            f"`dp.clipped_fun`; got a {type(fn).__name__}."
        )
    clips = jtu.tree_leaves(fn.l2_clip_norm)
    if any(float(c) <= 0 for c in clips):
        raise ValueError(
            "`adaptive_clipping` starts from the callable's `l2_clip_norm`, which must "
            "be positive (a clip norm of 0 cannot grow geometrically); got "
            f"{[float(c) for c in clips]}."
        )
    gradient = adaptive.gradient_noise_multiplier(noise_multiplier, len(clips), relation)
    if adaptive.key is None:
        adaptive = adaptive.with_key(jax.random.fold_in(jax.random.key(noise_seed), 1))
    return fn.with_grad_norms(), gradient, adaptive
