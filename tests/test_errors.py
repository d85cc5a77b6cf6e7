"""The bad-input catalogue: each misuse raises a clear error naming the fix."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eqx_micro as em


def test_batch_not_divisible_by_microbatch_size():
    f = em.microbatch(lambda batch: jnp.sum(batch["x"]), 0, 3)
    with pytest.raises(ValueError, match=r"10 examples in `batch\['x'\]`, not divisible"):
        f({"x": jnp.ones(10)})


def test_unequal_batch_sizes():
    f = em.microbatch(lambda x, y: jnp.sum(x) + jnp.sum(y), (0, 1), 2)
    with pytest.raises(ValueError, match=r"same batch size; got 10 in `x`, 6 in `y`"):
        f(jnp.ones(10), jnp.ones(6))


def test_zero_dimensional_array_in_batched_position():
    f = em.microbatch(lambda x, s: jnp.sum(x) * s, (0, 1), 2)
    with pytest.raises(ValueError, match=r"0-d array in the batched argument `s`"):
        f(jnp.ones(4), jnp.array(2.0))


@pytest.mark.parametrize("size", [0, -2])
def test_non_positive_microbatch_size(size):
    with pytest.raises(
        ValueError, match=rf"`microbatch_size={size}`; it must be a positive"
    ):
        em.microbatch(jnp.sum, 0, size)
    with pytest.raises(ValueError, match="must be a positive"):
        em.micro_vmap(jnp.sum, microbatch_size=size)


def test_non_integer_microbatch_size():
    # Our own check, or jaxtyping's runtime check first: both name the parameter.
    with pytest.raises(TypeError, match="microbatch_size"):
        em.microbatch(jnp.sum, 0, 2.0)  # type: ignore[arg-type]


def test_argnums_out_of_range():
    with pytest.raises(ValueError, match=r"`argnums` containing 2, but `fun` takes only 2"):
        em.microbatch(lambda x, y: x + y, 2, 2)


def test_batched_argument_missing_at_call_time():
    f = em.microbatch(lambda *args: sum(jnp.sum(a) for a in args), 1, 2)
    with pytest.raises(ValueError, match=r"`argnums` containing 1, but the function was"):
        f(jnp.ones(4))


def test_argnames_unknown_or_duplicated():
    with pytest.raises(ValueError, match="has no parameter of that name"):
        em.microbatch(lambda x: x, (), 2, argnames="y")
    with pytest.raises(ValueError, match="both in `argnums`"):
        em.microbatch(lambda x: x, 0, 2, argnames="x")
    with pytest.raises(ValueError, match="at least one batched argument"):
        em.microbatch(lambda x: x, (), 2)


def test_in_axes_length_and_range():
    with pytest.raises(ValueError, match="2 entries in `in_axes` for 1 batched"):
        em.microbatch(jnp.sum, 0, 2, in_axes=(0, 0))
    f = em.microbatch(jnp.sum, 0, 2, in_axes=3)
    with pytest.raises(ValueError, match=r"batch axis 3 for `a`, which has shape \(4, 2\)"):
        f(jnp.ones((4, 2)))


def test_accumulator_tree_does_not_match_output():
    f = em.microbatch(
        lambda x: {"a": jnp.sum(x), "b": x}, 0, 2, {"a": em.Sum(), "c": em.Concat()}
    )
    with pytest.raises(
        ValueError, match="`accumulator` does not match the function's output"
    ):
        f(jnp.ones(4))


def test_accumulator_of_the_wrong_type():
    with pytest.raises(TypeError, match="accumulator"):
        em.microbatch(jnp.sum, 0, 2, {"a": "sum"})


@pytest.mark.parametrize("n", [-1, 3])
def test_static_num_real_microbatches_out_of_range(n):
    f = em.microbatch(jnp.sum, 0, 2, num_real_microbatches=n)
    with pytest.raises(ValueError, match=rf"`num_real_microbatches={n}`, outside \[0, 2\]"):
        f(jnp.ones(4))


def test_traced_num_real_microbatches_out_of_range():
    f = jax.jit(lambda x, n: em.microbatch(jnp.sum, 0, 2, num_real_microbatches=n)(x))
    assert f(jnp.ones(4), 1) == 2
    with pytest.raises(Exception, match="`num_real_microbatches` is outside"):
        f(jnp.ones(4), 5)


def test_num_real_microbatches_of_the_wrong_type():
    with pytest.raises(TypeError, match="num_real_microbatches"):
        f = em.microbatch(jnp.sum, 0, 2, num_real_microbatches=jnp.array(1.0))
        f(jnp.ones(4))


def fun_with_mask(x, is_padding_example):
    return jnp.sum(jnp.where(is_padding_example, 0.0, x))


def test_non_bool_padding_mask():
    f = em.microbatch(fun_with_mask, 0, 2)
    with pytest.raises(TypeError, match="boolean array .* got dtype float32"):
        f(jnp.ones(4), is_padding_example=jnp.array([0.0, 0.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match="is_padding_example.*other than 0 and 1"):
        f(jnp.ones(4), is_padding_example=jnp.array([0, 0, 2, 1]))


def test_integer_padding_mask_equals_the_boolean_one():
    f = em.microbatch(fun_with_mask, 0, 2)
    x = jnp.arange(1.0, 5.0)
    as_bool = f(x, is_padding_example=jnp.array([False, True, False, True]))
    as_int = f(x, is_padding_example=jnp.array([0, 1, 0, 1]))
    assert float(as_bool) == float(as_int) == 4.0


def test_padding_mask_of_the_wrong_length_or_rank():
    f = em.microbatch(fun_with_mask, 0, 2)
    with pytest.raises(ValueError, match="length 6 for a batch of 4"):
        f(jnp.ones(4), is_padding_example=jnp.zeros(6, bool))
    with pytest.raises(ValueError, match="one-dimensional"):
        f(jnp.ones(4), is_padding_example=jnp.zeros((4, 1), bool))


def test_padding_mask_for_a_function_that_cannot_take_it():
    f = em.microbatch(jnp.sum, 0, 2)
    with pytest.raises(TypeError, match="takes no `is_padding_example` keyword"):
        f(jnp.ones(4), is_padding_example=jnp.zeros(4, bool))


@pytest.mark.parametrize("accumulator", [em.Mean(), em.RunningMean()])
def test_mean_of_integers(accumulator):
    f = em.microbatch(jnp.sum, 0, 2, accumulator)
    name = type(accumulator).__name__
    with pytest.raises(ValueError, match=rf"`{name}` needs floating-point values"):
        f(jnp.arange(4))
    as_float = em.microbatch(jnp.sum, 0, 2, type(accumulator)(dtype=jnp.float32))
    assert as_float(jnp.arange(4)) == 3.0  # microbatch sums 2 and 4


def test_concat_of_a_scalar_output():
    f = em.microbatch(jnp.sum, 0, 2, em.Concat())
    with pytest.raises(ValueError, match="`Concat` needs a leading batch axis"):
        f(jnp.ones(4))


def test_no_arrays_in_batched_arguments():
    f = em.microbatch(lambda s: s, 0, 2)
    with pytest.raises(ValueError, match="found no arrays to split"):
        f("not an array")


def test_out_axes_with_a_reducing_accumulator():
    f = em.micro_vmap(jnp.sum, out_axes=1, accumulator=em.Sum(), microbatch_size=2)
    with pytest.raises(ValueError, match="`out_axes` other than 0 needs `Concat"):
        f(jnp.ones((4, 3)))


def test_sharded_batch_with_indivisible_microbatch_size_is_checked_in_subprocess():
    # Exercised in tests/test_sharding.py (needs 8 devices).
    assert hasattr(em, "reshape_batch_axis")


def test_abstract_accumulator_cannot_be_instantiated():
    with pytest.raises(TypeError):
        em.AbstractAccumulator()  # type: ignore[abstract]
    assert isinstance(em.Sum(), eqx.Module)


def test_reshape_batch_axis_errors():
    with pytest.raises(ValueError, match="not divisible"):
        em.reshape_batch_axis(jnp.ones(5), 2)
    with pytest.raises(ValueError, match="same batch size"):
        em.reshape_batch_axis({"a": jnp.ones(4), "b": jnp.ones(6)}, 2)
    with pytest.raises(ValueError, match="`axis=2`"):
        em.reshape_batch_axis(jnp.ones((4, 2)), 2, axis=2)


def test_compute_early_stopping_order_errors():
    with pytest.raises(ValueError, match="not divisible"):
        em.compute_early_stopping_order(10, 3)
    with pytest.raises(ValueError, match="batch_size=-1.*non-negative"):
        em.compute_early_stopping_order(-1, 3)
    assert np.array_equal(em.compute_early_stopping_order(3, None), np.arange(3))
