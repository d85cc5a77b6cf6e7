"""The engine behind every transform: one compiled loop over microbatches.

`call_microbatched` does, in order:

1. check the batched leaves of the inputs and split each batch axis column-major into
   `(microbatch_size, num_microbatches)` (see `_batch_axis.py`);
2. trace the per-microbatch function once (`eqx.filter_make_jaxpr`), so the loop body
   replays that jaxpr (through the backend seam, `_backend.replay`) and non-array
   outputs never enter the loop carry;
3. run the microbatches in one `lax.fori_loop` (bounded by early stopping, if any),
   optionally several per iteration, or unrolled, folding each result into the
   accumulators' carry and threading an optional carried value (e.g. `eqx.nn.State`)
   from one microbatch to the next;
4. finalize the accumulators and put the non-array outputs back.
"""

import abc
import enum
from collections.abc import Callable, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.core
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jaxtyping import Array, PyTree

from . import _backend
from ._accumulators import (
    AbstractAccumulator,
    canonicalize_accumulators,
    is_accumulator,
    map_accumulators,
    Mean,
    Sum,
)
from ._arguments import Caller, describe_leaf, PADDING, validate_padding_mask
from ._batch_axis import num_microbatches_for, split_batch_axis
from ._custom_types import StaticInt
from ._early_stopping import count_real_microbatches


class AbstractTransformed(eqx.Module):
    """A function transformed by eqx_micro.

    Subclasses hold the wrapped function in `fun` and implement `__call__`. Here:
    `inspect.signature` reports `fun`'s signature, and the wrapper binds like a method
    when used as a decorator inside a class (then `argnums` count `self` as 0).
    """

    fun: eqx.AbstractVar[Callable]

    # `jax.jit(f)` keys its cache on `f` itself: hash by identity, so that an instance
    # holding arrays can be jitted as a function (its arrays become constants).
    __hash__ = object.__hash__

    @abc.abstractmethod
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Calls the transformed function."""

    @property
    def __wrapped__(self) -> Callable:
        return self.fun

    def __get__(self, instance: Any, owner: Any) -> Any:
        if instance is None:
            return self
        return jtu.Partial(self, instance)


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

    def example(self) -> Any:
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
    caller: Caller,
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
        where = describe_leaf(path, param_names)
        if leaf.ndim == 0:
            raise ValueError(
                f"`{caller.name}` got a 0-d array in the batched argument `{where}`; a "
                "batched array needs a batch axis. Give it one, or "
                f"{caller.unbatch}."
            )
        if not -leaf.ndim <= axis < leaf.ndim:
            raise ValueError(
                f"`{caller.name}` got batch axis {axis} for `{where}`, which has shape "
                f"{tuple(leaf.shape)}; pick an axis within its {leaf.ndim} axes in "
                f"{caller.mark}."
            )
        axis = axis % leaf.ndim
        normalized.append(axis)
        sizes[where] = leaf.shape[axis]
    mask_size = sizes.pop(PADDING, None)
    if not sizes:
        raise ValueError(
            f"`{caller.name}` found no arrays to split in the batched arguments. Mark "
            f"at least one argument holding arrays as batched ({caller.mark})."
        )
    if len(set(sizes.values())) > 1:
        seen = ", ".join(f"{size} in `{where}`" for where, size in sizes.items())
        raise ValueError(
            f"`{caller.name}` needs every batched array to have the same batch size; "
            f"got {seen}. Give them the same number of examples, or, for an argument "
            f"that is not batched, {caller.unbatch}."
        )
    where, batch_size = next(iter(sizes.items()))
    if mask_size is not None and mask_size != batch_size:
        raise ValueError(
            f"`{caller.name}` got `is_padding_example` of length {mask_size} for a "
            f"batch of "
            f"{batch_size} examples; give one flag per example."
        )
    if microbatch_size is None:  # One microbatch of the whole batch.
        microbatch_size = max(batch_size, 1)
    num_microbatches = num_microbatches_for(
        batch_size, microbatch_size, where, caller.name, caller.pad
    )
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
            or (
                isinstance(n, jax.Array | np.ndarray | np.generic)
                and jnp.issubdtype(n.dtype, jnp.integer)
            )
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


def _trace_once(fun: Callable, *example: Any, in_loop: bool) -> tuple[Callable, Any, Any]:
    """Traces `fun(*example)` once; returns a replayer and the output structure.

    The replayer takes the same arguments and returns only the array outputs
    (non-array outputs are `None`); `out_static` holds the non-array outputs.
    `in_loop` says whether the replay runs inside a loop (for the backend seam).
    """
    closed_jaxpr, out_struct, out_static = eqx.filter_make_jaxpr(fun)(*example)
    replay = _backend.replay(closed_jaxpr, in_loop=in_loop)
    out_leaves, out_treedef = jtu.tree_flatten(out_struct)

    def call(*inputs: Any) -> Any:
        flat = jtu.tree_leaves(eqx.filter(inputs, eqx.is_array))
        # Constant outputs come back from the jaxpr as NumPy scalars: make them arrays.
        outs = [
            _strong(jnp.asarray(out, struct.dtype))
            for out, struct in zip(replay(*flat), out_leaves)
        ]
        return jtu.tree_unflatten(out_treedef, outs)

    return call, out_struct, out_static


def _strong(x: Any) -> Any:
    """`x` without a weak type, so loop carries keep one type across iterations."""
    return jax.lax.convert_element_type(x, x.dtype) if eqx.is_array(x) else x


def combine_static(accumulators: Any, results: Any, out_static: Any) -> Any:
    """Puts the non-array outputs back next to each accumulator's result."""

    def combine(accumulator, result, static):
        if not jtu.tree_leaves(static):
            return result
        return eqx.combine(result, static)

    return map_accumulators(combine, accumulators, results, out_static, argument="")


def _check_threaded(before: Any, after: Any, after_static: Any, caller: str) -> None:
    """The value threaded through microbatches must keep its form (a loop carry)."""
    expected = eqx.filter_eval_shape(lambda: before)
    returned = eqx.combine(after, after_static)

    def same(a, b):
        if isinstance(a, jax.ShapeDtypeStruct) or isinstance(b, jax.ShapeDtypeStruct):
            return (
                isinstance(a, jax.ShapeDtypeStruct)
                and isinstance(b, jax.ShapeDtypeStruct)
                and (a.shape, a.dtype) == (b.shape, b.dtype)
            )
        return a is b or a == b

    ok = jtu.tree_structure(expected) == jtu.tree_structure(returned) and all(
        same(a, b) for a, b in zip(jtu.tree_leaves(expected), jtu.tree_leaves(returned))
    )
    if not ok:
        raise ValueError(
            f"`{caller}`: the state returned for a microbatch does not have the "
            "structure, shapes and dtypes of the state passed in; return the updated "
            "state (e.g. the `eqx.nn.State` a stateful layer returns) unchanged in form."
        )


class _Schedule(enum.Enum):
    """How the microbatches run."""

    STRAIGHT = enum.auto()  # written out one after another, at top level
    ONE_INLINE = enum.auto()  # a single microbatch at top level, kept if the bound is 1
    UNROLLED_LOOP = enum.auto()  # a loop running several microbatches per iteration
    LOOP = enum.auto()  # a loop running one microbatch per iteration


def _schedule(bound: Any, num_microbatches: int, unroll: bool | int) -> _Schedule:
    per_iteration = 1 if isinstance(unroll, bool) else unroll
    if isinstance(bound, int) and (unroll is True or bound <= per_iteration):
        return _Schedule.STRAIGHT
    if num_microbatches == 1 and _backend.enabled(_backend.Tweak.SINGLE_MICROBATCH_INLINE):
        return _Schedule.ONE_INLINE
    if isinstance(bound, int) and per_iteration > 1:
        return _Schedule.UNROLLED_LOOP
    return _Schedule.LOOP


def _run(
    schedule: _Schedule,
    body: Callable[[Any, Any], Any],
    carry: Any,
    bound: Any,
    unroll: bool | int,
) -> Any:
    """Runs `body(index, carry)` for the first `bound` microbatches."""
    if schedule is _Schedule.STRAIGHT:
        for index in range(bound):
            carry = body(jnp.int32(index), carry)
        return carry
    if schedule is _Schedule.ONE_INLINE:
        ran = body(jnp.int32(0), carry)
        return jtu.tree_map(lambda new, old: jnp.where(bound > 0, new, old), ran, carry)
    if schedule is _Schedule.UNROLLED_LOOP:
        # Independent microbatches written out in one iteration may run concurrently;
        # compile time grows with `unroll`, not with `bound`.
        return jax.lax.fori_loop(0, bound, body, carry, unroll=int(unroll))
    return jax.lax.fori_loop(0, bound, body, carry)


def _checked_update(
    accumulator: AbstractAccumulator, carry: Any, value: Any, index: Any, argument: str
) -> Any:
    """`accumulator.update`, refused when it changes the carry's form (a loop carry
    must keep its structure, shapes and dtypes)."""
    new = accumulator.update(carry, value, index)
    before = jtu.tree_flatten_with_path(carry)
    after = jtu.tree_flatten_with_path(new)
    name = type(accumulator).__name__
    if before[1] != after[1]:
        raise ValueError(
            f"`{name}.update` (in `{argument}`) returned a carry of structure "
            f"{after[1]}, but `{name}.init` made {before[1]}; `update` must return the "
            "carry in the form `init` made it."
        )
    for (path, old), (_, got) in zip(before[0], after[0]):
        if (jnp.shape(old), jnp.result_type(old)) != (jnp.shape(got), jnp.result_type(got)):
            raise ValueError(
                f"`{name}.update` (in `{argument}`) returned the carry leaf "
                f"`carry{jtu.keystr(path)}` with shape {jnp.shape(got)} and dtype "
                f"{jnp.result_type(got)}, but `{name}.init` made it {jnp.shape(old)} and "
                f"{jnp.result_type(old)}; `update` must keep the carry's shapes and dtypes "
                "(a loop carries it from one microbatch to the next)."
            )
    return new


def call_microbatched(
    per_microbatch: Callable[[Any, Any, Any], tuple[Any, Any]],
    inputs: Any,
    axes: Any,
    microbatch_size: int | None,
    accumulators: Any,
    *,
    num_real_microbatches: Any = None,
    is_padding_example: Any = None,
    threaded: Any = None,
    unroll: bool | int = False,
    param_names: Sequence[str] = (),
    caller: Caller,
    argument: str = "accumulator",
) -> tuple[Any, Any]:
    """Runs `per_microbatch` over the microbatches of `inputs` and accumulates.

    **Arguments:**

    - `per_microbatch`: `(inputs, index, threaded) -> (output, threaded)`, called with
        one microbatch of `inputs`, its int32 index, and the value threaded from the
        previous microbatch.
    - `inputs`: a PyTree (usually `(args, kwargs)`).
    - `axes`: `inputs`-shaped, the batch axis of each leaf or None (see
        `broadcast_axes`).
    - `microbatch_size`: examples per microbatch, or None for one microbatch.
    - `accumulators`: canonical accumulator tree, a prefix of the output.
    - `num_real_microbatches`, `is_padding_example`: early stopping.
    - `threaded`: the initial threaded value (None for none).
    - `unroll`: `True` runs the microbatches as straight-line code instead of a loop;
        an int `k` runs `k` of them per loop iteration (`lax.fori_loop(unroll=k)`). Both
        need a static number of microbatches; a run-time bound loops one at a time.

    **Returns:**

    `(accumulated output, final threaded value)`.
    """
    if is_padding_example is not None:
        validate_padding_mask(is_padding_example, None, caller.name)
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
        caller.name,
    )

    index_struct = jax.ShapeDtypeStruct((), jnp.int32)
    schedule = _schedule(bound, num_microbatches, unroll)
    call, (out_struct, threaded_struct), (out_static, threaded_static) = _trace_once(
        per_microbatch,
        split.example(),
        index_struct,
        threaded,
        in_loop=schedule in (_Schedule.LOOP, _Schedule.UNROLLED_LOOP),
    )
    threaded_arrays, _ = eqx.partition(threaded, eqx.is_array)
    threaded_arrays = jtu.tree_map(lambda x: _strong(jnp.asarray(x)), threaded_arrays)
    if threaded is not None:
        _check_threaded(threaded, threaded_struct, threaded_static, caller.name)
    init = map_accumulators(
        lambda acc, s: acc.init(s, num_microbatches),
        accumulators,
        out_struct,
        argument=argument,
    )

    def body(index, carry):
        acc_carry, threaded_arrays = carry
        threaded_in = eqx.combine(threaded_arrays, threaded_static)
        value, threaded_out = call(split.take(index), index, threaded_in)
        acc_carry = map_accumulators(
            lambda acc, c, v: _checked_update(acc, c, v, index, argument),
            accumulators,
            acc_carry,
            value,
            argument=argument,
        )
        return acc_carry, threaded_out

    carry = _run(schedule, body, (init, threaded_arrays), bound, unroll)
    acc_carry, threaded_arrays = carry
    results = map_accumulators(
        lambda acc, c: acc.finalize(c, num_microbatches, bound),
        accumulators,
        acc_carry,
        argument=argument,
    )
    output = combine_static(accumulators, results, out_static)
    return output, eqx.combine(threaded_arrays, threaded_static)


class _FoldInChunks(AbstractAccumulator):
    """`Sum` or `Mean` of per-example values, reduced inside the carry update a block of
    rows at a time (as many rows as the backend asks for: `_backend.rows_per_chunk`).
    `aggregate` passes the stacked values through; `update` reduces them."""

    inner: AbstractAccumulator

    def init(self, example: PyTree[jax.ShapeDtypeStruct], num_microbatches: int) -> Any:
        return self.inner.init(jtu.tree_map(drop_leading_axis, example), num_microbatches)

    def update(self, carry: Any, value: PyTree[Array], index: Any) -> Any:
        def fold(c: Array, v: Array) -> Array:
            rows = _backend.rows_per_chunk(c)
            if rows is None:
                return self.inner.update(c, self.inner.aggregate(v), index)
            for start in range(0, c.shape[0], rows):
                stop = min(start + rows, c.shape[0])
                part = self.inner.aggregate(jax.lax.slice_in_dim(v, start, stop, axis=1))
                block = self.inner.update(jax.lax.slice_in_dim(c, start, stop), part, index)
                c = jax.lax.dynamic_update_slice_in_dim(c, block, start, axis=0)
            return c

        return jtu.tree_map(fold, carry, value)

    def finalize(self, carry: Any, num_microbatches: int, num_executed: Any) -> Any:
        return self.inner.finalize(carry, num_microbatches, num_executed)

    def aggregate(self, values: PyTree[Array]) -> PyTree[Array]:
        return values


def drop_leading_axis(struct: jax.ShapeDtypeStruct) -> jax.ShapeDtypeStruct:
    """The struct of one row of `struct` (keeping a named sharding of the rest)."""
    sharding = struct.sharding
    if isinstance(sharding, jax.sharding.NamedSharding):
        spec = jax.sharding.PartitionSpec(*tuple(sharding.spec)[1:])
        sharding = jax.sharding.NamedSharding(sharding.mesh, spec)
        return jax.ShapeDtypeStruct(struct.shape[1:], struct.dtype, sharding=sharding)
    return jax.ShapeDtypeStruct(struct.shape[1:], struct.dtype)


def _fold_in_chunks(accumulators: Any) -> Any:
    """Accumulators that add per-example values (`Sum`, `Mean`) fold them into the carry
    in blocks where the backend benefits."""
    if not _backend.enabled(_backend.Tweak.FOLD_IN_CHUNKS):
        return accumulators
    return jtu.tree_map(
        lambda acc: _FoldInChunks(acc) if isinstance(acc, Sum | Mean) else acc,
        accumulators,
        is_leaf=is_accumulator,
    )


def vmap_and_aggregate(fun: Callable, axes: Any, accumulators: Any) -> Callable[[Any], Any]:
    """`inputs -> aggregated per-example fun(*args, **kwargs)`, for one microbatch."""

    def run(inputs: Any) -> Any:
        per_example = eqx.filter_vmap(lambda a, k: fun(*a, **k), in_axes=axes)(*inputs)
        arrays, static = eqx.partition(per_example, eqx.is_array)
        aggregated = map_accumulators(
            lambda acc, v: acc.aggregate(v), accumulators, arrays, argument="accumulator"
        )
        return combine_static(accumulators, aggregated, static)

    return run


def call_vmapped(
    fun: Callable,
    inputs: Any,
    axes: Any,
    microbatch_size: int | None,
    accumulators: Any,
    *,
    num_real_microbatches: Any,
    is_padding_example: Any,
    param_names: Sequence[str],
    caller: Caller,
) -> Any:
    """`fun` vectorized over each microbatch, aggregated, then accumulated."""
    accumulators = _fold_in_chunks(accumulators)
    per_microbatch = vmap_and_aggregate(fun, axes, accumulators)
    out, _ = call_microbatched(
        lambda mb, index, threaded: (per_microbatch(mb), threaded),
        inputs,
        axes,
        microbatch_size,
        accumulators,
        num_real_microbatches=num_real_microbatches,
        is_padding_example=is_padding_example,
        param_names=param_names,
        caller=caller,
    )
    return out


class Accumulators(eqx.Module):
    """An accumulator tree stored flat, so the wrappers stay hashable for `jax.jit`."""

    leaves: tuple[AbstractAccumulator, ...]
    treedef: Any = eqx.field(static=True)

    @property
    def tree(self) -> Any:
        return jtu.tree_unflatten(self.treedef, self.leaves)


def flat_accumulators(accumulator: Any, argument: str = "accumulator") -> Accumulators:
    tree = canonicalize_accumulators(accumulator, argument)
    leaves, treedef = jtu.tree_flatten(tree, is_leaf=is_accumulator)
    return Accumulators(tuple(leaves), treedef)
