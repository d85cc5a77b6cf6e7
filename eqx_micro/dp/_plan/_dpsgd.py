"""DP-SGD: Poisson sampling and independent Gaussian noise."""

import dp_accounting
import equinox as eqx

from .._accounting import (
    Accountant,
    AccountantLike,
    dpsgd_event,
    NeighboringRelation,
    Real,
    truncated_dpsgd_event,
)
from .._clipping._adaptive import QuantileAdaptiveClipping
from .._clipping._contract import AbstractBoundedSensitivityCallable
from .._noise._gaussian import GaussianNoise
from .._sampling._poisson import PoissonSampling
from ._config import (
    adaptive_parts,
    check_config,
    noise_multiplier_of,
    noise_seed_of,
    relation_of,
    sensitivity_of,
)
from ._plan import DPExecutionPlan


class DPSGDExecutionPlanConfig(eqx.Module):
    """The configuration of DP-SGD with Poisson sampling, calibrated or not.

    Give exactly one of `(epsilon, delta)` (the noise multiplier is then calibrated) or
    `noise_multiplier`. `.make(grad_fn)` builds the
    [`dp.DPExecutionPlan`][eqx_micro.dp.DPExecutionPlan]: Poisson sampling at
    `sampling_prob` (truncated to `truncated_batch_size` if set), Gaussian noise of standard
    deviation `noise_multiplier * grad_fn.sensitivity(relation)`, and the DP-SGD event over
    `iterations` updates (microbatching and gradient accumulation inside one update do not
    count).

    **Arguments:**

    - `iterations`: the number of noised updates (optimizer steps).
    - `sampling_prob`: the probability that an example is in a batch, in (0, 1].
    - `epsilon`, `delta`: the target guarantee (`epsilon > 0`, `delta` in (0, 1)).
    - `noise_multiplier`: instead of a target epsilon, the noise over the sensitivity
        (then without `delta`; `plan.epsilon(delta)` reports epsilon at any delta).
    - `truncated_batch_size`: truncate each Poisson batch to at most this many examples
        (accounted exactly; needs `num_examples`).
    - `num_examples`: the dataset size, if public.
    - `accountant`: a [`dp.Accountant`][eqx_micro.dp.Accountant] (default `PLD`) or a
        `dp_accounting` accountant instance.
    - `neighboring_relation`: defaults to the accountant instance's relation if one is
        given, else to `ADD_OR_REMOVE_ONE`, or to `REPLACE_SPECIAL` (zero-out) when
        `num_examples` is public.
    - `noise_seed`: the noise PRNG seed. `None` draws one from the operating system's
        secret source (non-reproducible, as noise should be in a real release).
    - `adaptive_clipping`: a
        [`dp.QuantileAdaptiveClipping`][eqx_micro.dp.QuantileAdaptiveClipping] to adapt
        the clip norm to a quantile of the gradient norms, starting from the callable's.
        Its privatized count is a second Gaussian query of each batch: the event is
        accounted at `noise_multiplier` (calibrated or given) for both together, and
        the gradient's noise multiplier is `(noise_multiplier⁻² -
        count_noise_multiplier⁻²)^(-1/2)`, as in Andrew et al. (2021).

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
    accountant: AccountantLike = Accountant.PLD
    neighboring_relation: NeighboringRelation | None = None
    noise_seed: int | None = None
    adaptive_clipping: QuantileAdaptiveClipping | None = None

    def __check_init__(self):
        check_config(self)

    def _make_event(self, noise_multiplier: Real) -> dp_accounting.DpEvent:
        if self.truncated_batch_size is None:
            return dpsgd_event(
                noise_multiplier, self.iterations, sampling_prob=self.sampling_prob
            )
        assert self.num_examples is not None  # checked at init with the truncation
        return truncated_dpsgd_event(
            noise_multiplier,
            self.iterations,
            sampling_prob=self.sampling_prob,
            num_examples=self.num_examples,
            truncated_batch_size=self.truncated_batch_size,
        )

    def make(
        self, clipped_aggregation_fn: AbstractBoundedSensitivityCallable
    ) -> DPExecutionPlan:
        """The plan for `clipped_aggregation_fn` (e.g. from `dp.clipped_grad`).

        Calibrates the noise multiplier if a target epsilon was given (a bisection with
        `dp_accounting`, the slow part of `make` for long runs), and sets the noise
        standard deviation to
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
        sensitivity = sensitivity_of(clipped_aggregation_fn, relation_of(self))
        noise_multiplier = noise_multiplier_of(self)
        seed = noise_seed_of(self.noise_seed)
        fn, gradient_multiplier, adaptive = adaptive_parts(
            self, clipped_aggregation_fn, noise_multiplier, relation_of(self), seed
        )
        return DPExecutionPlan(
            clipped_aggregation_fn=fn,
            batch_selection_strategy=PoissonSampling(
                sampling_prob=self.sampling_prob,
                iterations=self.iterations,
                truncated_batch_size=self.truncated_batch_size,
            ),
            noise_addition_transform=GaussianNoise(
                stddev=gradient_multiplier * sensitivity, key=seed
            ),
            dp_event=self._make_event(noise_multiplier),
            neighboring_relation=relation_of(self),
            noise_multiplier=noise_multiplier,
            iterations=self.iterations,
            accountant=self.accountant,
            adaptive_clipping=adaptive,
        )
