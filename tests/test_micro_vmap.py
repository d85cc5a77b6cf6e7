import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax.microbatching as omb
import pytest
from hypothesis import given, settings

import eqx_micro as em

from .helpers import assert_tree_allclose


@settings(max_examples=20, deadline=None)
@given(
    batch_size=st.sampled_from([1, 4, 6, 8]),
    axis=st.sampled_from([0, 1, -1]),
    data=st.data(),
)
def test_concat_equals_vmap(batch_size, axis, data):
    microbatch_size = data.draw(
        st.sampled_from([d for d in range(1, batch_size + 1) if batch_size % d == 0])
    )
    rng = np.random.default_rng(batch_size)
    shape = [3, 2]
    shape.insert(axis % 3 if axis >= 0 else 2, batch_size)
    x = jnp.asarray(rng.normal(size=shape), jnp.float32)
    w = jnp.asarray(rng.normal(size=(3,)), jnp.float32)  # not batched
    fun = lambda x, w: {"norm": jnp.linalg.norm(x), "outer": jnp.outer(x[:, 0], w)}
    expected = jax.vmap(fun, in_axes=(axis, None))(x, w)
    actual = em.micro_vmap(fun, in_axes=(axis, None), microbatch_size=microbatch_size)(x, w)
    assert_tree_allclose(actual, expected)


def test_in_axes_one_matches_vmap_and_optax():
    x = jnp.arange(64.0).reshape(2, 4, 8)
    expected = jax.vmap(jnp.sum, in_axes=1)(x)
    assert_tree_allclose(em.micro_vmap(jnp.sum, in_axes=1, microbatch_size=2)(x), expected)
    assert_tree_allclose(omb.micro_vmap(jnp.sum, in_axes=1, microbatch_size=2)(x), expected)


def test_keyword_arguments_are_mapped_on_axis_zero():
    def fun(x, *, y):
        return x * y

    x, y = jnp.arange(6.0), jnp.arange(6.0) + 1
    assert_tree_allclose(em.micro_vmap(fun, microbatch_size=3)(x, y=y), x * y)


@pytest.mark.parametrize(
    "accumulator,expected",
    [(em.Sum(), 12.0), (em.Mean(), 0.75), (em.RunningMean(), 1.0), (em.Max(), 1.0)],
)
def test_reducing_accumulators_with_early_stopping(accumulator, expected):
    f = em.micro_vmap(
        jnp.sum, microbatch_size=4, accumulator=accumulator, num_real_microbatches=3
    )
    assert f(jnp.ones(16)) == expected


@pytest.mark.parametrize("microbatch_size", [None, 1, 2, 6])
def test_sum_and_mean_of_per_example_values(microbatch_size, getkey):
    x = jax.random.normal(getkey(), (6, 5))
    total = em.micro_vmap(
        lambda x: x**2, microbatch_size=microbatch_size, accumulator=em.Sum()
    )(x)
    mean = em.micro_vmap(
        lambda x: x**2, microbatch_size=microbatch_size, accumulator=em.Mean()
    )(x)
    assert_tree_allclose(total, jnp.sum(x**2, axis=0))
    assert_tree_allclose(mean, jnp.mean(x**2, axis=0))


def test_out_axes_moves_the_batch_axis(getkey):
    x = jax.random.normal(getkey(), (6, 3))
    fun = lambda x: jnp.outer(x, x)
    expected = jax.vmap(fun, out_axes=2)(x)
    assert_tree_allclose(em.micro_vmap(fun, out_axes=2, microbatch_size=2)(x), expected)


def test_non_array_arguments_are_not_mapped():
    def fun(x, mode, scale):
        assert mode == "double" and scale == 2
        return x * scale

    x = jnp.arange(4.0)
    assert_tree_allclose(em.micro_vmap(fun, microbatch_size=2)(x, "double", 2), x * 2)


def test_padding_mask_reaches_each_example(getkey):
    def loss(x, *, is_padding_example):
        return jnp.where(is_padding_example, 0.0, x**2)

    x = jnp.arange(8.0)
    mask = jnp.arange(8) >= 3
    f = em.micro_vmap(loss, microbatch_size=2, accumulator=em.Sum())
    order = em.compute_early_stopping_order(8, 2)
    assert f(x[order], is_padding_example=mask[order]) == 0 + 1 + 4
    per_example = em.micro_vmap(loss, microbatch_size=2)(x, is_padding_example=mask)
    assert_tree_allclose(per_example, jnp.where(mask, 0.0, x**2))


# Sum and Mean fold large per-example outputs into the carry a block of rows at a time
# (`_engine._FoldInChunks`, on XLA:CPU): leaves above 256 KiB, here 300 x 250 float32
# (293 KiB, 2 blocks) and 1001 x 300 (1.1 MiB, 5 blocks of 201 rows, the last short).
@pytest.mark.parametrize("accumulator", [em.Sum(), em.Mean(), em.Sum(jnp.float32)])
@pytest.mark.parametrize("num_real", [None, 3])
def test_large_outputs_fold_in_blocks_exactly(accumulator, num_real, getkey):
    x = jax.random.normal(getkey(), (8, 300))
    u = jax.random.normal(getkey(), (250,))
    v = jax.random.normal(getkey(), (1001,))

    def fun(x):
        return {
            "a": jnp.outer(x, u),
            "b": jnp.outer(v, x),
            "n": jnp.sum(x).astype(jnp.int32),
        }

    accumulators = {"a": accumulator, "b": accumulator, "n": em.Sum()}
    f = em.micro_vmap(
        fun, microbatch_size=2, accumulator=accumulators, num_real_microbatches=num_real
    )
    out = jax.jit(f)(x)
    # Microbatch j holds examples j and j + 4 (column-major split).
    used = x if num_real is None else x[jnp.array([0, 1, 2, 4, 5, 6])]
    per_example = jax.vmap(fun)(used)
    # Mean: of each microbatch, then over all 4 (skipped ones count as zeros).
    scale = 1.0 if isinstance(accumulator, em.Sum) else 1.0 / 8
    for name in ("a", "b"):
        expected = per_example[name].reshape(-1, 2, *per_example[name].shape[1:])
        expected = expected.sum(axis=1).sum(axis=0) * scale
        np.testing.assert_allclose(out[name], expected, rtol=1e-5, atol=1e-5)
    assert out["n"] == per_example["n"].sum()


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="an XLA:CPU tweak")
def test_folding_in_blocks_saves_the_largest_leafs_copy():
    from eqx_micro import _backend

    layer = jnp.zeros((512, 784))
    grad = em.micro_grad(lambda w, x: jnp.sum(jnp.tanh(x @ w.T)), microbatch_size=32)

    def temp_bytes():
        compiled = jax.jit(lambda w, x: grad(w, x)[0]).lower(layer, jnp.ones((256, 784)))
        return compiled.compile().memory_analysis().temp_size_in_bytes

    blocked = temp_bytes()
    with _backend.disabled(_backend.Tweak.FOLD_IN_CHUNKS):
        whole = temp_bytes()
    # Without blocks XLA holds the 1.5 MiB contraction output next to the carry; with
    # 8 blocks, one block of 192 KiB.
    assert whole - blocked >= 1.2 * 2**20, (whole, blocked)
