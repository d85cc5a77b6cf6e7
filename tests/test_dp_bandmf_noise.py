"""`dp.BandMFNoise`: streaming `C⁻¹ z` against a dense solve, covariance, resume."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

import eqx_micro.dp as dp


def toeplitz(coefs, n):
    """The dense lower-triangular banded Toeplitz matrix with first column `coefs`."""
    matrix = np.zeros((n, n))
    for band, c in enumerate(coefs):
        matrix += c * np.eye(n, k=-band)
    return matrix


def stream(noise, template, steps, state=None):
    state = noise.init(template) if state is None else state
    outputs = []
    for _ in range(steps):
        noised, state = noise.update(template, state)
        outputs.append(noised)
    return outputs, state


@pytest.mark.parametrize("coefs", [[1.0], [1.0, 0.5], [0.7, 0.5, 0.3, 0.1]])
@pytest.mark.parametrize("steps", [1, 3, 9])
def test_streaming_noise_equals_dense_inverse(coefs, steps):
    stddev = 1.7
    template = {"a": jnp.zeros((5, 2)), "b": jnp.zeros(3)}
    # BandMFNoise draws z with GaussianNoise's key schedule, so the latter gives Z.
    z, _ = stream(dp.GaussianNoise(stddev, key=4), template, steps)
    w, _ = stream(dp.BandMFNoise(coefs, stddev, key=4), template, steps)
    inverse = np.linalg.inv(toeplitz(coefs, steps))
    for leaf in ("a", "b"):
        z_matrix = np.stack([np.ravel(o[leaf]) for o in z]).astype(np.float64)
        w_matrix = np.stack([np.ravel(o[leaf]) for o in w]).astype(np.float64)
        np.testing.assert_allclose(w_matrix, inverse @ z_matrix, rtol=1e-5, atol=1e-5)


def test_one_band_is_gaussian_noise_bit_for_bit():
    template = {"w": jnp.zeros((8, 4)), "frozen": None, "b": jnp.zeros(4, jnp.bfloat16)}
    gaussian, _ = stream(dp.GaussianNoise(0.9, key=11), template, 4)
    banded, _ = stream(dp.BandMFNoise([1.0], 0.9, key=11), template, 4)
    assert eqx.tree_equal(gaussian, banded)


def test_covariance_and_decorrelation():
    coefs = np.array([0.8, 0.5, 0.3])
    stddev, steps, size = 2.0, 6, 40_000
    w, _ = stream(dp.BandMFNoise(coefs, stddev, key=0), {"w": jnp.zeros(size)}, steps)
    w_matrix = np.stack([np.asarray(o["w"], np.float64) for o in w])
    # Cov(w) = stddev² C⁻¹ C⁻ᵀ, estimated over the coordinates.
    inverse = np.linalg.inv(toeplitz(coefs, steps))
    expected = stddev**2 * inverse @ inverse.T
    empirical = w_matrix @ w_matrix.T / size
    scale = np.sqrt(np.outer(np.diag(expected), np.diag(expected)))
    assert np.abs(empirical - expected).max() < 6 * scale.max() / np.sqrt(size)
    # Applying C recovers iid N(0, stddev²) draws.
    recovered = toeplitz(coefs, steps) @ w_matrix / stddev
    for row in recovered:
        assert scipy.stats.kstest(row, "norm").pvalue > 1e-4
    correlation = np.corrcoef(recovered)
    assert np.abs(correlation - np.eye(steps)).max() < 6 / np.sqrt(size)


def test_runs_past_any_horizon_without_repeating():
    noise = dp.BandMFNoise([0.6, 0.8], 1.0, key=2)
    outputs, state = stream(noise, {"w": jnp.zeros(3)}, 40)
    values = np.concatenate([np.asarray(o["w"]) for o in outputs])
    assert len(np.unique(values)) == values.size and state.count == 40


def test_resume_after_serialisation(tmp_path):
    noise = dp.BandMFNoise([0.6, 0.5, 0.4], 1.0, key=3)
    template = {"w": jnp.zeros((3, 2))}
    full, _ = stream(noise, template, 7)
    _, state = stream(noise, template, 4)
    path = tmp_path / "bandmf_state.eqx"
    eqx.tree_serialise_leaves(path, state)
    restored = eqx.tree_deserialise_leaves(path, noise.init(template))
    rest, _ = stream(noise, template, 3, restored)
    assert eqx.tree_equal(rest, full[4:])


def test_equinox_model_and_dtypes():
    model = eqx.nn.MLP(3, 2, 4, 1, key=jax.random.key(0))
    model = jax.tree.map(
        lambda x: x.astype(jnp.bfloat16) if eqx.is_inexact_array(x) else x, model
    )
    noise = dp.BandMFNoise([0.8, 0.6], 1.0, key=0)
    state = noise.init(model)
    grads = eqx.filter(model, eqx.is_inexact_array)
    step = eqx.filter_jit(noise.update)
    noised, state = step(grads, state)
    noised, state = step(grads, state)
    assert noised.layers[0].weight.dtype == jnp.bfloat16
    assert state.history.layers[0].weight.dtype == jnp.float32
    assert noised.activation is None


@pytest.mark.parametrize(
    "coefs,message",
    [
        ([], "non-empty 1-D"),
        ([0.0, 1.0], r"`coefs\[0\] > 0`"),
        ([-1.0], r"`coefs\[0\] > 0`"),
        ([1.0, np.nan], "must be finite"),
    ],
)
def test_bad_coefs(coefs, message):
    with pytest.raises(ValueError, match=message):
        dp.BandMFNoise(np.asarray(coefs), 1.0, key=0)


def test_updates_must_match_init_structure():
    noise = dp.BandMFNoise([0.8, 0.6], 1.0, key=0)
    state = noise.init({"w": jnp.zeros(3)})
    with pytest.raises(ValueError, match="structure `BandMFNoise.init` was given"):
        noise.update({"w": jnp.zeros(3), "b": jnp.zeros(2)}, state)
    with pytest.raises(ValueError, match="no matching history"):
        noise.update({"w": jnp.zeros(4)}, state)
    with pytest.raises(ValueError, match="`stddev` must be a finite non-negative"):
        dp.BandMFNoise([1.0], -1.0, key=0)
