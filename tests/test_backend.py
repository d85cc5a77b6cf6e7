"""The backend seam (`eqx_micro/_backend.py`): each tweak gives the results it gives
switched off, and does what it is there for."""

import re

import equinox as eqx
import jax
import jax.numpy as jnp
import pytest

import eqx_micro as em
from eqx_micro._backend import replay as replay_channels_last

from .helpers import assert_tree_allclose


# (lhs, rhs, out) layouts, lhs and rhs shapes, and the convolution's other parameters.
CONVOLUTIONS = [
    (("NCHW", "OIHW", "NCHW"), (2, 3, 9, 9), (4, 3, 3, 3), {}),
    (("NHWC", "HWIO", "NHWC"), (2, 9, 9, 3), (3, 3, 3, 4), {}),
    (("NCHW", "HWIO", "NHWC"), (2, 3, 9, 8), (3, 2, 3, 4), {"window_strides": (2, 1)}),
    (("CHWN", "IOHW", "HWCN"), (3, 9, 9, 2), (3, 4, 3, 3), {"rhs_dilation": (2, 1)}),
    (("NCHW", "OIHW", "NCHW"), (2, 4, 9, 9), (6, 2, 3, 3), {"feature_group_count": 2}),
    (("NCHW", "OIHW", "NCHW"), (4, 3, 9, 9), (6, 3, 3, 3), {"batch_group_count": 2}),
    (("NCH", "OIH", "NCH"), (2, 3, 9), (4, 3, 3), {"lhs_dilation": (2,)}),
    (("NCDHW", "OIDHW", "NCDHW"), (2, 3, 5, 6, 7), (4, 3, 2, 3, 2), {}),
]


@pytest.mark.parametrize("numbers, lhs_shape, rhs_shape, params", CONVOLUTIONS)
@pytest.mark.skipif(jax.default_backend() != "cpu", reason="an XLA:CPU tweak")
def test_replay_equals_the_convolution_and_its_gradients(
    numbers, lhs_shape, rhs_shape, params, getkey
):
    spatial = len(lhs_shape) - 2
    params = {"window_strides": (1,) * spatial, "padding": ((1, 1),) * spatial, **params}

    def f(lhs, rhs):
        out = jax.lax.conv_general_dilated(lhs, rhs, dimension_numbers=numbers, **params)
        return jnp.sum(jnp.sin(out))

    lhs = jax.random.normal(getkey(), lhs_shape)
    rhs = jax.random.normal(getkey(), rhs_shape)
    value_and_grads = jax.value_and_grad(f, argnums=(0, 1))
    jaxpr = jax.make_jaxpr(value_and_grads)(lhs, rhs)
    replayed = jax.jit(replay_channels_last(jaxpr))(lhs, rhs)
    value, (d_lhs, d_rhs) = jax.jit(value_and_grads)(lhs, rhs)
    assert_tree_allclose(replayed, [value, d_lhs, d_rhs], rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="an XLA:CPU tweak")
def test_replay_reaches_convolutions_inside_jit(getkey):
    conv = eqx.nn.Conv2d(2, 3, 3, key=getkey())
    images = jax.random.normal(getkey(), (4, 2, 7, 7))
    jaxpr = jax.make_jaxpr(jax.jit(jax.vmap(conv)))(images)
    assert all(eqn.primitive.name != "conv_general_dilated" for eqn in jaxpr.eqns)
    replayed = replay_channels_last(jaxpr)
    (eqn,) = [
        eqn
        for eqn in jax.make_jaxpr(replayed)(images).eqns
        if eqn.primitive.name == "conv_general_dilated"
    ]
    assert eqn.params["dimension_numbers"] == ((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))
    assert_tree_allclose(replayed(images)[0], jax.vmap(conv)(images), atol=1e-5)


class CNN(eqx.Module):
    conv1: eqx.nn.Conv2d
    conv2: eqx.nn.Conv2d
    head: eqx.nn.Linear

    def __init__(self, key):
        k1, k2, k3 = jax.random.split(key, 3)
        self.conv1 = eqx.nn.Conv2d(1, 4, 4, stride=2, padding=1, key=k1)
        self.conv2 = eqx.nn.Conv2d(4, 8, 3, key=k2)
        self.head = eqx.nn.Linear(8 * 2 * 2, 3, key=k3)

    def __call__(self, image):
        h = jnp.tanh(self.conv1(image))
        return self.head(jnp.tanh(self.conv2(h)).reshape(-1))


def cnn_loss(model, batch):
    logits = jax.vmap(model)(batch["x"])
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), batch["y"], 1))


@pytest.mark.parametrize("num_microbatches", [2, 4])
def test_convolutions_in_the_loop_are_channels_last(num_microbatches, getkey):
    if jax.default_backend() != "cpu":
        pytest.skip("the rewrite is for XLA:CPU")
    model = CNN(getkey())
    batch = {
        "x": jax.random.normal(getkey(), (8, 1, 8, 8)),
        "y": jax.random.randint(getkey(), (8, 1), 0, 3),
    }
    params, static = eqx.partition(model, eqx.is_array)
    step = jax.jit(
        lambda p, b: (
            em.accumulate_gradients(
                cnn_loss, eqx.combine(p, static), b, num_microbatches=num_microbatches
            ).grads
        )
    )
    plain = jax.jit(lambda p, b: eqx.filter_grad(cnn_loss)(eqx.combine(p, static), b))

    def conv_layouts(f):
        compiled = f.lower(params, batch).compile().as_text()
        return compiled, set(re.findall(r"dim_labels=([^,}\s]+)", compiled))

    compiled, in_loop = conv_layouts(step)
    _, top_level = conv_layouts(plain)
    # The loop gets the layouts XLA:CPU chooses at the top level (mostly NHWC).
    assert "while" in compiled
    assert in_loop == top_level and "b01f_01io->b01f" in in_loop
    grads = eqx.filter_grad(cnn_loss)(model, batch)
    assert_tree_allclose(step(params, batch), grads, rtol=1e-5, atol=1e-6)
