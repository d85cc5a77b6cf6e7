import equinox as eqx
import jax
import jax.numpy as jnp
import pytest

import eqx_micro as em

from .helpers import assert_tree_allclose


def make_problem(key, batch_size=12, dtype=jnp.float32):
    k1, k2, k3 = jax.random.split(key, 3)
    model = eqx.nn.MLP(4, 3, 16, 2, key=k1)
    model = jax.tree.map(lambda x: x.astype(dtype) if eqx.is_inexact_array(x) else x, model)
    batch = {
        "x": jax.random.normal(k2, (batch_size, 4), dtype),
        "y": jax.random.normal(k3, (batch_size, 3), dtype),
        "name": "train",
    }
    return model, batch


def mean_loss(model, batch):
    assert batch["name"] == "train"
    preds = jax.vmap(model)(batch["x"])
    return jnp.mean((preds - batch["y"]) ** 2)


@pytest.mark.parametrize("num_microbatches", [1, 2, 3, 12])
@pytest.mark.parametrize("unroll", [True, False, 2, 5])
def test_mean_loss_gradient_equals_full_batch(num_microbatches, unroll, getkey):
    model, batch = make_problem(getkey())
    out = eqx.filter_jit(
        lambda m, b: em.accumulate_gradients(
            mean_loss, m, b, num_microbatches=num_microbatches, unroll=unroll
        )
    )(model, batch)
    loss, grads = eqx.filter_value_and_grad(mean_loss)(model, batch)
    assert_tree_allclose(out.grads, grads)
    assert_tree_allclose(out.loss, loss)
    assert out.aux is None and out.state is None


def test_microbatch_size_and_num_microbatches_agree(getkey):
    model, batch = make_problem(getkey())
    a = em.accumulate_gradients(mean_loss, model, batch, microbatch_size=4)
    b = em.accumulate_gradients(mean_loss, model, batch, num_microbatches=3)
    assert_tree_allclose(a.grads, b.grads)


def test_metrics_are_accumulated_with_any_prefix(getkey):
    model, batch = make_problem(getkey())

    def loss_with_metrics(model, batch):
        preds = jax.vmap(model)(batch["x"])
        errors = (preds - batch["y"]) ** 2
        return jnp.mean(errors), {"mse": jnp.mean(errors), "worst": jnp.max(errors)}

    out = em.accumulate_gradients(
        loss_with_metrics,
        model,
        batch,
        num_microbatches=4,
        has_aux=True,
        aux_accumulator={"mse": em.Mean(), "worst": em.Max()},
    )
    _, full = loss_with_metrics(model, batch)
    assert_tree_allclose(out.aux, full)


@pytest.mark.parametrize("num_microbatches,unroll", [(4, False), (12, 3), (4, True)])
def test_a_fresh_key_per_microbatch(num_microbatches, unroll, getkey):
    model, batch = make_problem(getkey())
    key = jax.random.key(7)

    def loss(model, batch, *, key):
        return mean_loss(model, batch), jax.random.key_data(key)[None]

    out = em.accumulate_gradients(
        loss,
        model,
        batch,
        num_microbatches=num_microbatches,
        key=key,
        has_aux=True,
        aux_accumulator=em.Concat(),
        unroll=unroll,
    )
    expected = jnp.stack(
        [jax.random.key_data(jax.random.fold_in(key, i)) for i in range(num_microbatches)]
    )
    assert (out.aux == expected).all()
    assert len({tuple(row.tolist()) for row in out.aux}) == num_microbatches


class DropoutNet(eqx.Module):
    linear: eqx.nn.Linear
    dropout: eqx.nn.Dropout

    def __init__(self, key):
        self.linear = eqx.nn.Linear(4, 32, key=key)  # 2**32 possible masks
        self.dropout = eqx.nn.Dropout(0.5)

    def __call__(self, x, key):
        return self.dropout(self.linear(x), key=key)


def test_dropout_masks_differ_between_microbatches(getkey):
    model = DropoutNet(getkey())
    x = jnp.ones((8, 4))

    def loss(model, batch, *, key):
        keys = jax.random.split(key, batch.shape[0])
        out = jax.vmap(model)(batch, keys)
        return jnp.mean(out), (out == 0)

    out = em.accumulate_gradients(
        loss,
        model,
        x,
        microbatch_size=2,
        key=getkey(),
        has_aux=True,
        aux_accumulator=em.Concat(),
    )
    masks = out.aux.reshape(8, -1)
    assert len({tuple(m.tolist()) for m in masks}) == 8


class BatchNormNet(eqx.Module):
    linear: eqx.nn.Linear
    norm: eqx.nn.BatchNorm

    def __init__(self, key):
        self.linear = eqx.nn.Linear(4, 3, key=key)
        self.norm = eqx.nn.BatchNorm(3, axis_name="batch", mode="ema")

    def __call__(self, x, state):
        return self.norm(self.linear(x), state)


def batchnorm_loss(model, batch, *, state):
    preds, state = jax.vmap(
        model, axis_name="batch", in_axes=(0, None), out_axes=(0, None)
    )(batch["x"], state)
    return jnp.mean((preds - batch["y"]) ** 2), state


@pytest.mark.parametrize("unroll", [True, False, 3])
def test_state_is_threaded_in_order(unroll, getkey):
    model, state = eqx.nn.make_with_state(BatchNormNet)(getkey())
    _, batch = make_problem(getkey(), batch_size=8)
    out = em.accumulate_gradients(
        batchnorm_loss, model, batch, num_microbatches=4, state=state, unroll=unroll
    )
    # By hand: microbatch i holds examples i, i + 4 (column-major), run in order.
    manual_state, grads = state, []
    for i in range(4):
        minibatch = {**batch, "x": batch["x"][i::4], "y": batch["y"][i::4]}
        (_, manual_state), g = eqx.filter_value_and_grad(
            lambda m, b=minibatch, s=manual_state: batchnorm_loss(m, b, state=s),
            has_aux=True,
        )(model)
        grads.append(g)
    assert_tree_allclose(out.state, manual_state)
    mean_grads = jax.tree.map(lambda *g: sum(g) / 4, *grads)
    assert_tree_allclose(out.grads, mean_grads)


def test_bfloat16_parameters_with_float32_carry(getkey):
    model16, batch16 = make_problem(getkey(), batch_size=64, dtype=jnp.bfloat16)
    model32 = jax.tree.map(
        lambda x: x.astype(jnp.float32) if eqx.is_inexact_array(x) else x, model16
    )
    batch32 = {
        **batch16,
        "x": batch16["x"].astype(jnp.float32),
        "y": batch16["y"].astype(jnp.float32),
    }
    reference = eqx.filter_grad(mean_loss)(model32, batch32)
    out = em.accumulate_gradients(
        mean_loss, model16, batch16, num_microbatches=16, accumulator=em.Mean(jnp.float32)
    )
    leaves = jax.tree.leaves(out.grads)
    assert all(leaf.dtype == jnp.bfloat16 for leaf in leaves)
    assert out.loss.dtype == jnp.float32
    assert_tree_allclose(
        jax.tree.map(lambda g: g.astype(jnp.float32), out.grads),
        reference,
        rtol=5e-2,
        atol=5e-2,
    )


@pytest.mark.parametrize("accumulator", [em.Sum(), em.Mean()])
def test_microbatch_of_grad_equals_grad_of_microbatch(accumulator, getkey):
    model, batch = make_problem(getkey())
    inner = em.microbatch(eqx.filter_grad(mean_loss), 1, 3, accumulator)(model, batch)
    outer = eqx.filter_grad(lambda m, b: em.microbatch(mean_loss, 1, 3, accumulator)(m, b))(
        model, batch
    )
    assert_tree_allclose(inner, outer)


@pytest.mark.parametrize("unroll", [2, 3])
def test_integer_unroll_is_one_scan_with_that_unroll(unroll, getkey):
    """12 microbatches, `unroll` per loop iteration: one `scan` over the 12 with
    `unroll` set (XLA writes that many microbatches per iteration)."""
    model, batch = make_problem(getkey())
    jaxpr = jax.make_jaxpr(
        lambda: em.accumulate_gradients(
            mean_loss, model, batch, num_microbatches=12, unroll=unroll
        )
    )()
    (scan,) = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "scan"]
    assert scan.params["length"] == 12 and scan.params["unroll"] == unroll


def test_no_microbatch_size_is_one_microbatch(getkey):
    model, batch = make_problem(getkey(), batch_size=10)
    out = em.accumulate_gradients(mean_loss, model, batch)
    full = eqx.filter_value_and_grad(mean_loss)(model, batch)
    assert_tree_allclose((out.loss, out.grads), full, rtol=1e-5, atol=1e-6)


def test_accumulation_errors(getkey):
    model, batch = make_problem(getkey(), batch_size=10)
    for bad in (0, -2):
        with pytest.raises(ValueError, match="`unroll` to be True, False, or a positive"):
            em.accumulate_gradients(mean_loss, model, batch, num_microbatches=2, unroll=bad)
    with pytest.raises(ValueError, match="does not split into `num_microbatches=4`"):
        em.accumulate_gradients(mean_loss, model, batch, num_microbatches=4)
    with pytest.raises(ValueError, match="not divisible by `microbatch_size=4`"):
        em.accumulate_gradients(mean_loss, model, batch, microbatch_size=4)
    with pytest.raises(TypeError, match="one of `microbatch_size` and `num_microbatches`"):
        em.accumulate_gradients(
            mean_loss, model, batch, microbatch_size=5, num_microbatches=2
        )
    # The argument the user passed is the one the error names.
    # (Under the test suite's runtime type checking, jaxtyping names it first.)
    with pytest.raises(TypeError, match="num_microbatches"):
        em.accumulate_gradients(mean_loss, model, batch, num_microbatches=2.5)
    with pytest.raises(TypeError, match=r"key"):
        em.accumulate_gradients(lambda m, b, *, key: mean_loss(m, b), model, batch, key=0)
    with pytest.raises(TypeError, match="`loss_fn` needs a `key` argument"):
        em.accumulate_gradients(
            lambda m, b, *, key: mean_loss(m, b), model, batch, microbatch_size=5
        )
    with pytest.raises(TypeError, match="`loss_fn` takes no `key` keyword"):
        em.accumulate_gradients(mean_loss, model, batch, microbatch_size=5, key=getkey())
    with pytest.raises(TypeError, match=r"must return `\(loss, aux\)`"):
        em.accumulate_gradients(mean_loss, model, batch, microbatch_size=5, has_aux=True)
