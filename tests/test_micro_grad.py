import equinox as eqx
import jax
import jax.numpy as jnp
import optax.microbatching as omb
import pytest

import eqx_micro as em

from .helpers import assert_tree_allclose


def mse(params, batch):
    preds = batch["features"] @ params
    return 0.5 * jnp.mean((preds - batch["targets"]) ** 2)


OPTAX_BATCH = {"features": jnp.ones((4, 1)), "targets": jnp.array([0.0, 2.0, 4.0, 6.0])}


@pytest.mark.parametrize("microbatch_size", [None, 1, 2, 4])
@pytest.mark.parametrize("keep_batch_dim", [True, False])
def test_reproduces_the_optax_docstring_example(microbatch_size, keep_batch_dim):
    f = em.micro_grad(
        mse,
        accumulator=em.Mean(),
        microbatch_size=microbatch_size,
        keep_batch_dim=keep_batch_dim,
        transform_fn=lambda g: (g, g**2),
        metrics_fn=jnp.linalg.norm,
    )
    (grads, squared), out = f(jnp.zeros(1), OPTAX_BATCH)
    assert grads.tolist() == [-3.0] and squared.tolist() == [14.0]
    assert out.values.tolist() == [0.0, 2.0, 8.0, 18.0]
    assert out.metrics.tolist() == [0.0, 2.0, 4.0, 6.0]
    assert out.aux is None


@pytest.mark.parametrize("microbatch_size", [None, 2])
def test_equals_optax_micro_grad_where_optax_runs(microbatch_size):
    kwargs = dict(
        accumulator=em.Sum(), microbatch_size=microbatch_size, metrics_fn=jnp.linalg.norm
    )
    ours, out = em.micro_grad(mse, **kwargs)(jnp.array([0.5]), OPTAX_BATCH)
    kwargs["accumulator"] = omb.AccumulationType.SUM
    theirs, (values, metrics, _) = omb.micro_grad(mse, **kwargs)(
        jnp.array([0.5]), OPTAX_BATCH
    )
    assert_tree_allclose(ours, theirs)
    assert_tree_allclose(out.values, values)
    assert_tree_allclose(out.metrics, metrics)


def mlp_and_batch(key, batch_size=6):
    k1, k2, k3 = jax.random.split(key, 3)
    model = eqx.nn.MLP(3, 2, 8, 2, activation=jax.nn.gelu, key=k1)
    batch = {
        "x": jax.random.normal(k2, (batch_size, 3)),
        "y": jax.random.normal(k3, (batch_size, 2)),
        "split": "train",
    }
    return model, batch


def batched_mse(model, batch):
    """A loss written for batches: works per example thanks to `keep_batch_dim`."""
    assert batch["split"] == "train"
    preds = jax.vmap(model)(batch["x"])
    return jnp.mean((preds - batch["y"]) ** 2), preds


def per_example_reference(model, batch):
    def single(x, y):
        return eqx.filter_grad(
            lambda m: batched_mse(m, {**batch, "x": x[None], "y": y[None]})[0]
        )(model)

    return jax.vmap(single)(batch["x"], batch["y"])


@pytest.mark.parametrize("microbatch_size", [None, 1, 2, 3, 6])
def test_per_example_gradients_of_an_mlp_equal_vmap_grad(microbatch_size, getkey):
    model, batch = mlp_and_batch(getkey())
    f = eqx.filter_jit(
        em.micro_grad(
            batched_mse,
            has_aux=True,
            accumulator=em.Concat(),
            microbatch_size=microbatch_size,
        )
    )
    per_example, out = f(model, batch)
    assert_tree_allclose(per_example, per_example_reference(model, batch))
    # The activation function is not an array: no gradient, structure kept.
    assert per_example.activation is None
    assert_tree_allclose(out.aux, jax.vmap(model)(batch["x"]))  # batch axis squeezed
    values = jax.vmap(lambda x, y: jnp.mean((model(x) - y) ** 2))(batch["x"], batch["y"])
    assert_tree_allclose(out.values, values)
    total, _ = em.micro_grad(batched_mse, has_aux=True, microbatch_size=microbatch_size)(
        model, batch
    )
    expected_total = jax.tree.map(lambda g: g.sum(0), per_example_reference(model, batch))
    assert_tree_allclose(total, expected_total, rtol=1e-5, atol=1e-6)


class SmallCNN(eqx.Module):
    conv: eqx.nn.Conv2d
    head: eqx.nn.Linear

    def __init__(self, key):
        k1, k2 = jax.random.split(key)
        self.conv = eqx.nn.Conv2d(1, 3, kernel_size=3, stride=2, padding=1, key=k1)
        self.head = eqx.nn.Linear(3 * 4 * 4, 1, key=k2)

    def __call__(self, image):
        return self.head(jax.nn.relu(self.conv(image)).reshape(-1))[0]


@pytest.mark.parametrize("keep_batch_dim", [True, False])
@pytest.mark.parametrize("microbatch_size", [1, 4])
def test_per_example_gradients_of_a_cnn_equal_vmap_grad(
    keep_batch_dim, microbatch_size, getkey
):
    model = SmallCNN(getkey())
    images = jax.random.normal(getkey(), (8, 1, 8, 8))
    targets = jax.random.normal(getkey(), (8,))

    def loss(model, images, targets):
        if keep_batch_dim:
            preds = jax.vmap(model)(images)
            return jnp.mean((preds - targets) ** 2)
        return (model(images) - targets) ** 2

    f = em.micro_grad(
        loss,
        batch_argnums=(1, 2),
        keep_batch_dim=keep_batch_dim,
        accumulator=em.Concat(),
        microbatch_size=microbatch_size,
    )
    per_example, _ = eqx.filter_jit(f)(model, images, targets)
    reference = jax.vmap(lambda x, y: eqx.filter_grad(lambda m: (m(x) - y) ** 2)(model))(
        images, targets
    )
    assert_tree_allclose(per_example, reference, rtol=1e-4, atol=1e-5)


def test_frozen_parts_and_integer_leaves_get_no_gradient(getkey):
    class Model(eqx.Module):
        weight: jax.Array
        frozen: jax.Array
        count: jax.Array

        def __call__(self, x):
            return jnp.sum(x * self.weight) + jnp.sum(self.frozen) + self.count

    model = Model(jnp.ones(3), jnp.ones(3), jnp.array(2))
    trainable, frozen = eqx.partition(
        model, eqx.tree_at(lambda m: m.weight, jax.tree.map(lambda _: False, model), True)
    )

    def loss(trainable, frozen, x):
        return eqx.combine(trainable, frozen)(x[0])

    x = jax.random.normal(getkey(), (4, 3))
    grads, _ = em.micro_grad(loss, batch_argnums=2, microbatch_size=2)(trainable, frozen, x)
    assert grads.frozen is None and grads.count is None
    assert_tree_allclose(grads.weight, x.sum(0))


def test_optax_fails_where_we_work(getkey):
    model, batch = mlp_and_batch(getkey())
    with pytest.raises(Exception):  # noqa: B017 - any failure: activation leaf or string
        omb.micro_grad(lambda m, b: batched_mse(m, b)[0])(model, batch)
    grads, _ = em.micro_grad(lambda m, b: batched_mse(m, b)[0])(model, batch)
    assert grads.activation is None


@pytest.mark.parametrize("microbatch_size", [None, 2, 3])
def test_padding_contributes_exact_zeros_and_stops_early(microbatch_size, getkey):
    model, batch = mlp_and_batch(getkey())
    is_padding = jnp.array([False, False, True, False, True, True])
    poisoned = {**batch, "x": jnp.where(is_padding[:, None], jnp.nan, batch["x"])}

    def make(microbatch_size):
        return em.micro_grad(
            lambda m, b: batched_mse(m, b)[0],
            microbatch_size=microbatch_size,
            metrics_fn=lambda g: jnp.sum(g.layers[0].weight),
        )

    grads, out = make(microbatch_size)(model, poisoned, is_padding_example=is_padding)
    real = {**batch, "x": batch["x"][~is_padding], "y": batch["y"][~is_padding]}
    expected, _ = make(None)(model, real)
    assert_tree_allclose(grads, expected, rtol=1e-5, atol=1e-6)
    assert (out.values[is_padding] == 0).all() and (out.metrics[is_padding] == 0).all()


def test_padding_skips_microbatches():
    calls = []

    def loss(p, x):
        jax.debug.callback(lambda: calls.append(1))
        return jnp.sum(p * x)

    order = em.compute_early_stopping_order(8, 2)
    mask = (jnp.arange(8) >= 3)[order]
    grads, _ = jax.jit(em.micro_grad(loss, microbatch_size=2))(
        1.0, jnp.ones(8), is_padding_example=mask
    )
    jax.effects_barrier()
    assert grads == 3 and len(calls) == 2


def test_per_example_keys_differ_and_do_not_depend_on_microbatch_size():
    def loss(p, x, key):
        mask = jax.random.bernoulli(key, 0.5, (16,))
        return jnp.sum(p * x * mask.astype(x.dtype)), mask

    x = jnp.ones((8, 1))
    key = jax.random.key(0)
    results = [
        em.micro_grad(loss, has_aux=True, key_argnum=2, microbatch_size=m)(1.0, x, key)
        for m in (None, 1, 2, 4)
    ]
    masks = results[0][1].aux
    assert len({tuple(m.tolist()) for m in masks}) == 8  # every example its own mask
    for grads, out in results[1:]:
        assert grads == results[0][0] and (out.aux == masks).all()


def test_group_level_gradients_without_batch_dim(getkey):
    x = jax.random.normal(getkey(), (3, 4, 2))  # 3 groups of 4 examples

    def group_loss(w, group):
        return jnp.mean((group @ w) ** 2)

    w = jnp.array([1.0, -1.0])
    per_group, _ = em.micro_grad(group_loss, keep_batch_dim=False, accumulator=em.Concat())(
        w, x
    )
    assert_tree_allclose(per_group, jax.vmap(jax.grad(group_loss), (None, 0))(w, x))


def test_transform_fn_may_be_a_module():
    class Scale(eqx.Module):
        factor: jax.Array

        def __call__(self, grads):
            return grads * self.factor

    grads, _ = em.micro_grad(
        lambda p, x: jnp.sum(p * x), transform_fn=Scale(jnp.array(2.0))
    )(jnp.array(1.0), jnp.arange(4.0))
    assert grads == 12.0


def test_python_scalars_are_not_differentiated():
    # As `eqx.filter_grad`: only inexact arrays are differentiated.
    grads, _ = em.micro_grad(lambda p, x: jnp.sum(p * x))(1.0, jnp.arange(4.0))
    assert grads is None


def test_micro_grad_errors():
    with pytest.raises(ValueError, match=r"overlap in \[1\]"):
        em.micro_grad(mse, argnums=(0, 1), batch_argnums=1)
    with pytest.raises(ValueError, match="takes only 2 positional arguments"):
        em.micro_grad(mse, batch_argnums=3)
    with pytest.raises(TypeError, match=r"must return a pair `\(value, aux\)`"):
        em.micro_grad(mse, has_aux=True)(jnp.zeros(1), OPTAX_BATCH)
    with pytest.raises(TypeError, match=r"`args\[2\]` \(`key_argnum=2`\) to be a PRNG key"):
        em.micro_grad(lambda p, x, k: p * x, key_argnum=2)(1.0, jnp.ones(2), "key")
    with pytest.raises(ValueError, match="called with 1 positional arguments"):
        em.micro_grad(mse)(jnp.zeros(1))
