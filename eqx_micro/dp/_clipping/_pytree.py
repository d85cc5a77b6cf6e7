"""L2 clipping of PyTrees, globally or per layer: `clip_pytree` and `ClipL2`."""

import math
from typing import Any

import equinox as eqx
import jax
import jax.core
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jaxtyping import Array, ArrayLike, Bool, Float, PyTree

from ._clipping_fn import AbadiClipping, AbstractClippingFn, check_clipping_fn


# A clip norm: a Python number or a scalar array (traced clip norms are allowed).
ClipNorm = int | float | Float[ArrayLike, ""]


def _check_static_clip_norm(path: str, value: Any) -> None:
    """Rejects a concrete negative or NaN clip norm (infinity means: do not clip)."""
    if isinstance(value, jax.core.Tracer):
        return
    is_number = isinstance(value, int | float | np.number) and not isinstance(value, bool)
    is_array = isinstance(value, jax.Array | np.ndarray) and jnp.issubdtype(
        value.dtype, jnp.number
    )
    if not (is_number or is_array) or np.ndim(value) != 0:
        raise TypeError(
            f"`l2_clip_norm{path}` must be a number or a scalar array, got {value!r} of "
            f"type {type(value).__name__}."
        )
    value = float(value)
    if math.isnan(value) or value < 0:
        raise ValueError(
            f"`l2_clip_norm{path}` is {value}; a clip norm must be a non-negative "
            "number (or `inf` for no clipping)."
        )


def _global_norm(tree: Any) -> Float[Array, ""]:
    squares = [
        jnp.sum(jnp.square(leaf.astype(jnp.float32).reshape(-1)))
        for leaf in jtu.tree_leaves(tree)
        if eqx.is_array(leaf)
    ]
    return jnp.sqrt(sum(squares, jnp.float32(0)))


def _finite_or_zero(x: Any) -> Any:
    if eqx.is_array(x) and jnp.issubdtype(x.dtype, jnp.inexact):
        return jnp.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
    return x


def clip_scale(
    norm: Any,
    clip: Any,
    rescale_to_unit_norm: bool,
    clipping_fn: AbstractClippingFn,
) -> Any:
    """The factor `clip_pytree` scales a tree of L2 norm `norm` by (float32)."""
    clip = jnp.asarray(clip, jnp.float32)
    scale = clipping_fn.scale(norm, clip, rescale_to_unit_norm)
    # NaN (0/0, inf/inf) and inf scales become 0: the result is then zeros, never NaN
    # or inf unless the input itself is not finite.
    return jnp.nan_to_num(scale, nan=0.0, posinf=0.0, neginf=0.0)


def clip_pytree(
    tree: PyTree,
    l2_clip_norm: PyTree[ClipNorm],
    *,
    rescale_to_unit_norm: bool = False,
    nan_safe: bool = True,
    return_zero: bool | Bool[ArrayLike, ""] = False,
    clipping_fn: AbstractClippingFn = AbadiClipping(),
) -> tuple[PyTree, PyTree[Float[Array, ""]]]:
    """Clips a PyTree to an L2 norm, globally or per layer.

    With a scalar `l2_clip_norm` the whole tree is scaled by `min(1, c / ||tree||)`, its
    global L2 norm. With a PyTree prefix of `tree` (e.g. one clip norm per layer), each
    subtree is clipped to its own norm. Norms and scales are computed in float32 and the
    result is cast back to each leaf's dtype, so float16 leaves do not overflow.

    Edge cases: a zero tree is returned unchanged (norm 0); clip 0 gives zeros; clip
    `inf` returns the tree unchanged; with `rescale_to_unit_norm`, the result is further
    divided by `c` (norm at most 1), clip 0 normalizes to unit norm, and clip `inf` gives
    zeros. With `nan_safe` (the default, as in jax_privacy) NaN and infinite entries are
    read as zeros before the norm is taken, so the bound holds whatever the input; with
    `nan_safe=False` a non-finite input gives a non-finite norm and output.

    **Arguments:**

    - `tree`: the PyTree to clip; non-array leaves are returned unchanged.
    - `l2_clip_norm`: a non-negative number, or a PyTree prefix of `tree` of them.
    - `rescale_to_unit_norm`: divide the clipped tree by its clip norm.
    - `nan_safe`: replace NaN and ±inf entries by zeros before clipping.
    - `return_zero`: return zeros instead (a bool, or a bool scalar array, e.g. whether
        this example is padding), with the input's norm; as in jax_privacy, the
        computation is the same either way, so it does not reveal which it was.
    - `clipping_fn`: how a norm becomes a scale: hard clipping
        ([`dp.AbadiClipping`][eqx_micro.dp.AbadiClipping], the default) or
        [`dp.AutomaticClipping`][eqx_micro.dp.AutomaticClipping].

    **Returns:**

    `(clipped, norm)`: the clipped tree and the float32 L2 norm of the input, shaped like
    `l2_clip_norm` (one norm per clipped subtree).

    !!! example

        ```python
        import jax.numpy as jnp
        import eqx_micro.dp as dp

        clipped, norm = dp.clip_pytree({"w": jnp.array([3.0, 4.0])}, 1.0)
        assert norm == 5.0 and jnp.allclose(clipped["w"], jnp.array([0.6, 0.8]))
        layers = {"a": jnp.array([3.0, 4.0]), "b": jnp.array([0.0, 10.0])}
        clipped, norms = dp.clip_pytree(layers, {"a": 1.0, "b": 15.0})
        assert norms == {"a": 5.0, "b": 10.0} and (clipped["b"] == layers["b"]).all()
        zeros, norm = dp.clip_pytree({"w": jnp.array([3.0, 4.0])}, 1.0, return_zero=True)
        assert norm == 5.0 and (zeros["w"] == 0).all()
        ```
    """
    if not isinstance(nan_safe, bool):
        raise TypeError(f"`clip_pytree` needs `nan_safe` to be a bool, got {nan_safe!r}.")
    check_clipping_fn(clipping_fn, "clip_pytree")
    if nan_safe:
        tree = jtu.tree_map(_finite_or_zero, tree)
    scales, norms = clip_scales(tree, l2_clip_norm, rescale_to_unit_norm, clipping_fn)
    zero = jnp.asarray(return_zero)
    if zero.dtype != jnp.bool_ or zero.ndim != 0:
        raise TypeError(
            "`clip_pytree` needs `return_zero` to be a bool or a bool scalar array, got "
            f"{return_zero!r}."
        )

    def clip_leaf(x: Any, scale: Any) -> Any:
        if not eqx.is_array(x):
            return x
        clipped = (x.astype(jnp.float32) * scale).astype(x.dtype)
        return jnp.where(zero, jnp.zeros_like(clipped), clipped)

    return jtu.tree_map(clip_leaf, tree, scales), norms


def clip_scales(
    tree: PyTree,
    l2_clip_norm: PyTree[ClipNorm],
    rescale_to_unit_norm: bool,
    clipping_fn: AbstractClippingFn,
) -> tuple[PyTree, PyTree[Float[Array, ""]]]:
    """`(scales, norms)` of `clip_pytree`: `scales` is shaped like `tree`, one float32
    scalar per leaf (the scale of the subtree it belongs to); `norms` is shaped like
    `l2_clip_norm`. Clipping is `leaf * scale`, so callers may fold the scale into a
    later product instead of writing the clipped tree."""
    jtu.tree_map_with_path(
        lambda path, c: _check_static_clip_norm(jtu.keystr(path), c), l2_clip_norm
    )

    def subtree_scale(clip, subtree):
        norm = _global_norm(subtree)
        scale = clip_scale(norm, clip, rescale_to_unit_norm, clipping_fn)
        return jtu.tree_map(lambda x: scale if eqx.is_array(x) else x, subtree), norm

    try:
        pairs = jtu.tree_map(subtree_scale, l2_clip_norm, tree)
    except ValueError as error:
        raise ValueError(
            "`l2_clip_norm` must be a number or a PyTree prefix of `tree` (e.g. one "
            f"clip norm per layer); its structure does not match ({error})."
        ) from None
    clip_treedef = jtu.tree_structure(l2_clip_norm)
    flat = clip_treedef.flatten_up_to(pairs)
    scales = clip_treedef.unflatten([scale for scale, _ in flat])
    norms = clip_treedef.unflatten([norm for _, norm in flat])
    return scales, norms


class ClipL2(eqx.Module):
    """Clips a gradient to an L2 norm: a `transform_fn` for `em.micro_grad`.

    `ClipL2(c)(grads)` is `dp.clip_pytree(grads, c)[0]` (NaN and infinite entries read
    as zeros, unless `nan_safe=False`). The clip norm is an array
    field, so changing it between steps does not recompile; a PyTree of them clips per
    layer (a prefix of the gradient's structure).

    **Arguments:**

    - `l2_clip_norm`: a non-negative number, or a PyTree prefix of the gradient.
    - `rescale_to_unit_norm`: divide the clipped gradient by the clip norm.
    - `nan_safe`, `clipping_fn`: as for `clip_pytree`.

    !!! example

        ```python
        import jax.numpy as jnp
        import eqx_micro as em
        import eqx_micro.dp as dp

        def loss(w, x):
            return jnp.sum(w * x)

        # Per-example gradients are the examples themselves: norms 5 and 10.
        x = jnp.array([[3.0, 4.0], [6.0, 8.0]])
        total, _ = em.micro_grad(loss, transform_fn=dp.ClipL2(1.0))(jnp.zeros(2), x)
        assert jnp.allclose(total, jnp.array([1.2, 1.6]))
        ```
    """

    l2_clip_norm: PyTree[Float[Array, ""]]
    rescale_to_unit_norm: bool = eqx.field(static=True, default=False)
    nan_safe: bool = eqx.field(static=True, default=True)
    clipping_fn: AbstractClippingFn = AbadiClipping()

    # `jax.jit(f)` keys its cache on `f` itself: hash by identity, so that an instance
    # holding arrays can be jitted as a function (its arrays become constants).
    __hash__ = object.__hash__

    def __init__(
        self,
        l2_clip_norm: PyTree[ClipNorm],
        rescale_to_unit_norm: bool = False,
        nan_safe: bool = True,
        clipping_fn: AbstractClippingFn = AbadiClipping(),
    ):
        check_clipping_fn(clipping_fn, "ClipL2")
        for name, flag in (
            ("rescale_to_unit_norm", rescale_to_unit_norm),
            ("nan_safe", nan_safe),
        ):
            if not isinstance(flag, bool):
                raise TypeError(
                    f"`ClipL2` needs `{name}` to be True or False, got {flag!r}."
                )
        jtu.tree_map_with_path(
            lambda path, c: _check_static_clip_norm(jtu.keystr(path), c), l2_clip_norm
        )
        self.l2_clip_norm = jtu.tree_map(
            lambda c: jnp.asarray(c, jnp.float32), l2_clip_norm
        )
        self.rescale_to_unit_norm = rescale_to_unit_norm
        self.nan_safe = nan_safe
        self.clipping_fn = clipping_fn

    def __call__(self, grads: PyTree) -> PyTree:
        clipped, _ = clip_pytree(
            grads,
            self.l2_clip_norm,
            rescale_to_unit_norm=self.rescale_to_unit_norm,
            nan_safe=self.nan_safe,
            clipping_fn=self.clipping_fn,
        )
        return clipped
