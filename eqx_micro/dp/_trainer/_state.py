"""What a training run carries from step to step, and what it reports at the end."""

import dp_accounting
import equinox as eqx
from jaxtyping import Array, Int, PyTree

from .._clipping._adaptive import AdaptiveClipState
from .._noise._base import AbstractNoiseState


class TrainState(eqx.Module):
    """Everything a training run carries from one step to the next.

    A checkpoint is this state, saved with `eqx.tree_serialise_leaves(path, state)` and
    read back with `eqx.tree_deserialise_leaves(path, trainer.init(model))`. Pass it to
    `DPTrainer.fit` with the batch-selection `rng` in its initial state (e.g. the same
    seed) to resume: the first `step` batches are drawn again and skipped, so the resumed
    run ends exactly where an uninterrupted one would.

    **Fields:**

    - `model`: the model being trained.
    - `opt_state`: the optimizer's state.
    - `noise_state`: the state of the plan's noise (its PRNG key and release count).
    - `step`: the number of updates made so far, an int32 scalar.
    - `clip_state`: with adaptive clipping, the
        [`dp.AdaptiveClipState`][eqx_micro.dp.AdaptiveClipState] (the current clip norms
        and the count noise's key); None for a fixed clip norm.

    !!! example

        ```python
        import equinox as eqx
        import jax
        import jax.numpy as jnp
        import optax
        import eqx_micro.dp as dp

        loss = lambda model, batch, key: jnp.sum(model(batch["x"][0]) ** 2)
        trainer = dp.DPTrainer.non_private(
            loss, optax.sgd(0.1), batch_size=4, iterations=10
        )
        model = eqx.nn.Linear(2, 1, key=jax.random.key(0))
        state = trainer.init(model)
        assert isinstance(state, dp.TrainState) and state.step == 0
        ```
    """

    model: PyTree
    opt_state: PyTree
    noise_state: AbstractNoiseState
    step: Int[Array, ""]
    clip_state: AdaptiveClipState | None = None


class PrivacyReport(eqx.Module):
    """The privacy spent by a training run: epsilon at `delta` for the steps taken.

    **Fields:**

    - `epsilon`: the epsilon of the steps taken, with the plan's accountant and
        neighboring relation (`inf` for a non-private run, 0 before any step).
    - `delta`: the delta it is computed at.
    - `steps`: the number of noisy updates made.
    - `iterations`: the number the plan allows (and its event accounts for).
    - `dp_event`: the `dp_accounting` event of the steps taken.
    - `l2_clip_norm`: with adaptive clipping, the clip norms at the end of the run
        (reported by `DPTrainer.fit`); else None.

    !!! example

        ```python
        import eqx_micro.dp as dp

        event = dp.dpsgd_event(1.0, 10, sampling_prob=0.1)
        report = dp.PrivacyReport(
            epsilon=1.0, delta=1e-5, steps=10, iterations=20, dp_event=event
        )
        assert report.steps < report.iterations
        ```
    """

    epsilon: float
    delta: float
    steps: int
    iterations: int
    dp_event: dp_accounting.DpEvent = eqx.field(static=True)
    l2_clip_norm: PyTree[float] | None = None
