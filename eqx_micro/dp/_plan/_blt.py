"""BLT matrix factorization: cyclic participation and buffered-Toeplitz correlated noise,
accounted as one Gaussian mechanism (no amplification by sampling)."""

import math

import dp_accounting
import equinox as eqx

from .._accounting import Accountant, AccountantLike, NeighboringRelation, Real
from .._clipping._adaptive import QuantileAdaptiveClipping
from .._clipping._contract import AbstractBoundedSensitivityCallable
from .._noise._blt import BLTNoise
from .._noise._buffered_toeplitz import BufferedToeplitz, ErrorObjective, optimize_blt
from .._sampling._poisson import CyclicPoissonSampling, PartitionType
from ._config import (
    adaptive_parts,
    check_config,
    noise_multiplier_of,
    noise_seed_of,
    relation_of,
    sensitivity_of,
)
from ._plan import DPExecutionPlan


class BLTExecutionPlanConfig(eqx.Module):
    """The configuration of DP matrix factorization with a BLT strategy.

    The examples are split into `cycle_length` equal groups, and step `t` trains on
    group `t % cycle_length` (each example joins with probability `sampling_prob`, 1 by
    default: the whole group), so an example participates at most `ceil(iterations /
    cycle_length)` times, at least `cycle_length` steps apart. The noise is
    [`dp.BLTNoise`][eqx_micro.dp.BLTNoise] for a BLT strategy `C` (optimized for this
    participation pattern by [`dp.optimize_blt`][eqx_micro.dp.optimize_blt], or given),
    whose state holds `num_buffers` copies of the model whatever the number of steps.
    The whole run is one Gaussian mechanism on `C x`, of L2 sensitivity
    `callable sensitivity · C's min-separation sensitivity`, so the event is a single
    `GaussianDpEvent(noise_multiplier)`; sampling is not credited with amplification,
    so `sampling_prob < 1` only spends fewer examples. `.make(grad_fn)` builds the
    [`dp.DPExecutionPlan`][eqx_micro.dp.DPExecutionPlan], calibrated to
    `(epsilon, delta)` or at a given `noise_multiplier`.

    **Arguments:**

    - `iterations`: the number of noised updates.
    - `num_examples`: the dataset size (public: the groups split it equally).
    - `cycle_length`: the number of groups, and the fewest steps between two
        participations of an example; `1` uses every example at every step.
    - `num_buffers`: the BLT's buffers (3-7 is typical; `0` is independent noise).
    - `epsilon`, `delta`: the target guarantee; or `noise_multiplier` instead.
    - `sampling_prob`: the probability that an example of the active group joins its
        step, in (0, 1].
    - `strategy`: a [`dp.BufferedToeplitz`][eqx_micro.dp.BufferedToeplitz] to use
        instead of optimizing one (its coefficients must be non-negative and
        non-increasing when examples participate more than once).
    - `objective`: what the optimized strategy minimizes, a
        [`dp.ErrorObjective`][eqx_micro.dp.ErrorObjective] (default `RMSE`, the error
        SGD accumulates).
    - `strategy_optimization_steps`: the optimizer's step budget.
    - `accountant`, `neighboring_relation`, `noise_seed`, `adaptive_clipping`: as in
        [`dp.DPSGDExecutionPlanConfig`][eqx_micro.dp.DPSGDExecutionPlanConfig] (the
        relation defaults to `REPLACE_SPECIAL`, zero-out, as the dataset size is
        public).

    !!! example

        ```python
        import math
        import dp_accounting
        import jax.numpy as jnp
        import eqx_micro.dp as dp

        grad_fn = dp.clipped_grad(lambda w, x: jnp.sum(w * x), 1.0)
        config = dp.BLTExecutionPlanConfig(
            iterations=100, num_examples=1000, cycle_length=10, num_buffers=3,
            epsilon=4.0, delta=1e-5, noise_seed=0,
        )
        plan = config.make(grad_fn)
        assert plan.noise_addition_transform.num_buffers == 3
        assert plan.dp_event == dp_accounting.GaussianDpEvent(plan.noise_multiplier)
        assert plan.epsilon(1e-5) <= 4.0
        # The noise in the running sums, against DP-SGD's at the same epsilon:
        dpsgd = dp.BLTExecutionPlanConfig(
            iterations=100, num_examples=1000, cycle_length=10, num_buffers=0,
            epsilon=4.0, delta=1e-5, noise_seed=0,
        ).make(grad_fn)
        assert plan.prefix_sum_rmse() < 0.8 * dpsgd.prefix_sum_rmse()
        ```
    """

    iterations: int
    num_examples: int
    cycle_length: int = 1
    num_buffers: int = 4
    epsilon: Real | None = None
    delta: Real | None = None
    noise_multiplier: Real | None = None
    sampling_prob: Real = 1.0
    strategy: BufferedToeplitz | None = None
    objective: ErrorObjective = ErrorObjective.RMSE
    strategy_optimization_steps: int = 500
    accountant: AccountantLike = Accountant.PLD
    neighboring_relation: NeighboringRelation | None = None
    noise_seed: int | None = None
    adaptive_clipping: QuantileAdaptiveClipping | None = None

    @property
    def truncated_batch_size(self) -> None:
        """No truncation: batches are whole groups (or Poisson subsets of them).

        !!! example

            ```python
            import eqx_micro.dp as dp

            config = dp.BLTExecutionPlanConfig(10, 100, noise_multiplier=1.0)
            assert config.truncated_batch_size is None
            ```
        """
        return None

    def __check_init__(self):
        check_config(self)
        for name in ("cycle_length", "num_buffers", "strategy_optimization_steps"):
            value = getattr(self, name)
            minimum = 1 if name == "cycle_length" else 0
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(
                    f"`BLTExecutionPlanConfig` needs `{name}` to be an int >= {minimum}, "
                    f"got {value!r}."
                )
        if self.cycle_length > self.num_examples:
            raise ValueError(
                f"`cycle_length={self.cycle_length}` is larger than "
                f"`num_examples={self.num_examples}`: some groups would be empty."
            )
        if self.strategy is not None and not isinstance(self.strategy, BufferedToeplitz):
            raise TypeError(
                "`strategy` must be a `dp.BufferedToeplitz` (e.g. from `dp.optimize_blt`), "
                f"got {type(self.strategy).__name__}."
            )
        if not isinstance(self.objective, ErrorObjective):
            raise TypeError(
                "`objective` must be a `dp.ErrorObjective` (`RMSE` or `MAX_ERROR`), got "
                f"{self.objective!r}."
            )

    @property
    def max_participations(self) -> int:
        """The most steps one example joins: `ceil(iterations / cycle_length)`.

        !!! example

            ```python
            import eqx_micro.dp as dp

            config = dp.BLTExecutionPlanConfig(10, 100, cycle_length=4,
                                               noise_multiplier=1.0)
            assert config.max_participations == 3
            ```
        """
        return math.ceil(self.iterations / self.cycle_length)

    def _make_event(self, noise_multiplier: Real) -> dp_accounting.DpEvent:
        return dp_accounting.GaussianDpEvent(noise_multiplier)

    def make_strategy(self) -> BufferedToeplitz:
        """The BLT strategy the plan streams: the given one, or the optimized one.

        !!! example

            ```python
            import eqx_micro.dp as dp

            config = dp.BLTExecutionPlanConfig(50, 100, num_buffers=2,
                                               noise_multiplier=1.0)
            assert config.make_strategy().num_buffers == 2
            ```
        """
        if self.strategy is not None:
            return self.strategy
        return optimize_blt(
            self.iterations,
            self.num_buffers,
            objective=self.objective,
            min_sep=self.cycle_length,
            max_participations=self.max_participations,
            max_optimizer_steps=self.strategy_optimization_steps,
        )

    def make(
        self, clipped_aggregation_fn: AbstractBoundedSensitivityCallable
    ) -> DPExecutionPlan:
        """The plan for `clipped_aggregation_fn` (e.g. from `dp.clipped_grad`).

        Optimizes the strategy (unless given), calibrates the noise multiplier if a
        target epsilon was given, and sets the noise standard deviation to
        `noise_multiplier · callable sensitivity · strategy sensitivity` (of the
        float32 strategy the noise streams).

        !!! example

            ```python
            import jax.numpy as jnp
            import eqx_micro.dp as dp

            grad_fn = dp.clipped_grad(lambda w, x: jnp.sum(w * x), 2.0)
            strategy = dp.BufferedToeplitz([0.5], [0.25])
            config = dp.BLTExecutionPlanConfig(
                8, 80, cycle_length=4, strategy=strategy, noise_multiplier=1.5
            )
            plan = config.make(grad_fn)
            column = strategy.sensitivity(8, min_sep=4, max_participations=2)
            stddev = float(plan.noise_addition_transform.stddev)
            assert abs(stddev - 1.5 * 2.0 * column) < 1e-5
            ```
        """
        relation = relation_of(self)
        sensitivity = sensitivity_of(clipped_aggregation_fn, relation)
        noise_multiplier = noise_multiplier_of(self)
        seed = noise_seed_of(self.noise_seed)
        fn, gradient_multiplier, adaptive = adaptive_parts(
            self, clipped_aggregation_fn, noise_multiplier, relation, seed
        )
        unscaled = BLTNoise(self.make_strategy(), stddev=1.0, key=seed)
        # The sensitivity of the strategy the noise streams (float32 parameters).
        column = unscaled.strategy.sensitivity(
            self.iterations,
            min_sep=self.cycle_length,
            max_participations=self.max_participations,
        )
        noise = BLTNoise(
            unscaled.strategy,
            stddev=gradient_multiplier * sensitivity * column,
            key=seed,
        )
        return DPExecutionPlan(
            clipped_aggregation_fn=fn,
            batch_selection_strategy=CyclicPoissonSampling(
                sampling_prob=self.sampling_prob,
                iterations=self.iterations,
                cycle_length=self.cycle_length,
                partition_type=PartitionType.EQUAL_SPLIT,
            ),
            noise_addition_transform=noise,
            dp_event=self._make_event(noise_multiplier),
            neighboring_relation=relation,
            noise_multiplier=noise_multiplier,
            iterations=self.iterations,
            accountant=self.accountant,
            adaptive_clipping=adaptive,
        )
