"""`jax.jit` (not only `eqx.filter_jit`) over every public callable and plan method:
each jitted call equals the eager one. Arguments are pure array PyTrees, which is what
`jax.jit` takes; the callables themselves (Equinox modules holding arrays, such as a
noise transform's key) are hashed by identity, as a function is."""

import io

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import optax
import pytest

import eqx_micro as em
import eqx_micro.dp as dp

from .helpers import assert_tree_allclose


PARAMS = {"w": jnp.array([0.5, -1.0, 2.0]), "b": jnp.array(0.1)}
X = jax.random.normal(jax.random.key(0), (8, 3))
PADDING = jnp.array([False, False, True, False, False, False, True, False])


def loss(params, x):
    return jnp.sum(jnp.tanh(x @ params["w"] + params["b"]))


def keyed_loss(params, x, key):
    noise = 0.1 * jax.random.normal(key, x.shape)
    return jnp.sum(jnp.tanh((x + noise) @ params["w"] + params["b"]))


def assert_jit_equals_eager(fn, *args, **kwargs):
    eager = fn(*args, **kwargs)
    jitted = jax.jit(fn)(*args, **kwargs)
    assert_tree_allclose(jitted, eager, rtol=1e-5, atol=1e-6)
    return jitted


CORE = {
    "microbatch": lambda: em.microbatch(lambda x: jnp.sum(x**2), 0, 2, em.Sum()),
    "microbatch-mean": lambda: em.microbatch(lambda x: jnp.mean(x), 0, 4, em.Mean()),
    "micro_vmap": lambda: em.micro_vmap(lambda x: jnp.sum(x), microbatch_size=2),
    "micro_grad": lambda: em.micro_grad(loss, batch_argnums=1, microbatch_size=4),
    "micro_grad-clip": lambda: em.micro_grad(
        loss, batch_argnums=1, microbatch_size=2, transform_fn=dp.ClipL2(0.5)
    ),
}


@pytest.mark.parametrize("name", CORE)
def test_core_transforms(name):
    fn = CORE[name]()
    args = (X,) if name.startswith(("microbatch", "micro_vmap")) else (PARAMS, X)
    assert_jit_equals_eager(fn, *args)


def test_core_transforms_with_padding_and_a_traced_count():
    f = em.micro_grad(loss, batch_argnums=1, microbatch_size=2)
    assert_jit_equals_eager(f, PARAMS, X, is_padding_example=PADDING)
    g = em.microbatch(jnp.sum, 0, 2, num_real_microbatches=jnp.array(3))
    assert_jit_equals_eager(g, X)


def test_accumulate_gradients():
    def mean_loss(params, x):
        return loss(params, x) / x.shape[0]

    def f(params, x):
        return em.accumulate_gradients(mean_loss, params, x, microbatch_size=4)

    assert_jit_equals_eager(f, PARAMS, X)


DP_CALLABLES = {
    "clipped_grad": lambda: dp.clipped_grad(loss, 0.5, microbatch_size=4),
    "clipped_grad-keyed": lambda: dp.clipped_grad(
        keyed_loss, 0.5, key_argnum=2, return_grad_norms=True
    ),
    "ghost BOOK_KEEPING": lambda: dp.ghost_clipped_grad(loss, 0.5, microbatch_size=4),
    "ghost GHOST": lambda: dp.ghost_clipped_grad(loss, 0.5, method=dp.GhostMethod.GHOST),
    "clipped_fun": lambda: dp.clipped_fun(
        lambda x: {"x": x, "s": jnp.sum(x)}, microbatch_size=2
    ),
}


@pytest.mark.parametrize("name", DP_CALLABLES)
def test_bounded_sensitivity_callables(name):
    fn = DP_CALLABLES[name]()
    if name == "clipped_fun":
        args = (X,)
    elif name.endswith("keyed"):
        args = (PARAMS, X, jax.random.key(3))
    else:
        args = (PARAMS, X)
    assert_jit_equals_eager(fn, *args, is_padding_example=PADDING)


def test_clip_pytree_and_clip_l2():
    assert_jit_equals_eager(dp.clip_pytree, PARAMS, 0.5)
    assert_jit_equals_eager(
        lambda t, c: dp.clip_pytree(t, c, return_zero=True), PARAMS, 1.0
    )
    assert_jit_equals_eager(dp.ClipL2({"w": 0.5, "b": 0.1}), PARAMS)


NOISES = {
    "GaussianNoise": lambda: dp.GaussianNoise(1.0, key=0),
    "BandMFNoise": lambda: dp.BandMFNoise([1.0, 0.4, 0.1], stddev=1.0, key=0),
}


@pytest.mark.parametrize("name", NOISES)
def test_noise_transforms_as_optax_transformations(name):
    noise = NOISES[name]()
    state = assert_jit_equals_eager(noise.init, PARAMS)
    for _ in range(3):  # BandMF's history fills over steps
        noisy, state = assert_jit_equals_eager(noise.update, PARAMS, state)
    # The chain adds the noise, then sgd scales by -0.1.
    expected, _ = noise.update(PARAMS, noise.init(PARAMS))
    scaled = jtu.tree_map(lambda g: -0.1 * g, expected)
    typed = optax.GradientTransformation(noise.init, noise.update)
    wrapped = {
        "chain": (optax.chain(noise, optax.sgd(0.1)), scaled),
        "typed chain": (optax.chain(typed, optax.sgd(0.1)), scaled),
        "masked": (optax.masked(noise, {"w": True, "b": False}), None),
        "apply_if_finite": (optax.apply_if_finite(noise, 2), expected),
        "MultiSteps": (optax.MultiSteps(noise, 1).gradient_transformation(), expected),
    }
    for name, (tx, want) in wrapped.items():
        # optax's own MultiSteps relies on implicit promotion, which conftest turns off.
        with jax.numpy_dtype_promotion("standard"):
            tx_state = assert_jit_equals_eager(tx.init, PARAMS)
            updates, _ = assert_jit_equals_eager(tx.update, PARAMS, tx_state, PARAMS)
        if want is None:  # masked: noise on `w` only (drawn for a one-leaf tree)
            assert updates["b"] == PARAMS["b"], name
            assert not jnp.allclose(updates["w"], PARAMS["w"]), name
        else:
            assert_tree_allclose(updates, want, rtol=1e-5), name
    # States serialize and restore into a fresh template.
    saved = io.BytesIO()
    eqx.tree_serialise_leaves(saved, state)
    saved.seek(0)
    restored = eqx.tree_deserialise_leaves(saved, noise.init(PARAMS))
    assert_tree_allclose(restored, state)


def _plans():
    sum_grad = dp.clipped_grad(loss, 0.5, microbatch_size=2)
    dpsgd = dp.DPSGDExecutionPlanConfig(
        iterations=4, sampling_prob=0.5, noise_multiplier=1.0, noise_seed=0
    ).make(sum_grad)
    bandmf = dp.BandMFExecutionPlanConfig(
        iterations=4,
        num_bands=2,
        sampling_prob=0.5,
        noise_multiplier=1.0,
        num_examples=16,
        noise_seed=0,
        strategy_optimization_steps=5,
    ).make(sum_grad)
    return {"DP-SGD": dpsgd, "BandMF": bandmf}


@pytest.mark.parametrize("kind", ["DP-SGD", "BandMF"])
def test_plan_noisy_grad_and_release(kind):
    plan = _plans()[kind]
    state = plan.noise_addition_transform.init(PARAMS)
    for method in (plan.noisy_grad, plan.release):
        out = assert_jit_equals_eager(method, state, PARAMS, X, is_padding_example=PADDING)
        noisy, new_state, _ = out
        assert int(new_state.count) == 1
        assert jtu.tree_structure(noisy) == jtu.tree_structure(PARAMS)


def test_dp_trainer_step_under_jax_jit():
    trainer = dp.DPTrainer(
        dp.DPSGDExecutionPlanConfig(
            iterations=4, sampling_prob=0.5, noise_multiplier=1.0, noise_seed=0
        ).make(dp.clipped_grad(keyed_loss, 0.5, key_argnum=2)),
        optax.sgd(0.1),
    )
    state = trainer.init(PARAMS)
    key = jax.random.key(5)
    eager, eager_metrics = trainer.step(state, X, PADDING, key)
    jitted, metrics = jax.jit(trainer.step)(state, X, PADDING, key)
    assert_tree_allclose(jitted.model, eager.model, rtol=1e-5)
    np.testing.assert_allclose(
        metrics["noisy_grad_norm"], eager_metrics["noisy_grad_norm"], rtol=1e-5
    )
