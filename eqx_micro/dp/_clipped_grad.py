"""`clipped_grad`: the sum of clipped per-example gradients, with a known sensitivity.

The sensitivity is a property of the callable, not something users compute: the noise
of a DP plan is `noise_multiplier * callable.sensitivity(relation)`, so changing the clip
norm, `normalize_by` or `rescale_to_unit_norm` can never leave the noise miscalibrated.
"""

import abc
import math
from collections.abc import Callable, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jaxtyping import Array, ArrayLike, Float, Int, PyTree

from .._accumulators import (
    _carry_dtype,
    _sum_leading_axis,
    _zeros,
    AbstractAccumulator,
    Concat,
    Sum,
)
from .._custom_types import DType
from .._engine import _drop_leading_axis
from .._grad import AbstractPaddingAwareTransform, micro_grad
from ._accounting import NeighboringRelation
from ._clipping import clip_scales, ClipNorm


class ClippedGradAux(eqx.Module):
    """The side outputs of a `clipped_grad` call.

    **Fields:**

    - `values`: the value of `fun` for each example (with `return_values=True`), else
        None.
    - `grad_norms`: the L2 norm of each example's gradient before clipping, shaped like
        `l2_clip_norm` with a leading batch axis (with `return_grad_norms=True`), else
        None.
    - `aux`: `fun`'s auxiliary output per example (with `has_aux=True`), else None.
    - `num_nonfinite`: how many examples had a NaN or infinite gradient norm. With
        `nan_safe=True` they contributed zero to the sum.

    Per-example outputs are not privatised: releasing them is the caller's
    responsibility. Padded examples have zeros everywhere.

    !!! example

        ```python
        import jax.numpy as jnp
        import eqx_micro.dp as dp

        aux = dp.ClippedGradAux(values=None, grad_norms=None, aux=None,
                                num_nonfinite=jnp.array(0))
        assert aux.num_nonfinite == 0
        ```
    """

    values: Any
    grad_norms: Any
    aux: Any
    num_nonfinite: Int[Array, ""]


class AbstractBoundedSensitivityCallable(eqx.Module):
    """A function of a batch whose output has a known L2 sensitivity.

    The contract a subclass implements:

    - `__call__(*args, is_padding_example=None, **kwargs)` returns `(output, aux)`,
        where adding or removing one example (or user, for user-level callables) of the
        batch changes `output` by at most `l2_norm_bound` in L2 norm, and padded examples
        contribute nothing.
    - `l2_norm_bound`: that bound, a float.
    - `privacy_unit`: `"example"` or `"user"`: what one row of the batch is.

    `sensitivity(neighboring_relation)` then follows: the bound under add-or-remove and
    zero-out (`REPLACE_SPECIAL`), twice the bound when one example is replaced by another.
    Execution plans accept any subclass.

    !!! example

        ```python
        import jax.numpy as jnp
        import eqx_micro.dp as dp

        class ClippedCount(dp.AbstractBoundedSensitivityCallable):
            # How many rows exceed a threshold: each row adds 0 or 1.

            threshold: float

            def __call__(self, x, is_padding_example=None):
                hits = (x > self.threshold).astype(jnp.float32)
                if is_padding_example is not None:
                    hits = jnp.where(is_padding_example, 0.0, hits)
                return jnp.sum(hits), None

            @property
            def l2_norm_bound(self):
                return 1.0

            @property
            def privacy_unit(self):
                return "example"

        count = ClippedCount(threshold=0.5)
        assert count(jnp.array([0.1, 0.7, 0.9]))[0] == 2.0
        assert count.sensitivity(dp.NeighboringRelation.REPLACE_ONE) == 2.0
        ```
    """

    @abc.abstractmethod
    def __call__(self, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
        """The bounded-sensitivity output and its side outputs."""

    @property
    @abc.abstractmethod
    def l2_norm_bound(self) -> float:
        """The L2 sensitivity under add-or-remove-one."""

    @property
    @abc.abstractmethod
    def privacy_unit(self) -> str:
        """What one row of the batch is: `"example"` or `"user"`."""

    def sensitivity(
        self,
        neighboring_relation: NeighboringRelation = NeighboringRelation.ADD_OR_REMOVE_ONE,
    ) -> float:
        """The L2 sensitivity of the output under `neighboring_relation`.

        `ADD_OR_REMOVE_ONE` and `REPLACE_SPECIAL` (replacing one row by a zero
        contribution) give `l2_norm_bound`; `REPLACE_ONE` (one row replaced by any other)
        gives twice it.

        !!! example

            ```python
            import jax.numpy as jnp
            import eqx_micro.dp as dp

            grad_fn = dp.clipped_grad(lambda w, x: jnp.sum(w * x), 2.0)
            assert grad_fn.sensitivity() == 2.0  # ADD_OR_REMOVE_ONE
            assert grad_fn.sensitivity(dp.NeighboringRelation.REPLACE_ONE) == 4.0
            ```
        """
        if neighboring_relation in (
            NeighboringRelation.ADD_OR_REMOVE_ONE,
            NeighboringRelation.REPLACE_SPECIAL,
        ):
            return self.l2_norm_bound
        if neighboring_relation == NeighboringRelation.REPLACE_ONE:
            return 2.0 * self.l2_norm_bound
        raise ValueError(
            f"`neighboring_relation` must be a `dp.NeighboringRelation`, got "
            f"{neighboring_relation!r}."
        )


def _is_finite_number(value: Any) -> bool:
    return not math.isnan(value) and not math.isinf(value)


def _concrete_clip_norms(l2_clip_norm: Any, caller: str) -> list[float]:
    """The clip norms as floats; each must be finite and non-negative."""
    values = []
    for path, clip in jtu.tree_flatten_with_path(l2_clip_norm)[0]:
        if isinstance(clip, jax.core.Tracer):
            raise TypeError(
                f"`{caller}` needs a concrete `l2_clip_norm{jtu.keystr(path)}` to know its "
                "sensitivity, but it is traced. Build the callable outside `jit`."
            )
        value = float(np.asarray(clip))
        if not (_is_finite_number(value) and value >= 0):
            raise ValueError(
                f"`{caller}` got `l2_clip_norm{jtu.keystr(path)}={value}`; a clip norm "
                "must be a finite non-negative number, or the sensitivity is unbounded. "
                "For unclipped per-example gradients use `em.micro_grad`."
            )
        values.append(value)
    if not values:
        raise ValueError(f"`{caller}` got an empty `l2_clip_norm` tree.")
    return values


class _ScaledRows(eqx.Module):
    """One example's gradient and the scale of its clipped copy (`grads * scales`, leaf
    by leaf), left unmultiplied so the sum over examples can fold the scales in.

    `unreadable` (a bool scalar, or None when no example can be) marks a gradient that
    must not be read at all, because `0 * nan` is nan: a non-finite gradient that
    `nan_safe` drops, or a non-finite padded one."""

    grads: Any
    scales: Any
    unreadable: Any


class _ClipExample(AbstractPaddingAwareTransform):
    """The per-example `transform_fn`: pre-transform, cast, and clip scales (zero for a
    dropped non-finite or a padded example)."""

    l2_clip_norm: PyTree[Float[Array, ""]]
    pre_clipping_transform: Callable | None
    rescale_to_unit_norm: bool = eqx.field(static=True)
    nan_safe: bool = eqx.field(static=True)
    return_grad_norms: bool = eqx.field(static=True)
    dtype: DType = eqx.field(static=True)

    def __call__(self, grads: PyTree, is_padding: Any) -> tuple:
        if self.pre_clipping_transform is not None:
            grads = self.pre_clipping_transform(grads)
        if self.dtype is not None:
            grads = jtu.tree_map(
                lambda g: g.astype(self.dtype) if eqx.is_inexact_array(g) else g, grads
            )
        scales, norms = clip_scales(grads, self.l2_clip_norm, self.rescale_to_unit_norm)
        finite = jnp.all(jnp.stack([jnp.isfinite(n) for n in jtu.tree_leaves(norms)]))
        # The whole example goes, not just its non-finite entries: a partial gradient
        # has no sensitivity bound. Without `nan_safe` a non-finite example poisons the
        # sum (its scale is 0, but `0 * nan` is nan), unless it is padding.
        keep = finite if self.nan_safe else jnp.bool_(True)
        unreadable = ~finite if self.nan_safe else None
        nonfinite = jnp.where(finite, 0.0, 1.0).astype(jnp.float32)
        if is_padding is not None:
            keep = keep & ~is_padding
            if unreadable is None:
                unreadable = ~finite & is_padding
            nonfinite = jnp.where(is_padding, 0.0, nonfinite)
            norms = jtu.tree_map(lambda n: jnp.where(is_padding, 0.0, n), norms)
        scales = jtu.tree_map(lambda c: jnp.where(keep, c, 0.0), scales)
        rows = _ScaledRows(grads=grads, scales=scales, unreadable=unreadable)
        if self.return_grad_norms:
            return rows, nonfinite, norms
        return rows, nonfinite


class _ClippedSum(AbstractAccumulator):
    """Sums clipped gradients given as `_ScaledRows`, folding the clip scales into the
    contraction over examples: `sum_b scale_b * grad_b` is one dot per leaf, instead of
    writing a scaled, masked copy of every gradient and summing that. DP-SGD step time
    / jax_privacy's (`benchmarks/bench_dp.py`): MLP at microbatch 32 0.23 -> 0.13; CNN
    0.61 -> 0.45-0.51 at microbatch 32, 1.06-1.10 -> 0.95-0.99 unmicrobatched. The cost is
    memory: the per-example gradients are held whole for the `lax.cond` (CNN, batch
    256, microbatch 32: 7.3 -> 9.0 MiB of temp, jax_privacy 8.2).

    Unreadable rows are skipped only in microbatches that have one, behind that
    `lax.cond`, so the usual all-finite case reads each gradient once. float32 leaves
    take the folded path; other dtypes are scaled in float32 and cast back first, as
    `dp.clip_pytree` does.
    """

    dtype: DType = eqx.field(default=None, static=True)

    def init(self, example: _ScaledRows, num_microbatches: int) -> Any:
        return jtu.tree_map(
            lambda s: _zeros(_drop_leading_axis(s), _carry_dtype(self.dtype, s)),
            example.grads,
        )

    def update(self, carry: Any, value: _ScaledRows, index: Any) -> Any:
        if value.unreadable is None:
            return self._fold(carry, value)
        return jax.lax.cond(
            jnp.any(value.unreadable),
            lambda: self._fold_readable_rows(carry, value),
            lambda: self._fold(carry, value),
        )

    def _fold(self, carry: Any, value: _ScaledRows) -> Any:
        return jtu.tree_map(
            lambda total, grads, scales: total + _scaled_sum(grads, scales, total.dtype),
            carry,
            value.grads,
            value.scales,
        )

    def _fold_readable_rows(self, carry: Any, value: _ScaledRows) -> Any:
        """The rare branch: one example at a time, skipping unreadable ones. A masked
        copy of the microbatch fed to the dot would be a second buffer of all its
        gradients, held whether the branch runs or not (the MLP at batch 256: 1302
        instead of 657 MiB of temp)."""

        def add_example(b: Any, total: Any) -> Any:
            readable = ~value.unreadable[b]

            def add_leaf(t: Array, grads: Array, scales: Array) -> Array:
                row = jax.lax.dynamic_index_in_dim(grads, b, keepdims=False)
                row = jnp.where(readable, row, jnp.zeros_like(row))
                scaled = (row.astype(jnp.float32) * scales[b]).astype(row.dtype)
                return t + scaled.astype(t.dtype)

            return jtu.tree_map(add_leaf, total, value.grads, value.scales)

        num_rows = value.unreadable.shape[0]
        return jax.lax.fori_loop(0, num_rows, add_example, carry)

    def finalize(self, carry: Any, num_microbatches: int, num_executed: Any) -> Any:
        return carry

    def aggregate(self, values: _ScaledRows) -> _ScaledRows:
        return values  # `update` reduces, scales folded in.


def _scaled_sum(grads: Array, scales: Array, dtype: Any) -> Array:
    """`sum_b scales[b] * grads[b]` in `dtype`."""
    if grads.dtype == jnp.float32:
        return jax.lax.dot_general(
            scales, grads, (((0,), (0,)), ((), ())), preferred_element_type=dtype
        )
    scaled = grads.astype(jnp.float32) * scales.reshape((-1,) + (1,) * (grads.ndim - 1))
    return _sum_leading_axis(scaled.astype(grads.dtype), dtype)


class BoundedSensitivityCallable(AbstractBoundedSensitivityCallable):
    """The sum of clipped per-example gradients, as returned by `dp.clipped_grad`.

    Call it like `fun`, with the batched arguments holding the whole batch and an
    optional `is_padding_example` keyword; it returns `(clipped_sum, dp.ClippedGradAux)`.
    See `dp.clipped_grad` for the arguments and `sensitivity` for the guarantee.

    !!! example

        ```python
        import jax.numpy as jnp
        import eqx_micro.dp as dp

        grad_fn = dp.clipped_grad(lambda w, x: jnp.sum(w * x), 1.0)
        assert isinstance(grad_fn, dp.BoundedSensitivityCallable)
        total, aux = grad_fn(jnp.zeros(2), jnp.array([[3.0, 4.0], [0.0, 0.5]]))
        assert jnp.allclose(total, jnp.array([0.6, 1.3]))
        ```
    """

    grad_fn: Callable
    l2_clip_norm_values: tuple[float, ...] = eqx.field(static=True)
    normalize_by: float = eqx.field(static=True)
    rescale_to_unit_norm: bool = eqx.field(static=True)
    keep_batch_dim: bool = eqx.field(static=True)
    batch_argnums: tuple[int, ...] = eqx.field(static=True)
    has_aux: bool = eqx.field(static=True)
    return_values: bool = eqx.field(static=True)
    return_grad_norms: bool = eqx.field(static=True)

    @property
    def l2_norm_bound(self) -> float:
        """`sqrt(sum of squared clip norms) / normalize_by` (per-layer clip norms add in
        quadrature), or `sqrt(number of clip norms) / normalize_by` with
        `rescale_to_unit_norm`.

        !!! example

            ```python
            import jax.numpy as jnp
            import eqx_micro.dp as dp

            loss = lambda p, x: jnp.sum(p["a"] * x) + jnp.sum(p["b"] * x)
            per_layer = dp.clipped_grad(loss, {"a": 3.0, "b": 4.0}, normalize_by=5)
            assert per_layer.l2_norm_bound == 1.0  # sqrt(3² + 4²) / 5
            ```
        """
        return l2_norm_bound(
            self.l2_clip_norm_values, self.normalize_by, self.rescale_to_unit_norm
        )

    @property
    def privacy_unit(self) -> str:
        """`"example"`, or `"user"` with `keep_batch_dim=False` (a row is a user's
        group of examples, clipped together).

        !!! example

            ```python
            import jax.numpy as jnp
            import eqx_micro.dp as dp

            loss = lambda w, x: jnp.sum(w * x)
            assert dp.clipped_grad(loss, 1.0).privacy_unit == "example"
            per_user = dp.clipped_grad(loss, 1.0, keep_batch_dim=False)
            assert per_user.privacy_unit == "user"
            ```
        """
        return "example" if self.keep_batch_dim else "user"

    def __call__(
        self,
        *args: Any,
        is_padding_example: ArrayLike | None = None,
        **kwargs: Any,
    ) -> tuple[PyTree, ClippedGradAux]:
        if is_padding_example is not None:
            _check_padding_mask(is_padding_example, args, self.batch_argnums)
            kwargs["is_padding_example"] = is_padding_example
        outputs, per_example = self.grad_fn(*args, **kwargs)
        if self.return_grad_norms:
            clipped_sum, nonfinite, norms = outputs
        else:
            (clipped_sum, nonfinite), norms = outputs, None
        if self.normalize_by != 1.0:
            clipped_sum = jtu.tree_map(
                lambda g: (g / self.normalize_by).astype(g.dtype) if eqx.is_array(g) else g,
                clipped_sum,
            )
        aux = ClippedGradAux(
            values=per_example.values if self.return_values else None,
            grad_norms=norms,
            aux=per_example.aux if self.has_aux else None,
            num_nonfinite=jnp.round(nonfinite).astype(jnp.int32),
        )
        return clipped_sum, aux


def _check_padding_mask(mask: Any, args: tuple, batch_argnums: tuple[int, ...]) -> None:
    """Padding must be a bool vector over the batch: a wrong mask is a privacy leak."""
    mask_dtype = getattr(mask, "dtype", None)
    if mask_dtype is None or mask_dtype != jnp.bool_:
        raise TypeError(
            "`is_padding_example` must be a bool array (True marks padding), got "
            f"{type(mask).__name__} of dtype {mask_dtype}. Use `indices == -1`."
        )
    if np.ndim(mask) != 1:
        raise ValueError(
            f"`is_padding_example` must be 1-D (one flag per row), got shape "
            f"{np.shape(mask)}."
        )
    sizes = {
        leaf.shape[0]
        for i in batch_argnums
        if i < len(args)
        for leaf in jtu.tree_leaves(args[i])
        if eqx.is_array(leaf) and leaf.ndim > 0
    }
    if sizes and np.shape(mask)[0] not in sizes:
        raise ValueError(
            f"`is_padding_example` has {np.shape(mask)[0]} entries but the batch has "
            f"{sorted(sizes)[0]} rows; pass one flag per row."
        )


def _as_tuple(x: int | Sequence[int]) -> tuple[int, ...]:
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def check_clipping_config(
    caller: str,
    l2_clip_norm: Any,
    normalize_by: Any,
    argnums: int | Sequence[int],
    batch_argnums: int | Sequence[int],
) -> list[float]:
    """Validates what every clipped-gradient builder takes; returns the clip norms."""
    clip_values = _concrete_clip_norms(l2_clip_norm, caller)
    if isinstance(normalize_by, bool) or not (
        _is_finite_number(float(normalize_by)) and normalize_by > 0
    ):
        raise ValueError(
            f"`{caller}` got `normalize_by={normalize_by}`; it must be a finite positive "
            "number (the sum is divided by it, and so is the sensitivity)."
        )
    overlap = set(_as_tuple(argnums)) & set(_as_tuple(batch_argnums))
    if overlap:
        raise ValueError(
            f"`{caller}` got `argnums={argnums}` and `batch_argnums={batch_argnums}`, "
            f"which overlap in {sorted(overlap)}: the parameters are differentiated and "
            "the same for every example, the batch is split; an argument cannot be both."
        )
    return clip_values


def l2_norm_bound(
    clip_values: Sequence[float], normalize_by: float, rescale_to_unit_norm: bool
) -> float:
    """Per-layer clip norms add in quadrature; unit rescaling makes each one 1."""
    if rescale_to_unit_norm:
        total = float(len(clip_values))
    else:
        total = sum(c * c for c in clip_values)
    return math.sqrt(total) / normalize_by


def clipped_grad(
    fun: Callable,
    l2_clip_norm: PyTree[ClipNorm],
    *,
    argnums: int | Sequence[int] = 0,
    has_aux: bool = False,
    batch_argnums: int | Sequence[int] = 1,
    keep_batch_dim: bool = True,
    microbatch_size: int | None = None,
    normalize_by: int | float = 1.0,
    rescale_to_unit_norm: bool = False,
    return_values: bool = False,
    return_grad_norms: bool = False,
    nan_safe: bool = True,
    pre_clipping_transform: Callable | None = None,
    dtype: DType = None,
    key_argnum: int | None = None,
) -> BoundedSensitivityCallable:
    """The sum over a batch of clipped per-example gradients: the core of DP-SGD.

    Each example's gradient of `fun` (with respect to the inexact arrays of the `argnums`
    arguments, filtered like `eqx.filter_grad`, so Equinox models just work) is clipped
    to L2 norm `l2_clip_norm`, and the clipped gradients are summed over the batch and
    divided by `normalize_by`. Examples run `microbatch_size` at a time in one compiled
    loop (`em.micro_grad`); the microbatch size changes memory and speed, never the
    result or the sensitivity.

    The result has a known sensitivity, `.sensitivity(neighboring_relation)`, from which
    a DP plan sets its noise. Add noise to this output directly (it is already the
    normalised sum, and the sensitivity accounts for `normalize_by`): never rescale it
    by hand before noise.

    Call-time keyword `is_padding_example` (bool, one flag per row): padded rows
    contribute exactly zero (applied after clipping, so the sensitivity is unchanged),
    and microbatches holding only padding are skipped. Sort padding last (see
    `dp.pad_to_multiple_of`) for the skip to happen. An empty batch returns zeros.

    **Arguments:**

    - `fun`: `fun(*args)` returning a scalar loss for one example (or `(loss, aux)` with
        `has_aux`).
    - `l2_clip_norm`: a finite non-negative number, or a PyTree prefix of the gradient
        (per-layer clipping; the bound is then the root of the sum of squares).
    - `argnums`: the argument(s) to differentiate.
    - `has_aux`: whether `fun` returns `(loss, aux)`; aux is returned per example.
    - `batch_argnums`: the batched argument(s); they must not overlap `argnums`.
    - `keep_batch_dim`: if True, `fun` sees each example with a batch axis of size 1. If
        False, it sees a row without it: with inputs shaped `(users, examples_per_user,
        ...)`, a row is one user's examples, their gradient is clipped as one, and the
        guarantee is user-level (`privacy_unit == "user"`).
    - `microbatch_size`: rows per microbatch; `None` vectorises the whole batch.
    - `normalize_by`: a positive number the sum is divided by (e.g. the expected batch
        size, for a mean); included in the sensitivity.
    - `rescale_to_unit_norm`: divide each clipped gradient by its clip norm, so each
        clip norm contributes 1 to the sensitivity (decouples it from the learning rate).
    - `return_values`: return each example's loss in the aux.
    - `return_grad_norms`: return each example's gradient norm before clipping (after
        `pre_clipping_transform`), shaped like `l2_clip_norm`.
    - `nan_safe`: an example whose gradient norm is NaN or infinite contributes zero
        instead of poisoning the sum; `aux.num_nonfinite` counts them either way.
    - `pre_clipping_transform`: applied to each example's gradient before clipping (e.g.
        preconditioning); it may change the tree structure.
    - `dtype`: cast each example's gradient to this dtype before clipping; the sum is
        carried and returned in it (e.g. `jnp.float32` for a bfloat16 model).
    - `key_argnum`: position of a PRNG key argument; each example gets
        `jax.random.fold_in(key, example_index)` (e.g. for dropout).

    **Returns:**

    A `dp.BoundedSensitivityCallable` with `fun`'s arguments, returning
    `(clipped_sum, dp.ClippedGradAux)`.

    !!! example

        ```python
        import jax.numpy as jnp
        import eqx_micro.dp as dp

        def loss(p, x):
            return 0.5 * jnp.mean((p - x) ** 2)

        # Per-example gradients 1, -2 and -5, clipped to 2.5: 1 - 2 - 2.5.
        grad_fn = dp.clipped_grad(loss, 2.5, microbatch_size=1)
        x = jnp.array([[1.0], [4.0], [7.0]])
        total, aux = grad_fn(jnp.array(2.0), x)
        assert jnp.allclose(total, -3.5) and aux.num_nonfinite == 0
        assert grad_fn.sensitivity() == 2.5
        assert grad_fn.sensitivity(dp.NeighboringRelation.REPLACE_ONE) == 5.0
        padded, _ = grad_fn(jnp.array(2.0), x,
                            is_padding_example=jnp.array([False, True, True]))
        assert jnp.allclose(padded, 1.0)
        ```
    """
    clip_values = check_clipping_config(
        "clipped_grad", l2_clip_norm, normalize_by, argnums, batch_argnums
    )
    clip_example = _ClipExample(
        l2_clip_norm=jtu.tree_map(lambda c: jnp.asarray(c, jnp.float32), l2_clip_norm),
        pre_clipping_transform=pre_clipping_transform,
        rescale_to_unit_norm=rescale_to_unit_norm,
        nan_safe=nan_safe,
        return_grad_norms=return_grad_norms,
        dtype=dtype,
    )
    accumulator = (
        (_ClippedSum(dtype=dtype), Sum(), Concat())
        if return_grad_norms
        else (_ClippedSum(dtype=dtype), Sum())
    )
    grad_fn = micro_grad(
        fun,
        has_aux,
        argnums,
        batch_argnums=batch_argnums,
        keep_batch_dim=keep_batch_dim,
        microbatch_size=microbatch_size,
        accumulator=accumulator,
        transform_fn=clip_example,
        key_argnum=key_argnum,
    )
    return BoundedSensitivityCallable(
        grad_fn=grad_fn,
        l2_clip_norm_values=tuple(clip_values),
        normalize_by=float(normalize_by),
        rescale_to_unit_norm=rescale_to_unit_norm,
        keep_batch_dim=keep_batch_dim,
        batch_argnums=_as_tuple(batch_argnums),
        has_aux=has_aux,
        return_values=return_values,
        return_grad_norms=return_grad_norms,
    )
