"""`DPTrainer`: a training loop around a DP execution plan, with its privacy report.

The plan fixes everything the guarantee depends on (sampling, clipping, noise, the
number of updates). The trainer adds what it does not: the optimizer, padding batches to
a few fixed shapes, progress, checkpoints, and the epsilon of the steps actually taken.
"""

import dataclasses
import functools
import itertools
import math
from collections.abc import Callable
from typing import Any

import dp_accounting
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import optax
from jaxtyping import Array, ArrayLike, Bool, Float, PRNGKeyArray, PyTree

from ... import micro_grad
from ...internal import check_key, check_positive_int
from .._accounting import check_delta, compute_epsilon, NeighboringRelation, Real
from .._clipping._adaptive import AdaptiveClipState
from .._clipping._callable import BoundedSensitivityCallable
from .._clipping._contract import ClippedGradAux
from .._plan._plan import check_budget, DPExecutionPlan, NoisyRelease
from .._sampling._base import AbstractBatchSelectionStrategy, RngLike
from .._sampling._fixed import FixedBatchSampling
from .._sampling._padding import gather_padded_batch, pad_to_multiple_of
from ._non_private import NoNoise, UnclippedGrad
from ._progress import Progress
from ._state import PrivacyReport, TrainState


def _check_no_batch_norm(model: PyTree) -> None:
    def is_batch_norm(x: Any) -> bool:
        return isinstance(x, eqx.nn.BatchNorm)

    for path, leaf in jtu.tree_flatten_with_path(model, is_leaf=is_batch_norm)[0]:
        if is_batch_norm(leaf):
            raise ValueError(
                f"`DPTrainer.init` found an `eqx.nn.BatchNorm` layer at "
                f"`model{jtu.keystr(path)}`. Batch normalization mixes the examples of a "
                "batch, so a per-example gradient is not one example's, clipping no "
                "longer bounds the sensitivity, and its running statistics "
                "(`eqx.nn.State`) would be released without noise. Use "
                "`eqx.nn.GroupNorm` or `eqx.nn.LayerNorm`, which normalize each "
                "example on its own."
            )


def _num_examples(data: PyTree) -> int:
    leaves = [leaf for leaf in jtu.tree_leaves(data) if eqx.is_array(leaf)]
    if not leaves or any(np.ndim(leaf) == 0 for leaf in leaves):
        raise ValueError(
            "`DPTrainer.fit` needs `data` to be a PyTree of arrays with the examples "
            "along axis 0 (e.g. `{'x': images, 'y': labels}`); it has "
            + ("no array leaves." if not leaves else "a 0-d array leaf.")
        )
    return int(np.shape(leaves[0])[0])


def _default_multiple(
    strategy: AbstractBatchSelectionStrategy, num_examples: int, microbatch_size: int
) -> int:
    """About two standard deviations of the batch size, so a handful of padded shapes
    cover the batches (one shape when the size is fixed)."""
    spread = 2.0 * strategy.batch_size_stddev(num_examples)
    if spread == 0.0:
        spread = strategy.expected_batch_size(num_examples)
    return max(math.ceil(spread / microbatch_size), 1) * microbatch_size


def _check_trainer_loss(fn: Any) -> None:
    """The trainer calls the clipped aggregation as `fn(model, batch, key, ...)`."""
    if not isinstance(fn, BoundedSensitivityCallable):
        return  # a user's own callable: its contract says how it is called
    loss = fn.loss
    if (loss.argnums, loss.batch_argnums, loss.key_argnum) != ((0,), (1,), 2):
        raise ValueError(
            f"`DPTrainer` calls the plan's loss as `loss(model, batch, key)`, but it was "
            f"built with `argnums={loss.argnums}`, `batch_argnums={loss.batch_argnums}` "
            f"and `key_argnum={loss.key_argnum}`. Build it with "
            f"`dp.{loss.caller}(loss_fn, clip_norm, key_argnum=2, ...)` from a "
            "`loss_fn(model, batch, key)` (the key may go unused)."
        )


def _check_padding_multiple(padding_multiple: Any, microbatch_size: int | None) -> None:
    if isinstance(padding_multiple, bool) or not isinstance(padding_multiple, int):
        raise TypeError(
            "`DPTrainer.fit` needs `padding_multiple` to be a positive int, got "
            f"{padding_multiple!r}."
        )
    step = microbatch_size or 1
    if padding_multiple < 1 or padding_multiple % step:
        raise ValueError(
            f"`DPTrainer.fit` got `padding_multiple={padding_multiple}`, but every padded "
            f"batch must split into microbatches of {step} (the plan's "
            f"`microbatch_size`): pick a positive multiple of {step}, e.g. "
            f"{max(1, -(-padding_multiple // step)) * step}."
        )


def _pad(indices: np.ndarray, multiple: int, microbatch_size: int | None) -> np.ndarray:
    if indices.ndim != 1:
        raise ValueError(
            "`DPTrainer.fit` trains on batches of examples (1-D index arrays), but the "
            f"plan's batch selection gave indices of shape {indices.shape}; user-level "
            "batches need their own loop (see `dp.split_and_pad_global_batch`)."
        )
    if indices.size == 0:  # The step (and its noise) still runs, on padding only.
        return np.full(multiple, -1, indices.dtype)
    return pad_to_multiple_of(indices, multiple, microbatch_size)


class DPTrainer(eqx.Module):
    """A differentially private training loop for an Equinox model.

    Built from a [`dp.DPExecutionPlan`][eqx_micro.dp.DPExecutionPlan] (DP-SGD or BandMF: the
    same type) and an optax optimizer. The plan's clipped callable is the loss: build it as
    `dp.clipped_grad(loss_fn, clip_norm, key_argnum=2, ...)` from a per-example
    `loss_fn(model, batch, key) -> loss` (or `(loss, aux)` with `has_aux=True`); add
    `return_values=True` to see the training loss in the metrics and the progress bar.

    Each step (`step`) draws the clipped gradient sum of the batch with its noise from
    `plan.noisy_grad`, divides it by `normalize_by` (after the noise: post-processing,
    which keeps the guarantee) and applies the optimizer. `fit` runs the whole plan:
    batches from the plan's batch selection, padded to a few fixed sizes so the step
    compiles only a handful of times, a progress bar, checkpoints through a callback,
    and a [`dp.PrivacyReport`][eqx_micro.dp.PrivacyReport] of the steps actually taken.

    Models with `eqx.nn.BatchNorm` are refused (use `eqx.nn.GroupNorm` or
    `eqx.nn.LayerNorm`): normalizing over the batch breaks per-example clipping.
    `DPTrainer.non_private` gives the same loop without clipping and noise, for
    baselines.

    **Arguments:**

    - `plan`: the execution plan, e.g. `dp.DPSGDExecutionPlanConfig(...).make(grad_fn)`.
    - `optimizer`: an `optax.GradientTransformation`.
    - `normalize_by`: the noisy sum is divided by this after the noise: the expected
        batch size if `grad_fn` was built with `normalize_by=1` (the default), or 1 if
        it was already normalized.

    !!! example

        ```python
        import equinox as eqx
        import jax
        import jax.numpy as jnp
        import numpy as np
        import optax
        import eqx_micro.dp as dp

        def loss(model, batch, key):  # one example, with a batch axis of size 1
            return jnp.mean((jax.vmap(model)(batch["x"]) - batch["y"]) ** 2)

        x = np.random.default_rng(0).normal(size=(200, 3)).astype(np.float32)
        data = {"x": x, "y": x.sum(axis=1, keepdims=True)}
        grad_fn = dp.clipped_grad(loss, 1.0, microbatch_size=8, key_argnum=2,
                                  return_values=True)
        plan = dp.DPSGDExecutionPlanConfig(
            iterations=30,
            sampling_prob=0.1,
            noise_multiplier=1.0,
            accountant=dp.Accountant.RDP,
        ).make(grad_fn)
        trainer = dp.DPTrainer(plan, optax.sgd(0.1, momentum=0.9), normalize_by=20)
        model = eqx.nn.Linear(3, 1, key=jax.random.key(0))
        model, report = trainer.fit(
            data, model, rng=np.random.default_rng(1), key=jax.random.key(2),
            delta=1e-5, padding_multiple=64, progress=False,  # one padded size
        )
        assert report.steps == 30 and 0 < report.epsilon < 10
        ```
    """

    plan: DPExecutionPlan
    optimizer: optax.GradientTransformation
    normalize_by: Float[Array, ""]

    # `jax.jit(trainer.step)` keys its cache on the method's trainer: hash by identity,
    # as for a function (the trainer holds arrays, which are not hashable).
    __hash__ = object.__hash__

    def __init__(
        self,
        plan: DPExecutionPlan,
        optimizer: optax.GradientTransformation,
        *,
        normalize_by: Real = 1.0,
    ):
        if not isinstance(plan, DPExecutionPlan):
            raise TypeError(
                "`DPTrainer` needs a `dp.DPExecutionPlan` (e.g. "
                "`dp.DPSGDExecutionPlanConfig(...).make(grad_fn)`), got "
                f"{type(plan).__name__}."
            )
        if not isinstance(optimizer, optax.GradientTransformation):
            raise TypeError(
                "`DPTrainer` needs `optimizer` to be an optax optimizer (an "
                "`optax.GradientTransformation`, e.g. `optax.sgd(0.1)`), got "
                f"{optimizer!r}. Pass a learning rate through the optimizer: "
                "`DPTrainer(plan, optax.sgd(learning_rate))`."
            )
        _check_trainer_loss(plan.clipped_aggregation_fn)
        if isinstance(normalize_by, bool) or not (
            isinstance(normalize_by, int | float)
            and math.isfinite(normalize_by)
            and normalize_by > 0
        ):
            raise ValueError(
                f"`DPTrainer` got `normalize_by={normalize_by}`; it must be a finite "
                "positive number (the noisy gradient sum is divided by it)."
            )
        self.plan = plan
        self.optimizer = optimizer
        self.normalize_by = jnp.asarray(normalize_by, jnp.float32)

    @classmethod
    def non_private(
        cls,
        loss_fn: Callable,
        optimizer: optax.GradientTransformation,
        *,
        batch_size: int,
        iterations: int,
        microbatch_size: int | None = None,
        has_aux: bool = False,
    ) -> "DPTrainer":
        """The same training loop without privacy: a baseline to compare with.

        Batches of `batch_size` examples drawn uniformly at every step
        ([`dp.FixedBatchSampling`][eqx_micro.dp.FixedBatchSampling]), the mean of the
        per-example gradients of `loss_fn` (not clipped), no noise. `fit` reports `epsilon =
        inf`.

        **Arguments:**

        - `loss_fn`: `loss_fn(model, batch, key)`, the per-example loss a DP plan would
            clip (the batch has a leading axis of size 1).
        - `optimizer`: an `optax.GradientTransformation`.
        - `batch_size`: examples per step.
        - `iterations`: the number of steps.
        - `microbatch_size`: per-example gradients are computed this many at a time.
        - `has_aux`: whether `loss_fn` returns `(loss, aux)`.

        !!! example

            ```python
            import equinox as eqx
            import jax
            import jax.numpy as jnp
            import numpy as np
            import optax
            import eqx_micro.dp as dp

            def loss(model, batch, key):
                return jnp.mean((jax.vmap(model)(batch["x"]) - batch["y"]) ** 2)

            x = np.random.default_rng(0).normal(size=(64, 2)).astype(np.float32)
            data = {"x": x, "y": x[:, :1] - x[:, 1:]}
            trainer = dp.DPTrainer.non_private(
                loss, optax.sgd(0.1, momentum=0.9), batch_size=16, iterations=100
            )
            model = eqx.nn.Linear(2, 1, key=jax.random.key(0))
            model, report = trainer.fit(data, model, rng=0, key=jax.random.key(1),
                                        delta=1e-5, progress=False)
            assert report.epsilon == float("inf")
            assert np.allclose(model.weight, [[1.0, -1.0]], atol=0.05)
            ```
        """
        check_positive_int(batch_size, "batch_size", "DPTrainer.non_private")
        grad_fn = micro_grad(
            loss_fn,
            has_aux,
            0,
            batch_argnums=1,
            microbatch_size=microbatch_size,
            key_argnum=2,
        )
        plan = DPExecutionPlan(
            clipped_aggregation_fn=UnclippedGrad(
                grad_fn=grad_fn, microbatch_size=microbatch_size
            ),
            batch_selection_strategy=FixedBatchSampling(
                batch_size=batch_size, iterations=iterations
            ),
            noise_addition_transform=NoNoise(),
            dp_event=dp_accounting.NonPrivateDpEvent(),
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            noise_multiplier=0.0,
            iterations=iterations,
        )
        return cls(plan, optimizer, normalize_by=batch_size)

    def _check_state(self, state: Any) -> None:
        if not isinstance(state, TrainState):
            raise TypeError(
                "`DPTrainer.step` needs `state` to be a `dp.TrainState` (from "
                f"`trainer.init(model)`), got {type(state).__name__}."
            )
        # The budget, before the compiled step (whose check can only fail at run time).
        check_budget(state.noise_state.count, self.plan.iterations)
        self._check_clip_state(state.clip_state)

    def _check_clip_state(self, clip_state: Any) -> None:
        adaptive = self.plan.adaptive_clipping is not None
        if adaptive and not isinstance(clip_state, AdaptiveClipState):
            raise TypeError(
                "This trainer's plan adapts its clip norm, so the state needs its "
                "`clip_state` (a `dp.AdaptiveClipState`); got "
                f"{type(clip_state).__name__}. Make the state with `trainer.init(model)` "
                "(or restore a checkpoint of a run with the same plan)."
            )
        if not adaptive and clip_state is not None:
            raise TypeError(
                "The state has a `clip_state` (adaptive clipping), but this trainer's "
                "plan has a fixed clip norm: it comes from another plan. Make the state "
                "with `trainer.init(model)`."
            )

    def init(self, model: PyTree) -> TrainState:
        """The state before the first step.

        Raises a `ValueError` if `model` holds an `eqx.nn.BatchNorm` layer.

        !!! example

            ```python
            import equinox as eqx
            import jax
            import jax.numpy as jnp
            import optax
            import eqx_micro.dp as dp

            loss = lambda model, batch, key: jnp.sum(model(batch["x"][0]))
            trainer = dp.DPTrainer.non_private(loss, optax.sgd(1e-3), batch_size=8,
                                               iterations=10)
            state = trainer.init(eqx.nn.MLP(2, 1, 4, 1, key=jax.random.key(0)))
            assert state.step == 0 and state.noise_state.count == 0
            ```
        """
        _check_no_batch_norm(model)
        params = eqx.filter(model, eqx.is_inexact_array)
        clip_state = None
        if self.plan.adaptive_clipping is not None:
            fn = self.plan.clipped_aggregation_fn
            assert isinstance(fn, BoundedSensitivityCallable)  # checked by the config
            clip_state = self.plan.adaptive_clipping.init(fn.l2_clip_norm)
        return TrainState(
            model=model,
            opt_state=self.optimizer.init(params),
            noise_state=self.plan.noise_addition_transform.init(params),
            step=jnp.zeros((), jnp.int32),
            clip_state=clip_state,
        )

    def step(
        self,
        state: TrainState,
        batch: PyTree,
        is_padding_example: Bool[ArrayLike, " batch"],
        key: PRNGKeyArray,
    ) -> tuple[TrainState, dict[str, Array]]:
        """One private update on a (padded) batch; compiled, once per batch shape.

        The loss sees `jax.random.fold_in(key, state.step)`, so pass the same `key` at
        every step (as `fit` does): a resumed run draws the same keys.

        **Arguments:**

        - `state`: the [`dp.TrainState`][eqx_micro.dp.TrainState].
        - `batch`: the batch, examples along axis 0 of every array leaf.
        - `is_padding_example`: a bool vector, True for padding rows.
        - `key`: the run's PRNG key.

        **Returns:**

        `(new_state, metrics)`. The metrics are `"loss"`, the mean loss of the real
        examples (NaN unless the callable was built with `return_values=True`),
        `"num_nonfinite"`, the examples whose gradient was not finite,
        `"noisy_grad_norm"`, the norm of the normalized noisy gradient, and
        `"clip_norm"`, the clip norm this step used with adaptive clipping (the root of
        the sum of squares of per-layer ones; NaN for a fixed clip norm). The last two
        are privatized; the loss and `num_nonfinite` are computed from the private
        batch, for monitoring: the plan's epsilon covers the model, not them.

        !!! example

            ```python
            import equinox as eqx
            import jax
            import jax.numpy as jnp
            import optax
            import eqx_micro.dp as dp

            loss = lambda model, batch, key: jnp.sum(model(batch["x"][0]) ** 2)
            grad_fn = dp.clipped_grad(loss, 1.0, key_argnum=2, return_values=True)
            plan = dp.DPSGDExecutionPlanConfig(
                iterations=5, sampling_prob=0.5, noise_multiplier=0.0
            ).make(grad_fn)
            trainer = dp.DPTrainer(plan, optax.sgd(0.1), normalize_by=2)
            state = trainer.init(eqx.nn.Linear(2, 2, key=jax.random.key(0)))
            batch = {"x": jnp.ones((4, 2))}
            is_padding = jnp.array([False, False, True, True])
            state, metrics = trainer.step(state, batch, is_padding, jax.random.key(1))
            assert state.step == 1 and metrics["loss"] > 0
            ```
        """
        # Only the computing part of the plan enters the compiled step: plans that
        # differ in their accounting (epsilon, noise multiplier) share its compilation.
        self._check_state(state)
        check_key(key, "key", "DPTrainer.step")
        return _step(
            self.plan.release,
            self.optimizer,
            self.normalize_by,
            state,
            batch,
            jnp.asarray(is_padding_example),
            key,
        )

    def privacy_report(self, steps: int, delta: Real) -> PrivacyReport:
        """The epsilon at `delta` after `steps` updates of the plan.

        For a partial run (`steps < plan.iterations`), the plan's self-composed event
        with its count cut to the rounds taken (one per step for DP-SGD, one per cycle
        of `num_bands` steps for amplified BandMF); any other event is reported whole,
        an upper bound. Accounted with the plan's accountant and neighboring relation.

        !!! example

            ```python
            import jax.numpy as jnp
            import optax
            import eqx_micro.dp as dp

            grad_fn = dp.clipped_grad(lambda w, x, key: jnp.sum(w * x), 1.0,
                                      key_argnum=2)
            plan = dp.DPSGDExecutionPlanConfig(
                iterations=100,
                sampling_prob=0.1,
                noise_multiplier=1.0,
                accountant=dp.Accountant.RDP,
            ).make(grad_fn)
            report = dp.DPTrainer(plan, optax.sgd(0.1)).privacy_report(40, 1e-5)
            event = dp.dpsgd_event(1.0, 40, sampling_prob=0.1)
            rdp = dp.Accountant.RDP
            assert report.epsilon == dp.compute_epsilon(event, 1e-5, accountant=rdp)
            ```
        """
        check_delta(delta)
        if isinstance(steps, bool) or not isinstance(steps, int | np.integer):
            raise TypeError(f"`privacy_report` needs `steps` to be an int, got {steps!r}.")
        if not 0 <= steps <= self.plan.iterations:
            raise ValueError(
                f"`privacy_report` got `steps={steps}`; it must be in [0, "
                f"{self.plan.iterations}] (the plan's `iterations`): the plan's event "
                "covers no more updates than that."
            )
        event = self.plan.event_for_steps(steps)
        if steps == 0:
            epsilon = 0.0
        else:
            epsilon = compute_epsilon(
                event,
                delta,
                accountant=self.plan.accountant,
                neighboring_relation=self.plan.neighboring_relation,
            )
        return PrivacyReport(
            epsilon=epsilon,
            delta=float(delta),
            steps=steps,
            iterations=self.plan.iterations,
            dp_event=event,
        )

    def fit(
        self,
        data: PyTree,
        model_or_state: PyTree,
        *,
        rng: RngLike,
        key: PRNGKeyArray,
        delta: Real | None = None,
        padding_multiple: int | None = None,
        callback: Callable[[TrainState, dict[str, Array]], Any] | None = None,
        progress: bool = True,
    ) -> tuple[PyTree, PrivacyReport]:
        """Trains for the plan's `iterations` steps; returns the model and its report.

        Draws the batches from `plan.batch_selection_strategy.batch_iterator(n, rng)`, pads
        each one with [`dp.pad_to_multiple_of`][eqx_micro.dp.pad_to_multiple_of] (padding
        placed for early stopping, so microbatches of pure padding are skipped) and gathers
        it with [`dp.gather_padded_batch`][eqx_micro.dp.gather_padded_batch]. An empty batch
        becomes one of pure padding: the step and its noise still run, as the accounting
        assumes.

        To resume, pass a [`dp.TrainState`][eqx_micro.dp.TrainState] (e.g. from a
        checkpoint) instead of a model, with `rng` in the state it had when the run began
        (e.g. the same seed): the first `state.step` batches are drawn again and skipped, so
        the resumed run gives the same model, bit for bit, as one that was never
        interrupted.

        **Arguments:**

        - `data`: a PyTree of arrays (NumPy or JAX) with the examples along axis 0.
        - `model_or_state`: the model to train, or a `dp.TrainState` to continue.
        - `rng`: the batch-selection randomness: a `np.random.Generator` or an int seed.
            It is part of the mechanism: keep it secret in a real release.
        - `key`: the PRNG key of the loss (e.g. dropout); step `t` uses
            `fold_in(key, t)`.
        - `delta`: the delta of the privacy report and the progress bar; required for
            a private plan. A non-private run (`DPTrainer.non_private`) may omit it: its
            report is then epsilon `inf` at delta 0.
        - `padding_multiple`: every batch is padded to a multiple of this (a multiple of
            the microbatch size). By default about twice the standard deviation of the
            batch size, so that the step compiles for a handful of sizes.
        - `callback`: called as `callback(state, metrics)` after every step (e.g. to save
            a checkpoint); returning True stops training there.
        - `progress`: show a progress bar (tqdm if installed, else printed lines) with
            the training loss and the epsilon spent so far.

        **Returns:**

        `(model, dp.PrivacyReport)`, the report for the steps taken.

        !!! example

            ```python
            import equinox as eqx
            import jax
            import jax.numpy as jnp
            import numpy as np
            import optax
            import eqx_micro.dp as dp

            loss = lambda model, batch, key: jnp.sum((model(batch["x"][0]) - 1.0) ** 2)
            grad_fn = dp.clipped_grad(loss, 1.0, key_argnum=2)
            plan = dp.DPSGDExecutionPlanConfig(
                iterations=20,
                sampling_prob=0.2,
                noise_multiplier=2.0,
                accountant=dp.Accountant.RDP,
            ).make(grad_fn)
            trainer = dp.DPTrainer(plan, optax.sgd(0.1), normalize_by=10)
            data = {"x": np.ones((50, 2), np.float32)}

            def stop_at_5(state, metrics):
                return state.step == 5

            model, report = trainer.fit(
                data, eqx.nn.Linear(2, 1, key=jax.random.key(0)), rng=0,
                key=jax.random.key(1), delta=1e-5, callback=stop_at_5, progress=False,
            )
            assert report.steps == 5
            assert report.epsilon < trainer.privacy_report(20, 1e-5).epsilon
            ```
        """
        private = not isinstance(self.plan.dp_event, dp_accounting.NonPrivateDpEvent)
        if delta is not None:
            check_delta(delta)
        elif private:
            raise ValueError(
                "`DPTrainer.fit` needs `delta` for a private plan: the run's epsilon is "
                "reported at it, e.g. `delta=1e-5` (below 1 / the number of examples)."
            )
        check_key(key, "key", "DPTrainer.fit")
        if callback is not None and not callable(callback):
            raise TypeError(
                "`DPTrainer.fit` needs `callback` to be a function "
                f"`callback(state, metrics)`, got {callback!r}."
            )
        num_examples = _num_examples(data)
        if isinstance(model_or_state, TrainState):
            state = model_or_state
            _check_no_batch_norm(state.model)
            params = eqx.filter(state.model, eqx.is_inexact_array)
            self.plan.noise_addition_transform.check_state(state.noise_state, params)
            self._check_clip_state(state.clip_state)
        else:
            state = self.init(model_or_state)
        start = int(state.step)
        iterations = self.plan.iterations
        if start > iterations:
            raise ValueError(
                f"`DPTrainer.fit` got a state at step {start}, past the plan's "
                f"`iterations={iterations}`."
            )
        strategy = self.plan.batch_selection_strategy
        microbatch_size = self.plan.clipped_aggregation_fn.microbatch_size
        if padding_multiple is None:
            padding_multiple = _default_multiple(
                strategy, num_examples, microbatch_size or 1
            )
        _check_padding_multiple(padding_multiple, microbatch_size)
        batches = strategy.batch_iterator(num_examples, rng)
        # Resuming: replay the sampler to where the state stopped.
        batches = itertools.islice(batches, start, None)
        report_at = functools.partial(self._report, delta=delta)
        bar = Progress(
            progress,
            iterations,
            start,
            (lambda steps: report_at(steps).epsilon) if private else None,
        )
        steps = start
        for indices in batches:
            padded = _pad(np.asarray(indices), padding_multiple, microbatch_size)
            batch, is_padding = gather_padded_batch(data, padded)
            state, metrics = self.step(state, batch, jnp.asarray(is_padding), key)
            steps += 1
            bar.update(steps, metrics)
            if callback is not None and callback(state, metrics):
                break
        report = report_at(steps)
        if state.clip_state is not None:
            clips = jtu.tree_map(float, state.clip_state.l2_clip_norm)
            report = dataclasses.replace(report, l2_clip_norm=clips)
        bar.close(report)
        return state.model, report

    def _report(self, steps: int, delta: Real | None) -> PrivacyReport:
        if delta is not None:
            return self.privacy_report(steps, delta)
        # Non-private, no delta asked: no epsilon holds at any delta but 0, trivially.
        return PrivacyReport(
            epsilon=math.inf,
            delta=0.0,
            steps=steps,
            iterations=self.plan.iterations,
            dp_event=self.plan.event_for_steps(steps),
        )


@eqx.filter_jit
def _step(
    release: NoisyRelease,
    optimizer: optax.GradientTransformation,
    normalize_by: Float[Array, ""],
    state: TrainState,
    batch: PyTree,
    is_padding_example: Bool[Array, " batch"],
    key: PRNGKeyArray,
) -> tuple[TrainState, dict[str, Array]]:
    key = jax.random.fold_in(key, state.step)
    clip_state = state.clip_state
    if clip_state is None:
        grads, noise_state, aux = release(
            state.noise_state,
            state.model,
            batch,
            key,
            is_padding_example=is_padding_example,
        )
        clip_norm = jnp.full((), jnp.nan, jnp.float32)
    else:
        # The clip norm this step used: the one the progress bar shows.
        clip_norm = optax.tree.norm(clip_state.l2_clip_norm)
        grads, noise_state, clip_state, aux = release.adaptive(
            state.noise_state,
            clip_state,
            state.model,
            batch,
            key,
            is_padding_example=is_padding_example,
        )
    grads = jtu.tree_map(
        lambda g: g / normalize_by.astype(g.dtype) if eqx.is_array(g) else g, grads
    )
    params = eqx.filter(state.model, eqx.is_inexact_array)
    updates, opt_state = optimizer.update(grads, state.opt_state, params)
    model = eqx.apply_updates(state.model, updates)
    new_state = TrainState(
        model=model,
        opt_state=opt_state,
        noise_state=noise_state,
        step=state.step + 1,
        clip_state=clip_state,
    )
    return new_state, {**_metrics(aux, is_padding_example, grads), "clip_norm": clip_norm}


def _metrics(
    aux: ClippedGradAux, is_padding_example: Bool[ArrayLike, " batch"], grads: PyTree
) -> dict[str, Array]:
    real = jnp.logical_not(jnp.asarray(is_padding_example))
    values = aux.values
    if eqx.is_array(values) and values.ndim == 1:
        count = jnp.maximum(jnp.sum(real), 1).astype(values.dtype)
        loss = jnp.sum(jnp.where(real, values, jnp.zeros_like(values))) / count
    else:
        loss = jnp.full((), jnp.nan, jnp.float32)
    return {
        "loss": loss,
        "num_nonfinite": aux.num_nonfinite,
        "noisy_grad_norm": optax.tree.norm(grads),
    }
