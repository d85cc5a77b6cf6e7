"""Privacy accounting with `dp_accounting`: DP-SGD events, epsilon and calibration.

Accounting counts optimizer updates (releases of a noised gradient): microbatching and
gradient accumulation inside one update never change it.
"""

import contextlib
import copy
import enum
import logging
import math
import threading
from collections.abc import Callable, Iterator
from typing import Any

import dp_accounting
import numpy as np
import scipy.stats
from dp_accounting import mechanism_calibration


NeighboringRelation = dp_accounting.NeighboringRelation


class Accountant(enum.Enum):
    """The `dp_accounting` accountant that turns a privacy event into epsilon.

    - `PLD`: privacy loss distributions, the tightest (the default).
    - `RDP`: Rényi DP, faster and looser.

    Wherever an `accountant` is taken, a configured `dp_accounting.PrivacyAccountant`
    instance works too (its type and settings are used afresh).

    !!! example

        ```python
        import eqx_micro.dp as dp

        event = dp.dpsgd_event(1.0, 100, sampling_prob=0.01)
        pld = dp.compute_epsilon(event, 1e-5, accountant=dp.Accountant.PLD)
        rdp = dp.compute_epsilon(event, 1e-5, accountant=dp.Accountant.RDP)
        assert pld <= rdp
        ```
    """

    PLD = "pld"
    RDP = "rdp"


# What an `accountant` argument takes.
AccountantLike = Accountant | dp_accounting.PrivacyAccountant
# A real number as users (and `dp_accounting`'s bisection) pass it.
Real = int | float


def check_delta(delta: Any, name: str = "delta") -> None:
    """The one rule for a delta, everywhere: a number in the open interval (0, 1)."""
    if isinstance(delta, bool) or not isinstance(delta, int | float | np.floating):
        raise TypeError(f"`{name}` must be a number in (0, 1), got {delta!r}.")
    if not 0 < delta < 1:
        raise ValueError(
            f"`{name}` must be in (0, 1), got {delta}: it is the probability that the "
            "epsilon guarantee fails, so 0 needs pure DP and 1 guarantees nothing."
        )


def check_relation(relation: Any, name: str = "neighboring_relation") -> None:
    """A `dp.NeighboringRelation` member, not a string or anything else."""
    if not isinstance(relation, NeighboringRelation):
        names = [f"`dp.NeighboringRelation.{r.name}`" for r in NeighboringRelation]
        members = ", ".join(names)
        raise TypeError(f"`{name}` must be one of {members}; got {relation!r}.")


def check_accountant(accountant: Any) -> None:
    """A `dp.Accountant` member or a `dp_accounting.PrivacyAccountant` instance."""
    if accountant in (Accountant.PLD, Accountant.RDP) or isinstance(
        accountant, dp_accounting.PrivacyAccountant
    ):
        return
    raise TypeError(
        "`accountant` must be a `dp.Accountant` (`dp.Accountant.PLD` or "
        "`dp.Accountant.RDP`) or a `dp_accounting.PrivacyAccountant`, got "
        f"{accountant!r}."
    )


def _check(name: str, value: Real, low: Real, high: Real, closed_low: bool) -> None:
    ok = (value >= low if closed_low else value > low) and value <= high
    if not ok or math.isnan(value):
        interval = f"{'[' if closed_low else '('}{low}, {high}]"
        raise ValueError(f"`{name}` must be in {interval}, got {value}.")


def _check_common(noise_multiplier: Real, iterations: int) -> None:
    if not noise_multiplier >= 0:
        raise ValueError(f"`noise_multiplier` must be >= 0, got {noise_multiplier}.")
    if iterations < 0:
        raise ValueError(f"`iterations` must be >= 0, got {iterations}.")


def dpsgd_event(
    noise_multiplier: Real, iterations: int, *, sampling_prob: Real
) -> dp_accounting.DpEvent:
    """The event of DP-SGD with Poisson sampling: `iterations` Gaussian releases.

    **Arguments:**

    - `noise_multiplier`: noise standard deviation over the clipped sum's sensitivity.
    - `iterations`: the number of noised updates.
    - `sampling_prob`: the probability that an example is in a batch, in (0, 1].

    **Returns:**

    `SelfComposedDpEvent(PoissonSampledDpEvent(q, GaussianDpEvent(sigma)), T)`.

    !!! example

        ```python
        import eqx_micro.dp as dp

        event = dp.dpsgd_event(3.0, 512, sampling_prob=0.1)
        epsilon = dp.compute_epsilon(event, 1e-6)
        assert abs(epsilon - 3.77) < 0.01
        ```
    """
    _check_common(noise_multiplier, iterations)
    _check("sampling_prob", sampling_prob, 0.0, 1.0, closed_low=False)
    return dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(
            sampling_prob, dp_accounting.GaussianDpEvent(noise_multiplier)
        ),
        iterations,
    )


def truncated_dpsgd_event(
    noise_multiplier: Real,
    iterations: int,
    *,
    sampling_prob: Real,
    num_examples: int,
    truncated_batch_size: int,
) -> dp_accounting.DpEvent:
    """DP-SGD with Poisson sampling truncated to at most `truncated_batch_size`.

    Needs the (public) number of examples; supported by the PLD accountant.

    !!! example

        ```python
        import eqx_micro.dp as dp

        event = dp.truncated_dpsgd_event(
            1.0, 100, sampling_prob=0.01, num_examples=10_000, truncated_batch_size=120
        )
        assert dp.compute_epsilon(event, 1e-5) > dp.compute_epsilon(
            dp.dpsgd_event(1.0, 100, sampling_prob=0.01), 1e-5
        )
        ```
    """
    _check_common(noise_multiplier, iterations)
    _check("sampling_prob", sampling_prob, 0.0, 1.0, closed_low=False)
    if num_examples <= 0 or truncated_batch_size <= 0:
        raise ValueError(
            "`num_examples` and `truncated_batch_size` must be positive, got "
            f"{num_examples} and {truncated_batch_size}."
        )
    return dp_accounting.SelfComposedDpEvent(
        dp_accounting.TruncatedSubsampledGaussianDpEvent(
            dataset_size=num_examples,
            sampling_probability=sampling_prob,
            truncated_batch_size=truncated_batch_size,
            noise_multiplier=noise_multiplier,
        ),
        iterations,
    )


def fixed_batch_dpsgd_event(
    noise_multiplier: Real,
    iterations: int,
    *,
    num_examples: int,
    batch_size: int,
    replace: bool = False,
) -> dp_accounting.DpEvent:
    """DP-SGD with fixed-size batches, drawn without (or with) replacement.

    Without replacement (`dp.FixedBatchSampling`), it is accounted by the RDP accountant
    under `REPLACE_ONE` (the pair `dp_accounting` supports). With replacement
    (`replace=True`, `dp.FixedBatchSampling(..., replace=True)`), an example is drawn
    `k ~ Binomial(batch_size, 1 / num_examples)` times in a batch and adds `k` clipped
    gradients; `dp_accounting` has no accountant for this event, so
    `dp.compute_epsilon` accounts it itself, under `REPLACE_SPECIAL` (zero-out, a public
    dataset size) with the PLD accountant: each step is the mixture of Gaussians
    `Σ_k P(k) N(k, σ²)` against `N(0, σ²)`, composed `iterations` times.

    !!! example

        ```python
        import eqx_micro.dp as dp

        event = dp.fixed_batch_dpsgd_event(1.0, 100, num_examples=1000, batch_size=10)
        replace_one = dp.NeighboringRelation.REPLACE_ONE
        epsilon = dp.compute_epsilon(
            event, 1e-5, accountant=dp.Accountant.RDP, neighboring_relation=replace_one
        )
        assert epsilon > 0
        drawn = dp.fixed_batch_dpsgd_event(
            1.0, 100, num_examples=1000, batch_size=10, replace=True
        )
        zero_out = dp.NeighboringRelation.REPLACE_SPECIAL
        assert dp.compute_epsilon(drawn, 1e-5, neighboring_relation=zero_out) > 0
        ```
    """
    _check_common(noise_multiplier, iterations)
    gaussian = dp_accounting.GaussianDpEvent(noise_multiplier)
    if replace:
        if num_examples < 1 or batch_size < 0:
            raise ValueError(
                f"`fixed_batch_dpsgd_event(replace=True)` needs `num_examples >= 1` and "
                f"`batch_size >= 0`, got {num_examples} and {batch_size}."
            )
        sampled = dp_accounting.SampledWithReplacementDpEvent(
            num_examples, batch_size, gaussian
        )
        return dp_accounting.SelfComposedDpEvent(sampled, iterations)
    if not 0 < batch_size <= num_examples:
        raise ValueError(
            f"`batch_size` must be in [1, num_examples={num_examples}] without "
            f"replacement, got {batch_size}; pass `replace=True` to draw with replacement."
        )
    return dp_accounting.SelfComposedDpEvent(
        dp_accounting.SampledWithoutReplacementDpEvent(num_examples, batch_size, gaussian),
        iterations,
    )


def _with_replacement_epsilon(
    event: dp_accounting.DpEvent,
    delta: Real,
    accountant: AccountantLike,
    neighboring_relation: NeighboringRelation,
) -> float | None:
    """Epsilon of DP-SGD with batches drawn with replacement, or None for other events.

    The number of draws of one example is `Binomial(batch_size, 1 / num_examples)`; its
    tail beyond `1e-14` of mass is put on the largest count kept (pessimistic)."""
    inner, count = event, 1
    if isinstance(inner, dp_accounting.SelfComposedDpEvent):
        inner, count = inner.event, inner.count
    if not (
        isinstance(inner, dp_accounting.SampledWithReplacementDpEvent)
        and isinstance(inner.event, dp_accounting.GaussianDpEvent)
    ):
        return None
    is_pld = accountant is Accountant.PLD or isinstance(
        accountant, dp_accounting.pld.PLDAccountant
    )
    if not is_pld or neighboring_relation != NeighboringRelation.REPLACE_SPECIAL:
        raise ValueError(
            "Batches drawn with replacement are accounted with `accountant="
            "dp.Accountant.PLD` under `neighboring_relation=dp.NeighboringRelation."
            "REPLACE_SPECIAL` (a public dataset size: the event is a mixture of "
            "Gaussians only there); got "
            f"{accountant!r} and {neighboring_relation.name}."
        )
    sigma = inner.event.noise_multiplier
    if count == 0 or inner.sample_size == 0:
        return 0.0
    if sigma == 0:
        return math.inf
    n, p = inner.sample_size, 1.0 / inner.source_dataset_size
    largest = int(scipy.stats.binom.isf(1e-14, n, p)) + 1
    counts = np.arange(largest + 1)
    probs = np.asarray(scipy.stats.binom.pmf(counts, n, p), dtype=float)
    probs[-1] += max(0.0, 1.0 - probs.sum())  # the tail, at the largest count kept
    # A pessimistic PLD (it rounds towards more privacy loss) on a coarser grid than
    # the PLD accountant's default: the mixture is slow to discretize finely.
    pld = dp_accounting.pld.privacy_loss_distribution.from_mixture_gaussian_mechanism(
        sigma,
        counts.astype(float).tolist(),
        (probs / probs.sum()).tolist(),
        value_discretization_interval=1e-3,
        log_mass_truncation_bound=-30,
    )
    return float(pld.self_compose(count).get_epsilon_for_delta(delta))


def amplified_bandmf_event(
    noise_multiplier: Real, iterations: int, *, num_bands: int, sampling_prob: Real
) -> dp_accounting.DpEvent:
    """BandMF with cyclic Poisson sampling over `num_bands` groups (amplified BandMF).

    Each example belongs to one of `num_bands` groups and can only join every
    `num_bands`-th step, where it joins with probability `sampling_prob`. Its
    participations then touch disjoint bands of the strategy, and the run is accounted
    as DP-SGD over `ceil(iterations / num_bands)` rounds at `sampling_prob`, with the
    noise multiplier taken relative to the sensitivity times the strategy's column norm
    (Choquette-Choo et al. 2023, Theorem 4).

    **Arguments:**

    - `noise_multiplier`: noise over (sensitivity x max column norm of the strategy).
    - `iterations`: the number of noised updates.
    - `num_bands`: the number of bands, which is also the cycle length of the sampling.
    - `sampling_prob`: the per-step probability for an example of the active group.

    !!! example

        ```python
        import eqx_micro.dp as dp

        event = dp.amplified_bandmf_event(1.0, 1000, num_bands=4, sampling_prob=0.1)
        assert event == dp.dpsgd_event(1.0, 250, sampling_prob=0.1)
        assert dp.amplified_bandmf_event(
            1.0, 1001, num_bands=4, sampling_prob=0.1
        ) == dp.dpsgd_event(1.0, 251, sampling_prob=0.1)
        ```
    """
    _check_bands(num_bands, iterations)
    rounds = math.ceil(iterations / num_bands)
    return dpsgd_event(noise_multiplier, rounds, sampling_prob=sampling_prob)


def truncated_amplified_bandmf_event(
    noise_multiplier: Real,
    iterations: int,
    *,
    num_bands: int,
    sampling_prob: Real,
    largest_group_size: int,
    truncated_batch_size: int,
) -> dp_accounting.DpEvent:
    """Amplified BandMF with each step's batch truncated to `truncated_batch_size`.

    Accounted as `truncated_dpsgd_event` over `ceil(iterations / num_bands)` rounds,
    with the dataset size replaced by the largest group's size.

    !!! example

        ```python
        import eqx_micro.dp as dp

        event = dp.truncated_amplified_bandmf_event(
            1.0, 100, num_bands=4, sampling_prob=0.1, largest_group_size=250,
            truncated_batch_size=40,
        )
        assert event == dp.truncated_dpsgd_event(
            1.0, 25, sampling_prob=0.1, num_examples=250, truncated_batch_size=40
        )
        ```
    """
    _check_bands(num_bands, iterations)
    return truncated_dpsgd_event(
        noise_multiplier,
        math.ceil(iterations / num_bands),
        sampling_prob=sampling_prob,
        num_examples=largest_group_size,
        truncated_batch_size=truncated_batch_size,
    )


def _check_bands(num_bands: int, iterations: int) -> None:
    if num_bands < 1 or num_bands > max(iterations, 1):
        raise ValueError(
            f"`num_bands` must be in [1, iterations={iterations}], got {num_bands}."
        )


def _accountant(
    accountant: AccountantLike, neighboring_relation: NeighboringRelation
) -> Callable[[], dp_accounting.PrivacyAccountant]:
    if accountant is Accountant.PLD:
        return lambda: dp_accounting.pld.PLDAccountant(neighboring_relation)
    if accountant is Accountant.RDP:
        return lambda: dp_accounting.rdp.RdpAccountant(
            neighboring_relation=neighboring_relation
        )
    if isinstance(accountant, dp_accounting.PrivacyAccountant):
        if accountant.ledger != dp_accounting.NoOpDpEvent():
            raise ValueError(
                "`accountant` has already composed events; pass a fresh accountant "
                "(its settings are copied for every computation)."
            )
        if accountant.neighboring_relation != neighboring_relation:
            raise ValueError(
                f"`accountant` accounts under {accountant.neighboring_relation.name} but "
                f"`neighboring_relation` is {neighboring_relation.name}; make them agree "
                "(the accountant's relation is the one it would use)."
            )
        return lambda: copy.deepcopy(accountant)
    check_accountant(accountant)
    raise AssertionError("unreachable: check_accountant refuses everything else")


# Below this noise multiplier the PLD accountant's loss grid (interval 1e-4, range
# about 1/(2 sigma^2)) takes minutes and gigabytes: measured 27 s and 1 GB at 0.1 for
# 100 steps, 94 s and 3 GB at 0.05, and no answer within 2 minutes at 0.03.
_PLD_SMALLEST_NOISE_MULTIPLIER = 0.1


def _noise_multipliers(event: dp_accounting.DpEvent) -> Iterator[float]:
    """The Gaussian noise multipliers inside `event` (the ones a PLD discretizes)."""
    if isinstance(
        event,
        dp_accounting.GaussianDpEvent | dp_accounting.TruncatedSubsampledGaussianDpEvent,
    ):
        yield event.noise_multiplier
    elif isinstance(
        event,
        dp_accounting.PoissonSampledDpEvent
        | dp_accounting.SampledWithReplacementDpEvent
        | dp_accounting.SampledWithoutReplacementDpEvent
        | dp_accounting.SelfComposedDpEvent,
    ):
        yield from _noise_multipliers(event.event)
    elif isinstance(event, dp_accounting.ComposedDpEvent):
        for inner in event.events:
            yield from _noise_multipliers(inner)


def _check_pld_affordable(event: dp_accounting.DpEvent) -> None:
    small = [s for s in _noise_multipliers(event) if 0 < s < _PLD_SMALLEST_NOISE_MULTIPLIER]
    if small:
        raise ValueError(
            f"`accountant=dp.Accountant.PLD` cannot account a noise multiplier of "
            f"{min(small):g}: below {_PLD_SMALLEST_NOISE_MULTIPLIER} its loss grid takes "
            "minutes and gigabytes (it grows as 1/sigma^2), and such noise gives an "
            "epsilon in the tens or hundreds. Pass `accountant=dp.Accountant.RDP` (fast "
            "at any noise), or a `dp_accounting.pld.PLDAccountant` with a coarser "
            "`value_discretization_interval` of your choosing."
        )


def compute_epsilon(
    event: dp_accounting.DpEvent,
    delta: Real,
    *,
    accountant: AccountantLike = Accountant.PLD,
    neighboring_relation: NeighboringRelation = NeighboringRelation.ADD_OR_REMOVE_ONE,
) -> float:
    """The epsilon of `event` at `delta`, from `dp_accounting`.

    **Arguments:**

    - `event`: a `dp_accounting.DpEvent`, e.g. from `dpsgd_event`.
    - `delta`: in (0, 1).
    - `accountant`: a [`dp.Accountant`][eqx_micro.dp.Accountant] (default `PLD`, the
        tightest) or a `dp_accounting.PrivacyAccountant` whose type is used afresh.
    - `neighboring_relation`: `ADD_OR_REMOVE_ONE` (default), `REPLACE_ONE` or
        `REPLACE_SPECIAL`.

    **Returns:**

    Epsilon, a float.

    !!! example

        ```python
        import eqx_micro.dp as dp

        event = dp.dpsgd_event(1.1, 14062, sampling_prob=256 / 60000)
        assert abs(dp.compute_epsilon(event, 1e-5) - 2.382) < 0.01
        rdp = dp.compute_epsilon(event, 1e-5, accountant=dp.Accountant.RDP)
        assert abs(rdp - 2.597) < 0.01
        ```
    """
    if not isinstance(event, dp_accounting.DpEvent):
        raise TypeError(
            "`compute_epsilon` needs `event` to be a `dp_accounting.DpEvent` (e.g. from "
            f"`dp.dpsgd_event`), got {event!r} of type {type(event).__name__}."
        )
    check_delta(delta)
    check_relation(neighboring_relation)
    check_accountant(accountant)
    if accountant is Accountant.PLD:
        _check_pld_affordable(event)
    drawn = _with_replacement_epsilon(event, delta, accountant, neighboring_relation)
    if drawn is not None:
        return drawn
    fresh = _accountant(accountant, neighboring_relation)()
    if not fresh.supports(event):
        raise ValueError(
            f"The {type(fresh).__name__} does not support this event under "
            f"{neighboring_relation.name}; try another accountant or relation."
        )
    with _quiet():
        return float(fresh.compose(event).get_epsilon(delta))


def calibrate_noise_multiplier(
    make_event: Callable[[float], dp_accounting.DpEvent],
    target_epsilon: Real,
    target_delta: Real,
    *,
    accountant: AccountantLike = Accountant.PLD,
    neighboring_relation: NeighboringRelation = NeighboringRelation.ADD_OR_REMOVE_ONE,
    tol: Real = 1e-3,
) -> float:
    """The smallest noise multiplier whose event meets `(target_epsilon, target_delta)`.

    A bisection by `dp_accounting.calibrate_dp_mechanism`; the result re-accounts to at
    most `target_epsilon`.

    **Arguments:**

    - `make_event`: noise multiplier -> `DpEvent`, e.g.
        `lambda s: dp.dpsgd_event(s, T, sampling_prob=q)`.
    - `target_epsilon`: > 0. `target_delta`: in (0, 1).
    - `accountant`, `neighboring_relation`: as in `compute_epsilon`.
    - `tol`: the bisection's tolerance on the noise multiplier.

    !!! example

        ```python
        import eqx_micro.dp as dp

        make = lambda s: dp.dpsgd_event(s, 512, sampling_prob=0.1)
        sigma = dp.calibrate_noise_multiplier(make, 1.0, 1e-6)
        assert abs(sigma - 9.66) < 0.02
        assert dp.compute_epsilon(make(sigma), 1e-6) <= 1.0
        ```
    """
    if not target_epsilon > 0:
        raise ValueError(
            f"`calibrate_noise_multiplier` got `target_epsilon={target_epsilon}`; it "
            "must be a positive number (epsilon 0 would need infinite noise)."
        )
    check_delta(target_delta, "target_delta")
    check_relation(neighboring_relation)
    fresh_accountant = _accountant(accountant, neighboring_relation)
    with _quiet():
        sigma = _search(
            fresh_accountant,
            make_event,
            target_epsilon,
            target_delta,
            accountant is Accountant.PLD,
            neighboring_relation,
            tol,
        )
    return float(sigma)


def _search(
    fresh_accountant: Callable[[], dp_accounting.PrivacyAccountant],
    make_event: Callable[[float], dp_accounting.DpEvent],
    target_epsilon: Real,
    target_delta: Real,
    pld: bool,
    neighboring_relation: NeighboringRelation,
    tol: Real,
) -> float:
    """`calibrate_noise_multiplier`'s bisection."""
    bracket = None
    if pld:
        # The default PLD grid is slow to evaluate at small sigmas. A search on a 100x
        # coarser grid is cheap and lands close to the answer, so the exact search
        # starts from a narrow bracket around it: fewer exact evaluations, the same
        # result (and a search from scratch if the bracket misses).
        coarse = dp_accounting.calibrate_dp_mechanism(
            lambda: dp_accounting.pld.PLDAccountant(
                neighboring_relation, value_discretization_interval=1e-2
            ),
            make_event,
            target_epsilon,
            target_delta,
            tol=tol / 10,
        )
        if coarse is not None:  # None: the coarse search did not converge.
            low, high = 0.98 * coarse, 1.02 * coarse
            bracket = mechanism_calibration.ExplicitBracketInterval(low, high)
    try:
        sigma = dp_accounting.calibrate_dp_mechanism(
            fresh_accountant,
            make_event,
            target_epsilon,
            target_delta,
            bracket_interval=bracket,
            tol=tol,
        )
    except ValueError:
        if bracket is None:
            raise
        # The coarse answer was further off than the bracket: search from scratch.
        sigma = dp_accounting.calibrate_dp_mechanism(
            fresh_accountant, make_event, target_epsilon, target_delta, tol=tol
        )
    return float(sigma)


class _Silence(threading.local):
    """How deep this thread is in our accounting calls (the progress bar accounts in a
    background thread while the main thread may account too)."""

    depth = 0


_SILENCE = _Silence()


class _QuietAccounting(logging.Filter):
    """Drops `dp_accounting`'s messages below ERROR (e.g. the RDP orders it skips)
    logged while this thread is inside our accounting; other logging is untouched."""

    def filter(self, record: logging.LogRecord) -> bool:
        return _SILENCE.depth == 0 or record.levelno >= logging.ERROR


# dp_accounting logs through absl, whose records go to the "absl" logger. A filter
# (not a level change) is per thread and leaves the logger's level alone.
logging.getLogger("absl").addFilter(_QuietAccounting())


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silences `dp_accounting`'s log messages, which a user asking for an epsilon did
    not ask for; errors still raise."""
    _SILENCE.depth += 1
    try:
        yield
    finally:
        _SILENCE.depth -= 1
