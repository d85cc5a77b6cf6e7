"""`microbatch` and `micro_vmap`: run a function over microbatches in one compiled loop.

Both are thin wrappers over `call_microbatched` (see `_engine.py`); they only decide
which arguments are batched, along which axis.
"""

from collections.abc import Callable, Sequence
from typing import Any

import equinox as eqx
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import ArrayLike, Int

from ._accumulators import AccumulatorTree, Concat, map_accumulators, Sum
from ._arguments import (
    accepts_keyword,
    as_tuple,
    broadcast_axes,
    Caller,
    check_argnums,
    check_callable,
    check_positive_int,
    PADDING,
    padding_mask,
    positional_names,
    signature_of,
    takes_varargs,
)
from ._custom_types import AxisSpec, StaticInt
from ._engine import (
    AbstractTransformed,
    Accumulators,
    call_microbatched,
    call_vmapped,
    flat_accumulators,
)


_PAD_OR_COUNT = "pass `is_padding_example` (or `num_real_microbatches`)"
_MICROBATCH = Caller(
    "microbatch",
    "`argnums`/`argnames`",
    "leave it out of `argnums` and `argnames`",
    _PAD_OR_COUNT,
)
_MICRO_VMAP = Caller("micro_vmap", "`in_axes`", "give it `in_axes=None`", _PAD_OR_COUNT)


class _Microbatched(AbstractTransformed):
    fun: Callable
    accumulator: Accumulators
    num_real_microbatches: Any
    argnums: tuple[int, ...] = eqx.field(static=True)
    argnames: tuple[str, ...] = eqx.field(static=True)
    in_axes: tuple[Any, ...] = eqx.field(static=True)
    microbatch_size: int | None = eqx.field(static=True)

    def _batched_axes(self, args: tuple, kwargs: dict) -> tuple[list, dict]:
        """Per-argument axes, for batched arguments passed by position or keyword."""
        signature = signature_of(self.fun)
        names = positional_names(signature)
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
        if kwargs.get(PADDING) is not None and kwargs_axes.get(PADDING) is None:
            kwargs_axes[PADDING] = 0
        return args_axes, kwargs_axes

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        signature = signature_of(self.fun)
        is_padding_example = padding_mask(self.fun, kwargs, "microbatch")
        args_axes, kwargs_axes = self._batched_axes(args, kwargs)
        inputs = (args, kwargs)
        axes = broadcast_axes(
            (tuple(args_axes), kwargs_axes), inputs, "microbatch", "in_axes"
        )
        fun = self.fun
        out, _ = call_microbatched(
            lambda mb, index, threaded: (fun(*mb[0], **mb[1]), threaded),
            inputs,
            axes,
            self.microbatch_size,
            self.accumulator.tree,
            num_real_microbatches=self.num_real_microbatches,
            is_padding_example=is_padding_example,
            param_names=positional_names(signature),
            caller=_MICROBATCH,
        )
        return out


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
        runs the whole batch as one microbatch (as in every eqx_micro transform).
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
    check_callable(fun, "fun", "microbatch")
    if microbatch_size is not None:
        microbatch_size = check_positive_int(
            microbatch_size, "microbatch_size", "microbatch"
        )
    argnums = check_argnums(argnums, "argnums", "microbatch")
    argnames = as_tuple(argnames)
    for name in argnames:
        if not isinstance(name, str):
            raise TypeError(f"`microbatch` needs `argnames` to hold strings, got {name!r}.")
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
    signature = signature_of(fun)
    names = positional_names(signature)
    for argnum in argnums:
        if not takes_varargs(signature) and argnum >= len(names):
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
        if not accepts_keyword(signature, name) and name not in names:
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
    accumulator = flat_accumulators(accumulator)
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


class _MicroVmapped(AbstractTransformed):
    fun: Callable
    accumulator: Accumulators
    num_real_microbatches: Any
    in_axes: Any = eqx.field(static=True)
    out_axes: int = eqx.field(static=True)
    microbatch_size: int | None = eqx.field(static=True)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        signature = signature_of(self.fun)
        is_padding_example = padding_mask(self.fun, kwargs, "micro_vmap")
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
        axes = broadcast_axes(
            (tuple(args_axes), kwargs_axes), inputs, "micro_vmap", "in_axes"
        )
        accumulators = self.accumulator.tree
        out = call_vmapped(
            self.fun,
            inputs,
            axes,
            self.microbatch_size,
            accumulators,
            num_real_microbatches=self.num_real_microbatches,
            is_padding_example=is_padding_example,
            param_names=positional_names(signature),
            caller=_MICRO_VMAP,
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

    Within a microbatch, `fun` is vectorized over its examples and the per-example
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
    - `microbatch_size`: examples per microbatch; `None` vectorizes the whole batch at
        once (one microbatch).
    - `accumulator`: as in `microbatch`; default `Concat()`.
    - `num_real_microbatches`: run only the first this many microbatches.

    **Returns:**

    The vectorized, microbatched function.

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
    check_callable(fun, "fun", "micro_vmap")
    if microbatch_size is not None:
        microbatch_size = check_positive_int(
            microbatch_size, "microbatch_size", "micro_vmap"
        )
    if isinstance(out_axes, bool) or not isinstance(out_axes, StaticInt):
        raise TypeError(f"`micro_vmap` needs `out_axes` to be an int, got {out_axes!r}.")
    accumulator = flat_accumulators(accumulator)
    in_axes = tuple(in_axes) if isinstance(in_axes, list) else in_axes
    return _MicroVmapped(
        fun=fun,
        accumulator=accumulator,
        num_real_microbatches=num_real_microbatches,
        in_axes=in_axes,
        out_axes=int(out_axes),
        microbatch_size=microbatch_size,
    )
