"""Banded Toeplitz strategies: the O(n b) error formulas against dense linear algebra,
the optimizer against DP-SGD, more bands and jax_privacy's optimizer."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax_privacy.matrix_factorization import toeplitz

import eqx_micro.dp as dp
from eqx_micro.dp._noise import _banded_toeplitz as strategy


def _dense_strategy(coefs, n):
    """The n x n lower-triangular banded Toeplitz matrix of `coefs`."""
    return sum(c * np.eye(n, k=-k) for k, c in enumerate(np.asarray(coefs, np.float64)))


def _dense_error(coefs, n):
    """Per-query error, loss and RMSE from `A C^{-1}` and the column norms of `C`."""
    C = _dense_strategy(coefs, n)
    B = np.tri(n) @ np.linalg.inv(C)
    sensitivity_squared = np.max(np.sum(C**2, axis=0))
    per_query = np.sum(B**2, axis=1) * sensitivity_squared
    loss = np.sum(B**2) * sensitivity_squared
    return per_query, loss, math.sqrt(np.mean(per_query))


def _random_coefs(n_bands, seed):
    """Mixed-sign coefficients with `c_0 > sum |c_j|`: no root of `c(x)` in the unit
    disk, so `C^{-1}` stays bounded and the dense reference stays accurate."""
    coefs = np.random.default_rng(seed).normal(size=n_bands)
    coefs[0] = 0.2 + np.sum(np.abs(coefs[1:]))
    return coefs


SHAPES = [(1, 1), (5, 1), (5, 5), (7, 3), (40, 6), (129, 17), (300, 32)]


@pytest.mark.parametrize("n, bands", SHAPES)
@pytest.mark.parametrize("kind", ["random", "sqrt"])
def test_error_formulas_match_dense(n, bands, kind):
    if kind == "random":
        coefs = _random_coefs(bands, seed=n + bands)
    else:
        coefs = dp.sqrt_toeplitz_coefs(bands)
    per_query, loss, rmse = _dense_error(coefs, n)
    np.testing.assert_allclose(dp.per_query_error(coefs, n), per_query, rtol=1e-10)
    assert math.isclose(dp.banded_toeplitz_loss(coefs, n), loss, rel_tol=1e-10)
    assert math.isclose(dp.strategy_rmse(coefs, n), rmse, rel_tol=1e-10)
    assert math.isclose(loss, np.sum(per_query), rel_tol=1e-12)


@pytest.mark.parametrize("n, bands", [(40, 6), (300, 32)])
def test_max_column_norm_is_coefficient_norm(n, bands):
    C = _dense_strategy(_random_coefs(bands, seed=1), n)
    column_norms = np.linalg.norm(C, axis=0)
    assert math.isclose(column_norms.max(), np.linalg.norm(C[:bands, 0]), rel_tol=1e-14)
    assert np.argmax(column_norms) == 0


# Blocks shorter than the bands, a partial last block, several full blocks, one band.
@pytest.mark.parametrize("n, bands, block", [(37, 9, 4), (150, 20, 64), (40, 1, 8)])
def test_jax_blocked_loss_and_gradient_match_dense(n, bands, block):
    coefs = _random_coefs(bands, seed=n * bands)
    _, loss, _ = _dense_error(coefs, n)

    # d||M||_F^2 = -2 tr(C^{-1} M^T M dC) for M = A C^{-1}, and dC/dc_j = S^j (the
    # down-shift), whose trace against G picks G's j-th superdiagonal.
    C = _dense_strategy(coefs, n)
    M = np.tri(n) @ np.linalg.inv(C)
    G = np.linalg.solve(C, M.T @ M)
    dense_grad = np.array([-2 * np.trace(G, offset=j) for j in range(bands)])
    dense_grad = dense_grad / np.sum(M**2) + 2 * coefs / np.dot(coefs, coefs)

    with jax.enable_x64(True):
        c = jnp.asarray(coefs)
        log_loss = jax.jit(strategy._log_loss, static_argnums=(1, 2))
        value, grad = jax.value_and_grad(log_loss)(c, n, block)
        prefix = jax.jit(strategy._prefix_sums, static_argnums=(1, 2))(c, n, block)
    assert math.isclose(math.exp(float(value)), loss, rel_tol=1e-10)
    np.testing.assert_allclose(grad, dense_grad, rtol=1e-8, atol=1e-11)
    np.testing.assert_allclose(prefix, strategy._prefix_sums_numpy(coefs, n), rtol=1e-11)
    # Scale invariance: the gradient is orthogonal to the coefficients.
    assert abs(np.dot(grad, coefs)) <= 1e-10 * (np.linalg.norm(grad) + 1)


@pytest.mark.parametrize("scale", [-3.0, 1e-3, 0.5, 7.0])
def test_loss_is_scale_invariant(scale):
    coefs = _random_coefs(6, seed=3)
    for fn in (dp.banded_toeplitz_loss, dp.strategy_rmse):
        assert math.isclose(fn(scale * coefs, 200), fn(coefs, 200), rel_tol=1e-12)
    np.testing.assert_allclose(
        dp.per_query_error(scale * coefs, 200), dp.per_query_error(coefs, 200), rtol=1e-12
    )


def test_dpsgd_error():
    n = 50
    np.testing.assert_allclose(dp.per_query_error(np.array([2.0]), n), np.arange(1, n + 1))
    assert dp.banded_toeplitz_loss(np.array([1.0]), n) == n * (n + 1) / 2
    assert math.isclose(dp.strategy_rmse(np.array([1.0]), n), math.sqrt((n + 1) / 2))


@pytest.mark.parametrize("n", [1, 2, 3, 8, 33])
def test_sqrt_coefs_square_to_prefix_sum(n):
    coefs = dp.sqrt_toeplitz_coefs(n)
    expected = [math.comb(2 * k, k) / 4**k for k in range(n)]
    np.testing.assert_allclose(coefs, expected, rtol=1e-14)
    S = _dense_strategy(coefs, n)
    np.testing.assert_allclose(S @ S, np.tri(n), atol=1e-13)


@pytest.mark.parametrize("n, bands", [(12, 1), (12, 4), (30, 7)])
def test_streaming_noise_recurrence_is_dense_solve(n, bands):
    # The identity the docs state for the noise C^{-1} z:
    # w_t = (z_t - c_1 w_{t-1} - ... - c_{b-1} w_{t-b+1}) / c_0.
    coefs = _random_coefs(bands, seed=bands)
    z = np.random.default_rng(0).normal(size=n)
    w = np.zeros(n)
    for t in range(n):
        past = sum(coefs[j] * w[t - j] for j in range(1, min(bands, t + 1)))
        w[t] = (z[t] - past) / coefs[0]
    np.testing.assert_allclose(w, np.linalg.solve(_dense_strategy(coefs, n), z), rtol=1e-10)


def test_more_bands_lower_loss_and_never_worse_than_dpsgd():
    n = 1000
    losses = []
    for bands in (1, 2, 4, 16):
        coefs = dp.optimize_banded_toeplitz(n, bands)
        assert coefs.shape == (bands,) and coefs.dtype == np.float64
        assert math.isclose(np.linalg.norm(coefs), 1.0, rel_tol=1e-12) and coefs[0] > 0
        losses.append(dp.banded_toeplitz_loss(coefs, n))
        start = dp.sqrt_toeplitz_coefs(bands)
        assert losses[-1] <= dp.banded_toeplitz_loss(start, n)
    assert losses[0] == n * (n + 1) / 2
    assert all(more < fewer for fewer, more in zip(losses, losses[1:])), losses


@pytest.mark.parametrize(
    "optimized",
    [
        np.array([1.0, 1.9, 0.95]),  # Worse than the start (roots near -1).
        np.array([np.nan, 0.0, 0.0]),  # A failed run.
        np.array([0.0, 1.0, 0.0]),  # A singular strategy.
    ],
)
def test_falls_back_to_the_best_candidate(monkeypatch, optimized):
    def fake_minimize(start, iterations, max_steps, tol):
        return optimized, 1, 0.0

    monkeypatch.setattr(strategy, "_run_minimize", fake_minimize)
    coefs = dp.optimize_banded_toeplitz(20, 3)
    start = dp.sqrt_toeplitz_coefs(3)
    np.testing.assert_allclose(coefs, start / np.linalg.norm(start), rtol=1e-15)
    assert dp.banded_toeplitz_loss(coefs, 20) < dp.banded_toeplitz_loss(np.ones(1), 20)


def test_optimizer_converges():
    start = dp.sqrt_toeplitz_coefs(16)
    coefs, steps, stationarity = strategy._run_minimize(
        start / np.linalg.norm(start), iterations=1000, max_steps=500, tol=1e-8
    )
    assert coefs.dtype == np.float64
    assert 1 <= steps < 50 and stationarity < 1e-6


def test_zero_steps_returns_normalized_sqrt_start():
    coefs = dp.optimize_banded_toeplitz(100, 5, max_optimizer_steps=0)
    start = dp.sqrt_toeplitz_coefs(5)
    np.testing.assert_allclose(coefs, start / np.linalg.norm(start), rtol=1e-15)


def test_matches_jax_privacy():
    n, bands = 1000, 16
    ours = dp.optimize_banded_toeplitz(n, bands)
    with jax.numpy_dtype_promotion("standard"):  # jax_privacy needs it.
        theirs = toeplitz.optimize_banded_toeplitz(n, bands, max_optimizer_steps=50)
    theirs = np.asarray(theirs, np.float64)
    our_loss = dp.banded_toeplitz_loss(ours, n)
    their_loss = dp.banded_toeplitz_loss(theirs, n)
    assert abs(our_loss - their_loss) <= 1e-3 * their_loss
    assert our_loss <= their_loss * (1 + 1e-9)
    # Their loss is the mean of their per-query error, times ||c||^2; ours the sum.
    with jax.enable_x64(True), jax.numpy_dtype_promotion("standard"):
        coefs = jnp.asarray(_random_coefs(bands, seed=5))
        their_mean = float(toeplitz.loss(coefs, n))
        their_per_query = np.asarray(toeplitz.per_query_error(strategy_coef=coefs, n=n))
    coefs = np.asarray(coefs)
    assert math.isclose(dp.banded_toeplitz_loss(coefs, n), n * their_mean, rel_tol=1e-10)
    assert math.isclose(dp.strategy_rmse(coefs, n) ** 2, their_mean, rel_tol=1e-10)
    np.testing.assert_allclose(
        dp.per_query_error(coefs, n), their_per_query * np.dot(coefs, coefs), rtol=1e-10
    )
    their_sqrt = toeplitz.optimal_max_error_strategy_coefs(8)
    np.testing.assert_allclose(dp.sqrt_toeplitz_coefs(8), their_sqrt, rtol=1e-6)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(iterations=0, num_bands=1), r"`iterations=0`; it must be >= 1"),
        (dict(iterations=10, num_bands=0), r"`num_bands=0`; it must be >= 1"),
        (dict(iterations=10, num_bands=11), r"`num_bands=11` > `iterations=10`"),
        (
            dict(iterations=10, num_bands=2, max_optimizer_steps=-1),
            r"`max_optimizer_steps=-1`; it must be >= 0",
        ),
        (dict(iterations=10, num_bands=2, tol=-1.0), r"`tol` to be a number >= 0"),
        (dict(iterations=10, num_bands=2, tol=math.nan), r"`tol` to be a number >= 0"),
    ],
)
def test_optimize_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        dp.optimize_banded_toeplitz(**kwargs)


def test_optimize_rejects_non_int():
    # (With runtime type checking on, the annotation rejects the float first.)
    with pytest.raises(TypeError, match=r"iterations"):
        dp.optimize_banded_toeplitz(10.0, 2)
    with pytest.raises(TypeError, match=r"`num_bands` to be an int, got True"):
        dp.optimize_banded_toeplitz(10, True)


@pytest.mark.parametrize(
    "fn", [dp.per_query_error, dp.banded_toeplitz_loss, dp.strategy_rmse]
)
@pytest.mark.parametrize(
    "coefs, iterations, match",
    [
        (np.zeros(0), 5, r"non-empty 1-D array"),
        (np.ones(6), 5, r"6 coefficients for `iterations=5`"),
        (np.array([0.0, 1.0]), 5, r"`coefs\[0\] != 0`"),
        (np.array([1.0, np.nan]), 5, r"finite `coefs`"),
        (np.ones(1), 0, r"`iterations=0`; it must be >= 1"),
    ],
)
def test_error_functions_bad_arguments(fn, coefs, iterations, match):
    with pytest.raises(ValueError, match=match):
        fn(coefs, iterations)


def test_sqrt_coefs_bad_arguments():
    with pytest.raises(ValueError, match=r"`num_bands=0`; it must be >= 1"):
        dp.sqrt_toeplitz_coefs(0)
