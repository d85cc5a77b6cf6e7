"""`microbatch` and `micro_vmap`: run a function over microbatches in one compiled loop.

Both transforms share one engine, `_call_microbatched`:

1. resolve which array leaves of the arguments are batched, and along which axis;
2. check the batch sizes and split each batch axis column-major into
   `(microbatch_size, num_microbatches)`;
3. trace the per-microbatch function once (`eqx.filter_make_jaxpr`), so the loop body
   replays that jaxpr and non-array outputs never enter the loop carry;
4. run the microbatches in one `lax.fori_loop` (bounded by early stopping, if any),
   folding each result into the accumulators' carry, then finalize.
"""

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.extend as jex
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import ArrayLike, Int, PyTree

from ._accumulators import (
    AbstractAccumulator,
    AccumulatorTree,
    Concat,
    Sum,
    canonicalize_accumulators,
    is_accumulator,
    map_accumulators,
)
from ._batch_axis import check_microbatch_size, num_microbatches_for, split_batch_axis
from ._custom_types import AxisSpec, StaticInt
from ._early_stopping import count_real_microbatches, validate_padding_mask


_PADDING = "is_padding_example"


# --------------------------------------------------------------------------------------
# Naming arguments in error messages.


def _signature(fun: Callable) -> inspect.Signature | None:
    try:
        return inspect.signature(fun)
    except (TypeError, ValueError):  # Some builtins and C callables have none.
        return None


def _describe_leaf(path: tuple, param_names: Sequence[str]) -> str:
    """`(args, kwargs)` key path -> `x['a']`, the way the user passed it."""
    group, key, *rest = path
    if group.idx == 0:
        index = key.idx
        head = param_names[index] if index < len(param_names) else f"args[{index}]"
    else:
        head = str(key.key)
    return head + jtu.keystr(tuple(rest))


def _positional_names(signature: inspect.Signature | None) -> list[str]:
    if signature is None:
        return []
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return [p.name for p in signature.parameters.values() if p.kind in kinds]


def _accepts_keyword(signature: inspect.Signature | None, name: str) -> bool:
    if signature is None:
        return True
    for parameter in signature.parameters.values():
        if parameter.kind == inspect.Parameter.VAR_KEYWORD:
            return True
        if parameter.name == name and parameter.kind in (
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
            inspect.Parameter.KEYWORD_ONLY,
        ):
            return True
    return False


# --------------------------------------------------------------------------------------
# The engine.


def _broadcast_axes(axes: Any, inputs: Any, caller: str, argument: str) -> Any:
    """Expands an axis prefix tree to one axis (or None) per leaf of `inputs`."""

    def expand(axis, subtree):
        if axis is not None and (isinstance(axis, bool) or not isinstance(axis, int)):
            raise TypeError(
                f"`{caller}` got {axis!r} in `{argument}`; each entry must be an int "
                "axis, None, or a PyTree prefix of the argument with those as leaves."
            )
        return jtu.tree_map(lambda leaf: axis if eqx.is_array(leaf) else None, subtree)

    try:
        return jtu.tree_map(expand, axes, inputs, is_leaf=lambda x: x is None)
    except ValueError as error:
        raise ValueError(
            f"`{caller}`: `{argument}` must be an int, None, or a PyTree prefix of the "
            f"batched arguments; its structure does not match them ({error})."
        ) from None


class _Split(eqx.Module):
    """The batched leaves of the inputs, split into microbatches."""

    inputs: Any  # (args, kwargs) with each batched leaf split to (..., mbs, M, ...)
    axes: Any  # (args, kwargs)-shaped: the batch axis of each batched leaf, else None
    num_microbatches: int = eqx.field(static=True)

    def take(self, index: Any) -> Any:
        """Microbatch `index`: every batched leaf with its `M` axis indexed away."""

        def take_leaf(axis, leaf):
            if axis is None:
                return leaf
            return jax.lax.dynamic_index_in_dim(leaf, index, axis + 1, keepdims=False)

        return jtu.tree_map(take_leaf, self.axes, self.inputs, is_leaf=_is_none)

    def example(self, microbatch_size: int) -> Any:
        """Shapes (and shardings) of one microbatch, for tracing."""
        if self.num_microbatches > 0:
            return eqx.filter_eval_shape(lambda: self.take(0))

        def struct(axis, leaf):
            if axis is None:
                return leaf
            shape = (*leaf.shape[: axis + 1], *leaf.shape[axis + 2 :])
            return jax.ShapeDtypeStruct(shape, leaf.dtype)

        return jtu.tree_map(struct, self.axes, self.inputs, is_leaf=_is_none)


def _is_none(x: Any) -> bool:
    return x is None


def _split_inputs(
    inputs: Any,
    axes: Any,
    microbatch_size: int | None,
    param_names: Sequence[str],
    caller: str,
) -> tuple[_Split, int, int]:
    """Checks the batched leaves and splits them; returns (split, batch, mbs)."""
    flat, treedef = jtu.tree_flatten_with_path(inputs)
    flat_axes = treedef.flatten_up_to(axes)
    sizes: dict[str, int] = {}
    normalized = []
    for (path, leaf), axis in zip(flat, flat_axes):
        if axis is None:
            normalized.append(None)
            continue
        where = _describe_leaf(path, param_names)
        if leaf.ndim == 0:
            raise ValueError(
                f"`{caller}` got a 0-d array in the batched argument `{where}`; a "
                "batched array needs a batch axis. Give it one, or do not mark this "
                "argument as batched (use `in_axes=None` for it)."
            )
        if not -leaf.ndim <= axis < leaf.ndim:
            raise ValueError(
                f"`{caller}` got batch axis {axis} for `{where}`, which has shape "
                f"{tuple(leaf.shape)}; pass an `in_axes` within its {leaf.ndim} axes."
            )
        axis = axis % leaf.ndim
        normalized.append(axis)
        sizes[where] = leaf.shape[axis]
    if not sizes:
        raise ValueError(
            f"`{caller}` found no arrays to split in the batched arguments. Mark at "
            "least one argument holding arrays as batched (`argnums`/`argnames`/"
            "`in_axes`)."
        )
    mask_size = sizes.pop(_PADDING, None)
    if not sizes:
        raise ValueError(
            f"`{caller}` found no arrays to split in the batched arguments. Mark at "
            "least one argument holding arrays as batched (`argnums`/`argnames`/"
            "`in_axes`)."
        )
    if len(set(sizes.values())) > 1:
        seen = ", ".join(f"{size} in `{where}`" for where, size in sizes.items())
        raise ValueError(
            f"`{caller}` needs every batched array to have the same batch size; got "
            f"{seen}. Give them the same number of examples, or pass `in_axes=None` "
            "for the arguments that are not batched."
        )
    where, batch_size = next(iter(sizes.items()))
    if mask_size is not None and mask_size != batch_size:
        raise ValueError(
            f"`{caller}` got `is_padding_example` of length {mask_size} for a batch of "
            f"{batch_size} examples; give one flag per example."
        )
    if microbatch_size is None:  # One microbatch of the whole batch.
        microbatch_size = max(batch_size, 1)
    num_microbatches = num_microbatches_for(batch_size, microbatch_size, where, caller)
    axes = treedef.unflatten(normalized)

    def split(axis, leaf):
        if axis is None:
            return leaf
        return split_batch_axis(leaf, microbatch_size, axis)

    split_inputs = jtu.tree_map(split, axes, inputs, is_leaf=_is_none)
    return _Split(split_inputs, axes, num_microbatches), batch_size, microbatch_size


def _static_or_traced(x: Any) -> Any:
    """A concrete integer as a Python int; a traced one unchanged."""
    if isinstance(x, jax.core.Tracer):
        return x
    return int(x)


def _loop_bound(
    num_real_microbatches: Any,
    is_padding_example: Any,
    batch_size: int,
    microbatch_size: int,
    num_microbatches: int,
    caller: str,
) -> Any:
    """How many microbatches to run: a Python int, or an int32 array under tracing."""
    bound: Any = num_microbatches
    if num_real_microbatches is not None:
        n = num_real_microbatches
        if isinstance(n, bool) or not (
            isinstance(n, StaticInt)
            or (hasattr(n, "dtype") and jnp.issubdtype(n.dtype, jnp.integer))
        ):
            raise TypeError(
                f"`{caller}` needs `num_real_microbatches` to be an int or an integer "
                f"scalar array, got {n!r}."
            )
        if jnp.ndim(n) != 0:
            raise ValueError(
                f"`{caller}` needs `num_real_microbatches` to be a scalar, got shape "
                f"{jnp.shape(n)}."
            )
        n = _static_or_traced(n)
        if isinstance(n, int):
            if not 0 <= n <= num_microbatches:
                raise ValueError(
                    f"`{caller}` got `num_real_microbatches={n}`, outside [0, "
                    f"{num_microbatches}] for a batch of {batch_size} split into "
                    f"{num_microbatches} microbatches of {microbatch_size}."
                )
        else:
            n = eqx.error_if(
                n,
                (n < 0) | (n > num_microbatches),
                f"`{caller}`: `num_real_microbatches` is outside [0, "
                f"{num_microbatches}] (the number of microbatches).",
            )
            n = jnp.clip(n, 0, num_microbatches).astype(jnp.int32)
        bound = n
    if is_padding_example is not None:
        from_mask = _static_or_traced(
            count_real_microbatches(is_padding_example, microbatch_size)
        )
        if isinstance(bound, int) and isinstance(from_mask, int):
            bound = min(bound, from_mask)
        else:
            bound = jnp.minimum(bound, from_mask).astype(jnp.int32)
    return bound


def _trace_once(fun: Callable, example: Any) -> tuple[Callable, Any, Any]:
    """Traces `fun(*args, **kwargs)` once; returns a replayer and the output structure.

    The replayer takes `(args, kwargs)` and returns only the array outputs (non-array
    outputs are `None`); `out_static` holds the non-array outputs.
    """
    args, kwargs = example
    closed_jaxpr, out_struct, out_static = eqx.filter_make_jaxpr(fun)(*args, **kwargs)
    replay = jex.core.jaxpr_as_fun(closed_jaxpr)
    out_treedef = jtu.tree_structure(out_struct)

    def call(inputs: Any) -> Any:
        flat = jtu.tree_leaves(eqx.filter(inputs, eqx.is_array))
        return jtu.tree_unflatten(out_treedef, replay(*flat))

    return call, out_struct, out_static


def _combine_static(accumulators: Any, results: Any, out_static: Any) -> Any:
    """Puts the non-array outputs back next to each accumulator's result."""

    def combine(accumulator, result, static):
        if not jtu.tree_leaves(static):
            return result
        return eqx.combine(result, static)

    return map_accumulators(combine, accumulators, results, out_static, argument="")


def _call_microbatched(
    fun: Callable,
    inputs: Any,
    axes: Any,
    microbatch_size: int | None,
    accumulators: Any,
    num_real_microbatches: Any,
    is_padding_example: Any,
    param_names: Sequence[str],
    caller: str,
    argument: str,
) -> Any:
    """Runs `fun(*args, **kwargs)` per microbatch and returns the accumulated result."""
    if is_padding_example is not None:
        validate_padding_mask(is_padding_example, None, caller)
    split, batch_size, microbatch_size = _split_inputs(
        inputs, axes, microbatch_size, param_names, caller
    )
    num_microbatches = split.num_microbatches
    bound = _loop_bound(
        num_real_microbatches,
        is_padding_example,
        batch_size,
        microbatch_size,
        num_microbatches,
        caller,
    )

    call, out_struct, out_static = _trace_once(
        lambda *a, **k: fun(*a, **k), split.example(microbatch_size)
    )
    init = map_accumulators(
        lambda acc, s: acc.init(s, num_microbatches),
        accumulators,
        out_struct,
        argument=argument,
    )

    def body(index, carry):
        value = call(split.take(index))
        return map_accumulators(
            lambda acc, c, v: acc.update(c, v, index),
            accumulators,
            carry,
            value,
            argument=argument,
        )

    if isinstance(bound, int) and bound <= 1:
        # Zero or one microbatch: no loop, so XLA compiles the body at top level.
        carry = init if bound == 0 else body(jnp.int32(0), init)
    else:
        carry = jax.lax.fori_loop(0, bound, body, init)
    results = map_accumulators(
        lambda acc, c: acc.finalize(c, num_microbatches, bound),
        accumulators,
        carry,
        argument=argument,
    )
    return _combine_static(accumulators, results, out_static)


class _Accumulators(eqx.Module):
    """An accumulator tree stored flat, so the wrappers stay hashable for `jax.jit`."""

    leaves: tuple[AbstractAccumulator, ...]
    treedef: Any = eqx.field(static=True)

    @property
    def tree(self) -> Any:
        return jtu.tree_unflatten(self.treedef, self.leaves)


def _flat_accumulators(accumulator: Any) -> _Accumulators:
    tree = canonicalize_accumulators(accumulator, "accumulator")
    leaves, treedef = jtu.tree_flatten(tree, is_leaf=is_accumulator)
    return _Accumulators(tuple(leaves), treedef)


# --------------------------------------------------------------------------------------
# `microbatch`


def _as_tuple(x: Any) -> tuple:
    if isinstance(x, (tuple, list)):
        return tuple(x)
    return (x,)


class _Microbatched(eqx.Module):
    fun: Callable
    accumulator: _Accumulators
    num_real_microbatches: Any
    argnums: tuple[int, ...] = eqx.field(static=True)
    argnames: tuple[str, ...] = eqx.field(static=True)
    in_axes: tuple[Any, ...] = eqx.field(static=True)
    microbatch_size: int = eqx.field(static=True)

    def _batched_axes(self, args: tuple, kwargs: dict) -> tuple[list, dict]:
        """Per-argument axes, for batched arguments passed by position or keyword."""
        signature = _signature(self.fun)
        names = _positional_names(signature)
        args_axes: list[Any] = [None] * len(args)
        kwargs_axes: dict[str, Any] = {name: None for name in kwargs}
        for argnum, axis in zip(self.argnums, self.in_axes):
            if argnum < len(args):
                args_axes[argnum] = axis
            elif argnum < len(names) and names[argnum] in kwargs:
                kwargs_axes[names[argnum]] = axis
            else:
                raise ValueError(
                    f"`microbatch` was built with `argnums` containing {argnum}, but the "
                    f"function was called with {len(args)} positional arguments"
                    + (f" and no `{names[argnum]}` keyword" if argnum < len(names) else "")
                    + ". Pass the batched argument, or fix `argnums`."
                )
        for name, axis in zip(self.argnames, self.in_axes[len(self.argnums) :]):
            if name in kwargs:
                kwargs_axes[name] = axis
            elif name in names and names.index(name) < len(args):
                args_axes[names.index(name)] = axis
            else:
                raise ValueError(
                    f"`microbatch` was built with `argnames` containing '{name}', but "
                    f"the function was called without a `{name}` argument."
                )
        if kwargs.get(_PADDING) is not None and kwargs_axes.get(_PADDING) is None:
            kwargs_axes[_PADDING] = 0
        return args_axes, kwargs_axes

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        signature = _signature(self.fun)
        is_padding_example = kwargs.get(_PADDING)
        if is_padding_example is not None and not _accepts_keyword(signature, _PADDING):
            raise TypeError(
                "`is_padding_example` was passed, but the microbatched function takes "
                "no `is_padding_example` keyword, so padded examples would be counted. "
                "Add that parameter to the function (and make padded examples "
                "contribute nothing), or pass `num_real_microbatches` instead."
            )
        args_axes, kwargs_axes = self._batched_axes(args, kwargs)
        inputs = (args, kwargs)
        axes = _broadcast_axes(
            (tuple(args_axes), kwargs_axes), inputs, "microbatch", "in_axes"
        )
        out = _call_microbatched(
            self.fun,
            inputs,
            axes,
            self.microbatch_size,
            self.accumulator.tree,
            self.num_real_microbatches,
            is_padding_example,
            _positional_names(signature),
            "microbatch",
            "accumulator",
        )
        return out

    @property
    def __wrapped__(self) -> Callable:  # `inspect.signature` reports `fun`'s.
        return self.fun

    def __get__(self, instance: Any, owner: Any) -> Any:  # Works as a method decorator.
        if instance is None:
            return self
        return jtu.Partial(self, instance)


def microbatch(
    fun: Callable,
    argnums: int | Sequence[int],
    microbatch_size: int | None,
    accumulator: AccumulatorTree = Sum(),
    *,
    argnames: str | Sequence[str] = (),
    in_axes: AxisSpec = 0,
    num_real_microbatches: int | Int[ArrayLike, ""] | None = None,
) -> Callable:
    """Runs `fun` on microbatches of a batch, one after another, and combines the results.

    The batched arguments are split along their batch axis into microbatches of
    `microbatch_size` examples; `fun` runs on each in one compiled `lax` loop (so compile
    time does not grow with the number of microbatches), and the accumulators combine
    the results. Peak memory is that of one microbatch.

    Microbatch `i` of `M` takes examples `i, i + M, i + 2M, ...` (a column-major split):
    a batch sharded over devices stays sharded inside every microbatch. The split is
    exact only for functions that decompose over examples (sums, means, per-example
    outputs); see `compute_early_stopping_order` to make microbatches contiguous.

    The transform is filtered: only array leaves of the batched arguments are split;
    strings, callables, `None`, Python scalars and static module fields reach `fun`
    untouched, and non-array leaves of the output come back as they are.

    Early stopping: `num_real_microbatches` runs only the first microbatches (without
    recompiling when it is traced). If `fun` takes an `is_padding_example` keyword,
    passing that boolean mask at call time splits it with the batch and stops after the
    last microbatch holding a real example.

    **Arguments:**

    - `fun`: the function (or `eqx.Module`) to microbatch.
    - `argnums`: positions of the batched positional arguments (an int or a sequence).
    - `microbatch_size`: examples per microbatch; it must divide the batch size. `None`
        returns `fun` itself.
    - `accumulator`: how results combine across microbatches: an accumulator such as
        `Sum()` (default), `Mean()`, `RunningMean()`, `Concat()`, `Max()`, `Min()`, an
        `AccumulationType`, or a PyTree prefix of the output with those at its leaves.
    - `argnames`: names of batched keyword arguments.
    - `in_axes`: the batch axis: one int for all batched arguments, or one entry per
        `argnums` then `argnames` entry (each an int, None, or a PyTree prefix of that
        argument).
    - `num_real_microbatches`: run only the first this many microbatches (an int in
        `[0, M]` or an integer scalar array). `None` runs them all.

    **Returns:**

    A function with the signature of `fun`, returning the accumulated result.

    !!! example

        ```python
        import jax
        import jax.numpy as jnp
        import eqx_micro as em

        def loss(params, x, y):
            return jnp.mean((x @ params - y) ** 2)

        x, y = jnp.ones((8, 3)), jnp.arange(8.0)
        grad = em.microbatch(jax.grad(loss), argnums=(1, 2), microbatch_size=2,
                             accumulator=em.Mean())
        assert jnp.allclose(grad(jnp.zeros(3), x, y), jax.grad(loss)(jnp.zeros(3), x, y))
        ```
    """
    if microbatch_size is None:
        return fun
    microbatch_size = check_microbatch_size(microbatch_size, "microbatch")
    argnums = _as_tuple(argnums)
    argnames = _as_tuple(argnames)
    for argnum in argnums:
        if isinstance(argnum, bool) or not isinstance(argnum, StaticInt) or argnum < 0:
            raise TypeError(
                f"`microbatch` needs `argnums` to hold non-negative ints, got {argnum!r}."
            )
    argnums = tuple(int(a) for a in argnums)
    for name in argnames:
        if not isinstance(name, str):
            raise TypeError(
                f"`microbatch` needs `argnames` to hold strings, got {name!r}."
            )
    if not argnums and not argnames:
        raise ValueError(
            "`microbatch` needs at least one batched argument: pass `argnums` and/or "
            "`argnames`."
        )
    if len(set(argnums)) != len(argnums) or len(set(argnames)) != len(argnames):
        raise ValueError(
            f"`microbatch` got repeated entries in `argnums={argnums}` or "
            f"`argnames={argnames}`; list each batched argument once."
        )
    signature = _signature(fun)
    names = _positional_names(signature)
    takes_varargs = signature is None or any(
        p.kind == inspect.Parameter.VAR_POSITIONAL
        for p in signature.parameters.values()
    )
    for argnum in argnums:
        if not takes_varargs and argnum >= len(names):
            raise ValueError(
                f"`microbatch` got `argnums` containing {argnum}, but `fun` takes only "
                f"{len(names)} positional arguments ({', '.join(names) or 'none'}). "
                "Pass the positions of the batched arguments, counting from 0."
            )
    for name in argnames:
        if names and name in names and names.index(name) in argnums:
            raise ValueError(
                f"`microbatch` got argument '{name}' both in `argnums` (position "
                f"{names.index(name)}) and in `argnames`; list it once."
            )
        if not _accepts_keyword(signature, name) and name not in names:
            raise ValueError(
                f"`microbatch` got `argnames` containing '{name}', but `fun` has no "
                f"parameter of that name (its parameters: "
                f"{', '.join(signature.parameters) if signature else '?'})."
            )
    num_batched = len(argnums) + len(argnames)
    if isinstance(in_axes, (tuple, list)):
        if len(in_axes) != num_batched:
            raise ValueError(
                f"`microbatch` got {len(in_axes)} entries in `in_axes` for "
                f"{num_batched} batched arguments (`argnums={argnums}`, "
                f"`argnames={argnames}`); give one per argument, or a single int."
            )
        in_axes = tuple(in_axes)
    else:
        in_axes = (in_axes,) * num_batched
    accumulator = _flat_accumulators(accumulator)
    return _Microbatched(
        fun=fun,
        accumulator=accumulator,
        num_real_microbatches=num_real_microbatches,
        argnums=argnums,
        argnames=argnames,
        in_axes=in_axes,
        microbatch_size=microbatch_size,
    )


# --------------------------------------------------------------------------------------
# `micro_vmap`


class _MicroVmapped(eqx.Module):
    fun: Callable
    accumulator: _Accumulators
    num_real_microbatches: Any
    in_axes: Any = eqx.field(static=True)
    out_axes: int = eqx.field(static=True)
    microbatch_size: int | None = eqx.field(static=True)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        signature = _signature(self.fun)
        is_padding_example = kwargs.get(_PADDING)
        if is_padding_example is not None and not _accepts_keyword(signature, _PADDING):
            raise TypeError(
                "`is_padding_example` was passed, but the function given to "
                "`micro_vmap` takes no `is_padding_example` keyword, so padded examples "
                "would be counted. Add that parameter (and make padded examples "
                "contribute nothing), or pass `num_real_microbatches` instead."
            )
        if isinstance(self.in_axes, (tuple, list)):
            if len(self.in_axes) != len(args):
                raise ValueError(
                    f"`micro_vmap` got {len(self.in_axes)} entries in `in_axes` for "
                    f"{len(args)} positional arguments; give one per argument."
                )
            args_axes = list(self.in_axes)
        else:
            args_axes = [self.in_axes] * len(args)
        kwargs_axes = {name: 0 for name in kwargs}  # As `jax.vmap`: keywords map on 0.
        inputs = (args, kwargs)
        axes = _broadcast_axes(
            (tuple(args_axes), kwargs_axes), inputs, "micro_vmap", "in_axes"
        )
        accumulators = self.accumulator.tree
        fun = self.fun

        def vmap_then_aggregate(*mb_args, **mb_kwargs):
            per_example = eqx.filter_vmap(
                lambda a, k: fun(*a, **k), in_axes=(axes[0], axes[1])
            )(mb_args, mb_kwargs)
            arrays, static = eqx.partition(per_example, eqx.is_array)
            aggregated = map_accumulators(
                lambda acc, v: acc.aggregate(v),
                accumulators,
                arrays,
                argument="accumulator",
            )
            return _combine_static(accumulators, aggregated, static)

        out = _call_microbatched(
            vmap_then_aggregate,
            inputs,
            axes,
            self.microbatch_size,
            accumulators,
            self.num_real_microbatches,
            is_padding_example,
            _positional_names(signature),
            "micro_vmap",
            "accumulator",
        )
        if self.out_axes == 0:
            return out

        def move(accumulator, result):
            arrays = [leaf for leaf in jtu.tree_leaves(result) if eqx.is_array(leaf)]
            if not isinstance(accumulator, Concat):
                if arrays:
                    raise ValueError(
                        f"`micro_vmap` got `out_axes={self.out_axes}`, but "
                        f"{type(accumulator).__name__} reduces the batch axis away; "
                        "`out_axes` other than 0 needs `Concat()` accumulators."
                    )
                return result
            return jtu.tree_map(
                lambda x: jnp.moveaxis(x, 0, self.out_axes) if eqx.is_array(x) else x,
                result,
            )

        return map_accumulators(move, accumulators, out, argument="accumulator")

    @property
    def __wrapped__(self) -> Callable:  # `inspect.signature` reports `fun`'s.
        return self.fun

    def __get__(self, instance: Any, owner: Any) -> Any:  # Works as a method decorator.
        if instance is None:
            return self
        return jtu.Partial(self, instance)


def micro_vmap(
    fun: Callable,
    in_axes: AxisSpec = 0,
    out_axes: int = 0,
    *,
    microbatch_size: int | None = None,
    accumulator: AccumulatorTree = Concat(),
    num_real_microbatches: int | Int[ArrayLike, ""] | None = None,
) -> Callable:
    """`jax.vmap`, processed microbatch by microbatch, with the results accumulated.

    Within a microbatch, `fun` is vectorised over its examples and the per-example
    results are reduced with each accumulator's `aggregate`; across microbatches they
    are combined as in `microbatch`. With `Concat()` (the default) the result equals
    `jax.vmap(fun)`; with `Sum()` it is the sum over examples, without ever holding all
    per-example results at once.

    Filtered like `eqx.filter_vmap`: non-array leaves are not mapped, and keyword
    arguments are mapped along axis 0.

    **Arguments:**

    - `fun`: the per-example function.
    - `in_axes`: as `jax.vmap`: an int or None for all positional arguments, or a
        sequence with one entry (int, None, or PyTree prefix) per positional argument.
    - `out_axes`: where the batch axis goes in `Concat` outputs (default 0).
    - `microbatch_size`: examples per microbatch; `None` vectorises the whole batch at
        once (one microbatch).
    - `accumulator`: as in `microbatch`; default `Concat()`.
    - `num_real_microbatches`: run only the first this many microbatches.

    **Returns:**

    The vectorised, microbatched function.

    !!! example

        ```python
        import jax
        import jax.numpy as jnp
        import eqx_micro as em

        x = jnp.arange(12.0).reshape(6, 2)
        per_example = em.micro_vmap(jnp.linalg.norm, microbatch_size=2)(x)
        assert jnp.allclose(per_example, jax.vmap(jnp.linalg.norm)(x))
        total = em.micro_vmap(jnp.sum, microbatch_size=3, accumulator=em.Sum())(x)
        assert total == x.sum()
        ```
    """
    if microbatch_size is not None:
        microbatch_size = check_microbatch_size(microbatch_size, "micro_vmap")
    if isinstance(out_axes, bool) or not isinstance(out_axes, StaticInt):
        raise TypeError(f"`micro_vmap` needs `out_axes` to be an int, got {out_axes!r}.")
    accumulator = _flat_accumulators(accumulator)
    in_axes = tuple(in_axes) if isinstance(in_axes, list) else in_axes
    return _MicroVmapped(
        fun=fun,
        accumulator=accumulator,
        num_real_microbatches=num_real_microbatches,
        in_axes=in_axes,
        out_axes=int(out_axes),
        microbatch_size=microbatch_size,
    )

