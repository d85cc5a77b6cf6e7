"""The backend seam (`eqx_micro/_backend.py`): each tweak gives the results it gives
switched off, and does what it is there for."""

import re

import equinox as eqx
import jax
import jax.numpy as jnp
import pytest

import eqx_micro as em
import eqx_micro.dp as dp
from eqx_micro import _backend
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


# --------------------------------------------------------------------------------------
# Every tweak: the same results with it switched off, and a different program with it on
# (so the comparison is not of one program with itself).


def _mlp_loss(model, x, y):
    logits = jax.vmap(model)(x)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1))


def _mean_pool_loss(model, x, y):
    # A mean over positions makes the output-gradient a broadcast (the YNNPACK shape).
    hidden = jax.vmap(jax.vmap(model[0]))(x)  # (batch, positions, width)
    logits = jax.vmap(model[1])(jnp.mean(jnp.tanh(hidden), axis=1))
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1))


def _computation(tweak, getkey):
    """A function that the tweak applies to, and its arguments."""
    if tweak is _backend.Tweak.SUM_AS_DOT:
        x = jax.random.normal(getkey(), (16, 5))
        f = em.micro_vmap(
            lambda v: jnp.tanh(v) * v, microbatch_size=4, accumulator=em.Sum()
        )
        return f, (x,)
    if tweak is _backend.Tweak.FOLD_IN_CHUNKS:
        x = jax.random.normal(getkey(), (8, 300))
        u = jax.random.normal(getkey(), (250,))
        f = em.micro_vmap(
            lambda v: jnp.outer(v, u), microbatch_size=2, accumulator=em.Sum()
        )
        return f, (x,)
    if tweak is _backend.Tweak.CHANNELS_LAST_CONV:
        model = CNN(getkey())
        batch = {
            "x": jax.random.normal(getkey(), (8, 1, 8, 8)),
            "y": jax.random.randint(getkey(), (8, 1), 0, 3),
        }

        def grads(model, batch):
            return em.accumulate_gradients(cnn_loss, model, batch, num_microbatches=2).grads

        return grads, (model, batch)
    if tweak is _backend.Tweak.SINGLE_MICROBATCH_INLINE:
        x = jax.random.normal(getkey(), (6, 3))
        grad_fn = dp.clipped_grad(lambda w, x: jnp.sum(jnp.tanh(x @ w)), 0.5)
        mask = jnp.array([False, False, False, False, True, True])
        return (lambda w, x, m: grad_fn(w, x, is_padding_example=m)[0]), (
            jax.random.normal(getkey(), (3, 2)),
            x,
            mask,
        )
    model = eqx.nn.MLP(6, 3, 8, 2, key=getkey())
    x, y = jax.random.normal(getkey(), (12, 6)), jnp.arange(12) % 3
    loss = _mlp_loss
    if tweak is _backend.Tweak.YNNPACK_BARRIER:
        model = (eqx.nn.Linear(6, 8, key=getkey()), eqx.nn.Linear(8, 3, key=getkey()))
        x = jax.random.normal(getkey(), (12, 5, 6))
        loss = _mean_pool_loss
    grad_fn = dp.ghost_clipped_grad(loss, 0.5, batch_argnums=(1, 2), return_grad_norms=True)
    return grad_fn, (model, x, y)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the tweaks are XLA:CPU's")
@pytest.mark.parametrize("tweak", list(_backend.Tweak), ids=lambda t: t.name)
def test_results_equal_with_each_tweak_off(tweak, getkey):
    assert _backend.enabled(tweak), f"{tweak} is off here: {_backend.WHY[tweak]}"
    f, args = _computation(tweak, getkey)

    def fresh():  # A new function: tweaks are decided when it is traced.
        return eqx.filter_jit(lambda *a: f(*a))

    on_text, on = fresh().lower(*args).as_text(), fresh()(*args)
    with _backend.disabled(tweak):
        assert not _backend.enabled(tweak)
        off_text, off = fresh().lower(*args).as_text(), fresh()(*args)
    assert on_text != off_text, "the tweak did not change the program"
    assert_tree_allclose(on, off, rtol=1e-5, atol=1e-6)


def test_every_tweak_says_why():
    assert set(_backend.WHY) == set(_backend.Tweak)


def test_tweaks_are_off_on_other_backends(monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert not any(_backend.enabled(t) for t in _backend.Tweak)


def test_ynnpack_barrier_gate(monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    monkeypatch.setattr(_backend, "_jaxlib_version", lambda: (0, 10, 1))
    assert not _backend.enabled(_backend.Tweak.YNNPACK_BARRIER)
    monkeypatch.setattr(_backend, "_jaxlib_version", lambda: (0, 10, 2))
    monkeypatch.setenv("XLA_FLAGS", "")
    assert _backend.enabled(_backend.Tweak.YNNPACK_BARRIER)
    # The documented workaround takes reductions out of YNNPACK: the barrier goes too.
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=-reduce")
    assert not _backend.enabled(_backend.Tweak.YNNPACK_BARRIER)


def test_tweaks_switched_off_from_the_environment(monkeypatch):
    monkeypatch.setenv("EQX_MICRO_DISABLE_TWEAKS", "sum_as_dot, fold_in_chunks")
    assert _backend._from_environment() == {
        _backend.Tweak.SUM_AS_DOT,
        _backend.Tweak.FOLD_IN_CHUNKS,
    }
    monkeypatch.setenv("EQX_MICRO_DISABLE_TWEAKS", "all")
    assert _backend._from_environment() == set(_backend.Tweak)
    monkeypatch.setenv("EQX_MICRO_DISABLE_TWEAKS", "no_such_tweak")
    with pytest.raises(ValueError, match="NO_SUCH_TWEAK"):
        _backend._from_environment()


def test_sums_standing_in_for_contractions_ask_for_full_precision():
    x = jnp.ones((4, 3))
    jaxpr = jax.make_jaxpr(lambda v: _backend.sum_leading_axis(v, jnp.float32))(x)
    (dot,) = [e for e in jaxpr.eqns if e.primitive.name == "dot_general"]
    assert (
        dot.params["precision"]
        == (
            jax.lax.Precision.HIGHEST,
            jax.lax.Precision.HIGHEST,
        )
        or dot.params["precision"] == jax.lax.Precision.HIGHEST
    )
