"""The clipped aggregation: one module, two strategies, one route through the engine.

[`dp.clipped_grad`][eqx_micro.dp.clipped_grad] and
[`dp.ghost_clipped_grad`][eqx_micro.dp.ghost_clipped_grad] both build a
`BoundedSensitivityCallable`; they differ only in its `strategy` (`PerExampleGradients` or
`GhostClipping`). Everything else happens once, here: checking the call, one PRNG key per
example, the padding mask, microbatching and early stopping
(`eqx_micro.internal.call_microbatched`), `normalize_by`, and the aux.

The sensitivity is a property of the callable, not something users compute: a DP plan
adds noise `noise_multiplier * callable.sensitivity(relation)`, so changing the clip
norm, `normalize_by` or `rescale_to_unit_norm` can never leave the noise miscalibrated.
Clip norms and `normalize_by` are array fields, so changing them does not recompile.
"""

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.core
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jaxtyping import Array, ArrayLike, Float, PyTree

from ... import Concat, Sum
from ...internal import (
    call_microbatched,
    Caller,
    check_argnums,
    check_bool,
    check_callable,
    check_key,
    check_positive_int,
    DType,
    PADDING,
    per_example_keys,
    positional_names,
    signature_of,
    takes_varargs,
    validate_padding_mask,
)
from .._ghost._strategy import GhostClipping, GhostFallback, GhostMethod
from ._clipping_fn import AbadiClipping, AbstractClippingFn, check_clipping_fn
from ._contract import AbstractBoundedSensitivityCallable, ClippedGradAux, PrivacyUnit
from ._per_example import PerExampleGradients, PerExampleOutputs
from ._pytree import ClipNorm
from ._spec import AbstractClippingStrategy, ClipSettings, ExampleLoss, MicrobatchSums


class BoundedSensitivityCallable(AbstractBoundedSensitivityCallable):
    """The sum of clipped per-example gradients, from `dp.clipped_grad` or
    [`dp.ghost_clipped_grad`][eqx_micro.dp.ghost_clipped_grad].

    Call it like `fun`, with the batched arguments holding the whole batch and an
    optional `is_padding_example` keyword; it returns `(clipped_sum, dp.ClippedGradAux)`.
    See [`dp.clipped_grad`][eqx_micro.dp.clipped_grad] for the arguments and
    `sensitivity` for the guarantee; `describe(*args)` tells how each parameter's
    per-example norm is computed.

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

    loss: ExampleLoss
    clip: ClipSettings
    strategy: AbstractClippingStrategy
    normalize_by: Float[Array, ""]
    microbatch_size: int | None = eqx.field(static=True)

    @property
    def l2_clip_norm(self) -> PyTree[Float[Array, ""]]:
        """The clip norms (float32 arrays, shaped like the `l2_clip_norm` given).

        !!! example

            ```python
            import jax.numpy as jnp
            import eqx_micro.dp as dp

            grad_fn = dp.clipped_grad(lambda w, x: jnp.sum(w * x), {"a": 1.0})
            assert grad_fn.l2_clip_norm["a"].dtype == jnp.float32
            ```
        """
        return self.clip.l2_clip_norm

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
        clips = jtu.tree_leaves(self.clip.l2_clip_norm)
        if any(isinstance(x, jax.core.Tracer) for x in (*clips, self.normalize_by)):
            raise TypeError(
                "The sensitivity of a clipped aggregation needs concrete clip norms and "
                "`normalize_by`; read it outside `jax.jit` (plans do, when made)."
            )
        # In float64 on the host (`clip_bound` is the float32, traceable twin).
        if self.clip.rescale_to_unit_norm:
            total = float(len(clips))
        else:
            total = sum(float(c) ** 2 for c in clips)
        return math.sqrt(total) / float(self.normalize_by)

    def clip_bound(self) -> Float[Array, ""]:
        """The bound before `normalize_by`, as a float32 array (traceable, unlike
        `l2_norm_bound`): `sqrt(sum of squared clip norms)`, or `sqrt(number of clip
        norms)` with `rescale_to_unit_norm`.

        !!! example

            ```python
            import jax.numpy as jnp
            import eqx_micro.dp as dp

            loss = lambda p, x: jnp.sum(p["a"] * x) + jnp.sum(p["b"] * x)
            grad_fn = dp.clipped_grad(loss, {"a": 3.0, "b": 4.0})
            assert grad_fn.clip_bound() == 5.0
            ```
        """
        clips = jtu.tree_leaves(self.clip.l2_clip_norm)
        if self.clip.rescale_to_unit_norm:
            return jnp.sqrt(jnp.float32(len(clips)))
        return jnp.sqrt(sum((jnp.square(c) for c in clips), jnp.float32(0)))

    def with_l2_clip_norm(
        self, l2_clip_norm: PyTree[Float[ArrayLike, ""]]
    ) -> "BoundedSensitivityCallable":
        """This callable with other clip norms, of the same structure (traced ones
        too: adaptive clipping sets them inside a compiled step).

        !!! example

            ```python
            import jax.numpy as jnp
            import eqx_micro.dp as dp

            grad_fn = dp.clipped_grad(lambda w, x: jnp.sum(w * x), 1.0)
            assert grad_fn.with_l2_clip_norm(2.0).sensitivity() == 2.0
            ```
        """
        treedef = jtu.tree_structure(self.clip.l2_clip_norm)
        try:
            leaves = treedef.flatten_up_to(l2_clip_norm)
        except (ValueError, TypeError):
            raise ValueError(
                "`with_l2_clip_norm` needs clip norms shaped like the callable's "
                f"`l2_clip_norm` ({treedef}), got {l2_clip_norm!r}."
            ) from None
        clips = treedef.unflatten([jnp.asarray(c, jnp.float32) for c in leaves])
        return eqx.tree_at(lambda f: f.clip.l2_clip_norm, self, clips)

    def with_grad_norms(self) -> "BoundedSensitivityCallable":
        """This callable, returning each example's gradient norms in its aux.

        !!! example

            ```python
            import jax.numpy as jnp
            import eqx_micro.dp as dp

            grad_fn = dp.clipped_grad(lambda w, x: jnp.sum(w * x), 1.0)
            _, aux = grad_fn.with_grad_norms()(jnp.zeros(2), jnp.ones((3, 2)))
            assert aux.grad_norms.shape == (3,)
            ```
        """
        clip = dataclasses.replace(self.clip, return_grad_norms=True)
        return dataclasses.replace(self, clip=clip)

    @property
    def privacy_unit(self) -> PrivacyUnit:
        """`PrivacyUnit.EXAMPLE`, or `PrivacyUnit.USER` with `keep_batch_dim=False` (a
        row is a user's group of examples, clipped together).

        !!! example

            ```python
            import jax.numpy as jnp
            import eqx_micro.dp as dp

            loss = lambda w, x: jnp.sum(w * x)
            assert dp.clipped_grad(loss, 1.0).privacy_unit == dp.PrivacyUnit.EXAMPLE
            per_user = dp.clipped_grad(loss, 1.0, keep_batch_dim=False)
            assert per_user.privacy_unit == "user"
            ```
        """
        return PrivacyUnit.EXAMPLE if self.loss.keep_batch_dim else PrivacyUnit.USER

    def _prepare(self, args: tuple, kwargs: dict, mask: Any) -> tuple[tuple, dict]:
        """Checks the call; returns `(args, kwargs)` with one PRNG key per example and
        the padding mask among the keywords."""
        caller = self.loss.caller
        used = [*self.loss.argnums, *self.loss.batch_argnums]
        if self.loss.key_argnum is not None:
            used.append(self.loss.key_argnum)
        if max(used) >= len(args):
            raise ValueError(
                f"`{caller}` was built with `argnums={self.loss.argnums}` and "
                f"`batch_argnums={self.loss.batch_argnums}`"
                + (
                    f" and `key_argnum={self.loss.key_argnum}`"
                    if self.loss.key_argnum is not None
                    else ""
                )
                + f", but the function was called with {len(args)} positional "
                "arguments. Pass those arguments by position, or fix the argument "
                "numbers."
            )
        sizes = {
            leaf.shape[0]
            for i in self.loss.batch_argnums
            for leaf in jtu.tree_leaves(args[i])
            if eqx.is_array(leaf) and leaf.ndim > 0
        }
        if not sizes:
            raise ValueError(
                f"`{caller}` found no arrays with a batch axis in the batched arguments "
                f"`batch_argnums={self.loss.batch_argnums}`; pass the batch there."
            )
        batch_size = min(sizes)  # the engine names any mismatch
        arg_list = list(args)
        if self.loss.key_argnum is not None:
            key = arg_list[self.loss.key_argnum]
            where = f" (`key_argnum={self.loss.key_argnum}`)"
            check_key(key, f"args[{self.loss.key_argnum}]", caller, where)
            arg_list[self.loss.key_argnum] = per_example_keys(key, batch_size)
        if mask is not None:
            kwargs = {**kwargs, PADDING: validate_padding_mask(mask, None, caller)}
        return tuple(arg_list), kwargs

    def __call__(
        self,
        *args: Any,
        is_padding_example: ArrayLike | None = None,
        **kwargs: Any,
    ) -> tuple[PyTree, ClippedGradAux]:
        caller = self.loss.caller
        args, kwargs = self._prepare(args, kwargs, is_padding_example)
        inputs = (args, kwargs)
        is_padding_example = kwargs.get(PADDING)

        def per_microbatch(microbatch: Any, index: Any, threaded: Any) -> Any:
            mb_args, mb_kwargs = microbatch
            mb_kwargs = dict(mb_kwargs)
            pad = mb_kwargs.pop(PADDING, None)
            out = self.strategy.microbatch(self.loss, self.clip, mb_args, mb_kwargs, pad)
            fields = (out.clipped_sum, out.num_nonfinite, out.values, out.grad_norms)
            return (*fields, out.aux), threaded

        accumulators = (Sum(), Sum(), Concat(), Concat(), Concat())
        sums, _ = call_microbatched(
            per_microbatch,
            inputs,
            self.loss.axes(*inputs),
            self.microbatch_size,
            accumulators,
            is_padding_example=is_padding_example,
            param_names=positional_names(signature_of(self.loss.fun)),
            caller=Caller(
                caller,
                "`batch_argnums`",
                "leave it out of `batch_argnums`",
                "pass `is_padding_example` (`dp.pad_to_multiple_of` pads indices)",
            ),
        )
        sums = MicrobatchSums(*sums)
        _check_clip_groups(self.clip.l2_clip_norm, sums.clipped_sum, caller)
        clipped = jtu.tree_map(
            lambda g: (g / self.normalize_by.astype(g.dtype)).astype(g.dtype),
            sums.clipped_sum,
        )
        grad_norms = None
        if sums.grad_norms is not None:
            treedef = jtu.tree_structure(self.clip.l2_clip_norm)
            grad_norms = jtu.tree_unflatten(treedef, sums.grad_norms)
        return clipped, ClippedGradAux(
            values=sums.values,
            grad_norms=grad_norms,
            aux=sums.aux,
            num_nonfinite=sums.num_nonfinite,
        )

    def describe(self, *args: Any, **kwargs: Any) -> dict[str, str]:
        """How each parameter's per-example norm is computed, for these arguments.

        **Returns:**

        A dict from each parameter's path (e.g. `"model.layers[0].weight"`) to `"per-example
        gradient"` ([`dp.clipped_grad`][eqx_micro.dp.clipped_grad]), or, for
        [`dp.ghost_clipped_grad`][eqx_micro.dp.ghost_clipped_grad], `"dot (gram)"`/`"dot
        (direct)"` (a `dot_general`: Linear layers, attention projections), `"conv
        (gram)"`/`"conv (direct)"`, `"elementwise"` (biases, norm scales), `"gather"`
        (embeddings), `"unused"`, or `"fallback: <reason>"` (the exact per-example gradient
        of that parameter).

        !!! example

            ```python
            import equinox as eqx
            import jax
            import jax.numpy as jnp
            import eqx_micro.dp as dp

            def loss(model, x):
                return jnp.mean(jax.vmap(model)(x) ** 2)

            model = eqx.nn.MLP(4, 2, 8, 1, key=jax.random.key(0))
            plan = dp.ghost_clipped_grad(loss, 1.0).describe(model, jnp.ones((3, 4)))
            assert plan["model.layers[0].weight"] == "dot (gram)"
            assert plan["model.layers[0].bias"] == "elementwise"
            ```
        """
        args, kwargs = self._prepare(args, kwargs, None)
        return self.strategy.describe(self.loss, self.clip, args, kwargs)


# `dp.ghost_clipped_grad` used to return its own class; it is the same module now.
GhostClippedGrad = BoundedSensitivityCallable


# --------------------------------------------------------------------------------------
# Building one.


def _clip_norm_values(l2_clip_norm: Any, caller: str) -> list[float]:
    """The clip norms as floats; each a concrete, finite, non-negative number."""
    values = []
    leaves = jtu.tree_flatten_with_path(l2_clip_norm)[0]
    if not leaves:
        raise ValueError(f"`{caller}` got an empty `l2_clip_norm` tree.")
    for path, clip in leaves:
        where = f"l2_clip_norm{jtu.keystr(path)}"
        if isinstance(clip, jax.core.Tracer):
            raise TypeError(
                f"`{caller}` needs a concrete `{where}` to know its sensitivity, but it "
                "is traced. Build the callable outside `jax.jit`; it is an array field, "
                "so a new clip norm does not recompile."
            )
        is_number = isinstance(clip, int | float | np.number) and not isinstance(clip, bool)
        is_scalar_array = isinstance(clip, jax.Array | np.ndarray) and (
            np.ndim(clip) == 0 and jnp.issubdtype(clip.dtype, jnp.number)
        )
        if not (is_number or is_scalar_array):
            raise TypeError(
                f"`{caller}` needs `{where}` to be a number (or a scalar array), got "
                f"{clip!r} of type {type(clip).__name__}."
            )
        value = float(np.asarray(clip))
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(
                f"`{caller}` got `{where}={value}`; a clip norm must be a finite "
                "non-negative number, or the sensitivity is unbounded. For unclipped "
                "per-example gradients use `em.micro_grad`."
            )
        values.append(value)
    return values


def _normalize_by(normalize_by: Any, caller: str) -> Float[Array, ""]:
    if isinstance(normalize_by, bool) or not isinstance(
        normalize_by, int | float | np.number
    ):
        raise TypeError(
            f"`{caller}` needs `normalize_by` to be a number, got {normalize_by!r}."
        )
    if not (math.isfinite(normalize_by) and normalize_by > 0):
        raise ValueError(
            f"`{caller}` got `normalize_by={normalize_by}`; it must be a finite positive "
            "number (the sum is divided by it, and so is the sensitivity)."
        )
    return jnp.asarray(normalize_by, jnp.float32)


def _example_loss(
    caller: str,
    fun: Callable,
    argnums: int | Sequence[int],
    batch_argnums: int | Sequence[int],
    key_argnum: int | None,
    has_aux: bool,
    keep_batch_dim: bool,
    differentiate: bool,
) -> ExampleLoss:
    """The loss (or, with `differentiate=False`, the function whose outputs are
    clipped), its argument numbers checked against its signature."""
    check_callable(fun, "fun", caller)
    check_bool(has_aux, "has_aux", caller)
    check_bool(keep_batch_dim, "keep_batch_dim", caller)
    argnums_t = check_argnums(argnums, "argnums", caller)
    batch_argnums_t = check_argnums(batch_argnums, "batch_argnums", caller)
    if differentiate and not argnums_t:
        raise ValueError(
            f"`{caller}` needs at least one argument in `argnums` (the parameters to "
            "differentiate)."
        )
    if not batch_argnums_t:
        raise ValueError(
            f"`{caller}` needs at least one argument in `batch_argnums` (the batch)."
        )
    overlap = set(argnums_t) & set(batch_argnums_t)
    if overlap:
        raise ValueError(
            f"`{caller}` got `argnums={argnums}` and `batch_argnums={batch_argnums}`, "
            f"which overlap in {sorted(overlap)}: the parameters are differentiated and "
            "the same for every example, the batch is split; an argument cannot be both."
        )
    if key_argnum is not None:
        (key_argnum,) = check_argnums(key_argnum, "key_argnum", caller)
        if key_argnum in (*argnums_t, *batch_argnums_t):
            raise ValueError(
                f"`{caller}` got `key_argnum={key_argnum}`, which is also in `argnums` "
                "or `batch_argnums`; the key must be its own argument."
            )
    signature = signature_of(fun)
    names = positional_names(signature)
    keys = () if key_argnum is None else (key_argnum,)
    largest = max((*argnums_t, *batch_argnums_t, *keys))
    if not takes_varargs(signature) and largest >= len(names):
        raise ValueError(
            f"`{caller}` got argument number {largest}, but `fun` takes only "
            f"{len(names)} positional arguments ({', '.join(names) or 'none'}). Fix "
            "`argnums`/`batch_argnums`/`key_argnum` (they count from 0)."
        )
    return ExampleLoss(
        fun=fun,
        argnums=argnums_t,
        single_argnum=not isinstance(argnums, (tuple, list)),
        batch_argnums=batch_argnums_t,
        key_argnum=key_argnum,
        has_aux=has_aux,
        keep_batch_dim=keep_batch_dim,
        caller=caller,
    )


def _build(
    caller: str,
    strategy: AbstractClippingStrategy,
    fun: Callable,
    l2_clip_norm: Any,
    *,
    argnums: int | Sequence[int],
    differentiate: bool,
    has_aux: bool,
    batch_argnums: int | Sequence[int],
    keep_batch_dim: bool,
    microbatch_size: int | None,
    normalize_by: int | float,
    rescale_to_unit_norm: bool,
    return_values: bool,
    return_grad_norms: bool,
    nan_safe: bool,
    pre_clipping_transform: Callable | None,
    dtype: DType,
    key_argnum: int | None,
    clipping_fn: AbstractClippingFn,
) -> BoundedSensitivityCallable:
    _clip_norm_values(l2_clip_norm, caller)
    check_clipping_fn(clipping_fn, caller)
    flags = dict(
        rescale_to_unit_norm=rescale_to_unit_norm,
        return_values=return_values,
        return_grad_norms=return_grad_norms,
        nan_safe=nan_safe,
    )
    for name, flag in flags.items():
        check_bool(flag, name, caller)
    if pre_clipping_transform is not None:
        check_callable(pre_clipping_transform, "pre_clipping_transform", caller)
    if microbatch_size is not None:
        microbatch_size = check_positive_int(microbatch_size, "microbatch_size", caller)
    clip = ClipSettings(
        l2_clip_norm=l2_clip_norm,
        pre_clipping_transform=pre_clipping_transform,
        rescale_to_unit_norm=rescale_to_unit_norm,
        nan_safe=nan_safe,
        clipping_fn=clipping_fn,
        dtype=dtype,
        return_values=return_values,
        return_grad_norms=return_grad_norms,
    )
    strategy.check(clip, caller)
    loss = _example_loss(
        caller,
        fun,
        argnums,
        batch_argnums,
        key_argnum,
        has_aux,
        keep_batch_dim,
        differentiate,
    )
    return BoundedSensitivityCallable(
        loss=loss,
        clip=clip,
        strategy=strategy,
        normalize_by=_normalize_by(normalize_by, caller),
        microbatch_size=microbatch_size,
    )


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
    clipping_fn: AbstractClippingFn = AbadiClipping(),
) -> BoundedSensitivityCallable:
    """The sum over a batch of clipped per-example gradients: the core of DP-SGD.

    Each example's gradient of `fun` (with respect to the inexact arrays of the `argnums`
    arguments, filtered like `eqx.filter_grad`, so Equinox models just work) is clipped
    to L2 norm `l2_clip_norm`, and the clipped gradients are summed over the batch and
    divided by `normalize_by`. Examples run `microbatch_size` at a time in one compiled
    loop; the microbatch size changes memory and speed, never the result or the
    sensitivity. [`dp.ghost_clipped_grad`][eqx_micro.dp.ghost_clipped_grad] computes the
    same without forming per-example gradients.

    The result has a known sensitivity, `.sensitivity(neighboring_relation)`, from which
    a DP plan sets its noise. Add noise to this output directly (it is already the
    normalized sum, and the sensitivity accounts for `normalize_by`): never rescale it
    by hand before noise.

    Call-time keyword `is_padding_example` (bool, one flag per row): padded rows
    contribute exactly zero (applied after clipping, so the sensitivity is unchanged),
    and microbatches holding only padding are skipped. Sort padding last (see
    [`dp.pad_to_multiple_of`][eqx_micro.dp.pad_to_multiple_of]) for the skip to happen.
    An empty batch returns zeros.

    **Arguments:**

    - `fun`: `fun(*args)` returning a scalar loss for one example (or `(loss, aux)` with
        `has_aux`).
    - `l2_clip_norm`: a finite non-negative number, or a PyTree prefix of the gradient
        (per-layer clipping; the bound is then the root of the sum of squares). Stored
        as arrays: a new clip norm does not recompile.
    - `argnums`: the argument(s) to differentiate.
    - `has_aux`: whether `fun` returns `(loss, aux)`; aux is returned per example.
    - `batch_argnums`: the batched argument(s); they must not overlap `argnums`.
    - `keep_batch_dim`: if True, `fun` sees each example with a batch axis of size 1. If
        False, it sees a row without it: with inputs shaped `(users, examples_per_user,
        ...)`, a row is one user's examples, their gradient is clipped as one, and the
        guarantee is user-level (`privacy_unit == dp.PrivacyUnit.USER`).
    - `microbatch_size`: rows per microbatch; `None` processes the whole batch at once.
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
    - `clipping_fn`: how each norm becomes a scale: hard clipping
        ([`dp.AbadiClipping`][eqx_micro.dp.AbadiClipping], the default) or automatic
        clipping ([`dp.AutomaticClipping`][eqx_micro.dp.AutomaticClipping]); the
        sensitivity is the same.

    **Returns:**

    A [`dp.BoundedSensitivityCallable`][eqx_micro.dp.BoundedSensitivityCallable] with
    `fun`'s arguments, returning `(clipped_sum, dp.ClippedGradAux)`.

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
    return _build(
        "clipped_grad",
        PerExampleGradients(),
        fun,
        l2_clip_norm,
        argnums=argnums,
        differentiate=True,
        has_aux=has_aux,
        batch_argnums=batch_argnums,
        keep_batch_dim=keep_batch_dim,
        microbatch_size=microbatch_size,
        normalize_by=normalize_by,
        rescale_to_unit_norm=rescale_to_unit_norm,
        return_values=return_values,
        return_grad_norms=return_grad_norms,
        nan_safe=nan_safe,
        pre_clipping_transform=pre_clipping_transform,
        dtype=dtype,
        key_argnum=key_argnum,
        clipping_fn=clipping_fn,
    )


def ghost_clipped_grad(
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
    clipping_fn: AbstractClippingFn = AbadiClipping(),
    method: GhostMethod = GhostMethod.BOOK_KEEPING,
    fallback: GhostFallback = GhostFallback.PER_EXAMPLE,
) -> BoundedSensitivityCallable:
    """[`dp.clipped_grad`][eqx_micro.dp.clipped_grad] without per-example gradients
    (ghost norms and book-keeping).

    Same arguments, call, result and sensitivity as
    [`dp.clipped_grad`][eqx_micro.dp.clipped_grad], but each example's gradient norm is
    computed from each layer's inputs and output-gradients, taken in one batched backward
    pass, so the per-example gradients of Linear, Conv, Embedding, bias and norm-scale
    parameters are never formed: memory and time stay close to one non-private step even for
    large layers.

    `fun` is traced on one example; each parameter is followed to its one linear use: a
    `dot_general` (Linear layers, attention projections, on sequences too), a
    convolution (any dimension, stride, padding, dilation, groups), an elementwise
    `add`/`sub`/`mul` (biases, the affine parameters of LayerNorm, GroupNorm, RMSNorm),
    or a row `gather` (Embedding). A parameter used any other way (twice, as with tied
    weights; nonlinearly; inside a loop or a custom derivative) gets its per-example
    gradient computed exactly (`fallback=dp.GhostFallback.PER_EXAMPLE`), or raises an
    error naming it (`dp.GhostFallback.RAISE`); `describe(*args)` on the result lists
    what each parameter gets. A `pre_clipping_transform` acts on whole per-example
    gradients, so with one every parameter takes the exact per-example route.

    **Arguments:**

    - `fun`, `l2_clip_norm`, `argnums`, `has_aux`, `batch_argnums`, `keep_batch_dim`,
        `microbatch_size`, `normalize_by`, `rescale_to_unit_norm`, `return_values`,
        `return_grad_norms`, `nan_safe`, `pre_clipping_transform`, `dtype`,
        `key_argnum`, `clipping_fn`: as for `dp.clipped_grad`. Norms are computed in
        float32 whatever the parameters' dtype.
    - `method`: a [`dp.GhostMethod`][eqx_micro.dp.GhostMethod]: how the clipped sum is
        formed once the norms are known.
    - `fallback`: a [`dp.GhostFallback`][eqx_micro.dp.GhostFallback], for parameters
        without a tap.

    **Returns:**

    A [`dp.BoundedSensitivityCallable`][eqx_micro.dp.BoundedSensitivityCallable] with
    `fun`'s arguments, returning `(clipped_sum, dp.ClippedGradAux)`.

    !!! example

        ```python
        import equinox as eqx
        import jax
        import jax.numpy as jnp
        import eqx_micro.dp as dp

        def loss(model, x, y):
            logits = jax.vmap(model)(x)
            return jnp.mean(-jnp.take_along_axis(jax.nn.log_softmax(logits),
                                                 y[:, None], 1))

        model = eqx.nn.MLP(8, 3, 16, 2, key=jax.random.key(0))
        x = jax.random.normal(jax.random.key(1), (32, 8))
        y = jnp.arange(32) % 3
        ghost = dp.ghost_clipped_grad(loss, 0.5, batch_argnums=(1, 2))
        exact = dp.clipped_grad(loss, 0.5, batch_argnums=(1, 2))
        (g1, _), (g2, _) = ghost(model, x, y), exact(model, x, y)
        assert jnp.allclose(g1.layers[1].weight, g2.layers[1].weight, atol=1e-5)
        assert ghost.sensitivity() == exact.sensitivity() == 0.5
        ```

    ??? cite "References"

        Goodfellow, *Efficient Per-Example Gradient Computations*, arXiv 1510.01799
        (2015). Li, Tramèr, Liang, Hashimoto, *Large Language Models Can Be Strong
        Differentially Private Learners*, ICLR 2022 (ghost clipping). Bu, Wang, Zha,
        Karypis, *Differentially Private Optimization on Large Model at Small Cost*,
        ICML 2023 (book-keeping). Bu, Mao, Xu, *Scalable and Efficient Training of Large
        Convolutional Neural Networks with Differential Privacy*, NeurIPS 2022 (mixed
        ghost clipping).
    """
    if not isinstance(method, GhostMethod):
        raise TypeError(
            f"`ghost_clipped_grad` got `method={method!r}`; pass a `dp.GhostMethod`, "
            "e.g. `method=dp.GhostMethod.BOOK_KEEPING` (the default) or "
            "`dp.GhostMethod.GHOST`."
        )
    if not isinstance(fallback, GhostFallback):
        raise TypeError(
            f"`ghost_clipped_grad` got `fallback={fallback!r}`; pass a "
            "`dp.GhostFallback`, e.g. `fallback=dp.GhostFallback.RAISE`."
        )
    return _build(
        "ghost_clipped_grad",
        GhostClipping(method=method, fallback=fallback),
        fun,
        l2_clip_norm,
        argnums=argnums,
        differentiate=True,
        has_aux=has_aux,
        batch_argnums=batch_argnums,
        keep_batch_dim=keep_batch_dim,
        microbatch_size=microbatch_size,
        normalize_by=normalize_by,
        rescale_to_unit_norm=rescale_to_unit_norm,
        return_values=return_values,
        return_grad_norms=return_grad_norms,
        nan_safe=nan_safe,
        pre_clipping_transform=pre_clipping_transform,
        dtype=dtype,
        key_argnum=key_argnum,
        clipping_fn=clipping_fn,
    )


def _check_clip_groups(l2_clip_norm: PyTree, clipped: PyTree, caller: str) -> None:
    """Refuses a per-layer clip norm whose subtree holds no array to clip (a layer
    with no gradient, a model's activation function): its norm would still count in
    the sensitivity, and so in the noise, with nothing to show for it."""
    treedef = jtu.tree_structure(l2_clip_norm)
    if treedef.num_leaves <= 1:
        return
    try:
        subtrees = treedef.flatten_up_to(clipped)
    except (ValueError, TypeError):
        return  # a mismatch: clip_scales has named it already
    paths = [jtu.keystr(path) for path, _ in jtu.tree_flatten_with_path(l2_clip_norm)[0]]
    for path, subtree in zip(paths, subtrees, strict=True):
        if not any(eqx.is_array(leaf) for leaf in jtu.tree_leaves(subtree)):
            raise ValueError(
                f"`{caller}` got a clip norm at `l2_clip_norm{path}`, but that part "
                "of the output holds no array (no gradient: a non-array leaf, or a "
                "parameter outside `argnums`); its clip norm would still count in the "
                "sensitivity, adding noise for nothing. Put `None` there in the clip "
                "tree."
            )


def clipped_fun(
    fun: Callable,
    has_aux: bool = False,
    *,
    batch_argnums: int | Sequence[int] = 0,
    keep_batch_dim: bool = True,
    l2_clip_norm: PyTree[ClipNorm] = 1.0,
    rescale_to_unit_norm: bool = False,
    normalize_by: int | float = 1.0,
    return_norms: bool = False,
    microbatch_size: int | None = None,
    nan_safe: bool = True,
    dtype: DType = None,
    key_argnum: int | None = None,
    clipping_fn: AbstractClippingFn = AbadiClipping(),
) -> BoundedSensitivityCallable:
    """The sum over a batch of a function's per-example outputs, each clipped to an L2
    norm: DP sums, means and statistics with a known sensitivity.

    Each example's output of `fun` (any PyTree of arrays) is clipped to `l2_clip_norm`
    like a gradient in [`dp.clipped_grad`][eqx_micro.dp.clipped_grad], then the clipped
    outputs are summed and divided by `normalize_by`. Same machinery: microbatching,
    padding (`is_padding_example`), early stopping, NaN safety, per-example keys, and a
    `sensitivity(neighboring_relation)` from which a plan or a noise transform is set.
    The arguments are jax_privacy's `clipped_fun`'s.

    **Arguments:**

    - `fun`: `fun(*args)` of one example (with a batch axis of size 1 if
        `keep_batch_dim`); returns a PyTree of arrays, or `(output, aux)` with
        `has_aux`.
    - `has_aux`: whether `fun` returns `(output, aux)`; aux is returned per example.
    - `batch_argnums`: the batched argument(s); the others reach every example whole.
    - `keep_batch_dim`, `microbatch_size`, `normalize_by`, `rescale_to_unit_norm`,
        `nan_safe`, `dtype`, `key_argnum`, `clipping_fn`: as for `dp.clipped_grad`.
    - `l2_clip_norm`: a finite non-negative number, or a PyTree prefix of the output.
    - `return_norms`: return each example's output norm (before clipping) in
        `aux.grad_norms`.

    **Returns:**

    A [`dp.BoundedSensitivityCallable`][eqx_micro.dp.BoundedSensitivityCallable]
    returning `(clipped_sum, dp.ClippedGradAux)`.

    !!! example

        ```python
        import jax.numpy as jnp
        import eqx_micro.dp as dp

        clipped_sum = dp.clipped_fun(jnp.mean, l2_clip_norm=1.0)
        data = jnp.array([0.0, 1.0, 2.0, 3.0, 4.0, 5.0])
        total, aux = clipped_sum(data)
        assert total == 5.0  # 0 + 1 + 1 + 1 + 1 + 1
        padding = jnp.array([False, False, False, False, True, True])
        assert clipped_sum(data, is_padding_example=padding)[0] == 3.0
        assert clipped_sum.sensitivity() == 1.0
        ```
    """
    check_bool(return_norms, "return_norms", "clipped_fun")
    return _build(
        "clipped_fun",
        PerExampleOutputs(),
        fun,
        l2_clip_norm,
        argnums=(),
        differentiate=False,
        has_aux=has_aux,
        batch_argnums=batch_argnums,
        keep_batch_dim=keep_batch_dim,
        microbatch_size=microbatch_size,
        normalize_by=normalize_by,
        rescale_to_unit_norm=rescale_to_unit_norm,
        return_values=False,
        return_grad_norms=return_norms,
        nan_safe=nan_safe,
        pre_clipping_transform=None,
        dtype=dtype,
        key_argnum=key_argnum,
        clipping_fn=clipping_fn,
    )
