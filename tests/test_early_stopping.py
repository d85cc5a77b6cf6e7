import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

import eqx_micro as em


def test_compute_early_stopping_order_values():
    assert em.compute_early_stopping_order(10, 2).tolist() == [0, 2, 4, 6, 8, 1, 3, 5, 7, 9]
    assert em.compute_early_stopping_order(6, 3).tolist() == [0, 3, 1, 4, 2, 5]
    assert em.compute_early_stopping_order(5, None).tolist() == [0, 1, 2, 3, 4]
    assert em.compute_early_stopping_order(0, 4).tolist() == []


@settings(max_examples=30, deadline=None)
@given(microbatch_size=st.integers(1, 5), num_microbatches=st.integers(0, 6))
def test_early_stopping_order_makes_microbatches_contiguous(
    microbatch_size, num_microbatches
):
    batch_size = microbatch_size * num_microbatches
    order = em.compute_early_stopping_order(batch_size, microbatch_size)
    assert sorted(order.tolist()) == list(range(batch_size))
    if batch_size:
        split = em.reshape_batch_axis(jnp.asarray(order), microbatch_size)
        expected = np.arange(batch_size).reshape(num_microbatches, microbatch_size)
        assert (np.asarray(split) == expected).all()


@pytest.mark.parametrize(
    "microbatch_size,unordered,ordered", [(1, 3, 3), (2, 3, 2), (3, 2, 1), (6, 1, 1)]
)
def test_count_real_microbatches(microbatch_size, unordered, ordered):
    mask = np.array([0, 0, 0, 1, 1, 1], bool)
    order = em.compute_early_stopping_order(6, microbatch_size)
    assert em.count_real_microbatches(mask, microbatch_size) == unordered
    assert em.count_real_microbatches(mask[order], microbatch_size) == ordered
    assert (
        jax.jit(em.count_real_microbatches, static_argnums=1)(mask[order], microbatch_size)
        == ordered
    )


def test_count_real_microbatches_extremes():
    assert em.count_real_microbatches(np.ones(6, bool), 2) == 0
    assert em.count_real_microbatches(np.zeros(6, bool), 2) == 3
    assert em.count_real_microbatches(np.zeros(6, bool), None) == 1
    assert em.count_real_microbatches(np.zeros(0, bool), 2) == 0


@pytest.mark.parametrize("microbatch_size", [1, 2, 3, 6])
@pytest.mark.parametrize("permute", [False, True])
def test_dynamic_batch_sum_and_order_verification(microbatch_size, permute):
    data = jnp.array([2.0, 4.0, 6.0, -1.0, -1.0, -1.0])
    mask = data == -1
    if permute:
        order = em.compute_early_stopping_order(6, microbatch_size)
        data, mask = data[order], mask[order]

    def fun(x, is_padding_example):
        return jnp.sum(jnp.where(is_padding_example, 0.0, x**2))

    f = em.microbatch(fun, 0, microbatch_size)
    assert f(data, is_padding_example=mask) == 56
    assert em.verify_early_stopping_order(np.asarray(mask), microbatch_size) == (
        permute or microbatch_size in (1, 6)
    )


@settings(max_examples=30, deadline=None)
@given(
    microbatch_size=st.integers(1, 4),
    num_microbatches=st.integers(1, 5),
    data=st.data(),
)
def test_early_stopping_is_exact_and_minimal_with_the_order(
    microbatch_size, num_microbatches, data
):
    batch_size = microbatch_size * num_microbatches
    num_real = data.draw(st.integers(0, batch_size))
    mask = np.arange(batch_size) >= num_real
    values = np.arange(1.0, batch_size + 1, dtype=np.float32)
    order = em.compute_early_stopping_order(batch_size, microbatch_size)
    mask_o, values_o = mask[order], values[order]
    assert em.verify_early_stopping_order(mask_o, microbatch_size)
    expected_runs = -(-num_real // microbatch_size)
    assert em.count_real_microbatches(mask_o, microbatch_size) == expected_runs

    def fun(x, is_padding_example):
        return jnp.sum(jnp.where(is_padding_example, 0.0, x))

    f = em.microbatch(fun, 0, microbatch_size)
    out = f(jnp.asarray(values_o), is_padding_example=jnp.asarray(mask_o))
    assert out == values[:num_real].sum()


def test_verify_rejects_traced_masks():
    with pytest.raises(TypeError, match="concrete mask"):
        jax.jit(lambda m: em.verify_early_stopping_order(m, 2))(jnp.zeros(4, bool))


def test_verify_identifies_misplaced_padding():
    # mbs=2, M=3: microbatches {0,3}, {1,4}, {2,5}.
    # Full, mixed, padding: optimal.
    assert em.verify_early_stopping_order(np.array([0, 0, 1, 0, 1, 1], bool), 2)
    # Full, then two mixed: one microbatch more than needed.
    assert not em.verify_early_stopping_order(np.array([0, 0, 0, 0, 1, 1], bool), 2)
    # Padding first.
    assert not em.verify_early_stopping_order(np.array([1, 0, 0, 1, 0, 0], bool), 2)
    assert em.verify_early_stopping_order(np.array([0, 0, 1, 0, 0, 1], bool), 2)


@pytest.mark.parametrize("num_padding", [0, 3, 6])
def test_one_microbatch_with_a_traced_mask_runs_without_a_loop(num_padding):
    """A whole-batch microbatch under `jit` runs at top level (a one-trip loop costs
    XLA's fusions) and still early-stops: an all-padding batch skips it entirely."""
    data = jnp.arange(1.0, 7.0)
    mask = jnp.arange(6) >= 6 - num_padding

    def fun(x, is_padding_example):  # ignores the mask: only early stopping skips
        return jnp.sum(x)

    f = jax.jit(lambda x, m: em.microbatch(fun, 0, 6)(x, is_padding_example=m))
    expected = 0.0 if num_padding == 6 else 21.0
    assert f(data, mask) == expected
    assert "while" not in f.lower(data, mask).compile().as_text()
