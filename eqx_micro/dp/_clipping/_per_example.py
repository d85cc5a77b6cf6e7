"""The per-example strategy: every example's gradient formed (`vmap` of `grad`), clipped
and summed, the clip scales folded into the sum."""

import abc
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array

from ...internal import positional_names, signature_of, weighted_sum
from ._pytree import clip_scales
from ._spec import AbstractClippingStrategy, ClipSettings, ExampleLoss, MicrobatchSums


class _Rows(eqx.Module):
    """One example's gradient, its clip scale per leaf (zero for a dropped or padded
    example), and whether it must not be read at all: `0 * nan` is nan, so a
    non-finite gradient that `nan_safe` drops (or a non-finite padded one) is skipped,
    not scaled by zero."""

    grads: Any
    scales: Any
    unreadable: Any  # a bool scalar, or None when no example can be unreadable
    value: Array | None  # None for outputs clipped by `clipped_fun` (no loss)
    aux: Any
    norms: list[Array]
    nonfinite: Array


def _scaled_sum(grads: Array, scales: Array, dtype: Any) -> Array:
    """`Σ_b scales[b] * grads[b]`: one contraction over the examples, in `dtype`."""
    # Narrow floats are scaled and summed in float32, then cast back.
    work = dtype if jnp.finfo(dtype).bits >= 32 else jnp.dtype(jnp.float32)
    return weighted_sum(scales.astype(work), grads.astype(work), work).astype(dtype)


def _readable_sum(rows: _Rows, dtype_of: Any) -> Any:
    """The rare branch: one example at a time, skipping unreadable ones. (A masked copy
    of the microbatch fed to the contraction would be a second buffer of all its
    gradients, held whether or not the branch runs.)"""

    def add_example(b: Any, totals: Any) -> Any:
        readable = ~rows.unreadable[b]

        def add_leaf(total: Array, grads: Array, scales: Array) -> Array:
            row = jax.lax.dynamic_index_in_dim(grads, b, keepdims=False)
            row = jnp.where(readable, row, jnp.zeros_like(row))
            return total + (row.astype(jnp.float32) * scales[b]).astype(total.dtype)

        return jtu.tree_map(add_leaf, totals, rows.grads, rows.scales)

    zeros = jtu.tree_map(lambda g: jnp.zeros(g.shape[1:], dtype_of(g.dtype)), rows.grads)
    return jax.lax.fori_loop(0, rows.unreadable.shape[0], add_example, zeros)


class _AbstractPerExample(AbstractClippingStrategy):
    """Clips a tree formed for each example (by `example_tree`) and sums it."""

    @abc.abstractmethod
    def example_tree(
        self, loss: ExampleLoss, args: tuple, kwargs: dict
    ) -> tuple[Any, Any, Any]:
        """`(value, aux, tree to clip)` of one (expanded) example."""

    def check(self, clip: ClipSettings, caller: str) -> None:
        pass

    def _example(
        self,
        loss: ExampleLoss,
        clip: ClipSettings,
        args: tuple,
        kwargs: dict,
        is_padding: Any,
    ) -> _Rows:
        value, aux, grads = self.example_tree(loss, loss.expand(args), kwargs)
        if clip.pre_clipping_transform is not None:
            grads = clip.pre_clipping_transform(grads)
        if clip.dtype is not None:
            grads = jtu.tree_map(
                lambda g: g.astype(clip.dtype) if eqx.is_inexact_array(g) else g, grads
            )
        scales, norms = clip_scales(
            grads, clip.l2_clip_norm, clip.rescale_to_unit_norm, clip.clipping_fn
        )
        norms = jtu.tree_leaves(norms)
        finite = jnp.all(jnp.stack([jnp.isfinite(n) for n in norms]))
        # The whole example goes, not just its non-finite entries: a partial gradient
        # has no sensitivity bound. Without `nan_safe` a non-finite example poisons the
        # sum, unless it is padding.
        keep = finite if clip.nan_safe else jnp.bool_(True)
        unreadable = ~finite if clip.nan_safe else None
        nonfinite = (~finite).astype(jnp.int32)
        if is_padding is not None:
            keep = keep & ~is_padding
            if unreadable is None:
                unreadable = ~finite & is_padding
            nonfinite = jnp.where(is_padding, 0, nonfinite)
            norms = [jnp.where(is_padding, 0.0, n) for n in norms]
            if value is not None:
                value = jnp.where(is_padding, jnp.zeros_like(value), value)
            aux = jtu.tree_map(
                lambda x: (
                    jnp.where(is_padding, jnp.zeros_like(x), x) if eqx.is_array(x) else x
                ),
                aux,
            )
        scales = jtu.tree_map(lambda s: jnp.where(keep, s, 0.0), scales)
        return _Rows(grads, scales, unreadable, value, aux, norms, nonfinite)

    def microbatch(
        self,
        loss: ExampleLoss,
        clip: ClipSettings,
        args: tuple,
        kwargs: dict,
        is_padding: jax.Array | None,
    ) -> MicrobatchSums:
        in_axes = (*loss.axes(args, kwargs), None if is_padding is None else 0)
        rows = eqx.filter_vmap(
            lambda a, k, p: self._example(loss, clip, a, k, p), in_axes=in_axes
        )(args, kwargs, is_padding)

        def fold() -> Any:
            return jtu.tree_map(
                lambda g, s: _scaled_sum(g, s, clip.carry_dtype(g.dtype)),
                rows.grads,
                rows.scales,
            )

        if rows.unreadable is None:
            total = fold()
        else:
            total = jax.lax.cond(
                jnp.any(rows.unreadable),
                lambda: _readable_sum(rows, clip.carry_dtype),
                fold,
            )
        return MicrobatchSums(
            clipped_sum=total,
            num_nonfinite=jnp.sum(rows.nonfinite),
            values=rows.value if clip.return_values else None,
            grad_norms=rows.norms if clip.return_grad_norms else None,
            aux=rows.aux if loss.has_aux else None,
        )


class PerExampleGradients(_AbstractPerExample):
    """Forms each example's gradient with `jax.vmap(jax.grad(...))`: any model, any
    `pre_clipping_transform`, memory of one microbatch of gradients."""

    def example_tree(
        self, loss: ExampleLoss, args: tuple, kwargs: dict
    ) -> tuple[Any, Any, Any]:
        (value, aux), grads = loss.value_and_grad(args, kwargs)
        return value, aux, grads

    def describe(
        self, loss: ExampleLoss, clip: ClipSettings, args: tuple, kwargs: dict
    ) -> dict[str, str]:
        names = positional_names(signature_of(loss.fun))
        described = {}
        for i in loss.argnums:
            head = names[i] if i < len(names) else f"args[{i}]"
            params = eqx.filter(args[i], eqx.is_inexact_array)
            for path, _ in jtu.tree_flatten_with_path(params)[0]:
                described[head + jtu.keystr(path)] = "per-example gradient"
        return described


class PerExampleOutputs(_AbstractPerExample):
    """Clips each example's output of the function itself (`dp.clipped_fun`)."""

    def example_tree(
        self, loss: ExampleLoss, args: tuple, kwargs: dict
    ) -> tuple[Any, Any, Any]:
        output, aux = loss.outputs(args, kwargs)
        return None, aux, output

    def describe(
        self, loss: ExampleLoss, clip: ClipSettings, args: tuple, kwargs: dict
    ) -> dict[str, str]:
        return {"output": "per-example output"}
