"""`dp.GaussianNoise`: statistics, key freshness, dtypes, resume and optax composition."""

import io

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.stats

import eqx_micro.dp as dp


def zeros_tree():
    return {"w": jnp.zeros((64, 32)), "b": jnp.zeros(32), "frozen": None}


def run(noise, grads, steps, state=None):
    state = noise.init(grads) if state is None else state
    outputs = []
    for _ in range(steps):
        noised, state = noise.update(grads, state)
        outputs.append(noised)
    return outputs, state


def test_noise_is_normal_with_the_given_stddev():
    stddev = 2.5
    (noised,), _ = run(dp.GaussianNoise(stddev, key=0), {"w": jnp.zeros(20_000)}, 1)
    sample = np.asarray(noised["w"], np.float64)
    result = scipy.stats.kstest(sample / stddev, "norm")
    assert result.pvalue > 1e-3
    assert abs(sample.mean()) < 5 * stddev / np.sqrt(sample.size)
    assert abs(sample.std() / stddev - 1) < 5 / np.sqrt(2 * sample.size)


def test_noise_is_added_to_the_input():
    grads = {"w": jnp.arange(4.0)}
    (noised,), _ = run(dp.GaussianNoise(0.0, key=0), grads, 1)
    assert (noised["w"] == grads["w"]).all()
    (noised,), _ = run(dp.GaussianNoise(1e-3, key=0), grads, 1)
    assert jnp.allclose(noised["w"], grads["w"], atol=1e-2)
    assert not (noised["w"] == grads["w"]).all()


def test_no_value_repeats_across_steps_and_leaves():
    # Few values: float32 normals come from 23-bit uniforms, so thousands of draws
    # would collide by chance (birthday bound), while a reused key repeats them all.
    small = {"w": jnp.zeros((4, 3)), "b": jnp.zeros(3), "c": jnp.zeros(3)}
    outputs, _ = run(dp.GaussianNoise(1.0, key=1234), small, 3)
    other, _ = run(dp.GaussianNoise(1.0, key=5678), small, 1)
    values = np.concatenate(
        [np.ravel(leaf) for out in outputs + other for leaf in jax.tree.leaves(out)]
    )
    assert values.size == 72 and len(np.unique(values)) == values.size
    # Steps and leaves are also uncorrelated.
    outputs, _ = run(dp.GaussianNoise(1.0, key=1234), zeros_tree(), 2)
    a, b = np.ravel(outputs[0]["w"]), np.ravel(outputs[1]["w"])
    assert abs(np.corrcoef(a, b)[0, 1]) < 5 / np.sqrt(a.size)
    c = np.ravel(outputs[0]["w"])[:32]
    assert abs(np.corrcoef(c, np.ravel(outputs[0]["b"]))[0, 1]) < 0.8


def test_same_key_same_stream_and_pure_updates():
    first, _ = run(dp.GaussianNoise(1.0, key=jax.random.key(7)), zeros_tree(), 3)
    second, _ = run(dp.GaussianNoise(1.0, key=7), zeros_tree(), 3)
    assert eqx.tree_equal(first, second)
    noise = dp.GaussianNoise(1.0, key=7)
    state = noise.init(None)
    assert eqx.tree_equal(
        noise.update(zeros_tree(), state), noise.update(zeros_tree(), state)
    )


def test_resume_after_serialisation_continues_the_stream(tmp_path):
    noise = dp.GaussianNoise(1.0, key=3)
    full, _ = run(noise, zeros_tree(), 5)
    _, state = run(noise, zeros_tree(), 2)
    path = tmp_path / "noise_state.eqx"
    eqx.tree_serialise_leaves(path, state)
    restored = eqx.tree_deserialise_leaves(path, noise.init(None))
    rest, restored = run(noise, zeros_tree(), 3, restored)
    assert eqx.tree_equal(rest, full[2:])
    assert restored.count == 5


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_dtype_is_preserved(dtype):
    grads = {"w": jnp.zeros(1000, dtype)}
    (noised,), _ = run(dp.GaussianNoise(1.0, key=0), grads, 1)
    assert noised["w"].dtype == dtype
    assert 0.9 < float(jnp.std(noised["w"].astype(jnp.float32))) < 1.1


def test_inside_optax_chain_under_jit():
    noise = dp.GaussianNoise(1.0, key=0)
    optimizer = optax.chain(noise, optax.sgd(1.0))
    params = {"w": jnp.zeros(8)}
    state = optimizer.init(params)

    @eqx.filter_jit
    def step(params, state):
        updates, state = optimizer.update({"w": jnp.zeros(8)}, state, params)
        return optax.apply_updates(params, updates), state

    params1, state = step(params, state)
    params2, state = step(params1, state)
    (expected_1, expected_2), _ = run(noise, {"w": jnp.zeros(8)}, 2)
    assert jnp.allclose(params1["w"], -expected_1["w"])
    assert jnp.allclose(params2["w"], -expected_1["w"] - expected_2["w"])


def test_changing_stddev_does_not_recompile():
    traces = []

    @eqx.filter_jit
    def step(noise, state):
        traces.append(1)
        return noise.update({"w": jnp.zeros(3)}, state)

    noise = dp.GaussianNoise(1.0, key=0)
    state = noise.init(None)
    step(noise, state)
    step(dp.GaussianNoise(2.0, key=0), state)
    assert len(traces) == 1


@pytest.mark.parametrize("stddev", [-1.0, np.nan, np.inf])
def test_bad_stddev(stddev):
    with pytest.raises(ValueError, match="`stddev` must be a finite non-negative"):
        dp.GaussianNoise(stddev, key=0)


def test_bad_key_and_leaves():
    with pytest.raises(TypeError, match="key"):
        dp.GaussianNoise(1.0, key="seed")  # type: ignore
    with pytest.raises(TypeError, match="typed PRNG key"):
        dp.GaussianNoise(1.0, key=jax.random.PRNGKey(0))
    noise = dp.GaussianNoise(1.0, key=0)
    with pytest.raises(TypeError, match="floating-point leaves"):
        noise.update({"count": jnp.zeros(3, jnp.int32)}, noise.init(None))


def test_serialized_state_bytes_roundtrip():
    noise = dp.GaussianNoise(1.0, key=11)
    _, state = run(noise, zeros_tree(), 1)
    buffer = io.BytesIO()
    eqx.tree_serialise_leaves(buffer, state)
    buffer.seek(0)
    restored = eqx.tree_deserialise_leaves(buffer, noise.init(None))
    assert eqx.tree_equal(restored, state)
