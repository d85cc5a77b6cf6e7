"""`micro_grad`: per-example gradients, transformed and accumulated over the batch."""

from collections.abc import Callable, Sequence
from typing import Any

import equinox as eqx
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import ArrayLike, Int

from ._accumulators import AccumulatorTree, Concat, Sum
from ._arguments import (
    broadcast_axes,
    Caller,
    check_argnums,
    check_bool,
    check_callable,
    check_key,
    check_positive_int,
    PADDING,
    per_example_keys,
    positional_names,
    signature_of,
    takes_varargs,
    validate_padding_mask,
)
from ._engine import AbstractTransformed, Accumulators, call_vmapped, flat_accumulators


_MICRO_GRAD = Caller(
    "micro_grad",
    "`batch_argnums`",
    "leave it out of `batch_argnums`",
    "pass `is_padding_example` (or `num_real_microbatches`)",
)


class PerExample(eqx.Module):
    """The per-example outputs of `micro_grad`, each with a leading batch axis.

    **Fields:**

    - `values`: the value of `fun` for each example.
    - `metrics`: `metrics_fn` of each example's raw gradient, or None.
    - `aux`: the auxiliary output of `fun` for each example (with `has_aux=True`), or
        None. With `keep_batch_dim=True`, a leading axis of size 1 is squeezed away.

    Padded examples (see `is_padding_example`) have zeros everywhere.

    !!! example

        ```python
        import jax.numpy as jnp
        import eqx_micro as em

        out = em.PerExample(values=jnp.zeros(3), metrics=None, aux=None)
        assert out.values.shape == (3,)
        ```
    """

    values: Any
    metrics: Any
    aux: Any


def _identity(x: Any) -> Any:
    return x


def _squeeze_leading(x: Any) -> Any:
    if eqx.is_array(x) and x.ndim > 0 and x.shape[0] == 1:
        return x[0]
    return x


def _zero_if(pad: Any, tree: Any) -> Any:
    # `where`, not a product: a NaN in a padded example must not leak through.
    return jtu.tree_map(
        lambda x: jnp.where(pad, jnp.zeros_like(x), x) if eqx.is_array(x) else x, tree
    )


class _MicroGrad(AbstractTransformed):
    fun: Callable
    transform_fn: Callable
    metrics_fn: Callable | None
    accumulator: Accumulators
    num_real_microbatches: Any
    has_aux: bool = eqx.field(static=True)
    argnums: tuple[int, ...] = eqx.field(static=True)
    single_argnum: bool = eqx.field(static=True)
    batch_argnums: tuple[int, ...] = eqx.field(static=True)
    keep_batch_dim: bool = eqx.field(static=True)
    microbatch_size: int | None = eqx.field(static=True)
    key_argnum: int | None = eqx.field(static=True)

    def _per_example(self, args: tuple, kwargs: dict, batched: tuple[bool, ...]) -> Any:
        """Value, gradient, transform and metrics of one example."""
        kwargs = dict(kwargs)
        pad = kwargs.pop(PADDING, None)
        if self.keep_batch_dim:
            args = tuple(
                jtu.tree_map(lambda x: x[None] if eqx.is_array(x) else x, a)
                if is_batched and i != self.key_argnum
                else a
                for i, (a, is_batched) in enumerate(zip(args, batched))
            )

        def loss(diff_args):
            full = list(args)
            for i, arg in zip(self.argnums, diff_args):
                full[i] = arg
            out = self.fun(*full, **kwargs)
            if self.has_aux:
                if not (isinstance(out, tuple) and len(out) == 2):
                    raise TypeError(
                        "`micro_grad` was given `has_aux=True`, so `fun` must return a "
                        f"pair `(value, aux)`; it returned {type(out).__name__}."
                    )
                value, aux = out
            else:
                value, aux = out, None
            check_scalar_loss(value, self.keep_batch_dim, "micro_grad")
            return value, aux

        diff_args = tuple(args[i] for i in self.argnums)
        (value, aux), grads = eqx.filter_value_and_grad(loss, has_aux=True)(diff_args)
        if self.single_argnum:
            grads = grads[0]
        metrics = None if self.metrics_fn is None else self.metrics_fn(grads)
        if self.keep_batch_dim:
            aux = jtu.tree_map(_squeeze_leading, aux)
        per_example = PerExample(values=value, metrics=metrics, aux=aux)
        transformed = self.transform_fn(grads)
        if pad is not None:
            transformed = _zero_if(pad, transformed)
            per_example = _zero_if(pad, per_example)
        return transformed, per_example

    def __call__(self, *args: Any, **kwargs: Any) -> tuple[Any, PerExample]:
        is_padding_example = kwargs.get(PADDING)
        if PADDING in kwargs and is_padding_example is None:
            del kwargs[PADDING]
        if is_padding_example is not None:
            is_padding_example = validate_padding_mask(
                is_padding_example, None, "micro_grad"
            )
            kwargs[PADDING] = is_padding_example
        used = [*self.argnums, *self.batch_argnums]
        if self.key_argnum is not None:
            used.append(self.key_argnum)
        if max(used) >= len(args):
            raise ValueError(
                f"`micro_grad` was built with `argnums={self.argnums}`, "
                f"`batch_argnums={self.batch_argnums}`"
                + (
                    f", `key_argnum={self.key_argnum}`"
                    if self.key_argnum is not None
                    else ""
                )
                + f", but the function was called with {len(args)} positional arguments. "
                "Pass those arguments by position, or fix the argument numbers."
            )
        arg_list = list(args)
        batched = [i in self.batch_argnums for i in range(len(arg_list))]
        if self.key_argnum is not None:
            key = arg_list[self.key_argnum]
            arg_list[self.key_argnum] = self._per_example_keys(key, arg_list)
            batched[self.key_argnum] = True
        args_axes = tuple(0 if b else None for b in batched)
        kwargs_axes = {name: (0 if name == PADDING else None) for name in kwargs}
        inputs = (tuple(arg_list), kwargs)
        axes = broadcast_axes(
            (args_axes, kwargs_axes), inputs, "micro_grad", "batch_argnums"
        )
        accumulators = (self.accumulator.tree, Concat())
        batched_t = tuple(batched)
        accumulated, per_example = call_vmapped(
            lambda *a, **k: self._per_example(a, k, batched_t),
            inputs,
            axes,
            self.microbatch_size,
            accumulators,
            num_real_microbatches=self.num_real_microbatches,
            is_padding_example=is_padding_example,
            param_names=positional_names(signature_of(self.fun)),
            caller=_MICRO_GRAD,
        )
        return accumulated, per_example

    def _per_example_keys(self, key: Any, args: list) -> Any:
        where = f" (`key_argnum={self.key_argnum}`)"
        check_key(key, f"args[{self.key_argnum}]", "micro_grad", where)
        sizes = [
            leaf.shape[0]
            for i in self.batch_argnums
            for leaf in jtu.tree_leaves(args[i])
            if eqx.is_array(leaf) and leaf.ndim > 0
        ]
        return per_example_keys(key, sizes[0] if sizes else 0)


def check_scalar_loss(value: Any, keep_batch_dim: bool, caller: str) -> None:
    """A per-example loss must be a floating-point scalar."""
    if (
        eqx.is_array(value)
        and value.shape == ()
        and jnp.issubdtype(value.dtype, jnp.inexact)
    ):
        return
    if eqx.is_array(value):
        got = f"an array of shape {value.shape} and dtype {value.dtype}"
    else:
        got = f"{type(value).__name__}"
    hint = ""
    if keep_batch_dim and eqx.is_array(value) and value.shape == (1,):
        hint = (
            " With `keep_batch_dim=True` (the default) `fun` sees each example with a "
            "batch axis of size 1, so a loss such as `model(x)` has shape (1,): reduce "
            "it, e.g. with `jnp.mean`."
        )
    raise TypeError(
        f"`{caller}` needs `fun` to return a floating-point scalar loss for one "
        f"example; it returned {got}.{hint}"
    )


def micro_grad(
    fun: Callable,
    has_aux: bool = False,
    argnums: int | Sequence[int] = 0,
    *,
    batch_argnums: int | Sequence[int] = 1,
    keep_batch_dim: bool = True,
    microbatch_size: int | None = None,
    accumulator: AccumulatorTree = Sum(),
    transform_fn: Callable = _identity,
    metrics_fn: Callable | None = None,
    num_real_microbatches: int | Int[ArrayLike, ""] | None = None,
    key_argnum: int | None = None,
) -> Callable:
    """Per-example gradients of `fun`, transformed and accumulated over the batch.

    For every example of the batched arguments, computes the value of `fun` and its
    gradient with respect to the `argnums` arguments, applies `transform_fn` (e.g.
    clipping) to the gradient, and accumulates the transformed gradients over the batch
    with `accumulator`. Examples run `microbatch_size` at a time (vectorized within a
    microbatch, one microbatch after another in a compiled loop), so memory holds one
    microbatch of per-example gradients. The calling convention is that of
    `optax.microbatching.micro_grad`.

    Filtered like `eqx.filter_value_and_grad`: gradients are taken with respect to the
    inexact arrays of the `argnums` arguments; other leaves (integer arrays, callables,
    static fields) get `None`, and the gradient keeps the model's structure. Keyword
    arguments reach every example unbatched.

    Padding: pass `is_padding_example` (a boolean vector over the batch) at call time;
    padded examples contribute exact zeros (transformed gradient, values, metrics, aux),
    and microbatches holding only padding are skipped.

    **Arguments:**

    - `fun`: `fun(*args, **kwargs)` returning a scalar (or `(scalar, aux)` with
        `has_aux`). It sees one example at a time.
    - `has_aux`: whether `fun` returns `(value, aux)`.
    - `argnums`: the argument(s) to differentiate (an int gives that argument's
        gradient; a sequence gives a tuple).
    - `batch_argnums`: the batched argument(s), split along axis 0; they must not
        overlap `argnums`.
    - `keep_batch_dim`: if True, `fun` sees each example with a batch axis of size 1
        (models written for batches work unchanged). If False, it sees the example
        without it; inputs shaped `(groups, per_group, ...)` then give one gradient per
        group.
    - `microbatch_size`: examples per microbatch; `None` vectorizes the whole batch.
    - `accumulator`: how transformed gradients combine over examples (default `Sum()`;
        any accumulator or PyTree prefix of `transform_fn`'s output).
    - `transform_fn`: applied to each example's gradient; any callable, including an
        `eqx.Module`; it may return several trees.
    - `metrics_fn`: optional; sees each example's raw gradient; its outputs are returned
        per example.
    - `num_real_microbatches`: run only the first this many microbatches.
    - `key_argnum`: position of a PRNG key argument. Each example then gets its own key,
        `jax.random.fold_in(key, example_index)` with the example's position in the
        batch, so results do not depend on `microbatch_size`.

    **Returns:**

    A function with `fun`'s arguments returning `(accumulated, PerExample(values,
    metrics, aux))`.

    !!! example

        ```python
        import jax.numpy as jnp
        import eqx_micro as em

        def loss(params, batch):
            preds = batch["features"] @ params
            return 0.5 * jnp.mean((preds - batch["targets"]) ** 2)

        batch = {"features": jnp.ones((4, 1)), "targets": jnp.array([0.0, 2.0, 4.0, 6.0])}
        f = em.micro_grad(loss, accumulator=em.Mean(), microbatch_size=2,
                          transform_fn=lambda g: (g, g**2), metrics_fn=jnp.linalg.norm)
        (grads, squared), out = f(jnp.zeros(1), batch)
        assert grads.tolist() == [-3.0] and squared.tolist() == [14.0]
        assert out.values.tolist() == [0.0, 2.0, 8.0, 18.0]
        assert out.metrics.tolist() == [0.0, 2.0, 4.0, 6.0]
        ```
    """
    check_callable(fun, "fun", "micro_grad")
    check_bool(has_aux, "has_aux", "micro_grad")
    check_bool(keep_batch_dim, "keep_batch_dim", "micro_grad")
    check_callable(transform_fn, "transform_fn", "micro_grad")
    if metrics_fn is not None:
        check_callable(metrics_fn, "metrics_fn", "micro_grad")
    single_argnum = not isinstance(argnums, (tuple, list))
    argnums_t = check_argnums(argnums, "argnums", "micro_grad")
    batch_argnums_t = check_argnums(batch_argnums, "batch_argnums", "micro_grad")
    if not argnums_t:
        raise ValueError("`micro_grad` needs at least one argument in `argnums`.")
    if not batch_argnums_t:
        raise ValueError(
            "`micro_grad` needs at least one batched argument in `batch_argnums`."
        )
    overlap = set(argnums_t) & set(batch_argnums_t)
    if overlap:
        raise ValueError(
            f"`micro_grad` got `argnums={argnums}` and `batch_argnums={batch_argnums}`, "
            f"which overlap in {sorted(overlap)}: an argument is either differentiated "
            "(the same for all examples) or batched, not both."
        )
    if key_argnum is not None and key_argnum in (*argnums_t, *batch_argnums_t):
        raise ValueError(
            f"`micro_grad` got `key_argnum={key_argnum}`, which is also in `argnums` or "
            "`batch_argnums`; the key must be its own argument."
        )
    signature = signature_of(fun)
    names = positional_names(signature)
    largest = max(
        (*argnums_t, *batch_argnums_t, *(() if key_argnum is None else (key_argnum,)))
    )
    if not takes_varargs(signature) and largest >= len(names):
        raise ValueError(
            f"`micro_grad` got argument number {largest}, but `fun` takes only "
            f"{len(names)} positional arguments ({', '.join(names) or 'none'}). Fix "
            "`argnums`/`batch_argnums`/`key_argnum` (they count from 0)."
        )
    if microbatch_size is not None:
        microbatch_size = check_positive_int(
            microbatch_size, "microbatch_size", "micro_grad"
        )
    return _MicroGrad(
        fun=fun,
        transform_fn=transform_fn,
        metrics_fn=metrics_fn,
        accumulator=flat_accumulators(accumulator),
        num_real_microbatches=num_real_microbatches,
        has_aux=has_aux,
        argnums=argnums_t,
        single_argnum=single_argnum,
        batch_argnums=batch_argnums_t,
        keep_batch_dim=keep_batch_dim,
        microbatch_size=microbatch_size,
        key_argnum=key_argnum,
    )
