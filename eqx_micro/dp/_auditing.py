"""Empirical privacy auditing: lower bounds on epsilon from canaries' attack scores.

An audit trains with some canaries included ("in") and others held out ("out"), scores
every canary with a membership attack, and asks how well the scores tell the two groups
apart. Any (epsilon, delta)-DP mechanism limits that: at every decision threshold,
`TPR <= e^epsilon * FPR + delta`. A separation stronger than the claim allows, beyond
what chance explains at the given significance, refutes the claim, so the largest
refuted epsilon is a lower bound on the implementation's true epsilon. An audit can
show that a mechanism leaks more than it claims; it can never show that it is private.

The names, arguments, defaults and numbers are those of `jax_privacy.auditing` (2.0).
All of it runs on the host with NumPy and SciPy: it is analysis, not training.
"""

import abc
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import dp_accounting
import equinox as eqx
import numpy as np
import scipy.optimize
import scipy.special
import scipy.stats
from jaxtyping import ArrayLike, Float64, Int, Real


# `audit(auditor, significance, threshold) -> (epsilon, threshold)`: see
# `AbstractThresholdStrategy`.
AuditFn = Callable[["CanaryScoreAuditor", float, float | None], tuple[float, float]]

# The root search stops when epsilon is known to this absolute precision.
_EPSILON_XTOL = 1e-6


# ------------------------------------------------------------------- argument checks


def _real(owner: str, name: str, value: Any) -> float:
    if isinstance(value, bool | np.bool_) or not isinstance(
        value, int | float | np.integer | np.floating
    ):
        raise TypeError(
            f"`{owner}` needs `{name}` to be a real number, got {value!r} of type "
            f"{type(value).__name__}."
        )
    return float(value)


def _check_significance(owner: str, value: Any, upper: float = 1.0) -> float:
    significance = _real(owner, "significance", value)
    if not 0 < significance < upper:
        raise ValueError(
            f"`{owner}` got `significance={value}`; it must be in (0, {upper:g}): the "
            "allowed probability that the bound is wrong (one minus the confidence), "
            "e.g. `significance=0.05` for 95% confidence."
        )
    return significance


def _check_delta(owner: str, value: Any, allow_zero: bool) -> float:
    delta = _real(owner, "delta", value)
    low_ok = 0 <= delta if allow_zero else 0 < delta
    if not (low_ok and delta <= 1):
        interval = "[0, 1]" if allow_zero else "(0, 1]"
        raise ValueError(
            f"`{owner}` got `delta={value}`; it must be in {interval}: the delta of "
            "the (epsilon, delta) claim under test, e.g. `delta=1e-5`."
        )
    return delta


def _check_bool(owner: str, name: str, value: Any) -> bool:
    if not isinstance(value, bool | np.bool_):
        raise TypeError(f"`{owner}` needs `{name}` to be True or False, got {value!r}.")
    return bool(value)


def _check_int(owner: str, name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool | np.bool_) or not isinstance(value, int | np.integer):
        raise TypeError(
            f"`{owner}` needs `{name}` to be an int, got {value!r} of type "
            f"{type(value).__name__}."
        )
    if value < minimum:
        raise ValueError(f"`{owner}` got `{name}={value}`; it must be at least {minimum}.")
    return int(value)


def _check_seed(owner: str, seed: Any) -> None:
    if seed is not None:
        _check_int(owner, "seed", seed, 0)


def _check_fraction(owner: str, frac: Any) -> None:
    value = _real(owner, "threshold_estimation_frac", frac)
    if not 0 < value < 1:
        raise ValueError(
            f"`{owner}` got `threshold_estimation_frac={frac}`; it must be in (0, 1): "
            "the share of the canaries that picks the threshold (the rest bound "
            "epsilon at it), e.g. 0.5."
        )


def _float_if_real(value: Any) -> Any:
    # A converter: real numbers become floats; anything else is left for the checks.
    if isinstance(value, int | float | np.integer | np.floating) and not isinstance(
        value, bool | np.bool_
    ):
        return float(value)
    return value


def _as_scores(scores: Any, name: str) -> np.ndarray:
    try:
        array = np.asarray(scores)
    except (TypeError, ValueError) as error:
        raise ValueError(
            f"`CanaryScoreAuditor` could not read `{name}` as an array ({error}); pass "
            "a 1-D array or list with one score per canary."
        ) from error
    if array.dtype.kind not in "iuf":
        raise TypeError(
            f"`CanaryScoreAuditor` needs `{name}` to hold real numbers, got dtype "
            f"{array.dtype}. Scores are numbers where higher means 'in' (e.g. a "
            "log-likelihood); cast booleans with `.astype(float)`."
        )
    if array.ndim != 1:
        raise ValueError(
            f"`CanaryScoreAuditor` needs `{name}` to be 1-D, one score per canary, got "
            f"shape {array.shape}. Flatten it (`np.ravel`) if every entry is one "
            "canary's score."
        )
    if array.size == 0:
        raise ValueError(
            f"`CanaryScoreAuditor` got an empty `{name}`; an audit needs at least one "
            f"score of each kind (held-in and held-out canaries)."
        )
    finite = np.isfinite(array)
    if not finite.all():
        bad = np.flatnonzero(~finite)
        raise ValueError(
            f"`CanaryScoreAuditor` got {bad.size} non-finite score(s) (NaN or ±inf) in "
            f"`{name}`, the first at index {bad[0]} ({array[bad[0]]}). A NaN usually "
            "means the attack failed on that canary: fix or drop those scores."
        )
    return array.astype(np.float64)


# --------------------------------------------------------------- statistics helpers


def _clopper_pearson_upper(
    successes: np.ndarray, trials: int | np.integer | np.ndarray, significance: float
) -> np.ndarray:
    """The one-sided Clopper-Pearson upper confidence bound on a binomial probability.

    `P(Binomial(trials, p) <= successes) = significance` at the bound; 1 where every
    trial succeeded. Elementwise over 1-D `successes` (and `trials`, if an array).
    """
    successes = np.asarray(successes)
    trials = np.broadcast_to(trials, successes.shape)
    upper = np.ones(successes.shape)
    below = successes < trials
    k, n = successes[below], trials[below]
    upper[below] = scipy.stats.beta.ppf(1 - significance, k + 1, n - k)
    return upper


def _hull_indices(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """The corners of the upper convex hull of points sorted by `x` (ties by `y`).

    Andrew's monotone chain. A point on a straight edge between two others is dropped:
    every kept point is strictly above the chord of its neighbours.
    """
    # A corner of the hull is in particular a corner of its two neighbours. This
    # vectorized test leaves about a quarter of an ROC staircase's points to the
    # Python loop below, where the time goes.
    dx, dy = np.diff(x), np.diff(y)
    turns = dy[:-1] * dx[1:] > dy[1:] * dx[:-1]
    candidates = np.flatnonzero(np.concatenate([[True], turns, [True]]))
    xs, ys = x[candidates].tolist(), y[candidates].tolist()
    hull: list[int] = []
    for i, (xi, yi) in enumerate(zip(xs, ys)):
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            if (ys[b] - ys[a]) * (xi - xs[b]) > (yi - ys[b]) * (xs[b] - xs[a]):
                break
            hull.pop()
        hull.append(i)
    return candidates[hull]


def _roc_hull(
    in_scores: np.ndarray, out_scores: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The thresholds on the convex hull of the ROC curve, with TN and FN counts.

    A canary is guessed "in" when its score is at least the threshold. Every distinct
    score is a threshold, and `inf` (guess nothing) closes the curve. Keeping the hull
    only is what allows a classifier to randomize between two thresholds, and it keeps
    collinear thresholds from inflating a Bonferroni correction.
    """
    thresholds = np.append(np.unique(np.concatenate([in_scores, out_scores])), np.inf)
    fn_counts = np.searchsorted(np.sort(in_scores), thresholds, side="left")
    tn_counts = np.searchsorted(np.sort(out_scores), thresholds, side="left")
    keep = _hull_indices(fn_counts, tn_counts)
    return thresholds[keep], tn_counts[keep], fn_counts[keep]


def _tpr_at_fpr(fpr: np.ndarray, tp_counts: np.ndarray, fp_counts: np.ndarray) -> Any:
    """The TPR on the hull at each `fpr`, interpolating between its corners.

    `tp_counts` and `fp_counts` are increasing (from the threshold `inf` down).
    """
    target = fp_counts[-1] * fpr
    right = np.minimum(np.searchsorted(fp_counts, target, side="right"), fp_counts.size - 1)
    left = right - 1
    weight = (target - fp_counts[left]) / (fp_counts[right] - fp_counts[left])
    tp = tp_counts[left] + weight * (tp_counts[right] - tp_counts[left])
    return tp / tp_counts[-1]


def _raw_counts_epsilon(
    tp_counts: np.ndarray, fp_counts: np.ndarray, min_count: int, delta: float
) -> float:
    """`max log((TPR - delta) / FPR)` over the hull where at least `min_count` FPs."""
    n_neg = fp_counts[-1]
    if min_count >= n_neg:
        return 0.0
    min_fpr = min_count / n_neg
    tpr_at_min = float(_tpr_at_fpr(np.asarray(min_fpr), tp_counts, fp_counts))
    with np.errstate(divide="ignore"):  # log(0) = -inf: no evidence at that point.
        if delta == 0:
            return float(np.log(tpr_at_min / min_fpr))
        # The interpolated point at exactly `min_count` FPs is often the best one.
        start = 0.0
        if tpr_at_min > delta:
            start = max(0.0, float(np.log(tpr_at_min - delta) - np.log(min_fpr)))
        tpr, fpr = tp_counts / tp_counts[-1], fp_counts / n_neg
        usable = (fp_counts >= min_count) & (tpr > delta)
        ratios = np.log(tpr[usable] - delta) - np.log(fpr[usable])
    return float(np.max(ratios, initial=start))


def _brent_root(f: Callable[[float], float], lo: float, hi: float, xtol: float) -> float:
    # Annotated: SciPy's stubs type `brentq` as possibly returning a tuple.
    root: Any = scipy.optimize.brentq(f, lo, hi, xtol=xtol)
    return float(root)


def _largest_refuted_epsilon(objective: Callable[[float], float], eps_lo: float) -> float:
    """The root of `objective` (positive where a claim is refuted) above `eps_lo`.

    Returns `eps_lo` if nothing at or above it is refuted; otherwise doubles an upper
    end until the claim holds there, then bisects (Brent) to `_EPSILON_XTOL`.
    """
    if objective(eps_lo) <= 0:
        return eps_lo
    eps_hi = max(1.0, 2 * eps_lo)
    while objective(eps_hi) > 0:
        eps_lo, eps_hi = eps_hi, 2 * eps_hi
    return _brent_root(objective, eps_lo, eps_hi, _EPSILON_XTOL)


def _one_run_p_value(
    m: int, n_guess: int, n_correct: int, eps: float, delta: float
) -> float:
    """How likely `n_correct` right out of `n_guess` guesses are under (eps, delta)-DP.

    Theorems 3 and 4 of Steinke, Nasr and Jagielski (2023), with `m` canaries each
    included independently with probability 1/2. For pure DP each guess is right with
    probability at most `e^eps / (1 + e^eps)`; delta adds a term `2 m delta` weighted
    by the worst average binomial mass just below `n_correct`.
    """
    right = scipy.special.expit(eps)
    tail = scipy.stats.binom.sf(n_correct - 1, n_guess, right)
    if delta == 0:
        return float(tail)
    shortfall = np.arange(1, n_correct + 1)
    mass_below = scipy.stats.binom.sf(n_correct - shortfall - 1, n_guess, right) - tail
    worst = np.max(mass_below / shortfall, initial=0)
    return float(min(tail + worst * delta * 2 * m, 1))


def _one_run_epsilon(
    eps_lo: float, m: int, n_guess: int, n_correct: int, significance: float, delta: float
) -> float:
    """The largest epsilon (at least `eps_lo`) that one guess count refutes."""
    # With delta = 0 the p-value is smallest; if that is not significant, stop early.
    if _one_run_p_value(m, n_guess, n_correct, eps_lo, 0.0) > significance:
        return eps_lo
    return _largest_refuted_epsilon(
        lambda eps: significance - _one_run_p_value(m, n_guess, n_correct, eps, delta),
        eps_lo,
    )


@functools.lru_cache(maxsize=1024)
def _gaussian_sigma(eps: float, delta: float) -> float:
    # The Gaussian mechanism's noise (sensitivity 1) that is exactly (eps, delta)-DP.
    return dp_accounting.get_sigma_gaussian(eps, delta)


def _gaussian_blow_up_inverse(eps: float, delta: float, x: float) -> float:
    """The inverse blow-up of the Gaussian trade-off curve that is (eps, delta)-tight."""
    sigma = _gaussian_sigma(eps, delta)
    if sigma == 0:
        return float(x == 1.0)
    return float(scipy.stats.norm.cdf(scipy.stats.norm.ppf(x) - 1 / sigma))


def _one_run_fdp_epsilon(
    eps_lo: float, m: int, n_guess: int, n_correct: int, significance: float, delta: float
) -> float:
    """The largest epsilon (at least `eps_lo`) refuted through the Gaussian f-DP curve.

    The recursion of Mahloujifar, Melis and Chaudhuri (2024) ("audit with cap"): at
    each step the wrong-guess budget `h` and the right-guess budget `r` grow as the
    trade-off curve forces; the claim is refuted if the budgets end below the guesses.
    """

    def objective(eps: float) -> float:
        r = significance * n_correct / m
        h = significance * (n_guess - n_correct) / m
        for i in range(n_correct - 1, -1, -1):
            h_next = max(h, _gaussian_blow_up_inverse(eps, delta, r))
            if h_next == h:
                break  # A fixed point: neither budget moves again.
            r = min(r + (i / (n_guess - i)) * (h_next - h), 1.0)
            h = h_next
        return r + h - n_guess / m

    return _largest_refuted_epsilon(objective, eps_lo)


def _best_ratio(
    tpr_lower: np.ndarray, fpr_upper: np.ndarray, delta: float
) -> tuple[float, int]:
    """`max(0, log((TPR - delta) / FPR))` over the thresholds, and where (or -1)."""
    usable = np.flatnonzero(tpr_lower > delta)
    if usable.size == 0:
        return 0.0, -1
    ratios = np.log(tpr_lower[usable] - delta) - np.log(fpr_upper[usable])
    best = int(np.argmax(ratios))
    return max(0.0, float(ratios[best])), int(usable[best])


def _log_sub(x: float, y: float) -> float:
    """`log(e^x - e^y)`, stably; `-inf` where rounding puts `y` at or above `x`."""
    if y >= x:
        return -math.inf
    return x + math.log1p(-math.exp(y - x))


# ------------------------------------------------------------- threshold strategies


class AbstractThresholdStrategy(eqx.Module):
    """How an epsilon bound picks its decision threshold (multiple testing).

    Testing every threshold and keeping the best one overstates the evidence; each
    strategy keeps the bound valid at the requested significance in its own way:
    [`dp.Bonferroni`][eqx_micro.dp.Bonferroni] (all thresholds, corrected),
    [`dp.Explicit`][eqx_micro.dp.Explicit] (one threshold fixed in advance),
    [`dp.Split`][eqx_micro.dp.Split] and [`dp.MultiSplit`][eqx_micro.dp.MultiSplit]
    (choose on some canaries, bound on the others). `dp.ThresholdStrategy` is
    jax_privacy's name for this class.

    To write your own, subclass it and implement one method:

    - `bound(audit, auditor, significance)`: returns the epsilon lower bound, valid with
        probability at least `1 - significance`. `auditor` is the
        [`dp.CanaryScoreAuditor`][eqx_micro.dp.CanaryScoreAuditor] with all the scores
        (build others from parts of `auditor.in_canary_scores` and
        `auditor.out_canary_scores`). `audit(some_auditor, level, threshold)` returns
        `(epsilon, threshold)`, the method's bound at significance `level` for that
        auditor's scores: at the given `threshold` (a float), or with `threshold=None`
        the best over all `some_auditor.num_thresholds` thresholds *uncorrected*, with
        the threshold that gave it.

    !!! example

        ```python
        import numpy as np
        import eqx_micro.dp as dp

        class EitherOf(dp.AbstractThresholdStrategy):
            # Two thresholds fixed in advance; the union bound halves the significance.
            low: float
            high: float

            def bound(self, audit, auditor, significance):
                return max(
                    audit(auditor, significance / 2, t)[0] for t in (self.low, self.high)
                )

        rng = np.random.default_rng(0)
        auditor = dp.CanaryScoreAuditor(rng.normal(2, 1, 500), rng.normal(0, 1, 500))
        strategy = EitherOf(low=1.0, high=3.0)
        either = auditor.epsilon_clopper_pearson(0.05, threshold_strategy=strategy)
        # The better of the two thresholds, each tested at significance 0.025.
        assert either == max(
            auditor.epsilon_clopper_pearson(0.025, threshold_strategy=dp.Explicit(t))
            for t in (1.0, 3.0)
        )
        ```
    """

    @abc.abstractmethod
    def bound(
        self, audit: AuditFn, auditor: "CanaryScoreAuditor", significance: float
    ) -> float:
        """The epsilon lower bound at `significance`; see the class docstring."""


ThresholdStrategy = AbstractThresholdStrategy


class Bonferroni(AbstractThresholdStrategy):
    """Tests every threshold on the ROC hull, dividing the significance by their number.

    The default: no canaries are spent on choosing a threshold, and the correction
    costs little, as the bounds move with the log of the significance.

    !!! example

        ```python
        import numpy as np
        import eqx_micro.dp as dp

        rng = np.random.default_rng(0)
        auditor = dp.CanaryScoreAuditor(rng.normal(2, 1, 1000), rng.normal(0, 1, 1000))
        eps = auditor.epsilon_clopper_pearson(0.05, threshold_strategy=dp.Bonferroni())
        assert eps == auditor.epsilon_clopper_pearson(0.05)  # the default
        assert 2.5 < eps < 3.5
        ```
    """

    def bound(
        self, audit: AuditFn, auditor: "CanaryScoreAuditor", significance: float
    ) -> float:
        """The best bound over all `auditor.num_thresholds` thresholds, corrected.

        !!! example

            ```python
            import eqx_micro.dp as dp

            auditor = dp.CanaryScoreAuditor([2.0, 3.0, 4.0], [0.0, 1.0])
            def audit(a, level, threshold):
                return level, 0.0  # Shows the significance each threshold is tested at.
            assert dp.Bonferroni().bound(audit, auditor, 0.06) == 0.06 / 3
            ```
        """
        return audit(auditor, significance / auditor.num_thresholds, None)[0]


class Explicit(AbstractThresholdStrategy):
    """Bounds epsilon at one threshold, chosen before looking at the scores.

    **Arguments:**

    - `threshold`: guess "in" for scores at least this; a real number (`inf` guesses
        nothing).

    !!! example

        ```python
        import numpy as np
        import eqx_micro.dp as dp

        rng = np.random.default_rng(0)
        auditor = dp.CanaryScoreAuditor(rng.normal(2, 1, 1000), rng.normal(0, 1, 1000))
        eps = auditor.epsilon_one_run(0.05, 1e-5, threshold_strategy=dp.Explicit(2.0))
        assert 2 < eps < 3
        ```
    """

    threshold: float = eqx.field(static=True, converter=_float_if_real)

    def __check_init__(self):
        value = _real("Explicit", "threshold", self.threshold)
        if math.isnan(value):
            raise ValueError(
                "`Explicit` got `threshold=nan`; pass the score from which a canary is "
                "guessed 'in' (a real number, `inf` for none)."
            )

    def bound(
        self, audit: AuditFn, auditor: "CanaryScoreAuditor", significance: float
    ) -> float:
        """The bound at `threshold`, at the full significance.

        !!! example

            ```python
            import eqx_micro.dp as dp

            auditor = dp.CanaryScoreAuditor([2.0, 3.0], [0.0, 1.0])
            def audit(a, level, threshold):
                return threshold, threshold
            assert dp.Explicit(1.5).bound(audit, auditor, 0.05) == 1.5
            ```
        """
        return audit(auditor, significance, self.threshold)[0]


def _split_epsilon(
    audit: AuditFn,
    auditor: "CanaryScoreAuditor",
    significance: float,
    frac: float,
    seed: int | None,
) -> float:
    """Picks the threshold on a random `frac` of each kind of canary, bounds on the rest."""
    rng = np.random.default_rng(seed)
    parts = []
    for name, scores in (
        ("held-in", auditor.in_canary_scores),
        ("held-out", auditor.out_canary_scores),
    ):
        order = rng.permutation(scores.size)
        cut = int(scores.size * frac)
        if cut == 0 or cut == scores.size:
            raise ValueError(
                f"`threshold_estimation_frac={frac}` splits the {scores.size} {name} "
                f"scores into {cut} and {scores.size - cut}; both parts need at least "
                "one. Use more canaries, another fraction, or `dp.Bonferroni()`."
            )
        parts.append((scores[order[:cut]], scores[order[cut:]]))
    (in_fit, in_test), (out_fit, out_test) = parts
    _, threshold = audit(CanaryScoreAuditor(in_fit, out_fit), significance, None)
    epsilon, _ = audit(CanaryScoreAuditor(in_test, out_test), significance, threshold)
    return epsilon


class Split(AbstractThresholdStrategy):
    """Chooses the threshold on a random part of the canaries, bounds on the rest.

    The threshold is the best one for the first part (no correction needed, since the
    other part tests it once), at the price of bounding with fewer canaries.

    **Arguments:**

    - `threshold_estimation_frac`: the share, in `(0, 1)`, of each kind of canary
        used to choose the threshold.
    - `seed`: a non-negative int seed of the random split, or None for fresh entropy.

    !!! example

        ```python
        import numpy as np
        import eqx_micro.dp as dp

        rng = np.random.default_rng(0)
        auditor = dp.CanaryScoreAuditor(rng.normal(2, 1, 1000), rng.normal(0, 1, 1000))
        split = dp.Split(threshold_estimation_frac=0.3, seed=0)
        eps = auditor.epsilon_clopper_pearson(0.05, threshold_strategy=split)
        assert eps == auditor.epsilon_clopper_pearson(0.05, threshold_strategy=split)
        assert 2.5 < eps < 3.5
        ```
    """

    threshold_estimation_frac: float = eqx.field(
        static=True, default=0.5, converter=_float_if_real
    )
    seed: int | None = eqx.field(static=True, default=None)

    def __check_init__(self):
        _check_fraction("Split", self.threshold_estimation_frac)
        _check_seed("Split", self.seed)

    def bound(
        self, audit: AuditFn, auditor: "CanaryScoreAuditor", significance: float
    ) -> float:
        """The bound on the held-back part at the threshold the other part chose.

        !!! example

            ```python
            import eqx_micro.dp as dp

            auditor = dp.CanaryScoreAuditor([2.0, 3.0, 4.0, 5.0], [0.0, 1.0])
            sizes = []
            def audit(a, level, threshold):
                sizes.append(a.in_canary_scores.size)
                return 0.0, 2.5
            dp.Split(0.5, seed=0).bound(audit, auditor, 0.05)
            assert sizes == [2, 2]
            ```
        """
        return _split_epsilon(
            audit, auditor, significance, self.threshold_estimation_frac, self.seed
        )


class MultiSplit(AbstractThresholdStrategy):
    """The median of `Split` bounds over many random splits, each at half the significance.

    One split's bound depends on the luck of the split. Twice the median of p-values
    is a valid p-value (Meinshausen, Meier and Bühlmann, 2009, Theorem 3.1), so the
    median of the bounds at `significance / 2` is valid at `significance`.

    **Arguments:**

    - `num_samples`: the number of random splits, at least 1.
    - `threshold_estimation_frac`: as for `dp.Split`.
    - `seed`: a non-negative int seed for the splits' seeds, or None for fresh entropy.

    !!! example

        ```python
        import numpy as np
        import eqx_micro.dp as dp

        rng = np.random.default_rng(0)
        auditor = dp.CanaryScoreAuditor(rng.normal(2, 1, 300), rng.normal(0, 1, 300))
        multi = dp.MultiSplit(num_samples=5, seed=0)
        assert 0 < auditor.epsilon_clopper_pearson(0.05, threshold_strategy=multi) < 3
        ```

    ??? cite "References"

        ```bibtex
        @article{meinshausen2009pvalues,
            title={P-Values for High-Dimensional Regression},
            author={Meinshausen, Nicolai and Meier, Lukas and B{\\"u}hlmann, Peter},
            journal={Journal of the American Statistical Association},
            volume={104},
            number={488},
            pages={1671--1681},
            year={2009},
            url={https://arxiv.org/abs/0811.2177}
        }
        ```
    """

    num_samples: int = eqx.field(static=True, default=100)
    threshold_estimation_frac: float = eqx.field(
        static=True, default=0.5, converter=_float_if_real
    )
    seed: int | None = eqx.field(static=True, default=None)

    def __check_init__(self):
        _check_int("MultiSplit", "num_samples", self.num_samples, 1)
        _check_fraction("MultiSplit", self.threshold_estimation_frac)
        _check_seed("MultiSplit", self.seed)

    def bound(
        self, audit: AuditFn, auditor: "CanaryScoreAuditor", significance: float
    ) -> float:
        """The median of `num_samples` split bounds at `significance / 2`.

        !!! example

            ```python
            import eqx_micro.dp as dp

            auditor = dp.CanaryScoreAuditor([2.0, 3.0, 4.0, 5.0], [0.0, 1.0])
            levels = []
            def audit(a, level, threshold):
                levels.append(level)
                return 1.0, 2.5
            assert dp.MultiSplit(3, seed=0).bound(audit, auditor, 0.05) == 1.0
            assert levels == [0.025] * 6
            ```
        """
        seeds = np.random.default_rng(self.seed).integers(
            np.iinfo(np.int64).max, size=self.num_samples
        )
        frac = self.threshold_estimation_frac
        bounds = [
            _split_epsilon(audit, auditor, significance / 2, frac, int(seed))
            for seed in seeds
        ]
        return float(np.median(bounds))


# ------------------------------------------------------------------------ bootstrap


def _as_quantiles(value: Any) -> Any:
    # A converter: a number stays a number, a 1-D sequence becomes a tuple of floats;
    # anything else is left for `__check_init__` to refuse.
    try:
        array = np.asarray(value)
    except (TypeError, ValueError):
        return value
    if array.dtype.kind not in "iuf" or array.ndim > 1:
        return value
    if array.ndim == 0:
        return float(array)
    return tuple(float(q) for q in array)


class BootstrapParams(eqx.Module):
    """How to bootstrap a statistic of the scores: resamples, quantiles, corrections.

    The held-in and held-out scores are each resampled with replacement
    `num_samples` times, and the statistic's quantiles over the resamples are
    reported, optionally with Efron's bias correction and acceleration (BCa; the
    acceleration recomputes the statistic once per canary, leaving it out). This
    measures the spread of an *estimate*; it is not a confidence interval for the
    true epsilon.

    **Arguments:**

    - `num_samples`: the number of resamples, at least 1.
    - `quantiles`: a quantile in `(0, 1)`, or a 1-D sequence of them: `(0.025, 0.975)`
        for a 95% interval.
    - `bias_correction`: whether to correct for the bias of the resampled statistic.
    - `acceleration`: whether to correct for skew too (needs `bias_correction`).
    - `seed`: a non-negative int seed, or None for fresh entropy.

    !!! example

        ```python
        import numpy as np
        import eqx_micro.dp as dp

        rng = np.random.default_rng(0)
        auditor = dp.CanaryScoreAuditor(rng.normal(1, 1, 200), rng.normal(0, 1, 200))
        params = dp.BootstrapParams(num_samples=200, quantiles=(0.1, 0.5, 0.9), seed=0)
        low, middle, high = auditor.attack_auroc(bootstrap_params=params)
        assert low < middle < high and 0.7 < middle < 0.8
        ```

    ??? cite "References"

        ```bibtex
        @article{efron1987better,
            title={Better Bootstrap Confidence Intervals},
            author={Efron, Bradley},
            journal={Journal of the American Statistical Association},
            volume={82},
            number={397},
            pages={171--185},
            year={1987}
        }
        ```
    """

    num_samples: int = eqx.field(static=True, default=1000)
    quantiles: float | tuple[float, ...] = eqx.field(
        static=True, default=(0.025, 0.975), converter=_as_quantiles
    )
    bias_correction: bool = eqx.field(static=True, default=True)
    acceleration: bool = eqx.field(static=True, default=False)
    seed: int | None = eqx.field(static=True, default=None)

    def __check_init__(self):
        owner = "BootstrapParams"
        _check_int(owner, "num_samples", self.num_samples, 1)
        quantiles = self.quantiles
        if not isinstance(quantiles, float | tuple):
            raise TypeError(
                f"`{owner}` needs `quantiles` to be a number or a 1-D sequence of "
                f"numbers in (0, 1), got {quantiles!r}."
            )
        values = np.atleast_1d(np.asarray(quantiles, dtype=np.float64))
        if values.size == 0:
            raise ValueError(
                f"`{owner}` got empty `quantiles`; pass at least one, e.g. "
                "`quantiles=(0.025, 0.975)`."
            )
        if not np.all((values > 0) & (values < 1)):
            raise ValueError(
                f"`{owner}` got `quantiles={quantiles}`; every quantile must be in (0, 1)."
            )
        _check_bool(owner, "bias_correction", self.bias_correction)
        _check_bool(owner, "acceleration", self.acceleration)
        if self.acceleration and not self.bias_correction:
            raise ValueError(
                f"`{owner}` got `acceleration=True` with `bias_correction=False`; "
                "acceleration corrects the bias-corrected quantiles, so set both."
            )
        _check_seed(owner, self.seed)

    @classmethod
    def confidence_interval(
        cls, num_samples: int = 1000, confidence: float = 0.95, seed: int | None = None
    ) -> "BootstrapParams":
        """The two-sided interval holding the middle `confidence` of the resamples.

        **Arguments:**

        - `num_samples`: the number of resamples, at least 1.
        - `confidence`: in `(0, 1)`; the quantiles are `(1 - confidence) / 2` and
            `(1 + confidence) / 2`.
        - `seed`: a non-negative int seed, or None for fresh entropy.

        **Returns:**

        A `dp.BootstrapParams` with bias correction and no acceleration.

        !!! example

            ```python
            import numpy as np
            import eqx_micro.dp as dp

            params = dp.BootstrapParams.confidence_interval(100, confidence=0.9, seed=0)
            assert np.allclose(params.quantiles, (0.05, 0.95))
            ```
        """
        owner = "BootstrapParams.confidence_interval"
        value = _real(owner, "confidence", confidence)
        if not 0 < value < 1:
            raise ValueError(
                f"`{owner}` got `confidence={confidence}`; it must be in (0, 1), e.g. 0.95."
            )
        significance = 1 - value
        return cls(
            num_samples=num_samples,
            quantiles=(significance / 2, 1 - significance / 2),
            seed=seed,
        )


def _check_bootstrap(owner: str, params: Any) -> None:
    if params is not None and not isinstance(params, BootstrapParams):
        raise TypeError(
            f"`{owner}` needs `bootstrap_params` to be a `dp.BootstrapParams` or None, "
            f"got {params!r}."
        )


def _threshold_arg(owner: str, threshold: Any) -> float | None:
    # What a threshold strategy passes to `audit`: None (search all) or a number.
    if threshold is None:
        return None
    value = _real(f"{owner}'s threshold strategy", "threshold", threshold)
    if math.isnan(value):
        raise ValueError(f"`{owner}`'s threshold strategy passed `threshold=nan`.")
    return value


def _check_strategy(owner: str, strategy: Any) -> AbstractThresholdStrategy:
    if not isinstance(strategy, AbstractThresholdStrategy):
        raise TypeError(
            f"`{owner}` needs `threshold_strategy` to be a threshold strategy such as "
            f"`dp.Bonferroni()`, `dp.Explicit(threshold)` or `dp.Split()`, got "
            f"{strategy!r}."
        )
    return strategy


# ------------------------------------------------------------------------- auditor


class CanaryScoreAuditor(eqx.Module):
    """Empirical privacy metrics from the attack scores of held-in and held-out canaries.

    Train with some canaries included ("in") and others held out ("out"), then score
    each with a membership attack such that higher means "in" (e.g. the canary's
    log-likelihood, or its likelihood ratio to the model before training; negate a
    score where lower means "in"). A decision rule guesses "in" for scores at or above
    a threshold; every distinct score is a threshold, and the metrics use the convex
    hull of the ROC curve (a rule may randomize between two thresholds).

    The `epsilon_*` methods give lower bounds on the epsilon of the mechanism that
    trained the model, valid with probability `1 - significance` over its randomness:
    `epsilon_one_run` and `epsilon_one_run_fdp` for canaries inserted independently
    with probability 1/2 into one training run, `epsilon_clopper_pearson` and
    `epsilon_from_gdp` for in/out results from independent runs.
    `epsilon_raw_counts`, `tpr_at_given_fpr`, `attack_auroc` and `max_accuracy` are
    point estimates describing the attack.

    The methods, arguments, defaults and results are those of
    `jax_privacy.auditing.CanaryScoreAuditor`, so code can switch between the two.

    **Arguments:**

    - `in_canary_scores`: the scores of the held-in canaries, a non-empty 1-D array of
        finite real numbers.
    - `out_canary_scores`: the scores of the held-out canaries, likewise.

    **Fields:**

    - `in_canary_scores`, `out_canary_scores`: the scores, as float64 NumPy arrays.

    !!! example

        ```python
        import numpy as np
        import eqx_micro.dp as dp

        auditor = dp.CanaryScoreAuditor(np.arange(100) + 9.5, np.arange(100))
        assert np.isclose(auditor.tpr_at_given_fpr(0.01), 0.11)
        assert np.isclose(auditor.attack_auroc(), 0.595)
        ```

    ??? cite "References"

        ```bibtex
        @inproceedings{steinke2023privacy,
            title={Privacy Auditing with One (1) Training Run},
            author={Steinke, Thomas and Nasr, Milad and Jagielski, Matthew},
            booktitle={NeurIPS},
            year={2023},
            url={https://arxiv.org/abs/2305.08846}
        }

        @article{mahloujifar2024auditing,
            title={Auditing $f$-Differential Privacy in One Run},
            author={Mahloujifar, Saeed and Melis, Luca and Chaudhuri, Kamalika},
            journal={arXiv preprint arXiv:2410.22235},
            year={2024},
            url={https://arxiv.org/abs/2410.22235}
        }

        @inproceedings{jagielski2020auditing,
            title={Auditing Differentially Private Machine Learning: How Private is
                   Private {SGD}?},
            author={Jagielski, Matthew and Ullman, Jonathan and Oprea, Alina},
            booktitle={NeurIPS},
            year={2020},
            url={https://arxiv.org/abs/2006.07709}
        }

        @inproceedings{nasr2021adversary,
            title={Adversary Instantiation: Lower Bounds for Differentially Private
                   Machine Learning},
            author={Nasr, Milad and Song, Shuang and Thakurta, Abhradeep and Papernot,
                    Nicolas and Carlini, Nicholas},
            booktitle={IEEE Symposium on Security and Privacy},
            year={2021},
            url={https://arxiv.org/abs/2101.04535}
        }

        @inproceedings{nasr2023tight,
            title={Tight Auditing of Differentially Private Machine Learning},
            author={Nasr, Milad and Hayes, Jamie and Steinke, Thomas and Balle, Borja
                    and Tram{\\`e}r, Florian and Jagielski, Matthew and Carlini,
                    Nicholas and Terzis, Andreas},
            booktitle={USENIX Security},
            year={2023},
            url={https://arxiv.org/abs/2302.07956}
        }

        @article{dong2022gaussian,
            title={Gaussian Differential Privacy},
            author={Dong, Jinshuo and Roth, Aaron and Su, Weijie J.},
            journal={Journal of the Royal Statistical Society Series B},
            volume={84},
            number={1},
            pages={3--37},
            year={2022},
            url={https://arxiv.org/abs/1905.02383}
        }
        ```
    """

    in_canary_scores: Float64[np.ndarray, " n_in"]
    out_canary_scores: Float64[np.ndarray, " n_out"]
    # The ROC hull, from the threshold of the lowest score (all "in") up to `inf`.
    _thresholds: Float64[np.ndarray, " k"]
    _tn_counts: Int[np.ndarray, " k"]
    _fn_counts: Int[np.ndarray, " k"]

    def __init__(
        self,
        in_canary_scores: Real[ArrayLike, " n_in"] | Sequence[float | int],
        out_canary_scores: Real[ArrayLike, " n_out"] | Sequence[float | int],
    ):
        self.in_canary_scores = _as_scores(in_canary_scores, "in_canary_scores")
        self.out_canary_scores = _as_scores(out_canary_scores, "out_canary_scores")
        self._thresholds, self._tn_counts, self._fn_counts = _roc_hull(
            self.in_canary_scores, self.out_canary_scores
        )

    @property
    def num_thresholds(self) -> int:
        """The number of thresholds on the ROC hull (what `dp.Bonferroni` divides by).

        !!! example

            ```python
            import eqx_micro.dp as dp

            # Perfect separation: guess all, guess exactly the held-in ones, guess none.
            auditor = dp.CanaryScoreAuditor([5.0, 6.0, 7.0], [1.0, 2.0])
            assert auditor.num_thresholds == 3
            ```
        """
        return int(self._thresholds.size)

    # Counts of true and false positives, increasing: from the threshold `inf` down.
    def _tp_counts(self) -> np.ndarray:
        return (self._fn_counts[-1] - self._fn_counts)[::-1]

    def _fp_counts(self) -> np.ndarray:
        return (self._tn_counts[-1] - self._tn_counts)[::-1]

    def _bootstrap(
        self, statistic: Callable[["CanaryScoreAuditor"], Any], params: BootstrapParams
    ) -> np.ndarray:
        """The quantiles of `statistic` over resampled scores (BCa if asked)."""
        seeds = np.random.default_rng(params.seed).integers(
            np.iinfo(np.int64).max, size=params.num_samples
        )
        ins, outs = self.in_canary_scores, self.out_canary_scores
        values = np.empty(params.num_samples)
        for index, seed in enumerate(seeds):
            rng = np.random.default_rng(seed)
            resampled_in = rng.choice(ins, size=ins.size)
            resampled_out = rng.choice(outs, size=outs.size)
            values[index] = statistic(CanaryScoreAuditor(resampled_in, resampled_out))
        if not params.bias_correction:
            return np.asarray(np.quantile(values, params.quantiles, method="linear"))
        estimate = statistic(self)
        # Laplace smoothing keeps the share away from 0 and 1, where ppf is infinite.
        below = (np.sum(values < estimate) + 1) / (params.num_samples + 2)
        z0 = scipy.stats.norm.ppf(below)
        acceleration = 0.0
        if params.acceleration:
            leave_one_out = [
                statistic(CanaryScoreAuditor(np.delete(ins, i), outs))
                for i in range(ins.size)
            ] + [
                statistic(CanaryScoreAuditor(ins, np.delete(outs, i)))
                for i in range(outs.size)
            ]
            jackknife = np.asarray(leave_one_out, dtype=np.float64)
            centred = np.mean(jackknife) - jackknife
            scale = 6 * np.sum(centred**2) ** 1.5
            acceleration = 0.0 if scale == 0 else np.sum(centred**3) / scale
        z = z0 + scipy.stats.norm.ppf(params.quantiles)
        adjusted = scipy.stats.norm.cdf(z0 + z / (1 - acceleration * z))
        return np.asarray(np.quantile(values, adjusted, method="linear"))

    def _clopper_pearson_search(
        self, significance: float, delta: float, one_sided: bool, threshold: float | None
    ) -> tuple[float, float]:
        """The Clopper-Pearson bound at `threshold`, or the best over all (uncorrected)."""
        if threshold is None:
            fn_counts, tn_counts = self._fn_counts, self._tn_counts
        else:
            fn_counts = np.array([np.sum(self.in_canary_scores < threshold)])
            tn_counts = np.array([np.sum(self.out_canary_scores < threshold)])
        n_in, n_out = self._fn_counts[-1], self._tn_counts[-1]
        # Two one-sided bounds at significance / 2 each hold together (union bound).
        fnr_upper = _clopper_pearson_upper(fn_counts, n_in, significance / 2)
        fpr_upper = _clopper_pearson_upper(n_out - tn_counts, n_out, significance / 2)
        epsilon, index = _best_ratio(1 - fnr_upper, fpr_upper, delta)
        if not one_sided:
            # The reversed rule, guessing "in" *below* the threshold, swaps the rates.
            reverse, reverse_index = _best_ratio(1 - fpr_upper, fnr_upper, delta)
            if reverse > epsilon:
                epsilon, index = reverse, reverse_index
        if threshold is None:
            threshold = float(self._thresholds[index])
        return epsilon, threshold

    def _one_run_search(
        self, significance: float, delta: float, threshold: float | None, fdp: bool
    ) -> tuple[float, float]:
        """The one-run bound at `threshold`, or the best over all (uncorrected)."""
        epsilon_at = _one_run_fdp_epsilon if fdp else _one_run_epsilon
        n_in, n_out = int(self._fn_counts[-1]), int(self._tn_counts[-1])
        m = n_in + n_out
        if threshold is not None:
            tp = int(np.sum(self.in_canary_scores >= threshold))
            fp = int(np.sum(self.out_canary_scores >= threshold))
            return epsilon_at(0.0, m, tp + fp, tp, significance, delta), threshold
        tp_counts = n_in - self._fn_counts
        fp_counts = n_out - self._tn_counts
        guesses = tp_counts + fp_counts
        # Visit the thresholds from the most to the least precise (by a lower
        # confidence bound), so that once a good epsilon is found most others are
        # skipped by the cheap precision test below instead of a root search.
        precision_lower = 1.0 - _clopper_pearson_upper(fp_counts, guesses, significance)
        best_epsilon, best_index = 0.0, -1
        for index in np.argsort(-precision_lower):
            n_guess, n_correct = int(guesses[index]), int(tp_counts[index])
            # A guess rate no better than the best epsilon's e^eps / (1 + e^eps)
            # cannot refute a larger epsilon.
            if n_guess == 0 or n_correct / n_guess <= scipy.special.expit(best_epsilon):
                continue
            epsilon = epsilon_at(best_epsilon, m, n_guess, n_correct, significance, delta)
            if epsilon > best_epsilon:
                best_epsilon, best_index = epsilon, int(index)
        return best_epsilon, float(self._thresholds[best_index])

    def epsilon_clopper_pearson(
        self,
        significance: float,
        delta: float | int = 0,
        one_sided: bool = True,
        *,
        threshold_strategy: AbstractThresholdStrategy = Bonferroni(),  # noqa: B008
    ) -> float:
        """A lower bound on epsilon from Clopper-Pearson bounds on the TPR and FPR.

        For in/out results of independent training runs (one canary, or a fixed set,
        per run), the method of Jagielski et al. (2020) and Nasr et al. (2021): at a
        threshold, `log((TPR_lower - delta) / FPR_upper)` with exact binomial
        confidence bounds, each at `significance / 2`.

        **Arguments:**

        - `significance`: in `(0, 0.5)`, the allowed probability that the bound is
            wrong (one minus the confidence).
        - `delta`: in `[0, 1]`, the delta of the claim under test.
        - `one_sided`: if False, also consider guessing "in" *below* the threshold.
        - `threshold_strategy`: how the threshold is chosen (see
            [`dp.AbstractThresholdStrategy`][eqx_micro.dp.AbstractThresholdStrategy]).

        **Returns:**

        The epsilon lower bound, at least 0.

        !!! example

            ```python
            import numpy as np
            import eqx_micro.dp as dp

            rng = np.random.default_rng(0)
            auditor = dp.CanaryScoreAuditor(rng.normal(3, 1, 1000), rng.normal(0, 1, 1000))
            eps = auditor.epsilon_clopper_pearson(0.05)
            assert 4 < eps < 4.5
            assert auditor.epsilon_clopper_pearson(0.05, delta=1e-3) <= eps
            ```
        """
        owner = "CanaryScoreAuditor.epsilon_clopper_pearson"
        significance = _check_significance(owner, significance, 0.5)
        delta = _check_delta(owner, delta, allow_zero=True)
        one_sided = _check_bool(owner, "one_sided", one_sided)
        strategy = _check_strategy(owner, threshold_strategy)

        def audit(auditor, level, threshold):
            threshold = _threshold_arg(owner, threshold)
            return auditor._clopper_pearson_search(level, delta, one_sided, threshold)

        return float(strategy.bound(audit, self, significance))

    def epsilon_raw_counts(
        self,
        min_count: int = 50,
        delta: float | int = 0,
        one_sided: bool = True,
        *,
        bootstrap_params: BootstrapParams | None = None,
    ) -> float | Float64[np.ndarray, "*quantiles"]:
        """A point estimate of epsilon, `log((TPR - delta) / FPR)`, without confidence.

        The best ratio over thresholds where at least `min_count` held-out canaries are
        guessed "in" (held-in ones guessed "out", for the reversed rule): too small a
        `min_count` makes the estimate noisy, too large biases it toward 0.

        **Arguments:**

        - `min_count`: the least number of false positives at a threshold, at least 1.
        - `delta`: in `[0, 1]`, the delta of the claim.
        - `one_sided`: if False, also consider guessing "in" *below* the threshold.
        - `bootstrap_params`: if given, return the estimate's bootstrap quantiles (the
            spread of the estimate, not a confidence interval on epsilon).

        **Returns:**

        The estimate (at least 0), or an array of quantiles.

        !!! example

            ```python
            import numpy as np
            import eqx_micro.dp as dp

            rng = np.random.default_rng(0)
            auditor = dp.CanaryScoreAuditor(rng.normal(2, 1, 5000), rng.normal(0, 1, 5000))
            assert 2.5 < auditor.epsilon_raw_counts(min_count=50) < 4
            ```
        """
        owner = "CanaryScoreAuditor.epsilon_raw_counts"
        min_count = _check_int(owner, "min_count", min_count, 1)
        delta = _check_delta(owner, delta, allow_zero=True)
        one_sided = _check_bool(owner, "one_sided", one_sided)
        _check_bootstrap(owner, bootstrap_params)
        if bootstrap_params is not None:
            return self._bootstrap(
                lambda a: a.epsilon_raw_counts(min_count, delta, one_sided),
                bootstrap_params,
            )
        epsilon = _raw_counts_epsilon(
            self._tp_counts(), self._fp_counts(), min_count, delta
        )
        if not one_sided:
            # Guessing "in" below the threshold: TNs play TPs, FNs play FPs.
            reverse = _raw_counts_epsilon(
                self._tn_counts, self._fn_counts, min_count, delta
            )
            epsilon = max(epsilon, reverse)
        return max(epsilon, 0.0)

    def tpr_at_given_fpr(
        self,
        fpr: Real[ArrayLike, "*fprs"] | Sequence[float | int],
        *,
        bootstrap_params: BootstrapParams | None = None,
    ) -> float | Float64[np.ndarray, "*fprs_or_quantiles"]:
        """The largest true positive rate at a false positive rate.

        Interpolates along the ROC hull, i.e. allows rules that randomize between two
        thresholds.

        **Arguments:**

        - `fpr`: a false positive rate in `[0, 1]`, or an array of them.
        - `bootstrap_params`: if given (only with a scalar `fpr`), return the bootstrap
            quantiles of the TPR.

        **Returns:**

        The TPR (a float for a scalar `fpr`, else an array shaped like `fpr`), or an
        array of quantiles.

        !!! example

            ```python
            import numpy as np
            import eqx_micro.dp as dp

            auditor = dp.CanaryScoreAuditor([3.0, 4.0, 5.0, 6.0], [1.0, 2.0, 3.5, 7.0])
            # Threshold 4.0 guesses 4, 5, 6 and the held-out 7: FPR 1/4, TPR 3/4.
            assert auditor.tpr_at_given_fpr(0.25) == 0.75
            # FPR 1/8: use threshold 4.0 half of the time and `inf` (guess nothing)
            # the other half.
            assert np.allclose(auditor.tpr_at_given_fpr([0.125, 1.0]), [0.375, 1.0])
            ```
        """
        owner = "CanaryScoreAuditor.tpr_at_given_fpr"
        rates = np.asarray(fpr)
        if rates.dtype.kind not in "iuf":
            raise TypeError(
                f"`{owner}` needs `fpr` to be a real number or array, got {fpr!r}."
            )
        if not np.all((rates >= 0) & (rates <= 1)):
            raise ValueError(
                f"`{owner}` got `fpr={fpr}`; false positive rates must be in [0, 1]."
            )
        _check_bootstrap(owner, bootstrap_params)
        if bootstrap_params is not None:
            if rates.ndim > 0:
                raise ValueError(
                    f"`{owner}` bootstraps one `fpr` at a time, got shape {rates.shape}; "
                    "call it once per rate."
                )
            return self._bootstrap(lambda a: a.tpr_at_given_fpr(rates), bootstrap_params)
        tpr = _tpr_at_fpr(rates, self._tp_counts(), self._fp_counts())
        return float(tpr) if rates.ndim == 0 else np.asarray(tpr, dtype=np.float64)

    def attack_auroc(
        self, *, bootstrap_params: BootstrapParams | None = None
    ) -> float | Float64[np.ndarray, "*quantiles"]:
        """The area under the ROC hull: 0.5 for a useless attack, 1 for a perfect one.

        **Arguments:**

        - `bootstrap_params`: if given, return the bootstrap quantiles of the AUROC.

        **Returns:**

        The AUROC, or an array of quantiles.

        !!! example

            ```python
            import eqx_micro.dp as dp

            assert dp.CanaryScoreAuditor([2.0, 3.0], [0.0, 1.0]).attack_auroc() == 1.0
            assert dp.CanaryScoreAuditor([1.0, 2.0], [1.0, 2.0]).attack_auroc() == 0.5
            ```
        """
        _check_bootstrap("CanaryScoreAuditor.attack_auroc", bootstrap_params)
        if bootstrap_params is not None:
            return self._bootstrap(lambda a: a.attack_auroc(), bootstrap_params)
        # The trapezoid rule on TNR against FNR: the same area as TPR against FPR.
        tnr = self._tn_counts / self._tn_counts[-1]
        fnr = self._fn_counts / self._fn_counts[-1]
        return float(0.5 * np.dot(tnr[:-1] + tnr[1:], np.diff(fnr)))

    def max_accuracy(
        self, *, prevalence: float | None = None, significance: float | None = None
    ) -> float:
        """The best accuracy of a threshold rule, optionally an upper confidence bound.

        **Arguments:**

        - `prevalence`: in `[0, 1]`, the share of held-in examples the accuracy is
            weighted by; None for the share among the canaries.
        - `significance`: if given, in `(0, 1)`: bound the TPR and TNR from above
            (Clopper-Pearson, `significance / 2` each) and return that upper bound.

        **Returns:**

        The maximal accuracy over thresholds.

        !!! example

            ```python
            import eqx_micro.dp as dp

            auditor = dp.CanaryScoreAuditor([1.0, 3.0, 4.0], [0.0, 2.0, 3.0])
            # Threshold 3.0: right about 3.0 and 4.0 (in), 0.0 and 2.0 (out).
            assert auditor.max_accuracy() == 4 / 6
            assert auditor.max_accuracy(significance=0.05) > 4 / 6
            ```
        """
        owner = "CanaryScoreAuditor.max_accuracy"
        n_in, n_out = self._fn_counts[-1], self._tn_counts[-1]
        if prevalence is None:
            share_in = n_in / (n_in + n_out)
        else:
            share_in = _real(owner, "prevalence", prevalence)
            if not 0 <= share_in <= 1:
                raise ValueError(
                    f"`{owner}` got `prevalence={prevalence}`; it must be in [0, 1]: "
                    "the share of held-in examples."
                )
        tp_counts = n_in - self._fn_counts
        if significance is None:
            tnr = self._tn_counts / n_out
            tpr = tp_counts / n_in
        else:
            significance = _check_significance(owner, significance)
            tnr = _clopper_pearson_upper(self._tn_counts, n_out, significance / 2)
            tpr = _clopper_pearson_upper(tp_counts, n_in, significance / 2)
        return float(np.max(tpr * share_in + tnr * (1 - share_in)))

    def epsilon_from_gdp(
        self, significance: float, delta: float | int, eps_tol: float = 1e-6
    ) -> float:
        """A lower bound on epsilon through Gaussian DP (Nasr et al., 2023).

        Clopper-Pearson upper bounds on the FPR and FNR at every threshold (Bonferroni
        over both and all thresholds) give the largest `mu` that the scores refute for
        `mu`-GDP; epsilon is then that of `mu`-GDP at `delta`. This assumes the
        mechanism's trade-off curve is Gaussian, as DP-SGD's nearly is: tighter than
        `epsilon_clopper_pearson`, but not assumption-free.

        **Arguments:**

        - `significance`: in `(0, 0.5)`, the allowed probability that `mu` is wrong.
        - `delta`: in `(0, 1]`, the delta at which epsilon is reported.
        - `eps_tol`: the absolute tolerance of the root search for epsilon, positive.

        **Returns:**

        The epsilon lower bound, in `[0, 100]`.

        !!! example

            ```python
            import numpy as np
            import eqx_micro.dp as dp

            rng = np.random.default_rng(0)
            auditor = dp.CanaryScoreAuditor(rng.normal(2, 1, 1000), rng.normal(0, 1, 1000))
            gdp = auditor.epsilon_from_gdp(0.05, delta=1e-5)
            assert gdp > auditor.epsilon_clopper_pearson(0.05, delta=1e-5)
            ```
        """
        owner = "CanaryScoreAuditor.epsilon_from_gdp"
        significance = _check_significance(owner, significance, 0.5)
        delta = _check_delta(owner, delta, allow_zero=False)
        eps_tol = _real(owner, "eps_tol", eps_tol)
        if not 0 < eps_tol < math.inf:
            raise ValueError(
                f"`{owner}` got `eps_tol={eps_tol}`; it must be a positive finite "
                "tolerance, e.g. 1e-6."
            )
        n_in, n_out = self._fn_counts[-1], self._tn_counts[-1]
        level = significance / (2 * self._fn_counts.size)
        fnr_upper = _clopper_pearson_upper(self._fn_counts, n_in, level)
        fpr_upper = _clopper_pearson_upper(n_out - self._tn_counts, n_out, level)
        # A threshold where either rate may be 1 - delta or more shows nothing.
        informative = np.maximum(fpr_upper, fnr_upper) < 1 - delta
        if not informative.any():
            return 0.0
        fpr_upper, fnr_upper = fpr_upper[informative], fnr_upper[informative]
        # Dong, Roth and Su, eq. 6: mu = Phi^-1(1 - FPR) - Phi^-1(FNR). A negative mu
        # (FPR + FNR > 1) refutes the claim with the two hypotheses swapped.
        mus = scipy.stats.norm.isf(fpr_upper) - scipy.stats.norm.ppf(fnr_upper)
        mu = float(np.max(np.abs(mus)))
        if mu == 0:
            return 0.0
        log_delta = math.log(delta)

        def delta_gap(eps: float) -> float:
            # log delta(eps) of mu-GDP (Dong, Roth and Su, Corollary 2.13), minus log delta.
            return (
                _log_sub(
                    float(scipy.stats.norm.logcdf(-eps / mu + mu / 2)),
                    eps + float(scipy.stats.norm.logcdf(-eps / mu - mu / 2)),
                )
                - log_delta
            )

        eps_lo, eps_hi = 0.0, 100.0
        if delta_gap(eps_lo) <= 0:
            return eps_lo
        if delta_gap(eps_hi) >= 0:
            return eps_hi
        return _brent_root(delta_gap, eps_lo, eps_hi, eps_tol)

    def epsilon_one_run(
        self,
        significance: float,
        delta: float,
        one_sided: bool = True,
        *,
        threshold_strategy: AbstractThresholdStrategy = Bonferroni(),  # noqa: B008
    ) -> float:
        """A lower bound on epsilon from one training run (Steinke, Nasr, Jagielski 2023).

        The `m` canaries must have been included in training independently, each with
        probability 1/2 (the held-in ones are those that were). The attack guesses
        "in" above the threshold and abstains elsewhere; if the guesses are right more
        often than (epsilon, delta)-DP allows (a binomial tail, plus a delta term),
        epsilon is refuted. One run is cheap but loose: even a perfect attack with `r`
        guesses cannot certify more than `logit(significance^(1/r))`.

        **Arguments:**

        - `significance`: in `(0, 1)`, the allowed probability that the bound is wrong.
        - `delta`: in `(0, 1]`, the delta of the claim under test.
        - `one_sided`: must be True: only guesses of "in" are made (`k_- = 0` in the
            paper).
        - `threshold_strategy`: how the threshold is chosen (see
            [`dp.AbstractThresholdStrategy`][eqx_micro.dp.AbstractThresholdStrategy]).

        **Returns:**

        The epsilon lower bound, at least 0 (to within `1e-6`).

        !!! example

            ```python
            import numpy as np
            import eqx_micro.dp as dp

            rng = np.random.default_rng(0)
            auditor = dp.CanaryScoreAuditor(rng.normal(3, 1, 1000), rng.normal(0, 1, 1000))
            eps = auditor.epsilon_one_run(0.05, delta=1e-5)
            assert 3 < eps < 4
            ```
        """
        owner = "CanaryScoreAuditor.epsilon_one_run"
        significance, delta, strategy = self._one_run_checks(
            owner, significance, delta, one_sided, threshold_strategy
        )

        def audit(auditor, level, threshold):
            threshold = _threshold_arg(owner, threshold)
            return auditor._one_run_search(level, delta, threshold, fdp=False)

        return float(strategy.bound(audit, self, significance))

    def epsilon_one_run_fdp(
        self,
        significance: float,
        delta: float,
        one_sided: bool = True,
        *,
        threshold_strategy: AbstractThresholdStrategy = Bonferroni(),  # noqa: B008
    ) -> float:
        """A one-run lower bound on epsilon through f-DP (Mahloujifar et al., 2024).

        Like `epsilon_one_run` (same canaries, guesses and arguments), but the claim
        tested is the Gaussian trade-off curve that is tight at (epsilon, delta), as
        for DP-SGD's Gaussian noise; using the whole curve instead of one (epsilon,
        delta) pair gives tighter bounds when that curve is the right one.

        **Arguments:**

        - `significance`: in `(0, 1)`, the allowed probability that the bound is wrong.
        - `delta`: in `(0, 1]`, the delta at which epsilon is reported.
        - `one_sided`: must be True.
        - `threshold_strategy`: how the threshold is chosen.

        **Returns:**

        The epsilon lower bound, at least 0 (to within `1e-6`).

        !!! example

            ```python
            import numpy as np
            import eqx_micro.dp as dp

            rng = np.random.default_rng(0)
            auditor = dp.CanaryScoreAuditor(rng.normal(3, 1, 1000), rng.normal(0, 1, 1000))
            fdp = auditor.epsilon_one_run_fdp(0.05, delta=1e-5)
            assert fdp > auditor.epsilon_one_run(0.05, delta=1e-5)
            ```
        """
        owner = "CanaryScoreAuditor.epsilon_one_run_fdp"
        significance, delta, strategy = self._one_run_checks(
            owner, significance, delta, one_sided, threshold_strategy
        )

        def audit(auditor, level, threshold):
            threshold = _threshold_arg(owner, threshold)
            return auditor._one_run_search(level, delta, threshold, fdp=True)

        return float(strategy.bound(audit, self, significance))

    def _one_run_checks(
        self, owner: str, significance: Any, delta: Any, one_sided: Any, strategy: Any
    ) -> tuple[float, float, AbstractThresholdStrategy]:
        significance = _check_significance(owner, significance)
        delta = _check_delta(owner, delta, allow_zero=False)
        if not _check_bool(owner, "one_sided", one_sided):
            raise ValueError(
                f"`{owner}` got `one_sided=False`; only one-sided audits (guessing 'in' "
                "above the threshold, never 'out') are implemented. Negate the scores "
                "to audit the other direction."
            )
        return significance, delta, _check_strategy(owner, strategy)
