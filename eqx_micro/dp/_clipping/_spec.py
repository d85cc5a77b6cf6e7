"""What a clipped aggregation computes, whatever its strategy: the per-example loss
(`ExampleLoss`), how its gradients are clipped (`ClipSettings`), and what one microbatch
gives back (`MicrobatchSums`)."""

import abc
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, Float, Int, PyTree

from ...internal import check_scalar_loss, DType, PADDING
from ._clipping_fn import AbstractClippingFn


def _squeeze_leading(x: Any) -> Any:
    if eqx.is_array(x) and x.ndim > 0 and x.shape[0] == 1:
        return x[0]
    return x


class ExampleLoss(eqx.Module):
    """The user's loss for one example, and the roles of its positional arguments.

    - `argnums`: differentiated (the parameters, the same for every example);
    - `batch_argnums`: split along axis 0 (the batch);
    - `key_argnum`: a PRNG key, replaced by one key per example;
    - everything else (and every keyword): passed to each example unchanged.
    """

    fun: Callable
    argnums: tuple[int, ...] = eqx.field(static=True)
    single_argnum: bool = eqx.field(static=True)
    batch_argnums: tuple[int, ...] = eqx.field(static=True)
    key_argnum: int | None = eqx.field(static=True)
    has_aux: bool = eqx.field(static=True)
    keep_batch_dim: bool = eqx.field(static=True)
    caller: str = eqx.field(static=True)

    def is_batched(self, index: int) -> bool:
        return index in self.batch_argnums or index == self.key_argnum

    def axes(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """The batch axis (0 or None) of every leaf of `(args, kwargs)`: 0 for the array
        leaves of the batched arguments (and of `is_padding_example`)."""

        def leaf_axes(tree: Any, batched: bool) -> Any:
            return jtu.tree_map(lambda x: 0 if batched and eqx.is_array(x) else None, tree)

        args_axes = tuple(leaf_axes(a, self.is_batched(i)) for i, a in enumerate(args))
        kwargs_axes = {name: leaf_axes(v, name == PADDING) for name, v in kwargs.items()}
        return args_axes, kwargs_axes

    def expand(self, args: tuple) -> tuple:
        """One example's arguments as `fun` sees them: with `keep_batch_dim`, the batched
        arguments (not the key) get a leading axis of size 1."""
        if not self.keep_batch_dim:
            return args
        return tuple(
            jtu.tree_map(lambda x: x[None] if eqx.is_array(x) else x, a)
            if i in self.batch_argnums
            else a
            for i, a in enumerate(args)
        )

    def __call__(self, args: tuple, kwargs: dict) -> tuple[Array, Any]:
        """`(loss, aux)` of one (expanded) example; aux loses its size-1 batch axis."""
        out = self.fun(*args, **kwargs)
        if self.has_aux:
            if not (isinstance(out, tuple) and len(out) == 2):
                raise TypeError(
                    f"`{self.caller}` was given `has_aux=True`, so `fun` must return a "
                    f"pair `(loss, aux)`; it returned {type(out).__name__}."
                )
            loss, aux = out
        else:
            loss, aux = out, None
        check_scalar_loss(loss, self.keep_batch_dim, self.caller)
        if self.keep_batch_dim:
            aux = jtu.tree_map(_squeeze_leading, aux)
        return loss, aux

    def outputs(self, args: tuple, kwargs: dict) -> tuple[Any, Any]:
        """`(output, aux)` of one (expanded) example, whatever the output's form."""
        out = self.fun(*args, **kwargs)
        if not self.has_aux:
            return out, None
        if not (isinstance(out, tuple) and len(out) == 2):
            raise TypeError(
                f"`{self.caller}` was given `has_aux=True`, so `fun` must return a "
                f"pair `(output, aux)`; it returned {type(out).__name__}."
            )
        output, aux = out
        if self.keep_batch_dim:
            aux = jtu.tree_map(_squeeze_leading, aux)
        return output, aux

    def value_and_grad(self, args: tuple, kwargs: dict) -> tuple[tuple[Array, Any], Any]:
        """`((loss, aux), grads)` of one example, filtered like `eqx.filter_grad`:
        gradients of the inexact arrays of the `argnums` arguments, `None` elsewhere."""

        def loss(params: tuple) -> tuple[Array, Any]:
            full = list(args)
            for i, p in zip(self.argnums, params):
                full[i] = p
            return self(tuple(full), kwargs)

        params = tuple(args[i] for i in self.argnums)
        out, grads = eqx.filter_value_and_grad(loss, has_aux=True)(params)
        return out, grads[0] if self.single_argnum else grads


def _float32_clip_norms(l2_clip_norm: PyTree) -> PyTree[Float[Array, ""]]:
    # Array fields, not Python floats: a new clip norm does not recompile the step.
    return jtu.tree_map(lambda c: jnp.asarray(c, jnp.float32), l2_clip_norm)


class ClipSettings(eqx.Module):
    """How each example's gradient is clipped, and what is returned beside the sum."""

    l2_clip_norm: PyTree[Float[Array, ""]] = eqx.field(converter=_float32_clip_norms)
    pre_clipping_transform: Callable | None
    rescale_to_unit_norm: bool = eqx.field(static=True)
    nan_safe: bool = eqx.field(static=True)
    clipping_fn: AbstractClippingFn
    dtype: DType = eqx.field(static=True)
    return_values: bool = eqx.field(static=True)
    return_grad_norms: bool = eqx.field(static=True)

    @property
    def num_clip_norms(self) -> int:
        return len(jtu.tree_leaves(self.l2_clip_norm))

    def carry_dtype(self, leaf_dtype: Any) -> Any:
        """The dtype a gradient leaf is clipped, summed and returned in."""
        return leaf_dtype if self.dtype is None else jnp.dtype(self.dtype)


class MicrobatchSums(eqx.Module):
    """What a strategy returns for one microbatch; summed (or concatenated) over them.

    - `clipped_sum`: `Σ_b scale_b * grad_b` over the microbatch's kept examples, shaped
        like the (pre-transformed) gradient, each leaf in `ClipSettings.carry_dtype`.
    - `num_nonfinite`: the real examples with a non-finite gradient norm.
    - `values`, `grad_norms` (one `(B,)` array per clip norm, in the clip tree's leaf
        order), `aux`: per example, or None when not asked for.
    """

    clipped_sum: PyTree[Array]
    num_nonfinite: Int[Array, ""]
    values: Float[Array, " batch"] | None
    grad_norms: list[Float[Array, " batch"]] | None
    aux: Any


class AbstractClippingStrategy(eqx.Module):
    """How a clipped aggregation computes one microbatch's clipped sum.

    [`dp.clipped_grad`][eqx_micro.dp.clipped_grad] forms every example's gradient
    (`PerExampleGradients`); [`dp.ghost_clipped_grad`][eqx_micro.dp.ghost_clipped_grad]
    computes the norms from activations (`GhostClipping`). The callable around them
    (`BoundedSensitivityCallable`) does the rest: checking the inputs, per-example keys,
    padding, microbatching, `normalize_by` and the aux.
    """

    @abc.abstractmethod
    def check(self, clip: ClipSettings, caller: str) -> None:
        """Refuses, when the callable is built, settings this strategy cannot honor."""

    @abc.abstractmethod
    def microbatch(
        self,
        loss: ExampleLoss,
        clip: ClipSettings,
        args: tuple,
        kwargs: dict,
        is_padding: jax.Array | None,
    ) -> MicrobatchSums:
        """One microbatch: `args`' batched arguments hold its examples along axis 0
        (keys already one per example), `is_padding` flags its padded rows."""

    @abc.abstractmethod
    def describe(
        self, loss: ExampleLoss, clip: ClipSettings, args: tuple, kwargs: dict
    ) -> dict[str, str]:
        """How each parameter leaf's per-example norm is computed, by its path."""
