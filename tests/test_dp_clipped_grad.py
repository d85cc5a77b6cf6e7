"""`dp.clipped_grad` against jax_privacy, a hand-written vmap(grad) + clip + sum, and
its sensitivity bound."""

import math

import equinox as eqx
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import pytest
from hypothesis import given, settings
from jax_privacy import clipping as jp_clipping

import eqx_micro.dp as dp

from .helpers import assert_tree_allclose


RELATION = dp.NeighboringRelation


def squared_error(p, x):
    return 0.5 * jnp.mean((p - x) ** 2)


P = jnp.array(2.0)
X = jnp.array([[1.0], [4.0], [7.0]])  # per-example gradients 1, -2, -5


def make_model(key, in_size=4, width=8):
    return eqx.nn.MLP(in_size, 2, width, depth=2, key=key)


def model_loss(model, batch):
    """Mean squared error of a batch (keep_batch_dim gives it one row)."""
    preds = jax.vmap(model)(batch["x"])
    return jnp.mean((preds - batch["y"]) ** 2)


def make_batch(key, size, in_size=4):
    kx, ky = jax.random.split(key)
    return {
        "x": jax.random.normal(kx, (size, in_size)),
        "y": jax.random.normal(ky, (size, 2)),
    }


def reference_sum(model, batch, clip, normalize_by=1.0, rescale=False):
    """vmap(grad) + clip + sum, written independently of eqx_micro."""
    params, static = eqx.partition(model, eqx.is_inexact_array)

    def one(p, x, y):
        return model_loss(eqx.combine(p, static), {"x": x[None], "y": y[None]})

    grads = jax.vmap(jax.grad(one), in_axes=(None, 0, 0))(params, batch["x"], batch["y"])
    leaves = jtu.tree_leaves(grads)
    norms = jnp.sqrt(sum(jnp.sum(g**2, axis=tuple(range(1, g.ndim))) for g in leaves))
    scale = jnp.minimum(1.0, clip / norms)
    if rescale:
        scale = scale / clip
    return jtu.tree_map(
        lambda g: jnp.tensordot(scale, g, axes=1) / normalize_by, grads
    ), norms


@pytest.mark.parametrize("microbatch_size", [None, 1, 3])
@pytest.mark.parametrize(
    "rescale,padding,expected",
    [
        (False, None, -3.5),
        (True, None, -1.4),
        (False, [True, True, True], 0.0),
        (True, [False, True, True], 0.4),
    ],
)
def test_jax_privacy_facts(microbatch_size, rescale, padding, expected):
    grad_fn = dp.clipped_grad(
        squared_error, 2.5, microbatch_size=microbatch_size, rescale_to_unit_norm=rescale
    )
    mask = None if padding is None else jnp.array(padding)
    total, aux = eqx.filter_jit(grad_fn)(P, X, is_padding_example=mask)
    assert jnp.allclose(total, expected, atol=1e-6)
    assert aux.num_nonfinite == 0


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
def test_low_precision_under_jit(dtype):
    grad_fn = eqx.filter_jit(dp.clipped_grad(squared_error, 2.5, microbatch_size=1))
    total, _ = grad_fn(P.astype(dtype), X.astype(dtype))
    assert total.dtype == dtype and float(total) == -3.5
    widened = dp.clipped_grad(squared_error, 2.5, dtype=jnp.float32)
    total, _ = widened(P.astype(dtype), X.astype(dtype))
    assert total.dtype == jnp.float32 and float(total) == -3.5


@pytest.mark.parametrize("microbatch_size", [None, 2, 4])
@pytest.mark.parametrize(
    "clip,normalize_by,rescale", [(0.1, 1.0, False), (0.5, 4.0, False), (0.3, 8.0, True)]
)
def test_equals_reference_and_jax_privacy_on_mlp(
    getkey, microbatch_size, clip, normalize_by, rescale
):
    model = make_model(getkey())
    batch = make_batch(getkey(), 8)
    grad_fn = dp.clipped_grad(
        model_loss,
        clip,
        microbatch_size=microbatch_size,
        normalize_by=normalize_by,
        rescale_to_unit_norm=rescale,
        return_grad_norms=True,
    )
    total, aux = eqx.filter_jit(grad_fn)(model, batch)
    expected, norms = reference_sum(model, batch, clip, normalize_by, rescale)
    params, static = eqx.partition(model, eqx.is_inexact_array)
    assert_tree_allclose(eqx.filter(total, eqx.is_array), expected, rtol=1e-5, atol=1e-6)
    assert_tree_allclose(aux.grad_norms, norms, rtol=1e-5)

    def jp_loss(p, b):
        return model_loss(eqx.combine(p, static), b)

    jp_fn = jp_clipping.clipped_grad(
        jp_loss,
        l2_clip_norm=clip,
        microbatch_size=microbatch_size,
        normalize_by=normalize_by,
        rescale_to_unit_norm=rescale,
    )
    with jax.numpy_dtype_promotion("standard"):  # jax_privacy is not strict-safe
        jp_total = jp_fn(params, batch)
    assert_tree_allclose(eqx.filter(total, eqx.is_array), jp_total, rtol=1e-5, atol=1e-6)
    assert math.isclose(grad_fn.l2_norm_bound, jp_fn.l2_norm_bound, rel_tol=1e-7)


def test_gradient_keeps_the_model_structure(getkey):
    model = make_model(getkey())
    total, _ = dp.clipped_grad(model_loss, 1.0)(model, make_batch(getkey(), 4))
    assert isinstance(total, eqx.nn.MLP)
    assert total.layers[0].weight.shape == model.layers[0].weight.shape
    assert total.activation is None  # not differentiated, as in eqx.filter_grad


def test_pre_clipping_transform():
    # Fact 32 of the reference notes: scale w by 0.1 before clipping each example.
    def loss(params, x):
        return jnp.sum(params["w"] * x[0] + params["b"] * x[1])

    params = {"w": jnp.array(0.0), "b": jnp.array(0.0)}
    x = jnp.array([[4.0, 4.0], [12.0, 6.0]])
    grad_fn = dp.clipped_grad(
        loss,
        1.0,
        keep_batch_dim=False,
        pre_clipping_transform=lambda g: {"w": 0.1 * g["w"], "b": g["b"]},
    )
    total, _ = grad_fn(params, x)
    n1, n2 = math.hypot(0.4, 4.0), math.hypot(1.2, 6.0)
    assert jnp.allclose(total["w"], 0.4 / n1 + 1.2 / n2, atol=1e-5)
    assert jnp.allclose(total["b"], 4.0 / n1 + 6.0 / n2, atol=1e-5)


def test_user_level_clipping():
    # Three users with two examples each; a user's gradient is p - mean(their x).
    users = jnp.array([[1.0, -1.0], [2.0, 2.0], [0.0, 3.0]])
    grad_fn = dp.clipped_grad(squared_error, 100.0, keep_batch_dim=False)
    total, _ = grad_fn(jnp.array(3.0), users)
    assert jnp.allclose(total, 5.5)
    assert grad_fn.privacy_unit == "user"
    clipped, _ = dp.clipped_grad(squared_error, 1.0, keep_batch_dim=False)(
        jnp.array(3.0), users
    )
    assert jnp.allclose(clipped, 3.0)  # each user's gradient is clipped to 1
    assert dp.clipped_grad(squared_error, 1.0).privacy_unit == "example"


@pytest.mark.parametrize("microbatch_size", [None, 1])
@pytest.mark.parametrize("bad", [jnp.nan, jnp.inf])
def test_nan_safe_zeroes_the_whole_example(microbatch_size, bad):
    x = X.at[1, 0].set(bad)
    total, aux = dp.clipped_grad(squared_error, 2.5, microbatch_size=microbatch_size)(P, x)
    assert jnp.allclose(total, 1.0 - 2.5) and aux.num_nonfinite == 1
    unsafe, aux = dp.clipped_grad(squared_error, 2.5, nan_safe=False)(P, x)
    assert not jnp.isfinite(unsafe) and aux.num_nonfinite == 1


def test_padded_nonfinite_example_is_neither_summed_nor_counted():
    x = X.at[2, 0].set(jnp.nan)
    mask = jnp.array([False, False, True])
    total, aux = dp.clipped_grad(squared_error, 2.5)(P, x, is_padding_example=mask)
    assert jnp.allclose(total, -1.0) and aux.num_nonfinite == 0


@pytest.mark.parametrize("microbatch_size", [None, 2, 3])
@pytest.mark.parametrize("nan_safe", [True, False])
def test_nonfinite_rows_of_a_large_layer(getkey, microbatch_size, nan_safe):
    """The clip scales are folded into the sum, so a dropped or padded non-finite
    example must be kept out of it (`0 * nan` is nan), at the top level and in loops."""
    model = eqx.nn.Sequential(
        [
            eqx.nn.Linear(300, 300, key=getkey()),
            eqx.nn.Lambda(jnp.tanh),
            eqx.nn.Linear(300, 2, key=getkey()),
        ]
    )
    batch = {"x": jax.random.normal(getkey(), (6, 300)), "y": jnp.ones((6, 2))}
    batch["x"] = batch["x"].at[5, 0].set(jnp.inf)  # padded and not finite
    mask = jnp.array([False] * 5 + [True])
    if nan_safe:
        batch["x"] = batch["x"].at[1, 3].set(jnp.nan)  # dropped by nan_safe
    grad_fn = dp.clipped_grad(
        model_loss, 0.5, microbatch_size=microbatch_size, nan_safe=nan_safe
    )
    total, aux = eqx.filter_jit(grad_fn)(model, batch, is_padding_example=mask)
    kept = [0, 2, 3, 4] if nan_safe else [0, 1, 2, 3, 4]
    kept_batch = jtu.tree_map(lambda v: v[jnp.array(kept)], batch)
    expected, _ = reference_sum(model, kept_batch, 0.5)
    assert_tree_allclose(eqx.filter(total, eqx.is_array), expected, rtol=1e-5, atol=1e-6)
    assert aux.num_nonfinite == (1 if nan_safe else 0)


def test_mixed_precision_leaves():
    """A bfloat16 leaf is scaled in float32 and cast back before the sum, as
    `dp.clip_pytree` does; the float32 leaf has the scale folded into the sum."""
    params = {"a": jnp.array([1.0, 2.0]), "b": jnp.array([0.5], jnp.bfloat16)}

    def loss(p, x):
        return jnp.sum(p["a"] * x[:, :2]) + jnp.sum(p["b"].astype(jnp.float32) * x[:, 2:])

    x = jnp.array([[3.0, 0.0, 4.0], [0.3, 0.4, 0.0], [6.0, 0.0, 8.0]])
    total, _ = dp.clipped_grad(loss, 1.0, microbatch_size=3)(params, x)
    # Per-example gradients (3, 0 | 4), (0.3, 0.4 | 0), (6, 0 | 8): norms 5, 0.5, 10.
    assert total["b"].dtype == jnp.bfloat16
    assert jnp.allclose(total["a"], jnp.array([0.6 + 0.3 + 0.6, 0.4]), rtol=1e-6)
    assert jnp.allclose(total["b"].astype(jnp.float32), 0.8 + 0.8, rtol=1e-2)


@pytest.mark.parametrize("microbatch_size", [None, 2])
def test_empty_batch_returns_zeros(getkey, microbatch_size):
    model = make_model(getkey())
    grad_fn = dp.clipped_grad(
        model_loss, 1.0, microbatch_size=microbatch_size, return_values=True
    )
    total, aux = grad_fn(model, make_batch(getkey(), 0))
    assert all(
        (leaf == 0).all() for leaf in jtu.tree_leaves(eqx.filter(total, eqx.is_array))
    )
    assert aux.values.shape == (0,) and aux.num_nonfinite == 0


def test_side_outputs(getkey):
    def loss_with_aux(p, x):
        value = squared_error(p, x)
        return value, {"twice": 2 * value}

    grad_fn = dp.clipped_grad(
        loss_with_aux,
        2.5,
        has_aux=True,
        return_values=True,
        return_grad_norms=True,
        microbatch_size=1,
    )
    total, aux = grad_fn(P, X, is_padding_example=jnp.array([False, False, True]))
    values = jnp.array([0.5, 2.0, 0.0])  # padding gives zeros
    assert jnp.allclose(total, -1.0)
    assert jnp.allclose(aux.values, values)
    assert jnp.allclose(aux.aux["twice"], 2 * values)
    assert jnp.allclose(aux.grad_norms, jnp.array([1.0, 2.0, 0.0]))
    plain, plain_aux = dp.clipped_grad(squared_error, 2.5)(P, X)
    assert plain_aux.values is None and plain_aux.grad_norms is None
    assert plain_aux.aux is None


def test_per_example_keys_reach_fun():
    def noisy_loss(p, x, key):
        return jnp.sum(p * x) + 0.0 * jax.random.normal(key)

    grad_fn = dp.clipped_grad(noisy_loss, 10.0, key_argnum=2, microbatch_size=2)
    total, _ = grad_fn(jnp.ones(2), jnp.ones((4, 2)), jax.random.key(0))
    assert jnp.allclose(total, 4.0)


@pytest.mark.parametrize(
    "clip,rescale,normalize_by,expected",
    [
        (2.0, False, 1.0, 2.0),
        ({"a": 3.0, "b": 4.0}, False, 1.0, 5.0),
        ({"a": 3.0, "b": 4.0}, True, 2.0, math.sqrt(2) / 2),
        (2.0, True, 4.0, 0.25),
        (6.0, False, 3, 2.0),
    ],
)
def test_sensitivity_values(clip, rescale, normalize_by, expected):
    grad_fn = dp.clipped_grad(
        lambda p, x: jnp.sum(p["a"] * x) + jnp.sum(p["b"] * x),
        clip,
        rescale_to_unit_norm=rescale,
        normalize_by=normalize_by,
    )
    assert math.isclose(grad_fn.l2_norm_bound, expected)
    assert math.isclose(grad_fn.sensitivity(RELATION.ADD_OR_REMOVE_ONE), expected)
    assert math.isclose(grad_fn.sensitivity(RELATION.REPLACE_SPECIAL), expected)
    assert math.isclose(grad_fn.sensitivity(RELATION.REPLACE_ONE), 2 * expected)


def _difference_norm(a, b):
    leaves = zip(jtu.tree_leaves(eqx.filter(a, eqx.is_array)), jtu.tree_leaves(b))
    return math.sqrt(sum(float(jnp.sum((x - y) ** 2)) for x, y in leaves))


def _drop(batch, index):
    return jtu.tree_map(lambda x: jnp.delete(x, index, axis=0), batch)


@settings(max_examples=10, deadline=None)
@given(
    seed=st.integers(0, 2**16),
    batch_size=st.integers(2, 6),
    clip=st.floats(0.01, 3.0),
    per_layer=st.booleans(),
    rescale=st.booleans(),
    normalize_by=st.sampled_from([1.0, 3.0]),
    with_nan=st.booleans(),
    microbatch_size=st.sampled_from([None, 1]),
)
def test_sensitivity_bounds_hold(
    seed, batch_size, clip, per_layer, rescale, normalize_by, with_nan, microbatch_size
):
    keys = jax.random.split(jax.random.key(seed), 4)
    model = make_model(keys[0])
    batch = make_batch(keys[1], batch_size)
    # Large inputs make most gradients exceed the clip norm.
    batch["x"] = batch["x"] * 10
    if with_nan:
        batch["x"] = batch["x"].at[0, 0].set(jnp.nan)
    if per_layer:
        # Per-layer clipping: view the gradient as a tuple of layers.
        clip_norm = tuple(clip * (i + 1) for i in range(len(model.layers)))
        pre = lambda g: tuple(g.layers)  # noqa: E731
    else:
        clip_norm, pre = clip, None
    grad_fn = dp.clipped_grad(
        model_loss,
        clip_norm,
        microbatch_size=microbatch_size,
        rescale_to_unit_norm=rescale,
        normalize_by=normalize_by,
        pre_clipping_transform=pre,
    )
    total, _ = grad_fn(model, batch)
    tolerance = 1e-5 * (1 + grad_fn.l2_norm_bound)
    index = batch_size - 1
    # Add or remove one example.
    removed, _ = dp.clipped_grad(
        model_loss,
        clip_norm,
        rescale_to_unit_norm=rescale,
        normalize_by=normalize_by,
        pre_clipping_transform=pre,
    )(model, _drop(batch, index))
    bound = grad_fn.sensitivity(RELATION.ADD_OR_REMOVE_ONE)
    assert _difference_norm(total, eqx.filter(removed, eqx.is_array)) <= bound + tolerance
    # Replace one example by another one (here: a far-away, huge one).
    replaced_batch = jtu.tree_map(lambda x: x.at[index].set(-100 * x[index]), batch)
    replaced, _ = grad_fn(model, replaced_batch)
    bound = grad_fn.sensitivity(RELATION.REPLACE_ONE)
    assert _difference_norm(total, eqx.filter(replaced, eqx.is_array)) <= bound + tolerance
    # Zero out one example (padding).
    mask = jnp.arange(batch_size) == index
    zeroed, _ = grad_fn(model, batch, is_padding_example=mask)
    bound = grad_fn.sensitivity(RELATION.REPLACE_SPECIAL)
    assert _difference_norm(total, eqx.filter(zeroed, eqx.is_array)) <= bound + tolerance


@pytest.mark.parametrize(
    "clip,message",
    [
        (-1.0, "finite non-negative"),
        (jnp.nan, "finite non-negative"),
        (jnp.inf, "sensitivity is unbounded"),
        ({"a": 1.0, "b": -2.0}, r"l2_clip_norm\['b'\]"),
    ],
)
def test_bad_clip_norm(clip, message):
    with pytest.raises(ValueError, match=message):
        dp.clipped_grad(squared_error, clip)


def test_traced_clip_norm_is_rejected():
    @jax.jit
    def build(c):
        dp.clipped_grad(squared_error, c)
        return c

    with pytest.raises(TypeError, match="needs a concrete `l2_clip_norm"):
        build(1.0)


@pytest.mark.parametrize("normalize_by", [0.0, -2.0, math.nan, math.inf])
def test_bad_normalize_by(normalize_by):
    with pytest.raises(ValueError, match="`normalize_by=.*finite positive"):
        dp.clipped_grad(squared_error, 1.0, normalize_by=normalize_by)


def test_overlapping_argnums():
    with pytest.raises(ValueError, match="overlap in \\[1\\]"):
        dp.clipped_grad(squared_error, 1.0, argnums=(0, 1), batch_argnums=1)


@pytest.mark.parametrize(
    "mask,error,message",
    [
        (jnp.array([0, 1, 2]), ValueError, "`is_padding_example` with values other"),
        (np.array([0.0, 1.0, 0.0]), TypeError, "`is_padding_example` to be a boolean"),
        (jnp.array([False, True]), ValueError, "of length 2 for a batch of 3"),
        (jnp.zeros((3, 1), bool), ValueError, "to be one-dimensional"),
    ],
)
def test_bad_padding_mask(mask, error, message):
    grad_fn = dp.clipped_grad(squared_error, 1.0)
    with pytest.raises(error, match=message):
        grad_fn(P, X, is_padding_example=mask)


def test_a_clip_group_without_gradient_is_refused_and_none_excludes_it():
    """A per-layer clip norm over leaves that get no gradient would add to the
    sensitivity for nothing: refused, and `None` in the clip tree leaves it out."""

    def loss(p, x):
        return jnp.mean((p["scale"] * p["w"] - x) ** 2)

    params = {"w": jnp.array(2.0), "scale": 1.0}  # a Python float: no gradient
    x = jnp.ones((3, 1))
    with pytest.raises(ValueError, match=r"l2_clip_norm\['scale'\].*None"):
        dp.clipped_grad(loss, {"w": 1.0, "scale": 1.0})(params, x)
    with pytest.raises(ValueError, match=r"l2_clip_norm\['scale'\]"):
        dp.ghost_clipped_grad(loss, {"w": 1.0, "scale": 1.0})(params, x)
    f = dp.clipped_grad(loss, {"w": 1.0, "scale": None})
    grads, _ = f(params, x)
    assert f.sensitivity() == 1.0
    reference, _ = dp.clipped_grad(loss, 1.0)(params, x)
    assert_tree_allclose(grads, reference)
