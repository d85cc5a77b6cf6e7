import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

import eqx_micro as em
import eqx_micro.dp as dp

from .helpers import assert_tree_allclose


X = jnp.array([3.0, 4.0])  # norm 5


@pytest.mark.parametrize(
    "clip,rescale,expected",
    [
        (0.0, False, [0.0, 0.0]),
        (0.0, True, [0.6, 0.8]),
        (1.0, False, [0.6, 0.8]),
        (2.0, True, [0.6, 0.8]),
        (7.5, False, [3.0, 4.0]),  # 1.5 x the norm: unchanged
        (np.inf, False, [3.0, 4.0]),
        (np.inf, True, [0.0, 0.0]),
    ],
)
def test_edge_cases(clip, rescale, expected):
    clipped, norm = dp.clip_pytree(X, clip, rescale_to_unit_norm=rescale)
    assert_tree_allclose(clipped, jnp.array(expected))
    assert norm == 5.0 and norm.dtype == jnp.float32


@pytest.mark.parametrize("clip", [0.0, 1.0, np.inf])
@pytest.mark.parametrize("rescale", [False, True])
def test_zero_tree_stays_zero(clip, rescale):
    clipped, norm = dp.clip_pytree({"a": jnp.zeros(3)}, clip, rescale_to_unit_norm=rescale)
    assert (clipped["a"] == 0).all() and norm == 0


@pytest.mark.parametrize("bad", [jnp.nan, jnp.inf, -jnp.inf])
def test_non_finite_input(bad):
    """`nan_safe=False`: a non-finite norm says so; the default reads the entry as 0."""
    _, norm = dp.clip_pytree(jnp.array([1.0, bad]), 1.0, nan_safe=False)
    assert not jnp.isfinite(norm)
    clipped, norm = dp.clip_pytree(jnp.array([3.0, bad, 4.0]), 1.0)
    assert norm == 5.0
    assert_tree_allclose(clipped, jnp.array([0.6, 0.0, 0.8]))


def test_rescale_with_zero_clip_per_layer():
    tree = {"a": jnp.array([3.0, 0.0]), "b": jnp.array([0.0, 4.0])}
    clipped, norm = dp.clip_pytree(tree, 0.0, rescale_to_unit_norm=True)
    assert_tree_allclose(clipped, {"a": jnp.array([0.6, 0.0]), "b": jnp.array([0.0, 0.8])})
    assert norm == 5.0


def test_per_layer_clip_norms():
    tree = {"a": jnp.array([3.0, 4.0]), "b": jnp.array([0.0, 10.0])}
    clipped, norms = dp.clip_pytree(tree, {"a": 1.0, "b": 15.0})
    assert_tree_allclose(clipped, {"a": jnp.array([0.6, 0.8]), "b": jnp.array([0.0, 10.0])})
    assert norms == {"a": 5.0, "b": 10.0}
    # A prefix: each clip norm covers a whole subtree.
    layers = {
        "layer1": {"w": jnp.array([3.0]), "b": jnp.array([4.0])},  # norm 5
        "layer2": {"w": jnp.array([6.0]), "b": jnp.array([8.0])},  # norm 10
    }
    clipped, _ = dp.clip_pytree(layers, {"layer1": 2.0, "layer2": 5.0})
    assert_tree_allclose(clipped["layer1"]["w"], jnp.array([3.0 * 0.4]))
    assert_tree_allclose(clipped["layer2"]["b"], jnp.array([8.0 * 0.5]))


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("clip", [1e-5, 1.2e-5, 1e-6])
def test_low_precision_stays_finite(dtype, clip):
    clipped, norm = dp.clip_pytree(
        jnp.array([1e-5], dtype), clip, rescale_to_unit_norm=True
    )
    assert clipped.dtype == dtype and jnp.isfinite(clipped).all()
    assert float(jnp.linalg.norm(clipped.astype(jnp.float32))) <= 1 + 1e-2


@settings(max_examples=40, deadline=None)
@given(
    values=st.lists(st.floats(-1e3, 1e3), min_size=1, max_size=6),
    clip=st.floats(0.0, 1e3),
    rescale=st.booleans(),
)
def test_clipped_norm_is_bounded_and_direction_kept(values, clip, rescale):
    x = jnp.asarray(values, jnp.float32)
    clipped, norm = dp.clip_pytree(x, clip, rescale_to_unit_norm=rescale)
    bound = 1.0 if rescale else clip
    assert float(jnp.linalg.norm(clipped)) <= bound * (1 + 1e-5) + 1e-6
    as_f32 = np.asarray(values, np.float32).astype(np.float64)  # what was clipped
    # XLA:CPU flushes float32 subnormals to zero, so squares below 1.2e-38 vanish: a
    # norm made of entries under ~1e-19 reads 0 (clipping is unaffected: it keeps them).
    np.testing.assert_allclose(norm, np.linalg.norm(as_f32), rtol=1e-5, atol=3e-19)
    if norm > 0 and clip > 0:
        # A non-negative multiple of the input.
        scale = float(jnp.vdot(clipped, x) / (norm**2))
        np.testing.assert_allclose(clipped, scale * x, rtol=1e-4, atol=1e-6)
        assert scale >= 0


def test_traced_clip_norm_does_not_recompile():
    traces = []

    @jax.jit
    def f(x, c):
        traces.append(1)
        return dp.ClipL2(c)(x)

    assert_tree_allclose(f(X, 1.0), jnp.array([0.6, 0.8]))
    assert_tree_allclose(f(X, 2.5), jnp.array([1.5, 2.0]))
    assert len(traces) == 1


@pytest.mark.parametrize("bad", [-1.0, float("nan")])
def test_bad_clip_norms(bad):
    with pytest.raises(ValueError, match="a clip norm must be a non-negative"):
        dp.clip_pytree(X, bad)
    with pytest.raises(ValueError, match=r"`l2_clip_norm\['b'\]`"):
        dp.ClipL2({"a": 1.0, "b": bad})


def test_mismatched_clip_tree():
    with pytest.raises(ValueError, match="PyTree prefix of `tree`"):
        dp.clip_pytree({"a": X}, {"b": 1.0})


@pytest.mark.parametrize("microbatch_size", [None, 2, 3])
def test_clip_module_in_micro_grad_equals_vmap_reference(microbatch_size, getkey):
    w = {"w": jax.random.normal(getkey(), (3,)), "b": jnp.array(0.5)}
    x = jax.random.normal(getkey(), (6, 3)) * 3
    y = jax.random.normal(getkey(), (6,))

    def loss(params, x, y):
        return jnp.mean((x @ params["w"] + params["b"] - y) ** 2)

    clip = {"w": 1.0, "b": 0.5}  # per layer
    total, _ = em.micro_grad(
        loss,
        batch_argnums=(1, 2),
        microbatch_size=microbatch_size,
        transform_fn=dp.ClipL2(clip),
    )(w, x, y)
    per_example = jax.vmap(jax.grad(loss), (None, 0, 0))(w, x[:, None], y[:, None])
    reference = {
        "w": jnp.zeros(3).at[:].set(0.0),
        "b": jnp.array(0.0),
    }
    for i in range(6):
        g = jax.tree.map(lambda a, i=i: a[i], per_example)
        gw = g["w"] * jnp.minimum(1.0, 1.0 / jnp.linalg.norm(g["w"]))
        gb = g["b"] * jnp.minimum(1.0, 0.5 / jnp.abs(g["b"]))
        reference = {"w": reference["w"] + gw, "b": reference["b"] + gb}
    assert_tree_allclose(total, reference, rtol=1e-5, atol=1e-6)
