"""Execution plans: clipping, batch selection, noise and accounting that belong together.

A plan is only trustworthy as a whole: its `dp_event` describes the batch selection
strategy, the noise (`noise_multiplier` times the clipped callable's sensitivity) and the
number of iterations. Configs build plans so that these can never drift apart.
"""

import math
from typing import Any

import dp_accounting
import equinox as eqx
import jax
import jax.core
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jaxtyping import Array, ArrayLike, Bool, Int, PyTree

from .._accounting import (
    Accountant,
    AccountantLike,
    compute_epsilon,
    NeighboringRelation,
    Real,
)
from .._clipping._adaptive import AdaptiveClipState, QuantileAdaptiveClipping
from .._clipping._callable import BoundedSensitivityCallable
from .._clipping._contract import AbstractBoundedSensitivityCallable, ClippedGradAux
from .._noise._banded_toeplitz import strategy_rmse
from .._noise._bandmf import BandMFNoise
from .._noise._base import AbstractNoiseState, AbstractNoiseTransform
from .._noise._blt import BLTNoise
from .._noise._gaussian import GaussianNoise
from .._sampling._base import AbstractBatchSelectionStrategy


class NoisyRelease(eqx.Module):
    """One private release: a clipped aggregation plus its calibrated noise.

    The part of a [`dp.DPExecutionPlan`][eqx_micro.dp.DPExecutionPlan] that runs inside
    a compiled step (`plan.release`); calling it is `plan.noisy_grad`. `iterations` is
    an array, so changing it does not recompile either.

    !!! example

        ```python
        import jax.numpy as jnp
        import eqx_micro.dp as dp

        grad_fn = dp.clipped_grad(lambda w, x: jnp.sum(w * x), 1.0)
        plan = dp.DPSGDExecutionPlanConfig(5, 0.5, noise_multiplier=1.0).make(grad_fn)
        assert isinstance(plan.release, dp.NoisyRelease)
        ```
    """

    clipped_aggregation_fn: AbstractBoundedSensitivityCallable
    noise_addition_transform: AbstractNoiseTransform
    iterations: Int[Array, ""]
    adaptive_clipping: QuantileAdaptiveClipping | None = None

    # `jax.jit(f)` keys its cache on `f` itself: hash by identity, so that an instance
    # holding arrays can be jitted as a function (its arrays become constants).
    __hash__ = object.__hash__

    def __call__(
        self,
        noise_state: AbstractNoiseState,
        *args: Any,
        is_padding_example: Bool[ArrayLike, " batch"] | None = None,
        **kwargs: Any,
    ) -> tuple[PyTree, AbstractNoiseState, ClippedGradAux]:
        """`(noisy_grad, new_noise_state, aux)`, as `DPExecutionPlan.noisy_grad`."""
        if self.adaptive_clipping is not None:
            raise TypeError(
                "This plan adapts its clip norm (`adaptive_clipping`), which has a "
                "state of its own: call `plan.adaptive_noisy_grad(noise_state, "
                "clip_state, ...)` (or `plan.release.adaptive(...)`), or train with "
                "`dp.DPTrainer`, which carries both states."
            )
        self._check_noise_state(noise_state)
        clipped, aux = self.clipped_aggregation_fn(
            *args, is_padding_example=is_padding_example, **kwargs
        )
        noise_state = self._counted(noise_state, clipped)
        noisy, noise_state = self.noise_addition_transform.update(clipped, noise_state)
        return noisy, noise_state, aux

    def adaptive(
        self,
        noise_state: AbstractNoiseState,
        clip_state: AdaptiveClipState,
        *args: Any,
        is_padding_example: Bool[ArrayLike, " batch"] | None = None,
        **kwargs: Any,
    ) -> tuple[PyTree, AbstractNoiseState, AdaptiveClipState, ClippedGradAux]:
        """`(noisy_grad, new_noise_state, new_clip_state, aux)`, as
        `DPExecutionPlan.adaptive_noisy_grad`.

        !!! example

            ```python
            import jax.numpy as jnp
            import eqx_micro.dp as dp

            grad_fn = dp.clipped_grad(lambda w, x: jnp.sum(w * x), 1.0)
            adaptive = dp.QuantileAdaptiveClipping(expected_batch_size=2, count_stddev=0.0)
            config = dp.DPSGDExecutionPlanConfig(
                10, 0.5, noise_multiplier=0.0, adaptive_clipping=adaptive
            )
            release = config.make(grad_fn).release
            assert release.adaptive_clipping is not None
            noise_state = release.noise_addition_transform.init(jnp.zeros(2))
            clip_state = release.adaptive_clipping.init(1.0)
            x = jnp.array([[3.0, 4.0], [0.3, 0.4]])  # norms 5 and 0.5
            noisy, _, clip_state, _ = release.adaptive(
                noise_state, clip_state, jnp.zeros(2), x
            )
            assert jnp.allclose(noisy, jnp.array([0.9, 1.2]))  # no noise at sigma 0
            # One of two unclipped: the fraction is the target, the norm stays.
            assert jnp.allclose(clip_state.l2_clip_norm, 1.0)
            ```
        """
        adaptive = self.adaptive_clipping
        if adaptive is None:
            raise TypeError(
                "This plan has a fixed clip norm: call `plan.noisy_grad(noise_state, "
                "...)`; `adaptive_noisy_grad` is for plans made with "
                "`adaptive_clipping=dp.QuantileAdaptiveClipping(...)`."
            )
        if not isinstance(clip_state, AdaptiveClipState):
            raise TypeError(
                "`clip_state` must be a `dp.AdaptiveClipState` (from "
                f"`plan.adaptive_clipping.init(...)`), got {type(clip_state).__name__}."
            )
        self._check_noise_state(noise_state)
        initial = self.clipped_aggregation_fn
        assert isinstance(initial, BoundedSensitivityCallable)  # checked by the config
        current = initial.with_l2_clip_norm(clip_state.l2_clip_norm)
        clipped, aux = current(*args, is_padding_example=is_padding_example, **kwargs)
        noise_state = self._counted(noise_state, clipped)
        # The noise was calibrated to the initial clip norm: noising `clipped / ratio`
        # (of that sensitivity) and scaling back is noise scaled to the current one.
        ratio = current.clip_bound() / initial.clip_bound()
        scaled = jtu.tree_map(lambda g: _divide(g, ratio), clipped)
        noisy, noise_state = self.noise_addition_transform.update(scaled, noise_state)
        noisy = jtu.tree_map(lambda g: (g * ratio.astype(g.dtype)).astype(g.dtype), noisy)
        clip_state, _ = adaptive.update(clip_state, aux.grad_norms, is_padding_example)
        return noisy, noise_state, clip_state, aux

    def _check_noise_state(self, noise_state: Any) -> None:
        noise = self.noise_addition_transform
        if not isinstance(noise_state, noise.state_type):
            noise.check_state(noise_state, None)  # names the kinds
        check_budget(noise_state.count, self.iterations)

    def _counted(self, noise_state: Any, clipped: PyTree) -> Any:
        self.noise_addition_transform.check_state(noise_state, clipped)
        count = noise_state.count
        # Under `jit` the count is known only at run time: one check per release, on
        # the count the new state is built from.
        count = eqx.error_if(count, count >= self.iterations, _USED_UP_TRACED)
        return eqx.tree_at(lambda s: s.count, noise_state, count)


def _divide(g: Any, ratio: Any) -> Any:
    # A clip norm adapted down to 0 clips everything to 0: release 0, not 0 / 0.
    ratio = ratio.astype(g.dtype)
    return jnp.where(ratio > 0, g / jnp.where(ratio > 0, ratio, 1), jnp.zeros_like(g))


def check_budget(count: Any, iterations: Any) -> None:
    """Refuses, before anything runs, a release past the budget when it is known (a
    traced count is checked at run time, by `NoisyRelease`'s `eqx.error_if`)."""
    if isinstance(count, jax.core.Tracer) or isinstance(iterations, jax.core.Tracer):
        return
    if int(count) >= int(iterations):
        raise ValueError(_USED_UP.format(iterations=int(iterations)))


_USED_UP = (
    "This DP plan's privacy event covers {iterations} iterations and the noise state "
    "has made them all; make a new plan (and account for both) to train longer."
)
_USED_UP_TRACED = (
    "This DP plan's privacy event covers `plan.iterations` iterations and the noise "
    "state has made them all; make a new plan (and account for both) to train longer."
)


class DPExecutionPlan(eqx.Module):
    """The parts of a differentially private training run, with their privacy event.

    Build one with a config (e.g. `dp.DPSGDExecutionPlanConfig(...).make(grad_fn)`),
    which keeps the parts consistent: the event accounts for exactly this sampling, this
    noise and `iterations` updates. The training loop it is meant for:

    !!! example

        ```python
        import equinox as eqx
        import jax
        import jax.numpy as jnp
        import numpy as np
        import optax
        import eqx_micro.dp as dp

        def loss(model, batch):
            return jnp.mean((jax.vmap(model)(batch["x"]) - batch["y"]) ** 2)

        data = {"x": np.random.default_rng(0).normal(size=(100, 3)).astype(np.float32)}
        data["y"] = data["x"].sum(axis=1, keepdims=True)
        model = eqx.nn.Linear(3, 1, key=jax.random.key(0))
        # normalize_by: the expected batch size, so the noisy sum is a mean gradient.
        grad_fn = dp.clipped_grad(loss, 1.0, microbatch_size=8, normalize_by=10)
        config = dp.DPSGDExecutionPlanConfig(
            iterations=20, sampling_prob=0.1, epsilon=8.0, delta=1e-5
        )
        plan = config.make(grad_fn)

        optimizer = optax.sgd(0.1)
        opt_state = optimizer.init(eqx.filter(model, eqx.is_array))
        noise_state = plan.noise_addition_transform.init(model)

        @eqx.filter_jit
        def step(model, opt_state, noise_state, batch, is_padding):
            grads, noise_state, _ = plan.noisy_grad(
                noise_state, model, batch, is_padding_example=is_padding
            )
            updates, opt_state = optimizer.update(grads, opt_state)
            return eqx.apply_updates(model, updates), opt_state, noise_state

        rng = np.random.default_rng()  # secret and unseeded in real training
        for indices in plan.batch_selection_strategy.batch_iterator(100, rng):
            # A fixed shape: padding to 32 rows never recompiles the step.
            indices = dp.pad_to_multiple_of(indices, 32, microbatch_size=8)
            batch, is_padding = dp.gather_padded_batch(data, indices)
            model, opt_state, noise_state = step(
                model, opt_state, noise_state, batch, jnp.asarray(is_padding)
            )
        assert noise_state.count == 20 and plan.epsilon(1e-5) <= 8.0
        ```

    Anything after `noisy_grad` (optimizers, scaling, clipping) is post-processing and
    keeps the guarantee; anything that changes the clipped sum before the noise, or more
    updates than `iterations`, breaks it.

    **Fields:**

    - `clipped_aggregation_fn`: the bounded-sensitivity callable
        ([`dp.clipped_grad`][eqx_micro.dp.clipped_grad]).
    - `batch_selection_strategy`: how batches are drawn.
    - `noise_addition_transform`: the noise, with optax's `init`/`update` protocol.
    - `dp_event`: the `dp_accounting` event of the whole run.
    - `neighboring_relation`: the relation the event is accounted under.
    - `noise_multiplier`: noise standard deviation over the sensitivity.
    - `iterations`: the number of noised updates the event covers.
    - `accountant`: the accountant used for calibration and `epsilon`.
    - `adaptive_clipping`: a
        [`dp.QuantileAdaptiveClipping`][eqx_micro.dp.QuantileAdaptiveClipping] (with its
        key) when the clip norm adapts, else None. `noise_multiplier` is then that of
        the gradient and count queries together, the one the event accounts.
    """

    clipped_aggregation_fn: AbstractBoundedSensitivityCallable
    batch_selection_strategy: AbstractBatchSelectionStrategy
    noise_addition_transform: AbstractNoiseTransform
    dp_event: dp_accounting.DpEvent = eqx.field(static=True)
    neighboring_relation: NeighboringRelation = eqx.field(static=True)
    noise_multiplier: float = eqx.field(static=True)
    iterations: int = eqx.field(static=True)
    accountant: AccountantLike = eqx.field(static=True, default=Accountant.PLD)
    adaptive_clipping: QuantileAdaptiveClipping | None = None

    # `jax.jit(f)` keys its cache on `f` itself: hash by identity, so that an instance
    # holding arrays can be jitted as a function (its arrays become constants).
    __hash__ = object.__hash__

    @property
    def privacy_unit(self) -> str:
        """What the guarantee protects: one `"example"`, or one `"user"`'s rows.

        !!! example

            ```python
            import jax.numpy as jnp
            import eqx_micro.dp as dp

            grad_fn = dp.clipped_grad(lambda w, x: jnp.sum(w * x), 1.0,
                                      keep_batch_dim=False)
            config = dp.DPSGDExecutionPlanConfig(10, 0.01, noise_multiplier=1.0)
            assert config.make(grad_fn).privacy_unit == "user"
            ```
        """
        return self.clipped_aggregation_fn.privacy_unit

    def epsilon(self, delta: Real) -> float:
        """The epsilon of the whole run at `delta`, with the plan's accountant.

        !!! example

            ```python
            import jax.numpy as jnp
            import eqx_micro.dp as dp

            grad_fn = dp.clipped_grad(lambda w, x: jnp.sum(w * x), 1.0)
            config = dp.DPSGDExecutionPlanConfig(512, 0.1, noise_multiplier=3.0)
            assert abs(config.make(grad_fn).epsilon(1e-6) - 3.77) < 0.01
            ```
        """
        return compute_epsilon(
            self.dp_event,
            delta,
            accountant=self.accountant,
            neighboring_relation=self.neighboring_relation,
        )

    def prefix_sum_rmse(self) -> float:
        """The root-mean-squared noise in the running sums of the updates.

        Per coordinate, averaged over the `iterations` prefix sums of the released
        updates and divided by the sensitivity: the error that matters for SGD-style
        training, comparable across DP-SGD and BandMF plans at the same epsilon. For
        DP-SGD it is `noise_multiplier * sqrt((iterations + 1) / 2)`.

        !!! example

            ```python
            import math
            import jax.numpy as jnp
            import eqx_micro.dp as dp

            grad_fn = dp.clipped_grad(lambda w, x: jnp.sum(w * x), 1.0)
            config = dp.DPSGDExecutionPlanConfig(99, 0.1, noise_multiplier=2.0)
            assert math.isclose(config.make(grad_fn).prefix_sum_rmse(), 2.0 * math.sqrt(50))
            ```
        """
        noise = self.noise_addition_transform
        multiplier = self.noise_multiplier
        if self.adaptive_clipping is not None:
            fn = self.clipped_aggregation_fn
            assert isinstance(fn, BoundedSensitivityCallable)  # checked by the config
            multiplier = self.adaptive_clipping.gradient_noise_multiplier(
                multiplier, len(jtu.tree_leaves(fn.l2_clip_norm)), self.neighboring_relation
            )
        if isinstance(noise, BLTNoise):
            # Its RMSE includes the strategy's sensitivity for this participation.
            cycle = self.batch_selection_strategy.min_separation()
            return multiplier * noise.strategy.rmse(
                self.iterations,
                min_sep=cycle,
                max_participations=math.ceil(self.iterations / cycle),
            )
        if isinstance(noise, BandMFNoise):
            coefs = np.asarray(noise.coefs, np.float64)
        elif isinstance(noise, GaussianNoise):
            coefs = np.ones(1)
        else:
            raise TypeError(
                f"`prefix_sum_rmse` knows Gaussian, BandMF and BLT noise, not "
                f"{type(noise).__name__}."
            )
        return multiplier * strategy_rmse(coefs / np.linalg.norm(coefs), self.iterations)

    def noisy_grad(
        self,
        noise_state: Any,
        *args: Any,
        is_padding_example: ArrayLike | None = None,
        **kwargs: Any,
    ) -> tuple[PyTree, Any, Any]:
        """One private release: the clipped sum of the batch plus calibrated noise.

        Calls `clipped_aggregation_fn(*args, is_padding_example=..., **kwargs)` and adds
        the noise to its output directly, so nothing can come between them. Fails (an
        `eqx.error_if` runtime error) once the state has made `iterations` releases:
        more updates than the event accounts for would silently spend more privacy.

        **Returns:**

        `(noisy_grad, new_noise_state, aux)`, with the callable's aux (per-example side
        outputs, not privatized).

        !!! example

            ```python
            import jax.numpy as jnp
            import eqx_micro.dp as dp

            grad_fn = dp.clipped_grad(lambda w, x: jnp.sum(w * x), 1.0)
            config = dp.DPSGDExecutionPlanConfig(1, 0.5, noise_multiplier=0.0)
            plan = config.make(grad_fn)
            state = plan.noise_addition_transform.init(None)
            x = jnp.array([[3.0, 4.0], [0.3, 0.4]])  # norms 5 and 0.5
            noisy, state, _ = plan.noisy_grad(state, jnp.zeros(2), x)
            assert jnp.allclose(noisy, jnp.array([0.9, 1.2]))  # no noise at sigma 0
            ```
        """
        return self.release(
            noise_state, *args, is_padding_example=is_padding_example, **kwargs
        )

    @property
    def release(self) -> "NoisyRelease":
        """The computing part of the plan: the clipped aggregation and its noise.

        What a compiled training step needs, without the accounting (event,
        accountant, relation), which stays on the host: plans that differ only in
        their epsilon or noise multiplier share a compiled step.

        !!! example

            ```python
            import jax.numpy as jnp
            import eqx_micro.dp as dp

            grad_fn = dp.clipped_grad(lambda w, x: jnp.sum(w * x), 1.0)
            plan = dp.DPSGDExecutionPlanConfig(5, 0.5, noise_multiplier=0.0).make(grad_fn)
            state = plan.noise_addition_transform.init(None)
            noisy, state, _ = plan.release(state, jnp.zeros(2), jnp.ones((3, 2)))
            assert jnp.allclose(noisy, 3 / jnp.sqrt(2.0))
            ```
        """
        return NoisyRelease(
            clipped_aggregation_fn=self.clipped_aggregation_fn,
            noise_addition_transform=self.noise_addition_transform,
            iterations=jnp.asarray(self.iterations, jnp.int32),
            adaptive_clipping=self.adaptive_clipping,
        )

    def adaptive_noisy_grad(
        self,
        noise_state: Any,
        clip_state: AdaptiveClipState,
        *args: Any,
        is_padding_example: ArrayLike | None = None,
        **kwargs: Any,
    ) -> tuple[PyTree, Any, AdaptiveClipState, Any]:
        """`noisy_grad` for a plan with adaptive clipping: one private release at the
        current clip norm, then the clip norm's update from the privatized count.

        The clip norms of `clip_state` replace the callable's; the noise, calibrated to
        the initial clip norm, is scaled with them (the noise multiplier is fixed, so
        the sensitivity and the noise move together).

        **Returns:**

        `(noisy_grad, new_noise_state, new_clip_state, aux)`.

        !!! example

            ```python
            import jax.numpy as jnp
            import eqx_micro.dp as dp

            grad_fn = dp.clipped_grad(lambda w, x: jnp.sum(w * x), 1.0)
            adaptive = dp.QuantileAdaptiveClipping(expected_batch_size=2, count_stddev=5.0)
            config = dp.DPSGDExecutionPlanConfig(
                10, 0.5, noise_multiplier=1.0, adaptive_clipping=adaptive, noise_seed=0
            )
            plan = config.make(grad_fn)
            noise_state = plan.noise_addition_transform.init(jnp.zeros(2))
            clip_state = plan.adaptive_clipping.init(grad_fn.l2_clip_norm)
            x = jnp.array([[3.0, 4.0], [0.3, 0.4]])
            noisy, noise_state, clip_state, _ = plan.adaptive_noisy_grad(
                noise_state, clip_state, jnp.zeros(2), x
            )
            assert noisy.shape == (2,) and clip_state.l2_clip_norm != 1.0
            ```
        """
        return self.release.adaptive(
            noise_state,
            clip_state,
            *args,
            is_padding_example=is_padding_example,
            **kwargs,
        )

    def event_for_steps(self, steps: int) -> dp_accounting.DpEvent:
        """The privacy event of the first `steps` updates of the plan.

        For a partial run, the plan's self-composed event with its count cut to the
        rounds taken: one per step, or one per `min_separation()` steps of the batch
        selection (an example joins at most once per cycle, as in amplified BandMF).
        Any other event is returned whole, an upper bound.

        !!! example

            ```python
            import jax.numpy as jnp
            import eqx_micro.dp as dp

            grad_fn = dp.clipped_grad(lambda w, x: jnp.sum(w * x), 1.0)
            plan = dp.DPSGDExecutionPlanConfig(100, 0.1, noise_multiplier=1.0).make(grad_fn)
            assert plan.event_for_steps(40) == dp.dpsgd_event(1.0, 40, sampling_prob=0.1)
            ```
        """
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"`steps` must be a non-negative int, got {steps!r}.")
        event = self.dp_event
        if steps >= self.iterations:
            return event
        if steps == 0:
            return dp_accounting.NoOpDpEvent()
        if not isinstance(event, dp_accounting.SelfComposedDpEvent):
            return event
        cycle = self.batch_selection_strategy.min_separation()
        if event.count != math.ceil(self.iterations / cycle):
            return event
        return dp_accounting.SelfComposedDpEvent(event.event, math.ceil(steps / cycle))
