"""Amplified BandMF: banded correlated noise with cyclic Poisson sampling."""

import dp_accounting
import equinox as eqx
import numpy as np

from .._accounting import (
    Accountant,
    AccountantLike,
    amplified_bandmf_event,
    NeighboringRelation,
    Real,
    truncated_amplified_bandmf_event,
)
from .._clipping._adaptive import QuantileAdaptiveClipping
from .._clipping._contract import AbstractBoundedSensitivityCallable
from .._noise._banded_toeplitz import optimize_banded_toeplitz, strategy_rmse
from .._noise._bandmf import BandMFNoise
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


class BandMFExecutionPlanConfig(eqx.Module):
    """The configuration of amplified BandMF: correlated noise with cyclic Poisson sampling.

    BandMF adds noise correlated across steps through a banded Toeplitz strategy `C`
    with `num_bands` bands, so that the noise in the running sum of updates partly
    cancels. The examples are split into `num_bands` groups and step `t` samples only
    from group `t % num_bands`, so an example's participations are at least `num_bands`
    steps apart and the run is amplified like DP-SGD over
    `ceil(iterations / num_bands)` rounds. At the same (epsilon, delta) it beats DP-SGD
    (`num_bands=1`, which this config reproduces exactly: same sampling, event and
    noise for the same seed).

    `.make(grad_fn)` optimizes the strategy (unit column norm), calibrates the noise
    multiplier if a target epsilon is given, and returns a
    [`dp.DPExecutionPlan`][eqx_micro.dp.DPExecutionPlan] with
    `dp.CyclicPoissonSampling(cycle_length=num_bands)`,
    [`dp.BandMFNoise`][eqx_micro.dp.BandMFNoise] of standard deviation `noise_multiplier *
    sensitivity * column norm`, and the amplified event. `plan.prefix_sum_rmse()` compares
    it with other plans.

    **Arguments:**

    - `iterations`: the number of noised updates (optimizer steps).
    - `num_bands`: the strategy's bands, in `[1, iterations]`; also the cycle length.
    - `sampling_prob`: the probability that an example of the active group joins a
        step (the per-group Poisson rate), in (0, 1]. The expected batch size is
        `sampling_prob * num_examples / num_bands`.
    - `epsilon`, `delta`: the target guarantee; or `noise_multiplier` instead.
    - `truncated_batch_size`: truncate each batch (needs `num_examples` and
        `EQUAL_SPLIT` groups).
    - `num_examples`: the dataset size, if public.
    - `partition_type`: how examples are split into groups. Defaults to `EQUAL_SPLIT`
        (`num_examples // num_bands` per group) when the relation is zero-out or
        replace-one, and to `INDEPENDENT` (each example picks a group) under
        add-or-remove, the only one valid there.
    - `strategy_optimization_steps`: the optimizer's step budget (stops early on
        convergence).
    - `accountant`, `neighboring_relation`, `noise_seed`, `adaptive_clipping`: as in
        [`dp.DPSGDExecutionPlanConfig`][eqx_micro.dp.DPSGDExecutionPlanConfig] (the relation
        defaults to `REPLACE_SPECIAL` when `num_examples` is public, else
        `ADD_OR_REMOVE_ONE`).

    !!! example

        ```python
        import jax.numpy as jnp
        import eqx_micro.dp as dp

        grad_fn = dp.clipped_grad(lambda w, x: jnp.sum(w * x), 1.0)
        # 1000 examples, batches of 100 on average, 64 steps, epsilon 4.
        settings = dict(iterations=64, epsilon=4.0, delta=1e-5, num_examples=1000,
                        noise_seed=0)
        bandmf = dp.BandMFExecutionPlanConfig(
            num_bands=4, sampling_prob=0.4, **settings  # 4 groups of 250
        ).make(grad_fn)
        dpsgd = dp.BandMFExecutionPlanConfig(
            num_bands=1, sampling_prob=0.1, **settings
        ).make(grad_fn)
        assert bandmf.epsilon(1e-5) <= 4.0
        assert bandmf.prefix_sum_rmse() < dpsgd.prefix_sum_rmse()
        ```

    ??? cite "References"

        ```bibtex
        @inproceedings{choquettechoo2023amplified,
            title={(Amplified) Banded Matrix Factorization: A unified approach to
                   private training},
            author={Choquette-Choo, Christopher A. and Ganesh, Arun and McKenna, Ryan
                    and McMahan, H. Brendan and Rush, Keith and Thakurta, Abhradeep
                    and Xu, Zheng},
            booktitle={NeurIPS},
            year={2023},
            url={https://arxiv.org/abs/2306.08153}
        }
        ```
    """

    iterations: int
    num_bands: int
    sampling_prob: Real
    epsilon: Real | None = None
    delta: Real | None = None
    noise_multiplier: Real | None = None
    truncated_batch_size: int | None = None
    num_examples: int | None = None
    partition_type: PartitionType | None = None
    strategy_optimization_steps: int = 500
    accountant: AccountantLike = Accountant.PLD
    neighboring_relation: NeighboringRelation | None = None
    noise_seed: int | None = None
    adaptive_clipping: QuantileAdaptiveClipping | None = None

    def __check_init__(self):
        check_config(self)
        if isinstance(self.num_bands, bool) or not 1 <= self.num_bands <= self.iterations:
            raise ValueError(
                f"`num_bands` must be in [1, iterations={self.iterations}], got "
                f"{self.num_bands}."
            )
        if self.strategy_optimization_steps < 0:
            raise ValueError(
                "`strategy_optimization_steps` must be >= 0, got "
                f"{self.strategy_optimization_steps}."
            )
        if (
            self._partition() == PartitionType.EQUAL_SPLIT
            and relation_of(self) == NeighboringRelation.ADD_OR_REMOVE_ONE
        ):
            raise ValueError(
                "`partition_type=EQUAL_SPLIT` is only valid under a replace relation "
                "(`REPLACE_SPECIAL` or `REPLACE_ONE`, with a public `num_examples`): "
                "adding or removing an example reshuffles every group. Use "
                "`PartitionType.INDEPENDENT` under `ADD_OR_REMOVE_ONE`."
            )
        if (
            self.truncated_batch_size is not None
            and self._partition() == PartitionType.INDEPENDENT
        ):
            raise ValueError(
                "`truncated_batch_size` needs `EQUAL_SPLIT` groups (of public size "
                "`num_examples // num_bands`) for its accounting; `INDEPENDENT` groups "
                "have random sizes. Use a replace relation with `EQUAL_SPLIT`, or drop "
                "the truncation."
            )
        if self.num_examples is not None and self.num_examples < self.num_bands:
            raise ValueError(
                f"`num_examples={self.num_examples}` is smaller than "
                f"`num_bands={self.num_bands}`: some groups would be empty."
            )

    def _partition(self) -> PartitionType:
        if self.partition_type is not None:
            return self.partition_type
        if relation_of(self) == NeighboringRelation.ADD_OR_REMOVE_ONE:
            return PartitionType.INDEPENDENT
        return PartitionType.EQUAL_SPLIT

    def _make_event(self, noise_multiplier: Real) -> dp_accounting.DpEvent:
        if self.truncated_batch_size is None:
            return amplified_bandmf_event(
                noise_multiplier,
                self.iterations,
                num_bands=self.num_bands,
                sampling_prob=self.sampling_prob,
            )
        # Truncation needs EQUAL_SPLIT and `num_examples` (checked at init): every
        # group has n // b.
        assert self.num_examples is not None
        largest = self.num_examples // self.num_bands
        return truncated_amplified_bandmf_event(
            noise_multiplier,
            self.iterations,
            num_bands=self.num_bands,
            sampling_prob=self.sampling_prob,
            largest_group_size=largest,
            truncated_batch_size=self.truncated_batch_size,
        )

    def make(
        self, clipped_aggregation_fn: AbstractBoundedSensitivityCallable
    ) -> DPExecutionPlan:
        """The plan for `clipped_aggregation_fn` (e.g. from `dp.clipped_grad`).

        Optimizes the strategy, calibrates the noise
        multiplier if a target epsilon was given, and sets the noise standard deviation
        to `noise_multiplier * sensitivity_of(relation) * column norm of C`.

        !!! example

            ```python
            import jax.numpy as jnp
            import eqx_micro.dp as dp

            grad_fn = dp.clipped_grad(lambda w, x: jnp.sum(w * x), 2.0)
            config = dp.BandMFExecutionPlanConfig(
                iterations=100, num_bands=4, sampling_prob=0.1, noise_multiplier=1.5
            )
            plan = config.make(grad_fn)
            assert plan.noise_addition_transform.num_bands == 4
            assert abs(float(plan.noise_addition_transform.stddev) - 3.0) < 1e-5
            ```
        """
        sensitivity = sensitivity_of(clipped_aggregation_fn, relation_of(self))
        coefs = optimize_banded_toeplitz(
            self.iterations,
            self.num_bands,
            max_optimizer_steps=self.strategy_optimization_steps,
        )
        column_norm = float(np.linalg.norm(coefs))
        noise_multiplier = noise_multiplier_of(self)
        seed = noise_seed_of(self.noise_seed)
        fn, gradient_multiplier, adaptive = adaptive_parts(
            self, clipped_aggregation_fn, noise_multiplier, relation_of(self), seed
        )
        return DPExecutionPlan(
            clipped_aggregation_fn=fn,
            batch_selection_strategy=CyclicPoissonSampling(
                sampling_prob=self.sampling_prob,
                iterations=self.iterations,
                truncated_batch_size=self.truncated_batch_size,
                cycle_length=self.num_bands,
                partition_type=self._partition(),
            ),
            noise_addition_transform=BandMFNoise(
                coefs,
                stddev=gradient_multiplier * sensitivity * column_norm,
                key=seed,
            ),
            dp_event=self._make_event(noise_multiplier),
            neighboring_relation=relation_of(self),
            noise_multiplier=noise_multiplier,
            iterations=self.iterations,
            accountant=self.accountant,
            adaptive_clipping=adaptive,
        )


def choose_num_bands(
    iterations: int,
    num_examples: int,
    expected_batch_size: Real,
    epsilon: Real,
    delta: Real,
    *,
    candidates: tuple[int, ...] | None = None,
    accountant: AccountantLike = Accountant.PLD,
    strategy_optimization_steps: int = 100,
) -> tuple[int, dict[int, float]]:
    """The number of BandMF bands with the least prefix-sum RMSE for a training run.

    For every candidate `b`, builds the amplified BandMF plan with `num_bands=b` at the
    same expected batch size (per-group rate `expected_batch_size * b / num_examples`)
    and target `(epsilon, delta)`, calibrates its noise multiplier, optimizes its
    strategy, and computes its `prefix_sum_rmse`. More bands cancel more noise but give
    each example fewer, less amplified participations; this finds the balance. `b = 1`
    is DP-SGD. The dataset size is treated as public (zero-out relation).

    **Arguments:**

    - `iterations`: the number of training steps.
    - `num_examples`: the dataset size.
    - `expected_batch_size`: the average batch size.
    - `epsilon`, `delta`: the target guarantee.
    - `candidates`: the band counts to try; by default 1 and the powers of 2 up to the
        largest with a per-group rate of at most 1 and at most `iterations` bands.
    - `accountant`: as in the plan configs.
    - `strategy_optimization_steps`: the optimizer's step budget per candidate.

    **Returns:**

    `(best_num_bands, {num_bands: rmse})`.

    !!! example

        ```python
        import eqx_micro.dp as dp

        best, rmses = dp.choose_num_bands(
            iterations=32, num_examples=400, expected_batch_size=50, epsilon=4.0,
            delta=1e-5, candidates=(1, 2, 4),
        )
        assert rmses[best] == min(rmses.values()) and set(rmses) == {1, 2, 4}
        ```
    """
    if not 0 < expected_batch_size <= num_examples:
        raise ValueError(
            f"`expected_batch_size` must be in (0, num_examples={num_examples}], got "
            f"{expected_batch_size}."
        )
    if candidates is None:
        candidates, bands = (), 1
        while bands <= iterations and expected_batch_size * bands <= num_examples:
            candidates += (bands,)
            bands *= 2
    rmses = {}
    for bands in candidates:
        config = BandMFExecutionPlanConfig(
            iterations=iterations,
            num_bands=bands,
            sampling_prob=expected_batch_size * bands / num_examples,
            epsilon=epsilon,
            delta=delta,
            num_examples=num_examples,
            accountant=accountant,
            strategy_optimization_steps=strategy_optimization_steps,
        )
        coefs = optimize_banded_toeplitz(
            iterations, bands, max_optimizer_steps=strategy_optimization_steps
        )
        unit = coefs / np.linalg.norm(coefs)
        rmses[bands] = noise_multiplier_of(config) * strategy_rmse(unit, iterations)
    best = min(rmses, key=rmses.__getitem__)
    return best, rmses
