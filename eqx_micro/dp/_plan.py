"""Execution plans: clipping, batch selection, noise and accounting that belong together.

A plan is only trustworthy as a whole: its `dp_event` describes the batch selection
strategy, the noise (`noise_multiplier` times the clipped callable's sensitivity) and the
number of iterations. Configs build plans so that these can never drift apart.
"""

import dataclasses
import math
import secrets
from typing import Any

import dp_accounting
import equinox as eqx
import numpy as np
from jaxtyping import ArrayLike, PyTree

from ._accounting import (
    Accountant,
    amplified_bandmf_event,
    calibrate_noise_multiplier,
    compute_epsilon,
    dpsgd_event,
    NeighboringRelation,
    Real,
    truncated_amplified_bandmf_event,
    truncated_dpsgd_event,
)
from ._bandmf_strategy import optimize_banded_toeplitz, strategy_rmse
from ._clipped_grad import AbstractBoundedSensitivityCallable
from ._noise import AbstractNoiseTransform, BandMFNoise, GaussianNoise
from ._sampling import (
    AbstractBatchSelectionStrategy,
    CyclicPoissonSampling,
    PartitionType,
    PoissonSampling,
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
    noise_addition_transform: AbstractNoiseTransform
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
        if isinstance(noise, BandMFNoise):
            coefs = np.asarray(noise.coefs, np.float64)
        elif isinstance(noise, GaussianNoise):
            coefs = np.ones(1)
        else:
            raise TypeError(
                f"`prefix_sum_rmse` knows Gaussian and BandMF noise, not "
                f"{type(noise).__name__}."
            )
        return self.noise_multiplier * strategy_rmse(
            coefs / np.linalg.norm(coefs), self.iterations
        )

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
        # One check per release, on the count the new state is built from (a check per
        # leaf costs a host callback each: 6% of a small CNN step).
        count = eqx.error_if(
            noise_state.count,
            noise_state.count >= self.iterations,
            f"This DP plan's privacy event covers {self.iterations} iterations and they "
            "are used up; make a new plan (and account for both) to train longer.",
        )
        noise_state = dataclasses.replace(noise_state, count=count)
        noisy, noise_state = self.noise_addition_transform.update(clipped, noise_state)
        return noisy, noise_state, aux


def _check_open_unit(name: str, value: Real, *, closed_high: bool) -> None:
    high_ok = value <= 1 if closed_high else value < 1
    if not (value > 0 and high_ok) or math.isnan(value):
        interval = "(0, 1]" if closed_high else "(0, 1)"
        raise ValueError(f"`{name}` must be in {interval}, got {value}.")


def _check_config(config: Any) -> None:
    """The checks shared by every plan config."""
    if isinstance(config.iterations, bool) or config.iterations < 1:
        raise ValueError(f"`iterations` must be a positive int, got {config.iterations}.")
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
            raise ValueError("A target `epsilon` needs a `delta` too.")
    if config.delta is not None:
        _check_open_unit("delta", config.delta, closed_high=False)
    if config.noise_multiplier is not None and not (
        config.noise_multiplier >= 0 and math.isfinite(config.noise_multiplier)
    ):
        raise ValueError(
            f"`noise_multiplier` must be finite and >= 0, got {config.noise_multiplier}."
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


def _relation(config: Any) -> NeighboringRelation:
    """The configured neighboring relation, or the default for the config."""
    if config.neighboring_relation is not None:
        return config.neighboring_relation
    if isinstance(config.accountant, dp_accounting.PrivacyAccountant):
        return config.accountant.neighboring_relation
    if config.num_examples is None:
        return NeighboringRelation.ADD_OR_REMOVE_ONE
    return NeighboringRelation.REPLACE_SPECIAL


def _noise_multiplier(config: Any) -> float:
    """The configured noise multiplier, or the one calibrated to `(epsilon, delta)`."""
    if config.noise_multiplier is not None:
        return float(config.noise_multiplier)
    return calibrate_noise_multiplier(
        config._make_event,
        config.epsilon,
        config.delta,
        accountant=config.accountant,
        neighboring_relation=_relation(config),
    )


def _sensitivity(fn: Any, relation: NeighboringRelation) -> float:
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


def _seed(noise_seed: int | None) -> int:
    # Noise an adversary can predict protects nothing: by default, a secret seed.
    return secrets.randbits(63) if noise_seed is None else noise_seed


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
        _check_config(self)

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

    def make(
        self, clipped_aggregation_fn: AbstractBoundedSensitivityCallable
    ) -> DPExecutionPlan:
        """The plan for `clipped_aggregation_fn` (e.g. from `dp.clipped_grad`).

        Calibrates the noise multiplier if a target epsilon was given (a bisection with
        `dp_accounting`: 0.6-1 s with RDP, 3-19 s with PLD for 10⁴ steps), and sets the
        noise standard deviation to
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
        sensitivity = _sensitivity(clipped_aggregation_fn, _relation(self))
        noise_multiplier = _noise_multiplier(self)
        return DPExecutionPlan(
            clipped_aggregation_fn=clipped_aggregation_fn,
            batch_selection_strategy=PoissonSampling(
                sampling_prob=self.sampling_prob,
                iterations=self.iterations,
                truncated_batch_size=self.truncated_batch_size,
            ),
            noise_addition_transform=GaussianNoise(
                stddev=noise_multiplier * sensitivity, key=_seed(self.noise_seed)
            ),
            dp_event=self._make_event(noise_multiplier),
            neighboring_relation=_relation(self),
            noise_multiplier=noise_multiplier,
            iterations=self.iterations,
            accountant=self.accountant,
        )


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
    multiplier if a target epsilon is given, and returns a `dp.DPExecutionPlan` with
    `dp.CyclicPoissonSampling(cycle_length=num_bands)`, `dp.BandMFNoise` of standard
    deviation `noise_multiplier * sensitivity * column norm`, and the amplified event.
    `plan.prefix_sum_rmse()` compares it with other plans.

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
    - `accountant`, `neighboring_relation`, `noise_seed`: as in
        `dp.DPSGDExecutionPlanConfig` (the relation defaults to `REPLACE_SPECIAL` when
        `num_examples` is public, else `ADD_OR_REMOVE_ONE`).

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
    accountant: Accountant = "pld"
    neighboring_relation: NeighboringRelation | None = None
    noise_seed: int | None = None

    def __check_init__(self):
        _check_config(self)
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
            and _relation(self) == NeighboringRelation.ADD_OR_REMOVE_ONE
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
        if _relation(self) == NeighboringRelation.ADD_OR_REMOVE_ONE:
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
        # Truncation needs EQUAL_SPLIT (checked at init): every group has n // b.
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

        Optimizes the strategy (seconds for 10⁴ iterations), calibrates the noise
        multiplier if a target epsilon was given, and sets the noise standard deviation
        to `noise_multiplier * sensitivity(relation) * column norm of C`.

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
        sensitivity = _sensitivity(clipped_aggregation_fn, _relation(self))
        coefs = optimize_banded_toeplitz(
            self.iterations,
            self.num_bands,
            max_optimizer_steps=self.strategy_optimization_steps,
        )
        column_norm = float(np.linalg.norm(coefs))
        noise_multiplier = _noise_multiplier(self)
        return DPExecutionPlan(
            clipped_aggregation_fn=clipped_aggregation_fn,
            batch_selection_strategy=CyclicPoissonSampling(
                sampling_prob=self.sampling_prob,
                iterations=self.iterations,
                truncated_batch_size=self.truncated_batch_size,
                cycle_length=self.num_bands,
                partition_type=self._partition(),
            ),
            noise_addition_transform=BandMFNoise(
                coefs,
                stddev=noise_multiplier * sensitivity * column_norm,
                key=_seed(self.noise_seed),
            ),
            dp_event=self._make_event(noise_multiplier),
            neighboring_relation=_relation(self),
            noise_multiplier=noise_multiplier,
            iterations=self.iterations,
            accountant=self.accountant,
        )


def choose_num_bands(
    iterations: int,
    num_examples: int,
    expected_batch_size: Real,
    epsilon: Real,
    delta: Real,
    *,
    candidates: tuple[int, ...] | None = None,
    accountant: Accountant = "pld",
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
        rmses[bands] = _noise_multiplier(config) * strategy_rmse(unit, iterations)
    best = min(rmses, key=rmses.__getitem__)
    return best, rmses
