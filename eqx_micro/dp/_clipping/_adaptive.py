"""Quantile-based adaptive clipping: the clip norm follows a target quantile of the
per-example gradient norms, driven by a privatized count of unclipped examples."""

import math
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, ArrayLike, Bool, Float, PRNGKeyArray, PyTree, UInt32

from .._accounting import NeighboringRelation, Real
from .._noise._base import key_from, step_keys


class AdaptiveClipState(eqx.Module):
    """The state of [`dp.QuantileAdaptiveClipping`][eqx_micro.dp.QuantileAdaptiveClipping].

    **Fields:**

    - `l2_clip_norm`: the current clip norms (float32 scalars, shaped like the clipped
        callable's `l2_clip_norm`); arrays, so a new value never recompiles a step.
    - `key_data`: the raw data of the key the next count noise is drawn from.

    Saved and restored with the rest of a [`dp.TrainState`][eqx_micro.dp.TrainState], so
    a resumed run continues the same clip-norm trajectory bit for bit.

    !!! example

        ```python
        import eqx_micro.dp as dp

        adaptive = dp.QuantileAdaptiveClipping(expected_batch_size=100, key=0)
        state = adaptive.init(1.0)
        assert state.l2_clip_norm == 1.0
        ```
    """

    l2_clip_norm: PyTree[Float[Array, ""]]
    key_data: UInt32[Array, "..."]


def _positive(name: str, value: Any, *, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(
            f"`QuantileAdaptiveClipping` needs `{name}` to be a number, got {value!r}."
        )
    ok = value >= 0 if allow_zero else value > 0
    if not (math.isfinite(value) and ok):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(
            f"`QuantileAdaptiveClipping` got `{name}={value}`; it must be finite and "
            f"{bound}."
        )
    return float(value)


class QuantileAdaptiveClipping(eqx.Module):
    """Adaptive clipping to a quantile of the gradient norms (Andrew et al. 2021).

    After every step, each clip norm `C` moves towards the `target_unclipped_quantile`
    of its per-example gradient norms by the geometric update `C ← C · exp(-η (b̄ - γ))`,
    where `b̄` is the privatized fraction of the batch whose norm was at most `C`: the
    count `Σ (1[‖gᵢ‖ ≤ C] - ½)` over the real examples (padding never counts), plus
    Gaussian noise of standard deviation `count_stddev`, divided by
    `expected_batch_size`, plus ½. Each example changes that count by at most ½, so
    the count is a Gaussian query whose noise is part of the privacy cost: a plan
    config given this module composes it with the gradient's and splits the noise as
    the paper does (`(σ_grad⁻² + σ_count⁻²)^(-1/2)` is the configured noise multiplier;
    see [`dp.DPSGDExecutionPlanConfig`][eqx_micro.dp.DPSGDExecutionPlanConfig]). The
    clipped callable's `l2_clip_norm` is the initial clip norm; per-layer clip norms
    each follow their own quantile.

    **Arguments:**

    - `expected_batch_size`: the expected number of (real) examples per batch,
        e.g. `sampling_prob * num_examples` (public: the count is divided by it).
    - `target_unclipped_quantile`: the fraction `γ` of examples left unclipped, in
        (0, 1); the paper's default is 0.5.
    - `learning_rate`: the step size `η` of the update (default 0.2, the paper's).
    - `count_stddev`: the standard deviation of the noise on the count; `None` takes
        the paper's `expected_batch_size / 20`. Larger values cost less privacy (the
        gradient keeps more of the budget) and track the quantile less closely.
    - `geometric_update`: the geometric update above (the default), or the linear one,
        `C ← max(0, C - η (b̄ - γ))`.
    - `key`: the PRNG key (or int seed) of the count noise; a plan config sets it from
        its noise seed, so leave it out there.

    !!! example

        ```python
        import jax.numpy as jnp
        import eqx_micro.dp as dp

        adaptive = dp.QuantileAdaptiveClipping(
            expected_batch_size=4, count_stddev=0.0, learning_rate=0.5, key=0
        )
        state = adaptive.init(1.0)
        norms = jnp.array([0.5, 2.0, 3.0, 4.0])  # one of four unclipped, target 1/2
        state, fraction = adaptive.update(state, norms)
        assert fraction == 0.25
        assert jnp.allclose(state.l2_clip_norm, jnp.exp(-0.5 * (0.25 - 0.5)))
        ```

    ??? cite "References"

        ```bibtex
        @inproceedings{andrew2021differentially,
            title={Differentially Private Learning with Adaptive Clipping},
            author={Andrew, Galen and Thakkar, Om and McMahan, H. Brendan and
                    Ramaswamy, Swaroop},
            booktitle={NeurIPS},
            year={2021},
            url={https://arxiv.org/abs/1905.03871}
        }
        ```
    """

    expected_batch_size: float = eqx.field(static=True)
    target_unclipped_quantile: float = eqx.field(static=True)
    learning_rate: float = eqx.field(static=True)
    count_stddev: float = eqx.field(static=True)
    geometric_update: bool = eqx.field(static=True)
    key: PRNGKeyArray | None

    # `jax.jit(f)` keys its cache on `f` itself: hash by identity, as for a function.
    __hash__ = object.__hash__

    def __init__(
        self,
        expected_batch_size: Real,
        *,
        target_unclipped_quantile: Real = 0.5,
        learning_rate: Real = 0.2,
        count_stddev: Real | None = None,
        geometric_update: bool = True,
        key: PRNGKeyArray | int | None = None,
    ):
        self.expected_batch_size = _positive("expected_batch_size", expected_batch_size)
        quantile = target_unclipped_quantile
        if isinstance(quantile, bool) or not isinstance(quantile, int | float):
            raise TypeError(
                "`QuantileAdaptiveClipping` needs `target_unclipped_quantile` to be a "
                f"number, got {quantile!r}."
            )
        if not 0 < quantile < 1:
            raise ValueError(
                "`QuantileAdaptiveClipping` got "
                f"`target_unclipped_quantile={quantile}`; it must be in (0, 1) (e.g. "
                "0.5: half the examples unclipped)."
            )
        self.target_unclipped_quantile = float(quantile)
        self.learning_rate = _positive("learning_rate", learning_rate)
        if count_stddev is None:
            count_stddev = self.expected_batch_size / 20
        self.count_stddev = _positive("count_stddev", count_stddev, allow_zero=True)
        if not isinstance(geometric_update, bool):
            raise TypeError(
                "`QuantileAdaptiveClipping` needs `geometric_update` to be True or "
                f"False, got {geometric_update!r}."
            )
        self.geometric_update = geometric_update
        self.key = None if key is None else key_from(key)

    def count_sensitivity(
        self, num_clip_norms: int, neighboring_relation: NeighboringRelation
    ) -> float:
        """The L2 sensitivity of the centered counts, one per clip norm: ½ each (an
        example adds or removes ½, or one replaced by another moves it by 1).

        !!! example

            ```python
            import eqx_micro.dp as dp

            adaptive = dp.QuantileAdaptiveClipping(expected_batch_size=100)
            relation = dp.NeighboringRelation.ADD_OR_REMOVE_ONE
            assert adaptive.count_sensitivity(4, relation) == 1.0
            ```
        """
        factor = 2.0 if neighboring_relation == NeighboringRelation.REPLACE_ONE else 1.0
        return factor * 0.5 * math.sqrt(num_clip_norms)

    def count_noise_multiplier(
        self, num_clip_norms: int, neighboring_relation: NeighboringRelation
    ) -> float:
        """`count_stddev` over the counts' sensitivity: the noise multiplier of the
        count query.

        !!! example

            ```python
            import eqx_micro.dp as dp

            adaptive = dp.QuantileAdaptiveClipping(expected_batch_size=100)  # stddev 5
            relation = dp.NeighboringRelation.ADD_OR_REMOVE_ONE
            assert adaptive.count_noise_multiplier(1, relation) == 10.0
            ```
        """
        sensitivity = self.count_sensitivity(num_clip_norms, neighboring_relation)
        return self.count_stddev / sensitivity

    def gradient_noise_multiplier(
        self,
        noise_multiplier: Real,
        num_clip_norms: int,
        neighboring_relation: NeighboringRelation,
    ) -> float:
        """The gradient's noise multiplier when the gradient and count queries together
        have `noise_multiplier`: `(noise_multiplier⁻² - count_noise_multiplier⁻²)^(-1/2)`
        (two Gaussian queries of one batch are one Gaussian query whose inverse squared
        multipliers add). Raises a `ValueError` if the count's noise alone is too small.

        !!! example

            ```python
            import math
            import eqx_micro.dp as dp

            adaptive = dp.QuantileAdaptiveClipping(expected_batch_size=100)  # z_count 10
            relation = dp.NeighboringRelation.ADD_OR_REMOVE_ONE
            z_grad = adaptive.gradient_noise_multiplier(1.0, 1, relation)
            assert math.isclose(z_grad ** -2 + 10.0 ** -2, 1.0)
            ```
        """
        if noise_multiplier == 0:
            return 0.0
        z_count = self.count_noise_multiplier(num_clip_norms, neighboring_relation)
        if z_count <= noise_multiplier:
            needed = noise_multiplier * self.count_sensitivity(
                num_clip_norms, neighboring_relation
            )
            raise ValueError(
                f"`QuantileAdaptiveClipping(count_stddev={self.count_stddev:g})` gives "
                f"the count a noise multiplier of {z_count:.4g}, not above the plan's "
                f"total `noise_multiplier` {noise_multiplier:.4g}: the count alone would "
                "spend the whole budget. Raise `count_stddev` well above "
                f"{needed:.4g} (the paper's `expected_batch_size / 20` is typical)."
            )
        return (noise_multiplier**-2 - z_count**-2) ** -0.5

    def with_key(self, key: PRNGKeyArray | int) -> "QuantileAdaptiveClipping":
        """This module with the count noise drawn from `key`.

        !!! example

            ```python
            import eqx_micro.dp as dp

            adaptive = dp.QuantileAdaptiveClipping(expected_batch_size=100)
            assert adaptive.key is None and adaptive.with_key(3).key is not None
            ```
        """
        return eqx.tree_at(
            lambda m: m.key, self, key_from(key), is_leaf=lambda x: x is None
        )

    def init(self, l2_clip_norm: PyTree[float | Float[ArrayLike, ""]]) -> AdaptiveClipState:
        """The state before the first step, starting from `l2_clip_norm`.

        !!! example

            ```python
            import eqx_micro.dp as dp

            adaptive = dp.QuantileAdaptiveClipping(expected_batch_size=10, key=0)
            state = adaptive.init({"a": 1.0, "b": 2.0})
            assert float(state.l2_clip_norm["b"]) == 2.0
            ```
        """
        return AdaptiveClipState(
            l2_clip_norm=jtu.tree_map(lambda c: jnp.asarray(c, jnp.float32), l2_clip_norm),
            key_data=jax.random.key_data(self._key()),
        )

    def _key(self) -> PRNGKeyArray:
        if self.key is None:
            raise ValueError(
                "This `QuantileAdaptiveClipping` has no `key` for its count noise. Give "
                "it one (`key=...`), or use the plan's (`plan.adaptive_clipping`, whose "
                "key the config sets from its noise seed)."
            )
        return self.key

    def update(
        self,
        state: AdaptiveClipState,
        grad_norms: PyTree[Float[Array, " batch"]],
        is_padding_example: Bool[ArrayLike, " batch"] | None = None,
    ) -> tuple[AdaptiveClipState, PyTree[Float[Array, ""]]]:
        """The next clip norms from this batch's per-example gradient norms.

        **Arguments:**

        - `state`: the current state.
        - `grad_norms`: each example's norm before clipping, one `(batch,)` array per
            clip norm (`aux.grad_norms` of a callable built with
            `return_grad_norms=True`).
        - `is_padding_example`: padded rows, which never count.

        **Returns:**

        `(new_state, unclipped_fraction)`: the privatized fraction `b̄` per clip norm.

        !!! example

            ```python
            import jax.numpy as jnp
            import eqx_micro.dp as dp

            adaptive = dp.QuantileAdaptiveClipping(
                expected_batch_size=2, count_stddev=0.0, key=0
            )
            norms = jnp.array([0.5, 0.7, 9.0])
            padding = jnp.array([False, False, True])  # the 9.0 is padding
            state, fraction = adaptive.update(adaptive.init(1.0), norms, padding)
            assert fraction == 1.0 and state.l2_clip_norm < 1.0
            ```
        """
        treedef = jtu.tree_structure(state.l2_clip_norm)
        clips = treedef.flatten_up_to(state.l2_clip_norm)
        try:
            norms = treedef.flatten_up_to(grad_norms)
        except (ValueError, TypeError):
            raise ValueError(
                "`grad_norms` must be shaped like the clip norms (one `(batch,)` array "
                "per clip norm, as `aux.grad_norms` of a callable built with "
                "`return_grad_norms=True`)."
            ) from None
        next_key, step_key = step_keys(self._key(), state.key_data)
        noise = jax.random.normal(step_key, (len(clips),), jnp.float32)
        new_clips, fractions = [], []
        for k, (clip, norm) in enumerate(zip(clips, norms, strict=True)):
            norm = jnp.asarray(norm, jnp.float32)
            real = jnp.ones(norm.shape, bool)
            if is_padding_example is not None:
                real = ~jnp.asarray(is_padding_example, bool)
            centered = jnp.where(real, (norm <= clip).astype(jnp.float32) - 0.5, 0.0)
            noisy = jnp.sum(centered) + self.count_stddev * noise[k]
            fraction = noisy / self.expected_batch_size + 0.5
            step = self.learning_rate * (fraction - self.target_unclipped_quantile)
            if self.geometric_update:
                new_clip = clip * jnp.exp(-step)
            else:
                new_clip = jnp.maximum(clip - step, 0.0)
            new_clips.append(new_clip)
            fractions.append(fraction)
        new_state = AdaptiveClipState(
            l2_clip_norm=treedef.unflatten(new_clips),
            key_data=jax.random.key_data(next_key),
        )
        return new_state, treedef.unflatten(fractions)
