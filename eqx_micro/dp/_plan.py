"""Execution plans: clipping, batch selection, noise and accounting that belong together.

A plan is only trustworthy as a whole: its `dp_event` describes the batch selection
strategy, the noise (`noise_multiplier` times the clipped callable's sensitivity) and the
number of iterations. Configs build plans so that these can never drift apart.
"""

import math
import secrets
from typing import Any

import dp_accounting
import equinox as eqx
import jax.tree_util as jtu
from jaxtyping import ArrayLike, PyTree

from ._accounting import (
    Accountant,
    calibrate_noise_multiplier,
    compute_epsilon,
    dpsgd_event,
    NeighboringRelation,
    Real,
    truncated_dpsgd_event,
)
from ._clipped_grad import AbstractBoundedSensitivityCallable
from ._noise import GaussianNoise, GaussianNoiseState
from ._sampling import AbstractBatchSelectionStrategy, PoissonSampling


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
        noise_state = plan.noise_addition_transform.init(None)

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

    - `clipped_aggregation_fn`: the bounded-sensitivity callable (`dp.clipped_grad`).
    - `batch_selection_strategy`: how batches are drawn.
    - `noise_addition_transform`: the noise, with optax's `init`/`update` protocol.
    - `dp_event`: the `dp_accounting` event of the whole run.
    - `neighboring_relation`: the relation the event is accounted under.
    - `noise_multiplier`: noise standard deviation over the sensitivity.
    - `iterations`: the number of noised updates the event covers.
    - `accountant`: the accountant used for calibration and `epsilon`.
    """

    clipped_aggregation_fn: AbstractBoundedSensitivityCallable
    batch_selection_strategy: AbstractBatchSelectionStrategy
    noise_addition_transform: GaussianNoise
    dp_event: dp_accounting.DpEvent = eqx.field(static=True)
    neighboring_relation: NeighboringRelation = eqx.field(static=True)
    noise_multiplier: float = eqx.field(static=True)
    iterations: int = eqx.field(static=True)
    accountant: Accountant = eqx.field(static=True, default="pld")

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

    def noisy_grad(
        self,
        noise_state: GaussianNoiseState,
        *args: Any,
        is_padding_example: ArrayLike | None = None,
        **kwargs: Any,
    ) -> tuple[PyTree, GaussianNoiseState, Any]:
        """One private release: the clipped sum of the batch plus calibrated noise.

        Calls `clipped_aggregation_fn(*args, is_padding_example=..., **kwargs)` and adds
        the noise to its output directly, so nothing can come between them. Fails (an
        `eqx.error_if` runtime error) once the state has made `iterations` releases:
        more updates than the event accounts for would silently spend more privacy.

        **Returns:**

        `(noisy_grad, new_noise_state, aux)`, with the callable's aux (per-example side
        outputs, not privatised).

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
        clipped, aux = self.clipped_aggregation_fn(
            *args, is_padding_example=is_padding_example, **kwargs
        )
        clipped = jtu.tree_map(
            lambda x: (
                eqx.error_if(
                    x,
                    noise_state.count >= self.iterations,
                    "This DP plan's privacy event covers "
                    f"{self.iterations} iterations and they are used up; make a new "
                    "plan (and account for both) to train longer.",
                )
                if eqx.is_array(x)
                else x
            ),
            clipped,
        )
        noisy, noise_state = self.noise_addition_transform.update(clipped, noise_state)
        return noisy, noise_state, aux


def _check_open_unit(name: str, value: Real, *, closed_high: bool) -> None:
    high_ok = value <= 1 if closed_high else value < 1
    if not (value > 0 and high_ok) or math.isnan(value):
        interval = "(0, 1]" if closed_high else "(0, 1)"
        raise ValueError(f"`{name}` must be in {interval}, got {value}.")


class DPSGDExecutionPlanConfig(eqx.Module):
    """The configuration of DP-SGD with Poisson sampling, calibrated or not.

    Give exactly one of `(epsilon, delta)` (the noise multiplier is then calibrated) or
    `noise_multiplier`. `.make(grad_fn)` builds the `dp.DPExecutionPlan`: Poisson
    sampling at `sampling_prob` (truncated to `truncated_batch_size` if set), Gaussian
    noise of standard deviation `noise_multiplier * grad_fn.sensitivity(relation)`, and
    the DP-SGD event over `iterations` updates (microbatching and gradient accumulation
    inside one update do not count).

    **Arguments:**

    - `iterations`: the number of noised updates (optimizer steps).
    - `sampling_prob`: the probability that an example is in a batch, in (0, 1].
    - `epsilon`, `delta`: the target guarantee (`epsilon > 0`, `delta` in (0, 1)).
    - `noise_multiplier`: instead of a target epsilon, the noise over the sensitivity
        (`delta` may still be given, to report epsilon).
    - `truncated_batch_size`: truncate each Poisson batch to at most this many examples
        (accounted exactly; needs `num_examples`).
    - `num_examples`: the dataset size, if public.
    - `accountant`: `"pld"` (default), `"rdp"` or a `dp_accounting` accountant.
    - `neighboring_relation`: defaults to the accountant instance's relation if one is
        given, else to `ADD_OR_REMOVE_ONE`, or to `REPLACE_SPECIAL` (zero-out) when
        `num_examples` is public.
    - `noise_seed`: the noise PRNG seed. `None` draws one from the operating system's
        secret source (non-reproducible, as noise should be in a real release).

    !!! example

        ```python
        import jax.numpy as jnp
        import eqx_micro.dp as dp

        grad_fn = dp.clipped_grad(lambda w, x: jnp.sum(w * x), 1.0)
        config = dp.DPSGDExecutionPlanConfig(
            iterations=512, sampling_prob=0.1, epsilon=1.0, delta=1e-6, noise_seed=0
        )
        plan = config.make(grad_fn)
        assert abs(plan.noise_multiplier - 9.66) < 0.02
        assert plan.epsilon(1e-6) <= 1.0
        state = plan.noise_addition_transform.init(jnp.zeros(3))
        x = jnp.ones((4, 3))
        noisy, state, aux = plan.noisy_grad(state, jnp.zeros(3), x)
        assert noisy.shape == (3,) and state.count == 1
        ```
    """

    iterations: int
    sampling_prob: Real
    epsilon: Real | None = None
    delta: Real | None = None
    noise_multiplier: Real | None = None
    truncated_batch_size: int | None = None
    num_examples: int | None = None
    accountant: Accountant = "pld"
    neighboring_relation: NeighboringRelation | None = None
    noise_seed: int | None = None

    def __check_init__(self):
        if isinstance(self.iterations, bool) or self.iterations < 1:
            raise ValueError(f"`iterations` must be a positive int, got {self.iterations}.")
        _check_open_unit("sampling_prob", self.sampling_prob, closed_high=True)
        if self.noise_multiplier is None and self.epsilon is None:
            raise ValueError(
                "Give a target `epsilon` (with `delta`) to calibrate the noise, or a "
                "`noise_multiplier`; got neither."
            )
        if self.noise_multiplier is not None and self.epsilon is not None:
            raise ValueError(
                "Give either a target `epsilon` (with `delta`) or a `noise_multiplier`, "
                f"not both (got epsilon={self.epsilon}, "
                f"noise_multiplier={self.noise_multiplier})."
            )
        if self.epsilon is not None:
            if not (self.epsilon > 0 and math.isfinite(self.epsilon)):
                raise ValueError(f"`epsilon` must be finite and > 0, got {self.epsilon}.")
            if self.delta is None:
                raise ValueError("A target `epsilon` needs a `delta` too.")
        if self.delta is not None:
            _check_open_unit("delta", self.delta, closed_high=False)
        if self.noise_multiplier is not None and not (
            self.noise_multiplier >= 0 and math.isfinite(self.noise_multiplier)
        ):
            raise ValueError(
                f"`noise_multiplier` must be finite and >= 0, got {self.noise_multiplier}."
            )
        if self.num_examples is not None and self.num_examples < 1:
            raise ValueError(f"`num_examples` must be >= 1, got {self.num_examples}.")
        if self.truncated_batch_size is not None:
            if self.num_examples is None:
                raise ValueError(
                    "`truncated_batch_size` needs `num_examples`: accounting for "
                    "truncated Poisson sampling depends on the dataset size."
                )
            if self.truncated_batch_size < 1:
                raise ValueError(
                    f"`truncated_batch_size` must be >= 1, got {self.truncated_batch_size}."
                )

    def _relation(self) -> NeighboringRelation:
        if self.neighboring_relation is not None:
            return self.neighboring_relation
        if isinstance(self.accountant, dp_accounting.PrivacyAccountant):
            return self.accountant.neighboring_relation
        if self.num_examples is None:
            return NeighboringRelation.ADD_OR_REMOVE_ONE
        return NeighboringRelation.REPLACE_SPECIAL

    def _make_event(self, noise_multiplier: Real) -> dp_accounting.DpEvent:
        if self.truncated_batch_size is None:
            return dpsgd_event(
                noise_multiplier, self.iterations, sampling_prob=self.sampling_prob
            )
        return truncated_dpsgd_event(
            noise_multiplier,
            self.iterations,
            sampling_prob=self.sampling_prob,
            num_examples=self.num_examples,
            truncated_batch_size=self.truncated_batch_size,
        )

    def _noise_multiplier(self) -> float:
        if self.noise_multiplier is not None:
            return float(self.noise_multiplier)
        return calibrate_noise_multiplier(
            self._make_event,
            self.epsilon,
            self.delta,
            accountant=self.accountant,
            neighboring_relation=self._relation(),
        )

    def make(
        self, clipped_aggregation_fn: AbstractBoundedSensitivityCallable
    ) -> DPExecutionPlan:
        """The plan for `clipped_aggregation_fn` (e.g. from `dp.clipped_grad`).

        Calibrates the noise multiplier if a target epsilon was given (a bisection with
        `dp_accounting`, about a second), and sets the noise standard deviation to
        `noise_multiplier * clipped_aggregation_fn.sensitivity(relation)`.

        !!! example

            ```python
            import jax.numpy as jnp
            import eqx_micro.dp as dp

            grad_fn = dp.clipped_grad(lambda w, x: jnp.sum(w * x), 2.0)
            config = dp.DPSGDExecutionPlanConfig(100, 0.01, noise_multiplier=1.5)
            plan = config.make(grad_fn)
            assert float(plan.noise_addition_transform.stddev) == 3.0
            ```
        """
        if not isinstance(clipped_aggregation_fn, AbstractBoundedSensitivityCallable):
            raise TypeError(
                "`make` needs `clipped_aggregation_fn` to be a bounded-sensitivity "
                "callable such as the output of `dp.clipped_grad`, got "
                f"{type(clipped_aggregation_fn).__name__}: without a known sensitivity "
                "the noise cannot be calibrated."
            )
        sensitivity = clipped_aggregation_fn.sensitivity(self._relation())
        if not math.isfinite(sensitivity):
            raise ValueError(
                f"The callable's sensitivity is {sensitivity}; a DP plan needs a finite "
                "clip norm and a positive `normalize_by`."
            )
        noise_multiplier = self._noise_multiplier()
        seed = secrets.randbits(63) if self.noise_seed is None else self.noise_seed
        return DPExecutionPlan(
            clipped_aggregation_fn=clipped_aggregation_fn,
            batch_selection_strategy=PoissonSampling(
                sampling_prob=self.sampling_prob,
                iterations=self.iterations,
                truncated_batch_size=self.truncated_batch_size,
            ),
            noise_addition_transform=GaussianNoise(
                stddev=noise_multiplier * sensitivity, key=seed
            ),
            dp_event=self._make_event(noise_multiplier),
            neighboring_relation=self._relation(),
            noise_multiplier=noise_multiplier,
            iterations=self.iterations,
            accountant=self.accountant,
        )
