"""`dp.CanaryScoreAuditor`: every method against jax_privacy's, closed forms, bad inputs."""

import functools
import math

import hypothesis.strategies as st
import jax_privacy.auditing as jpa
import jaxtyping
import numpy as np
import pytest
import scipy.special
import scipy.stats
from hypothesis import given, settings

import eqx_micro.dp as dp


RTOL, ATOL = 1e-6, 1e-9


@pytest.fixture
def no_runtime_typecheck():
    """Turns jaxtyping's runtime checks off, to reach our own checks behind them."""
    previous = jaxtyping.config.jaxtyping_disable
    jaxtyping.config.update("jaxtyping_disable", True)
    yield
    jaxtyping.config.update("jaxtyping_disable", previous)


# ------------------------------------------------------------------------- scores


def _scores(kind: str, n: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(n)
    if kind == "gaussian":  # A realistic, weak attack.
        return rng.normal(1.0, 1.0, n), rng.normal(0.0, 1.0, n)
    if kind == "strong":
        return rng.normal(3.0, 1.0, n), rng.normal(0.0, 1.0, n)
    if kind == "ties":  # Few distinct scores: heavy ties within and across groups.
        return rng.binomial(4, 0.6, n).astype(float), rng.binomial(4, 0.4, n) * 1.0
    if kind == "separated":  # Perfect separation.
        return rng.normal(20.0, 1.0, n), rng.normal(0.0, 1.0, n)
    if kind == "identical":  # No signal at all.
        scores = rng.normal(0.0, 1.0, n)
        return scores, scores.copy()
    if kind == "unbalanced":  # Three times more held-out canaries, integer scores.
        return rng.integers(2, 40, n), rng.integers(0, 30, 3 * n)
    raise ValueError(kind)


KINDS = ["gaussian", "strong", "ties", "separated", "identical", "unbalanced"]
SIZES = [10, 100, 1000, 5000]


@functools.cache
def _auditors(kind: str, n: int):
    in_scores, out_scores = _scores(kind, n)
    ours = dp.CanaryScoreAuditor(in_scores, out_scores)
    theirs = jpa.CanaryScoreAuditor(in_scores, out_scores)
    # A threshold fixed "in advance": the median held-in score.
    return ours, theirs, float(np.median(in_scores))


def _strategy(lib, spec):
    """The same threshold strategy in `dp` (lib=dp) or jax_privacy (lib=jpa)."""
    name, *args = spec
    return getattr(lib, name)(*args)


# Each case: (name, (lib, auditor, threshold) -> value, size up to which it runs on
# every kind of scores, largest size, run on the Gaussian scores only). The sizes are
# capped where a method's cost grows quickly (f-DP, MultiSplit, bootstraps).
CASES = [
    ("cp", lambda lib, a, t: a.epsilon_clopper_pearson(0.05), 5000, 5000),
    (
        "cp_two_sided_delta",
        lambda lib, a, t: a.epsilon_clopper_pearson(0.1, 1e-3, one_sided=False),
        5000,
        5000,
    ),
    (
        "cp_explicit",
        lambda lib, a, t: a.epsilon_clopper_pearson(
            0.05, threshold_strategy=_strategy(lib, ("Explicit", t))
        ),
        5000,
        5000,
    ),
    (
        "cp_split",
        lambda lib, a, t: a.epsilon_clopper_pearson(
            0.05, 1e-4, threshold_strategy=_strategy(lib, ("Split", 0.3, 3))
        ),
        5000,
        5000,
    ),
    (
        "cp_multisplit",
        lambda lib, a, t: a.epsilon_clopper_pearson(
            0.05, threshold_strategy=_strategy(lib, ("MultiSplit", 5, 0.5, 4))
        ),
        1000,
        5000,
    ),
    ("raw", lambda lib, a, t: a.epsilon_raw_counts(), 5000, 5000),
    ("raw_min_count_1", lambda lib, a, t: a.epsilon_raw_counts(min_count=1), 5000, 5000),
    (
        "raw_two_sided_delta",
        lambda lib, a, t: a.epsilon_raw_counts(3, 1e-2, one_sided=False),
        5000,
        5000,
    ),
    (
        "tpr",
        lambda lib, a, t: a.tpr_at_given_fpr(np.array([0, 1e-3, 0.01, 0.1, 0.5, 1])),
        5000,
        5000,
    ),
    ("tpr_scalar", lambda lib, a, t: a.tpr_at_given_fpr(0.05), 5000, 5000),
    ("auroc", lambda lib, a, t: a.attack_auroc(), 5000, 5000),
    ("max_accuracy", lambda lib, a, t: a.max_accuracy(), 5000, 5000),
    (
        "max_accuracy_ub",
        lambda lib, a, t: a.max_accuracy(prevalence=0.3, significance=0.1),
        5000,
        5000,
    ),
    ("gdp", lambda lib, a, t: a.epsilon_from_gdp(0.05, 1e-5), 5000, 5000),
    ("gdp_tol", lambda lib, a, t: a.epsilon_from_gdp(0.2, 1e-2, eps_tol=1e-9), 5000, 5000),
    ("one_run", lambda lib, a, t: a.epsilon_one_run(0.05, 1e-5), 5000, 5000),
    (
        "one_run_explicit",
        lambda lib, a, t: a.epsilon_one_run(
            0.1, 1e-2, threshold_strategy=_strategy(lib, ("Explicit", t))
        ),
        5000,
        5000,
    ),
    (
        "one_run_split",
        lambda lib, a, t: a.epsilon_one_run(
            0.05, 1e-5, threshold_strategy=_strategy(lib, ("Split", 0.5, 1))
        ),
        5000,
        5000,
    ),
    (
        "one_run_multisplit",
        lambda lib, a, t: a.epsilon_one_run(
            0.05, 1e-5, threshold_strategy=_strategy(lib, ("MultiSplit", 3, 0.4, 2))
        ),
        100,
        5000,
    ),
    ("one_run_fdp", lambda lib, a, t: a.epsilon_one_run_fdp(0.05, 1e-5), 100, 5000),
    (
        "one_run_fdp_explicit",
        lambda lib, a, t: a.epsilon_one_run_fdp(
            0.2, 1e-3, threshold_strategy=_strategy(lib, ("Explicit", t))
        ),
        100,
        5000,
    ),
    (
        "auroc_bootstrap_bca",
        lambda lib, a, t: a.attack_auroc(
            bootstrap_params=lib.BootstrapParams(40, (0.05, 0.5, 0.95), seed=0)
        ),
        100,
        5000,
    ),
    (
        "tpr_bootstrap_plain",
        lambda lib, a, t: a.tpr_at_given_fpr(
            0.1,
            bootstrap_params=lib.BootstrapParams(30, 0.5, bias_correction=False, seed=1),
        ),
        100,
        5000,
    ),
    (
        "raw_bootstrap_accelerated",
        lambda lib, a, t: a.epsilon_raw_counts(
            5,
            bootstrap_params=lib.BootstrapParams(20, seed=2, acceleration=True),
        ),
        10,
        100,
    ),
    (
        "auroc_confidence_interval",
        lambda lib, a, t: a.attack_auroc(
            bootstrap_params=lib.BootstrapParams.confidence_interval(25, 0.8, seed=5)
        ),
        100,
        5000,
    ),
]

PARAMS = [
    pytest.param(kind, n, name, run, id=f"{name}-{kind}-{n}")
    for name, run, every_kind_up_to, max_n in CASES
    for kind in KINDS
    for n in SIZES
    if n <= every_kind_up_to or (kind == "gaussian" and n <= max_n)
]


@pytest.mark.parametrize("kind, n, name, run", PARAMS)
def test_matches_jax_privacy(kind, n, name, run):
    ours, theirs, threshold = _auditors(kind, n)
    expected = run(jpa, theirs, threshold)
    actual = run(dp, ours, threshold)
    assert np.shape(actual) == np.shape(expected)
    np.testing.assert_allclose(actual, expected, rtol=RTOL, atol=ATOL)


def test_matches_jax_privacy_on_lists_and_float32():
    in_scores = [0.5, 2.0, 2.0, 3.25, 1.0]
    out_scores = np.array([0.0, 1.0, 2.0, 0.25], np.float32)
    ours = dp.CanaryScoreAuditor(in_scores, out_scores)
    theirs = jpa.CanaryScoreAuditor(in_scores, out_scores)
    for method in ("attack_auroc", "max_accuracy"):
        assert getattr(ours, method)() == pytest.approx(getattr(theirs, method)())
    assert ours.epsilon_clopper_pearson(0.1) == pytest.approx(
        theirs.epsilon_clopper_pearson(0.1)
    )


_SCORES = st.lists(st.integers(0, 6), min_size=1, max_size=40) | st.lists(
    st.floats(-3, 3, allow_nan=False, width=32), min_size=1, max_size=40
)


@settings(max_examples=40, deadline=None)
@given(in_scores=_SCORES, out_scores=_SCORES, shift=st.sampled_from([0.0, 1.0, 2.5]))
def test_matches_jax_privacy_on_random_scores(in_scores, out_scores, shift):
    in_array = np.asarray(in_scores, np.float64) + shift
    out_array = np.asarray(out_scores, np.float64)
    ours = dp.CanaryScoreAuditor(in_array, out_array)
    theirs = jpa.CanaryScoreAuditor(in_array, out_array)
    for run in (
        lambda a: a.epsilon_clopper_pearson(0.1, 1e-3, one_sided=False),
        lambda a: a.epsilon_raw_counts(1, 0.01, one_sided=False),
        lambda a: a.tpr_at_given_fpr(np.linspace(0, 1, 7)),
        lambda a: a.attack_auroc(),
        lambda a: a.max_accuracy(significance=0.2),
        lambda a: a.epsilon_from_gdp(0.1, 1e-3),
        lambda a: a.epsilon_one_run(0.2, 1e-3),
        lambda a: a.epsilon_one_run_fdp(0.2, 1e-3),
    ):
        np.testing.assert_allclose(run(ours), run(theirs), rtol=RTOL, atol=ATOL)


@settings(max_examples=30, deadline=None)
@given(
    in_scores=st.lists(st.integers(0, 8), min_size=2, max_size=40),
    out_scores=st.lists(st.integers(0, 8), min_size=2, max_size=40),
    shifts=st.tuples(st.floats(0, 4), st.floats(0, 4)).map(sorted),
)
def test_stronger_attack_never_lowers_the_metrics(in_scores, out_scores, shifts):
    """Shifting the held-in scores up moves every ROC point up: nothing may drop.

    (Bonferroni-corrected bounds are left out: a shift can add hull thresholds, and so
    tighten the correction. So is `max_accuracy(significance=...)`: it bounds the
    rates at the hull's corners only, and a shift can drop a corner where an upper
    bound was large; hypothesis found in=[0, 0, 2], out=[1, 2, 2, 4], shifts 1 -> 2.)
    """
    out_array = np.asarray(out_scores, np.float64)
    values = []
    for shift in shifts:
        auditor = dp.CanaryScoreAuditor(np.asarray(in_scores) + shift, out_array)
        at_4 = dp.Explicit(4.0)
        values.append(
            [
                auditor.attack_auroc(),
                auditor.max_accuracy(),
                *auditor.tpr_at_given_fpr(np.linspace(0, 1, 9)),
                auditor.epsilon_raw_counts(min_count=1),
                auditor.epsilon_clopper_pearson(0.1, threshold_strategy=at_4),
                auditor.epsilon_clopper_pearson(0.1, 1e-2, threshold_strategy=at_4),
            ]
        )
    weaker, stronger = np.asarray(values)
    assert np.all(stronger >= weaker - 1e-12), (weaker, stronger)


# -------------------------------------------------------------------- closed forms


def _separated(n: int) -> dp.CanaryScoreAuditor:
    # n held-in canaries all above n held-out ones, every score distinct.
    return dp.CanaryScoreAuditor(np.arange(n) + n + 0.5, np.arange(n, dtype=float))


@pytest.mark.parametrize("n", [10, 100, 1000])
@pytest.mark.parametrize("significance", [0.05, 0.01])
def test_clopper_pearson_perfect_separation_closed_form(n, significance):
    """At a threshold between the groups, 0 of n false negatives and false positives.

    The one-sided Clopper-Pearson upper bound on a rate with 0 of n events at level
    a solves (1 - p)^n = a, so p = 1 - a^(1/n); with a = significance / 2 for each
    rate, epsilon = log((1 - p) / p) = logit((significance / 2)^(1/n)).
    """
    auditor = _separated(n)
    at_gap = dp.Explicit(n - 0.25)
    expected = scipy.special.logit((significance / 2) ** (1 / n))
    assert auditor.epsilon_clopper_pearson(
        significance, threshold_strategy=at_gap
    ) == pytest.approx(expected, rel=1e-9)
    # The hull has 3 thresholds (guess all, the held-in ones, none): Bonferroni
    # divides the significance by 3.
    assert auditor.num_thresholds == 3
    corrected = scipy.special.logit((significance / 6) ** (1 / n))
    assert auditor.epsilon_clopper_pearson(significance) == pytest.approx(
        corrected, rel=1e-9
    )


@pytest.mark.parametrize("n", [10, 100, 1000])
def test_one_run_perfect_guesses_closed_form(n):
    """r right guesses out of r: pure-DP p-value q^r with q = e^eps / (1 + e^eps).

    The bound solves q^r = significance: eps = logit(significance^(1/r)). A tiny delta
    moves it by far less than the root search's tolerance (1e-6).
    """
    auditor = _separated(n)
    significance = 0.05
    at_gap = dp.Explicit(n - 0.25)
    expected = scipy.special.logit(significance ** (1 / n))
    actual = auditor.epsilon_one_run(significance, 1e-300, threshold_strategy=at_gap)
    assert actual == pytest.approx(expected, abs=2e-6)
    corrected = scipy.special.logit((significance / 3) ** (1 / n))
    assert auditor.epsilon_one_run(significance, 1e-300) == pytest.approx(
        corrected, abs=2e-6
    )


def test_one_run_ceiling_grows_like_log_canaries():
    """Even a perfect attack certifies little in one run: the bound is the ceiling."""
    ceilings = [
        _separated(n).epsilon_one_run(0.05, 1e-300, threshold_strategy=dp.Explicit(n))
        for n in (10, 100, 1000)
    ]
    np.testing.assert_allclose(ceilings, [1.0519, 3.4930, 5.8091], atol=1e-4)


def test_raw_counts_hand_derived():
    """Held-out 0..99, held-in 50..149: the hull runs (0, 0.5) -> (0.5, 1) -> (1, 1).

    On the first edge TPR = 0.5 + FPR. With min_count=10 the estimate sits at FPR
    0.1, TPR 0.6: log(0.6 / 0.1). With delta=0.05, the hull corners with at least 10
    false positives, (0.5, 1) and (1, 1), give less than that point: log(0.55 / 0.1).
    """
    auditor = dp.CanaryScoreAuditor(np.arange(100) + 50.0, np.arange(100.0))
    assert auditor.epsilon_raw_counts(10) == pytest.approx(math.log(6), rel=1e-12)
    assert auditor.epsilon_raw_counts(10, 0.05) == pytest.approx(math.log(5.5), rel=1e-12)
    assert auditor.tpr_at_given_fpr(0.1) == pytest.approx(0.6, rel=1e-12)
    assert auditor.attack_auroc() == pytest.approx(0.5 * 0.75 + 0.5 * 1.0)
    # The best threshold is 100 (guess the 50 in-scores >= 100): accuracy 150 / 200.
    assert auditor.max_accuracy() == pytest.approx(0.75, rel=1e-12)


def test_auroc_extremes_and_symmetry():
    assert _separated(50).attack_auroc() == 1.0
    scores = np.random.default_rng(0).normal(size=200)
    assert dp.CanaryScoreAuditor(scores, scores).attack_auroc() == pytest.approx(0.5)
    # The hull of a reversed attack is the diagonal: a randomized rule does as well.
    assert dp.CanaryScoreAuditor(-np.arange(5.0), np.arange(5.0)).attack_auroc() == 0.5


def test_gdp_bound_is_the_gdp_conversion_of_mu():
    """Rebuild mu from Clopper-Pearson bounds by hand, then check delta(eps) = delta.

    Perfect separation, n per side, 3 hull thresholds: the best mu uses the threshold
    between the groups, where both FPR and FNR are 0 out of n, each bounded at level
    significance / (2 * 3): p = 1 - level^(1/n), mu = 2 * Phi^-1(1 - p).
    """
    n, significance, delta = 200, 0.05, 1e-5
    eps = _separated(n).epsilon_from_gdp(significance, delta, eps_tol=1e-12)
    p = 1 - (significance / 6) ** (1 / n)
    mu = 2 * scipy.stats.norm.isf(p)
    norm = scipy.stats.norm
    delta_at = norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * norm.cdf(-eps / mu - mu / 2)
    assert delta_at == pytest.approx(delta, rel=1e-6)


def test_fdp_is_at_least_the_one_run_bound_for_gaussian_scores():
    ours, _, _ = _auditors("strong", 1000)
    assert ours.epsilon_one_run_fdp(0.05, 1e-5) > ours.epsilon_one_run(0.05, 1e-5)


def test_split_and_bootstrap_are_reproducible():
    ours, _, _ = _auditors("gaussian", 100)
    split = dp.Split(seed=7)
    assert ours.epsilon_one_run(0.05, 1e-5, threshold_strategy=split) == (
        ours.epsilon_one_run(0.05, 1e-5, threshold_strategy=split)
    )
    params = dp.BootstrapParams(20, seed=3)
    np.testing.assert_array_equal(
        ours.attack_auroc(bootstrap_params=params),
        ours.attack_auroc(bootstrap_params=params),
    )


def test_user_defined_strategy():
    class Twice(dp.AbstractThresholdStrategy):
        threshold: float

        def bound(self, audit, auditor, significance):
            return audit(auditor, significance / 2, self.threshold)[0]

    ours, _, threshold = _auditors("gaussian", 1000)
    assert ours.epsilon_clopper_pearson(
        0.1, threshold_strategy=Twice(threshold)
    ) == ours.epsilon_clopper_pearson(0.05, threshold_strategy=dp.Explicit(threshold))
    assert dp.ThresholdStrategy is dp.AbstractThresholdStrategy


# ------------------------------------------------------------------------- errors


def _auditor():
    return dp.CanaryScoreAuditor([1.0, 2.0, 3.0], [0.0, 1.0])


ERRORS = [
    # The scores.
    (lambda: dp.CanaryScoreAuditor([], [1.0]), ValueError, "empty `in_canary_scores`"),
    (lambda: dp.CanaryScoreAuditor([1.0], []), ValueError, "empty `out_canary_scores`"),
    (
        lambda: dp.CanaryScoreAuditor(np.ones((2, 3)), [1.0]),
        ValueError,
        r"`in_canary_scores` to be 1-D.*\(2, 3\)",
    ),
    (lambda: dp.CanaryScoreAuditor(1.0, [1.0]), ValueError, "`in_canary_scores` to be 1-D"),
    (
        lambda: dp.CanaryScoreAuditor([1.0], [0.0, np.nan]),
        ValueError,
        "non-finite.*`out_canary_scores`.*index 1",
    ),
    (
        lambda: dp.CanaryScoreAuditor([np.inf], [0.0]),
        ValueError,
        "non-finite.*`in_canary_scores`",
    ),
    (
        lambda: dp.CanaryScoreAuditor(["a"], [0.0]),
        TypeError,
        "`in_canary_scores` to hold real numbers",
    ),
    (
        lambda: dp.CanaryScoreAuditor([True], [0.0]),
        TypeError,
        "`in_canary_scores` to hold real numbers",
    ),
    (
        lambda: dp.CanaryScoreAuditor([1.0], [[1.0], [1.0, 2.0]]),
        ValueError,
        "`out_canary_scores` as an array",
    ),
    # Significance, delta and friends.
    (lambda: _auditor().epsilon_clopper_pearson(0.5), ValueError, "significance=0.5"),
    (lambda: _auditor().epsilon_clopper_pearson(0.0), ValueError, "significance=0.0"),
    (lambda: _auditor().epsilon_clopper_pearson(np.nan), ValueError, "significance=nan"),
    (lambda: _auditor().epsilon_clopper_pearson("0.05"), TypeError, "`significance`"),
    (lambda: _auditor().epsilon_clopper_pearson(0.05, -0.1), ValueError, "delta=-0.1"),
    (lambda: _auditor().epsilon_clopper_pearson(0.05, 1.5), ValueError, "delta=1.5"),
    (
        lambda: _auditor().epsilon_clopper_pearson(0.05, one_sided="yes"),
        TypeError,
        "`one_sided`",
    ),
    (
        lambda: _auditor().epsilon_clopper_pearson(0.05, threshold_strategy="split"),
        TypeError,
        "`threshold_strategy`",
    ),
    (lambda: _auditor().epsilon_one_run(1.0, 1e-5), ValueError, "significance=1.0"),
    (lambda: _auditor().epsilon_one_run(0.05, 0), ValueError, r"delta=0.*\(0, 1\]"),
    (
        lambda: _auditor().epsilon_one_run(0.05, 1e-5, one_sided=False),
        ValueError,
        "one_sided=False",
    ),
    (lambda: _auditor().epsilon_one_run_fdp(-0.1, 1e-5), ValueError, "significance=-0.1"),
    (lambda: _auditor().epsilon_one_run_fdp(0.05, 2.0), ValueError, "delta=2.0"),
    (
        lambda: _auditor().epsilon_one_run_fdp(0.05, 1e-5, one_sided=False),
        ValueError,
        "one_sided=False",
    ),
    (lambda: _auditor().epsilon_from_gdp(0.6, 1e-5), ValueError, "significance=0.6"),
    (lambda: _auditor().epsilon_from_gdp(0.05, 0.0), ValueError, "delta=0.0"),
    (lambda: _auditor().epsilon_from_gdp(0.05, 1e-5, eps_tol=0), ValueError, "eps_tol=0"),
    (lambda: _auditor().epsilon_raw_counts(0), ValueError, "min_count=0"),
    (lambda: _auditor().epsilon_raw_counts(2.5), TypeError, "`min_count`"),
    (lambda: _auditor().epsilon_raw_counts(5, delta=-1), ValueError, "delta=-1"),
    (lambda: _auditor().tpr_at_given_fpr(1.5), ValueError, "fpr=1.5"),
    (lambda: _auditor().tpr_at_given_fpr([0.1, -0.1]), ValueError, "fpr="),
    (lambda: _auditor().tpr_at_given_fpr(np.nan), ValueError, "fpr=nan"),
    (lambda: _auditor().tpr_at_given_fpr("low"), TypeError, "`fpr`"),
    (
        lambda: _auditor().tpr_at_given_fpr(
            [0.1, 0.2], bootstrap_params=dp.BootstrapParams()
        ),
        ValueError,
        "one `fpr` at a time",
    ),
    (
        lambda: _auditor().attack_auroc(bootstrap_params=100),
        TypeError,
        "`bootstrap_params`",
    ),
    (lambda: _auditor().max_accuracy(prevalence=1.2), ValueError, "prevalence=1.2"),
    (lambda: _auditor().max_accuracy(significance=1.0), ValueError, "significance=1.0"),
    # Strategies.
    (lambda: dp.Explicit(np.nan), ValueError, "threshold=nan"),
    (lambda: dp.Explicit("high"), TypeError, "`threshold`"),
    (
        lambda: dp.Split(threshold_estimation_frac=1.0),
        ValueError,
        "threshold_estimation_frac=1.0",
    ),
    (lambda: dp.Split(seed=-1), ValueError, "seed=-1"),
    (lambda: dp.Split(seed=1.5), TypeError, "`seed`"),
    (lambda: dp.MultiSplit(num_samples=0), ValueError, "num_samples=0"),
    (
        lambda: dp.MultiSplit(threshold_estimation_frac=0),
        ValueError,
        "threshold_estimation_frac=0",
    ),
    (
        lambda: _auditor().epsilon_one_run(0.05, 1e-5, threshold_strategy=dp.Split(0.1)),
        ValueError,
        r"threshold_estimation_frac=0.1.*held-in",
    ),
    # Bootstrap parameters.
    (lambda: dp.BootstrapParams(num_samples=0), ValueError, "num_samples=0"),
    (lambda: dp.BootstrapParams(quantiles=()), ValueError, "empty `quantiles`"),
    (lambda: dp.BootstrapParams(quantiles=(0.5, 1.0)), ValueError, "quantiles="),
    (lambda: dp.BootstrapParams(quantiles=[[0.1]]), TypeError, "`quantiles`"),
    (
        lambda: dp.BootstrapParams(bias_correction=False, acceleration=True),
        ValueError,
        "acceleration=True.*bias_correction=False",
    ),
    (
        lambda: dp.BootstrapParams.confidence_interval(confidence=1.0),
        ValueError,
        "confidence=1.0",
    ),
]


@pytest.mark.usefixtures("no_runtime_typecheck")
@pytest.mark.parametrize(
    "run, error, match", ERRORS, ids=[f"error{i}" for i in range(len(ERRORS))]
)
def test_bad_input_is_refused(run, error, match):
    with pytest.raises(error, match=match):
        run()


def test_bad_input_is_refused_under_runtime_type_checks():
    # With jaxtyping's checks on (as in this suite), a wrong shape is still refused.
    with pytest.raises(TypeError):
        dp.CanaryScoreAuditor(np.ones((2, 2)), [1.0])
    with pytest.raises(ValueError, match="non-finite"):
        dp.CanaryScoreAuditor(np.array([np.nan]), [1.0])
