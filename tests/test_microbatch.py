import functools

import equinox as eqx
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import optax.microbatching as omb
import pytest
from hypothesis import given, settings

import eqx_micro as em

from .helpers import Affine, assert_tree_allclose, mixed_batch, mixed_fun


# --------------------------------------------------------------------------------------
# The central property: microbatched == plain == optax, for every accumulator.

# accumulator name -> (ours, optax's or None, function of (x, w) reducing the batch)
REDUCTIONS = {
    "sum": (em.Sum(), omb.AccumulationType.SUM, lambda x, w: jnp.sum(x * w, axis=0)),
    "mean": (em.Mean(), omb.AccumulationType.MEAN, lambda x, w: jnp.mean(x * w, axis=0)),
    "running_mean": (
        em.RunningMean(),
        omb.AccumulationType.RUNNING_MEAN,
        lambda x, w: jnp.mean(x * w, axis=0),
    ),
    "concat": (em.Concat(), omb.AccumulationType.CONCAT, lambda x, w: x * w + 1),
    "max": (em.Max(), None, lambda x, w: jnp.max(x * w, axis=0)),
    "min": (em.Min(), None, lambda x, w: jnp.min(x * w, axis=0)),
}
FLOAT_ONLY = {"mean", "running_mean"}


def divisors(n):
    return [d for d in range(1, n + 1) if n % d == 0]


@st.composite
def microbatch_cases(draw):
    name = draw(st.sampled_from(sorted(REDUCTIONS)))
    dtypes = [jnp.float32, jnp.bfloat16, jnp.float16]
    if name not in FLOAT_ONLY:
        dtypes.append(jnp.int32)
    dtype = draw(st.sampled_from(dtypes))
    batch_size = draw(st.sampled_from([1, 2, 4, 6, 8, 12]))
    # Sizes 1, a divisor, and the whole batch.
    microbatch_size = draw(st.sampled_from(sorted({1, batch_size, *divisors(batch_size)})))
    feature_shape = tuple(draw(st.lists(st.integers(1, 3), max_size=2)))
    seed = draw(st.integers(0, 2**16))
    # Small integers: exact in every dtype, so only the summation order differs.
    rng = np.random.default_rng(seed)
    x = rng.integers(-4, 5, (batch_size, *feature_shape)).astype(dtype)
    w = rng.integers(-2, 3, (batch_size,) + (1,) * len(feature_shape)).astype(dtype)
    return name, jnp.asarray(x), jnp.asarray(w), microbatch_size


@settings(max_examples=30, deadline=None)
@given(
    case=microbatch_cases(),
    how=st.sampled_from(["argnums", "argnames", "mixed"]),
    batch_axis=st.sampled_from([0, 1]),
)
def test_microbatch_equals_plain_and_optax(case, how, batch_axis):
    name, x, w, microbatch_size = case
    ours, theirs, reduce = REDUCTIONS[name]
    batch_axis = batch_axis if x.ndim > 1 else 0
    x = jnp.moveaxis(x, 0, batch_axis)  # The batch travels on `batch_axis` of `x`.

    def fun(x, w):
        return reduce(jnp.moveaxis(x, batch_axis, 0), w)

    axes = (batch_axis, 0)
    argnums, argnames, call = {
        "argnums": ((0, 1), (), lambda f: f(x, w)),
        "argnames": ((), ("x", "w"), lambda f: f(x=x, w=w)),
        "mixed": ((0,), ("w",), lambda f: f(x, w=w)),
    }[how]
    expected = fun(x, w)
    kwargs = dict(argnames=argnames, in_axes=axes)
    actual = call(em.microbatch(fun, argnums, microbatch_size, ours, **kwargs))
    assert_tree_allclose(actual, expected)
    if theirs is not None:
        reference = call(omb.microbatch(fun, argnums, microbatch_size, theirs, **kwargs))
        assert_tree_allclose(actual, reference)


@settings(max_examples=8, deadline=None)
@given(
    batch_size=st.sampled_from([2, 4, 6, 12]),
    data=st.data(),
)
def test_accumulator_prefix_tree_on_mixed_pytree(batch_size, data):
    microbatch_size = data.draw(st.sampled_from(divisors(batch_size)))
    batch = mixed_batch(jax.random.key(batch_size), batch_size)
    accumulator = {
        "per_example": em.Concat(),
        "sum": em.Sum(),
        "mean": em.AccumulationType.MEAN,
        "tag": em.Sum(),
        "nothing": em.Sum(),
    }
    expected = mixed_fun(batch)
    f = em.microbatch(mixed_fun, 0, microbatch_size, accumulator)
    assert_tree_allclose(f(batch), expected)
    assert_tree_allclose(eqx.filter_jit(f)(batch), expected)


def test_column_major_split_on_non_decomposable_function():
    # Microbatches {0, 2, 4} and {1, 3, 5}: 0*2 + 2*4 + 1*3 + 3*5 = 26, not 40.
    x = jnp.arange(6.0)
    f = lambda x: x[:-1] @ x[1:]
    assert f(x) == 40
    assert em.microbatch(f, 0, 3)(x) == 26
    assert omb.microbatch(f, 0, 3)(x) == 26


@pytest.mark.parametrize(
    "argnums,argnames,call",
    [
        ((0, 1), (), lambda f, a, b: f(a, b)),
        ((1, 0), (), lambda f, a, b: f(a, b)),
        ((), ("a", "b"), lambda f, a, b: f(a=a, b=b)),
        ((), ("b", "a"), lambda f, a, b: f(b=b, a=a)),
        ((0,), ("b",), lambda f, a, b: f(a, b=b)),
        # Batched arguments passed the other way round from how they were declared.
        ((0, 1), (), lambda f, a, b: f(a, b=b)),
        ((), ("a", "b"), lambda f, a, b: f(a, b)),
    ],
)
def test_argnums_and_argnames_are_interchangeable(argnums, argnames, call):
    def fun(a, b, c=1.0):
        return jnp.sum(a * b) * c

    a, b = jnp.arange(8.0), jnp.arange(8.0) + 1
    f = em.microbatch(fun, argnums, 2, argnames=argnames)
    assert call(f, a, b) == fun(a, b)


@pytest.mark.parametrize("accumulator", [em.Sum(), em.Mean(), em.RunningMean()])
def test_in_axes_one_matches_in_axes_zero(accumulator, getkey):
    x = jax.random.normal(getkey(), (10, 4, 5))
    fun = lambda x: jnp.einsum("bij,bkj->ik", x, x)
    on_zero = em.microbatch(fun, 0, 2, accumulator)(x)
    fun_t = lambda xt: fun(jnp.transpose(xt, (1, 0, 2)))
    on_one = em.microbatch(fun_t, 0, 2, accumulator, in_axes=1)(jnp.transpose(x, (1, 0, 2)))
    assert_tree_allclose(on_one, on_zero)


def test_in_axes_per_argument_with_pytree_prefix():
    def fun(batch, weights):
        return jnp.sum(batch["x"] @ weights) + jnp.sum(batch["bias"])

    batch = {"x": jnp.arange(24.0).reshape(8, 3), "bias": jnp.arange(8.0)}
    weights = jnp.arange(6.0).reshape(3, 2)
    f = em.microbatch(fun, (0, 1), 4, in_axes=({"x": 0, "bias": 0}, None))
    assert_tree_allclose(f(batch, weights), fun(batch, weights))


def test_module_fun_and_method_decorator(getkey):
    model = Affine(jax.random.normal(getkey(), (3, 2)))
    x = jax.random.normal(getkey(), (6, 3))
    f = em.microbatch(model, 0, 2, em.Concat())
    assert_tree_allclose(f(x), model(x))
    assert_tree_allclose(eqx.filter_jit(f)(x), model(x))

    class Model(eqx.Module):
        weight: jax.Array

        @functools.partial(em.microbatch, argnums=1, microbatch_size=3)
        def loss(self, x):
            return jnp.sum(x @ self.weight)

    m = Model(jnp.ones((3, 2)))
    assert jnp.allclose(m.loss(x), jnp.sum(x @ m.weight), rtol=1e-5)


def test_microbatch_size_none_runs_one_microbatch():
    # `None` means the whole batch as one microbatch, as in every eqx_micro transform.
    x = jnp.arange(6.0)
    assert em.microbatch(jnp.sum, 0, None)(x) == 15.0
    assert em.microbatch(jnp.sum, 0, None, num_real_microbatches=0)(x) == 0.0
    assert em.micro_vmap(jnp.sin, microbatch_size=None)(x).shape == (6,)


def test_non_array_outputs_and_python_scalars_pass_through():
    def fun(x, label, scale):
        return {"total": jnp.sum(x) * scale, "label": label, "scale": scale}

    f = em.microbatch(fun, 0, 2)
    out = f(jnp.arange(4.0), "hello", 3)
    assert out["label"] == "hello" and out["scale"] == 3 and out["total"] == 18.0


def test_function_traced_once(getkey):
    traces = []

    def fun(x):
        traces.append(1)
        return jnp.sum(x)

    em.microbatch(fun, 0, 2)(jnp.arange(8.0))
    assert len(traces) == 1


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16, jnp.float32])
def test_sum_keeps_input_dtype(dtype):
    out = em.microbatch(jnp.sum, 0, 2)(jnp.ones(8, dtype))
    assert out.dtype == dtype and out == 8


def test_sum_dtype_sets_carry_precision():
    # bfloat16 has 8 significant bits: adding 1.0 to 256.0 rounds back to 256.0.
    ones = jnp.ones(1024, jnp.bfloat16)
    in_bf16 = em.microbatch(jnp.sum, 0, 1)(ones)
    in_f32 = em.microbatch(jnp.sum, 0, 1, em.Sum(dtype=jnp.float32))(ones)
    assert in_bf16 == 256 and in_bf16.dtype == jnp.bfloat16
    assert in_f32 == 1024 and in_f32.dtype == jnp.float32
    mean = em.microbatch(jnp.mean, 0, 1, em.Mean(dtype=jnp.float32))(ones)
    assert mean == 1 and mean.dtype == jnp.float32


@pytest.mark.parametrize("accumulator", [em.Sum(), em.Mean()])
def test_grad_through_microbatch_equals_microbatched_grad(accumulator, getkey):
    x, y = jax.random.normal(getkey(), (8, 3)), jax.random.normal(getkey(), (8,))
    params = jax.random.normal(getkey(), (3,))

    def loss(p, x, y):
        return jnp.mean((x @ p - y) ** 2)

    scale = 4 if isinstance(accumulator, em.Sum) else 1  # 4 microbatch means summed
    expected = scale * jax.grad(loss)(params, x, y)
    outer = jax.grad(em.microbatch(loss, (1, 2), 2, accumulator))(params, x, y)
    inner = em.microbatch(jax.grad(loss), (1, 2), 2, accumulator)(params, x, y)
    assert_tree_allclose(outer, expected)
    assert_tree_allclose(inner, expected)


def test_vmap_over_microbatched_function(getkey):
    x = jax.random.normal(getkey(), (5, 8, 3))  # 5 independent batches of 8
    f = em.microbatch(lambda x: jnp.sum(x**2, axis=0), 0, 2)
    assert_tree_allclose(jax.vmap(f)(x), jnp.sum(x**2, axis=1))


def test_traced_num_real_microbatches_does_not_recompile():
    traces = []

    @jax.jit
    def f(x, n):
        traces.append(1)
        return em.microbatch(jnp.sum, 0, 4, num_real_microbatches=n)(x)

    x = jnp.ones(128)
    assert f(x, 4) == 16
    assert f(x, 32) == 128
    assert f(x, 0) == 0
    assert len(traces) == 1


def test_accumulation_type_and_optax_enum_are_accepted():
    x = jnp.arange(8.0)
    for kind in (em.AccumulationType.MEAN, omb.AccumulationType.MEAN):
        assert em.microbatch(jnp.mean, 0, 2, kind)(x) == 3.5
    out = em.microbatch(lambda x: x, 0, 2, omb.AccumulationType.CONCAT)(x)
    assert (out == x).all()


# --------------------------------------------------------------------------------------
# Early stopping inside `microbatch`.


def test_concat_zero_fills_skipped_microbatches():
    x = jnp.arange(12.0) + 1
    out = em.microbatch(lambda x: x, 0, 3, em.Concat(), num_real_microbatches=2)(x)
    assert out.tolist() == [1, 2, 0, 0, 5, 6, 0, 0, 9, 10, 0, 0]


def test_sum_mean_running_mean_under_early_stopping():
    x = jnp.arange(1.0, 13.0)
    # Microbatches {1, 5, 9} and {2, 6, 10} run (means 5 and 6); two are skipped.
    results = {
        name: em.microbatch(jnp.mean, 0, 3, acc, num_real_microbatches=2)(x)
        for name, acc in [("sum", em.Sum()), ("mean", em.Mean()), ("rm", em.RunningMean())]
    }
    assert results == {"sum": 11.0, "mean": 2.75, "rm": 5.5}


def test_padding_mask_skips_microbatches_and_they_really_do_not_run():
    executed = []

    def fun(x, *, is_padding_example):
        jax.debug.callback(lambda: executed.append(1))
        return jnp.sum(jnp.where(is_padding_example, 0.0, x))

    x = jnp.arange(12.0)
    mask = jnp.arange(12) >= 5  # five real examples
    order = em.compute_early_stopping_order(12, 3)
    f = jax.jit(lambda x, m: em.microbatch(fun, 0, 3)(x, is_padding_example=m))
    out = f(x[order], mask[order])
    jax.effects_barrier()
    assert out == jnp.sum(x[:5])
    assert len(executed) == 2 == em.count_real_microbatches(mask[order], 3)
    executed.clear()
    assert f(x, mask) == jnp.sum(x[:5])  # unordered: correct, runs all 4
    jax.effects_barrier()
    assert len(executed) == 4


def test_padding_mask_and_num_real_microbatches_take_the_minimum():
    def fun(x, is_padding_example):
        return jnp.sum(jnp.where(is_padding_example, 0.0, x))

    x, mask = jnp.ones(8), jnp.zeros(8, bool)
    f = em.microbatch(fun, 0, 2, num_real_microbatches=1)
    assert f(x, is_padding_example=mask) == 2


# --------------------------------------------------------------------------------------
# Empty batches and user-defined accumulators.


def test_empty_batch():
    x = jnp.zeros((0, 4))
    assert (em.microbatch(lambda x: jnp.sum(x, 0), 0, 2)(x) == jnp.zeros(4)).all()
    assert jnp.isnan(em.microbatch(lambda x: jnp.mean(x, 0), 0, 2, em.Mean())(x)).all()
    assert em.microbatch(lambda x: x, 0, 2, em.Concat())(x).shape == (0, 4)
    assert em.micro_vmap(lambda x: x, microbatch_size=2)(x).shape == (0, 4)
    assert (em.micro_vmap(jnp.sum, accumulator=em.Sum())(x) == 0).all()


class TopK(em.AbstractAccumulator):
    """Keeps the `k` largest values seen along the leading axis (test accumulator)."""

    k: int = eqx.field(static=True)

    def init(self, example, num_microbatches):
        return jax.tree.map(
            lambda s: jnp.full((self.k, *s.shape[1:]), -jnp.inf, s.dtype), example
        )

    def update(self, carry, value, index):
        def merge(c, v):
            both = jnp.concatenate([c, v], axis=0)
            return -jnp.sort(-both, axis=0)[: self.k]

        return jax.tree.map(merge, carry, value)

    def finalize(self, carry, num_microbatches, num_executed):
        return carry

    def aggregate(self, values):
        return jax.tree.map(lambda v: -jnp.sort(-v, axis=0)[: self.k], values)


@pytest.mark.parametrize("microbatch_size", [1, 3, 4, 12])
def test_user_defined_accumulator(microbatch_size, getkey):
    x = jax.random.normal(getkey(), (12, 2))
    expected = -jnp.sort(-x, axis=0)[:3]
    # `microbatch`: fun returns each microbatch's examples; TopK keeps the best 3.
    out = em.microbatch(lambda x: x, 0, microbatch_size, TopK(3))(x)
    assert_tree_allclose(out, expected)
    # `micro_vmap`: per-example outputs, aggregated inside each microbatch.
    f = em.micro_vmap(lambda x: x, microbatch_size=microbatch_size, accumulator=TopK(3))
    assert_tree_allclose(f(x), expected)
