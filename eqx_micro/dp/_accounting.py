"""Privacy accounting with `dp_accounting`: DP-SGD events, epsilon and calibration.

Accounting counts optimizer updates (releases of a noised gradient): microbatching and
gradient accumulation inside one update never change it.
"""

import copy
import enum
import math
from collections.abc import Callable

import dp_accounting
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
    noise_multiplier: Real, iterations: int, *, num_examples: int, batch_size: int
) -> dp_accounting.DpEvent:
    """DP-SGD with fixed-size batches sampled without replacement.

    Accounted with the RDP accountant under `REPLACE_ONE` (the only supported pair).

    !!! example

        ```python
        import eqx_micro.dp as dp

        event = dp.fixed_batch_dpsgd_event(1.0, 100, num_examples=1000, batch_size=10)
        replace_one = dp.NeighboringRelation.REPLACE_ONE
        epsilon = dp.compute_epsilon(
            event, 1e-5, accountant=dp.Accountant.RDP, neighboring_relation=replace_one
        )
        assert epsilon > 0
        ```
    """
    _check_common(noise_multiplier, iterations)
    if not 0 < batch_size <= num_examples:
        raise ValueError(
            f"`batch_size` must be in [1, num_examples={num_examples}], got {batch_size}."
        )
    return dp_accounting.SelfComposedDpEvent(
        dp_accounting.SampledWithoutReplacementDpEvent(
            num_examples, batch_size, dp_accounting.GaussianDpEvent(noise_multiplier)
        ),
        iterations,
    )


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
    raise TypeError(
        "`accountant` must be a `dp.Accountant` (`dp.Accountant.PLD` or "
        "`dp.Accountant.RDP`) or a `dp_accounting.PrivacyAccountant`, got "
        f"{accountant!r}."
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
    _check("delta", delta, 0.0, 1.0, closed_low=False)
    if delta == 1.0:
        raise ValueError("`delta` must be below 1, got 1.0.")
    fresh = _accountant(accountant, neighboring_relation)()
    if not fresh.supports(event):
        raise ValueError(
            f"The {type(fresh).__name__} does not support this event under "
            f"{neighboring_relation.name}; try another accountant or relation."
        )
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
        raise ValueError(f"`target_epsilon` must be > 0, got {target_epsilon}.")
    _check("target_delta", target_delta, 0.0, 1.0, closed_low=False)
    fresh_accountant = _accountant(accountant, neighboring_relation)
    bracket = None
    if accountant is Accountant.PLD:
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
