"""Accumulators: how the results of the microbatches are combined into one result.

An accumulator is matched to a subtree of a function's output (the accumulator tree is a
PyTree prefix of the output), and only ever sees the array leaves of that subtree; other
leaves arrive as `None` and are put back by the transform afterwards.
"""

import abc
import enum
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, PyTree

from ._backend import sum_leading_axis
from ._custom_types import DType, MicrobatchCount, MicrobatchIndex


class AbstractAccumulator(eqx.Module):
    """Combines the results of the microbatches of a function into one result.

    Subclass it to write your own accumulator; there is nothing to register. Each method
    receives the subtree of the function's output that the accumulator is matched to,
    holding only array leaves (non-array leaves are `None`, and `jax.tree.map` skips
    them).

    The transform calls, in order:

    1. `init(example, num_microbatches)` once, where `example` is a PyTree of
       `jax.ShapeDtypeStruct` describing one microbatch's result. It returns the loop
       carry.
    2. `update(carry, value, index)` for every executed microbatch, where `value` is that
       microbatch's result and `index` its (traced) integer position. It returns the new
       carry, with the same structure, shapes and dtypes as the one it got.
    3. `finalize(carry, num_microbatches, num_executed)` once, where `num_microbatches` is
       the static number of microbatches and `num_executed` the number that ran (an
       integer array when early stopping is decided at run time). It returns the result.

    `aggregate(values)` reduces a leading stacked axis to one value; `micro_vmap` applies
    it to the per-example results inside a microbatch before calling `update`.

    !!! example

        ```python
        import equinox as eqx
        import jax
        import jax.numpy as jnp
        import eqx_micro as em

        class MaxAbs(em.AbstractAccumulator):
            def init(self, example, num_microbatches):
                return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), example)

            def update(self, carry, value, index):
                return jax.tree.map(lambda c, v: jnp.maximum(c, jnp.abs(v)), carry, value)

            def finalize(self, carry, num_microbatches, num_executed):
                return carry

            def aggregate(self, values):
                return jax.tree.map(lambda v: jnp.max(jnp.abs(v), axis=0), values)

        f = em.micro_vmap(lambda x: x, microbatch_size=2, accumulator=MaxAbs())
        assert f(jnp.array([1.0, -5.0, 3.0, 2.0])) == 5.0
        ```
    """

    @abc.abstractmethod
    def init(self, example: PyTree[jax.ShapeDtypeStruct], num_microbatches: int) -> Any:
        """Returns the initial carry for results shaped like `example`."""

    @abc.abstractmethod
    def update(self, carry: Any, value: PyTree[Array], index: MicrobatchIndex) -> Any:
        """Folds the result `value` of microbatch `index` into `carry`."""

    @abc.abstractmethod
    def finalize(
        self, carry: Any, num_microbatches: int, num_executed: MicrobatchCount
    ) -> Any:
        """Turns the final carry into the result."""

    @abc.abstractmethod
    def aggregate(self, values: PyTree[Array]) -> PyTree[Array]:
        """Reduces the leading (stacked) axis of every leaf of `values`."""


def _carry_dtype(requested: DType, leaf: Any) -> Any:
    return leaf.dtype if requested is None else jnp.dtype(requested)


def _zeros(struct: jax.ShapeDtypeStruct, dtype: Any) -> Array:
    """Zeros shaped like `struct`, keeping an explicit sharding if there is one."""
    return jnp.zeros(struct.shape, dtype, out_sharding=_explicit_sharding(struct))


def _full(struct: jax.ShapeDtypeStruct, value: Any, dtype: Any) -> Array:
    return jnp.full(struct.shape, value, dtype, out_sharding=_explicit_sharding(struct))


def _explicit_sharding(struct: jax.ShapeDtypeStruct, insert_axis: int | None = None) -> Any:
    """The sharding a loop carry needs under an explicit-sharding mesh, else None.

    There the carry must have the same sharding type as the values folded into it;
    elsewhere (auto sharding, no mesh) XLA propagates shardings itself. `insert_axis`
    adds a replicated axis at that position (the per-microbatch slots of `Concat`).
    """
    sharding = struct.sharding
    if not isinstance(sharding, jax.sharding.NamedSharding) or not any(
        t == jax.sharding.AxisType.Explicit for t in sharding.mesh.axis_types
    ):
        return None
    if insert_axis is None:
        return sharding
    spec = list(sharding.spec) + [None] * (len(struct.shape) - len(sharding.spec))
    spec.insert(insert_axis, None)
    return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec))


def _mean_leading_axis(values: Array, dtype: Any) -> Array:
    total = sum_leading_axis(values, dtype)
    return total / jnp.asarray(values.shape[0], total.dtype)


def _require_inexact(name: str, example: Any, dtype: DType) -> None:
    for path, struct in jtu.tree_flatten_with_path(example)[0]:
        carry = _carry_dtype(dtype, struct)
        if not jnp.issubdtype(carry, jnp.inexact):
            raise ValueError(
                f"`{name}` needs floating-point values, but the output leaf "
                f"`{jtu.keystr(path) or 'output'}` has dtype {struct.dtype}. Return "
                f"floating-point values, or use `{name}(dtype=jnp.float32)` to "
                "accumulate them in float32, or use `Sum()`."
            )


class Sum(AbstractAccumulator):
    """Sums the results of the microbatches.

    **Arguments:**

    - `dtype`: the dtype of the running sum and of the result, e.g. `jnp.float32` to sum
        bfloat16 values in float32. `None` (default) keeps each leaf's own dtype.

    !!! example

        ```python
        import jax.numpy as jnp
        import eqx_micro as em

        f = em.microbatch(jnp.sum, argnums=0, microbatch_size=2, accumulator=em.Sum())
        assert f(jnp.arange(6.0)) == 15.0
        ```
    """

    dtype: DType = eqx.field(default=None, static=True)

    def init(self, example: PyTree[jax.ShapeDtypeStruct], num_microbatches: int) -> Any:
        return jtu.tree_map(lambda s: _zeros(s, _carry_dtype(self.dtype, s)), example)

    def update(self, carry: Any, value: PyTree[Array], index: MicrobatchIndex) -> Any:
        return jtu.tree_map(lambda c, v: c + v.astype(c.dtype), carry, value)

    def finalize(
        self, carry: Any, num_microbatches: int, num_executed: MicrobatchCount
    ) -> Any:
        return carry

    def aggregate(self, values: PyTree[Array]) -> PyTree[Array]:
        return jtu.tree_map(
            lambda v: sum_leading_axis(v, _carry_dtype(self.dtype, v)), values
        )


class Mean(AbstractAccumulator):
    """Averages the results over the static number of microbatches.

    Microbatches skipped by early stopping count as zeros: the sum of the executed
    results is divided by the total number of microbatches. This is the exact mean of a
    padded batch whose padding contributes zero; use `RunningMean` to average over the
    executed microbatches only. An empty batch (no microbatch at all) gives NaN, as
    `jnp.mean` of an empty array does: there is no mean to give.

    **Arguments:**

    - `dtype`: the dtype of the running sum and of the result. `None` keeps each leaf's
        own dtype, which must then be floating point.

    !!! example

        ```python
        import jax.numpy as jnp
        import eqx_micro as em

        f = em.microbatch(jnp.mean, argnums=0, microbatch_size=2, accumulator=em.Mean())
        assert f(jnp.arange(6.0)) == 2.5
        ```
    """

    dtype: DType = eqx.field(default=None, static=True)

    def init(self, example: PyTree[jax.ShapeDtypeStruct], num_microbatches: int) -> Any:
        _require_inexact("Mean", example, self.dtype)
        return jtu.tree_map(lambda s: _zeros(s, _carry_dtype(self.dtype, s)), example)

    def update(self, carry: Any, value: PyTree[Array], index: MicrobatchIndex) -> Any:
        return jtu.tree_map(lambda c, v: c + v.astype(c.dtype), carry, value)

    def finalize(
        self, carry: Any, num_microbatches: int, num_executed: MicrobatchCount
    ) -> Any:
        # 0 / 0 is NaN: the mean of an empty batch is undefined, as with `jnp.mean`.
        return jtu.tree_map(lambda c: c / jnp.asarray(num_microbatches, c.dtype), carry)

    def aggregate(self, values: PyTree[Array]) -> PyTree[Array]:
        return jtu.tree_map(
            lambda v: _mean_leading_axis(v, _carry_dtype(self.dtype, v)), values
        )


class RunningMean(AbstractAccumulator):
    """Averages the results over the microbatches actually executed.

    The carry is updated as `mean += (value - mean) / (index + 1)`, which stays accurate
    for many microbatches. Under early stopping it averages the executed microbatches
    only; with no microbatch executed the result is NaN.

    **Arguments:**

    - `dtype`: the dtype of the running mean and of the result. `None` keeps each leaf's
        own dtype, which must then be floating point.

    !!! example

        ```python
        import jax.numpy as jnp
        import eqx_micro as em

        f = em.microbatch(
            jnp.mean, argnums=0, microbatch_size=2, accumulator=em.RunningMean(),
            num_real_microbatches=2,
        )
        # Microbatches are [0, 3], [1, 4], [2, 5] (column-major); the last is skipped.
        assert f(jnp.arange(6.0)) == 2.0  # mean(1.5, 2.5)
        ```
    """

    dtype: DType = eqx.field(default=None, static=True)

    def init(self, example: PyTree[jax.ShapeDtypeStruct], num_microbatches: int) -> Any:
        _require_inexact("RunningMean", example, self.dtype)
        return jtu.tree_map(lambda s: _zeros(s, _carry_dtype(self.dtype, s)), example)

    def update(self, carry: Any, value: PyTree[Array], index: MicrobatchIndex) -> Any:
        def step(c, v):
            count = jnp.asarray(index, c.dtype) + 1
            return c + (v.astype(c.dtype) - c) / count

        return jtu.tree_map(step, carry, value)

    def finalize(
        self, carry: Any, num_microbatches: int, num_executed: MicrobatchCount
    ) -> Any:
        return jtu.tree_map(
            lambda c: jnp.where(jnp.asarray(num_executed) > 0, c, jnp.nan), carry
        )

    def aggregate(self, values: PyTree[Array]) -> PyTree[Array]:
        return jtu.tree_map(
            lambda v: _mean_leading_axis(v, _carry_dtype(self.dtype, v)), values
        )


class Concat(AbstractAccumulator):
    """Concatenates per-example results back into the original example order.

    Every output leaf must have a leading batch axis (the microbatch's examples). The
    result has the full batch on that axis, in the order of the input batch, whatever the
    column-major split. Slots of microbatches skipped by early stopping are zeros.

    !!! example

        ```python
        import jax.numpy as jnp
        import eqx_micro as em

        f = em.microbatch(lambda x: x**2, argnums=0, microbatch_size=2,
                          accumulator=em.Concat())
        assert (f(jnp.arange(6.0)) == jnp.arange(6.0) ** 2).all()
        ```
    """

    def init(self, example: PyTree[jax.ShapeDtypeStruct], num_microbatches: int) -> Any:
        def init_leaf(path, struct):
            if len(struct.shape) == 0:
                raise ValueError(
                    "`Concat` needs a leading batch axis on every output leaf it "
                    f"accumulates, but `{jtu.keystr(path) or 'output'}` is a scalar. "
                    "Return per-example values, or accumulate this leaf with `Sum()`, "
                    "`Mean()` or another reducing accumulator."
                )
            # Carry layout (examples per microbatch, microbatches, ...): flattening it
            # row-major gives back the original order of the column-major split.
            shape = (struct.shape[0], num_microbatches, *struct.shape[1:])
            sharding = _explicit_sharding(struct, insert_axis=1)
            return jnp.zeros(shape, struct.dtype, out_sharding=sharding)

        return jtu.tree_map_with_path(init_leaf, example)

    def update(self, carry: Any, value: PyTree[Array], index: MicrobatchIndex) -> Any:
        return jtu.tree_map(
            lambda c, v: jax.lax.dynamic_update_index_in_dim(
                c, v.astype(c.dtype), index, axis=1
            ),
            carry,
            value,
        )

    def finalize(
        self, carry: Any, num_microbatches: int, num_executed: MicrobatchCount
    ) -> Any:
        return jtu.tree_map(
            lambda c: c.reshape(c.shape[0] * c.shape[1], *c.shape[2:]), carry
        )

    def aggregate(self, values: PyTree[Array]) -> PyTree[Array]:
        return values


def _lowest(dtype: Any) -> Any:
    if jnp.issubdtype(dtype, jnp.inexact):
        return -jnp.inf
    if jnp.issubdtype(dtype, jnp.integer):
        return jnp.iinfo(dtype).min
    return False


def _highest(dtype: Any) -> Any:
    if jnp.issubdtype(dtype, jnp.inexact):
        return jnp.inf
    if jnp.issubdtype(dtype, jnp.integer):
        return jnp.iinfo(dtype).max
    return True


class Max(AbstractAccumulator):
    """Elementwise maximum over the microbatches (`-inf` if none was executed).

    !!! example

        ```python
        import jax.numpy as jnp
        import eqx_micro as em

        f = em.micro_vmap(lambda x: x, microbatch_size=2, accumulator=em.Max())
        assert f(jnp.array([1.0, 7.0, -3.0, 2.0])) == 7.0
        ```
    """

    def init(self, example: PyTree[jax.ShapeDtypeStruct], num_microbatches: int) -> Any:
        return jtu.tree_map(lambda s: _full(s, _lowest(s.dtype), s.dtype), example)

    def update(self, carry: Any, value: PyTree[Array], index: MicrobatchIndex) -> Any:
        return jtu.tree_map(jnp.maximum, carry, value)

    def finalize(
        self, carry: Any, num_microbatches: int, num_executed: MicrobatchCount
    ) -> Any:
        return carry

    def aggregate(self, values: PyTree[Array]) -> PyTree[Array]:
        return jtu.tree_map(lambda v: jnp.max(v, axis=0), values)


class Min(AbstractAccumulator):
    """Elementwise minimum over the microbatches (`+inf` if none was executed).

    !!! example

        ```python
        import jax.numpy as jnp
        import eqx_micro as em

        f = em.micro_vmap(lambda x: x, microbatch_size=2, accumulator=em.Min())
        assert f(jnp.array([1.0, 7.0, -3.0, 2.0])) == -3.0
        ```
    """

    def init(self, example: PyTree[jax.ShapeDtypeStruct], num_microbatches: int) -> Any:
        return jtu.tree_map(lambda s: _full(s, _highest(s.dtype), s.dtype), example)

    def update(self, carry: Any, value: PyTree[Array], index: MicrobatchIndex) -> Any:
        return jtu.tree_map(jnp.minimum, carry, value)

    def finalize(
        self, carry: Any, num_microbatches: int, num_executed: MicrobatchCount
    ) -> Any:
        return carry

    def aggregate(self, values: PyTree[Array]) -> PyTree[Array]:
        return jtu.tree_map(lambda v: jnp.min(v, axis=0), values)


class AccumulationType(enum.Enum):
    """The accumulation kinds of `optax.microbatching`, accepted wherever an accumulator is.

    `SUM`, `MEAN`, `RUNNING_MEAN` and `CONCAT` stand for `Sum()`, `Mean()`,
    `RunningMean()` and `Concat()`; `optax.microbatching.AccumulationType` members are
    accepted too, so optax code ports by changing the import.

    !!! example

        ```python
        import jax.numpy as jnp
        import eqx_micro as em

        f = em.microbatch(jnp.mean, 0, 2, accumulator=em.AccumulationType.MEAN)
        assert f(jnp.arange(4.0)) == 1.5
        ```
    """

    SUM = "sum"
    MEAN = "mean"
    RUNNING_MEAN = "running_mean"
    CONCAT = "concat"


# What the transforms accept as `accumulator`: also `optax.microbatching`'s enum.
AccumulatorTree = PyTree[AbstractAccumulator | enum.Enum]

_BY_NAME = {
    "SUM": Sum,
    "MEAN": Mean,
    "RUNNING_MEAN": RunningMean,
    "CONCAT": Concat,
}


def _is_accumulator_leaf(x: Any) -> bool:
    return isinstance(x, AbstractAccumulator | enum.Enum)


def canonicalize_accumulators(accumulator: Any, argument: str) -> Any:
    """Replaces enum members by accumulator modules, rejecting anything else."""

    def canonicalize(path, leaf):
        if isinstance(leaf, AbstractAccumulator):
            return leaf
        if isinstance(leaf, enum.Enum) and leaf.name in _BY_NAME:
            # Our `AccumulationType` or `optax.microbatching.AccumulationType`.
            return _BY_NAME[leaf.name]()
        raise TypeError(
            f"`{argument}` must be an accumulator (e.g. `eqx_micro.Sum()`), an "
            "`AccumulationType`, or a PyTree prefix of the output with those at its "
            f"leaves; found {leaf!r} of type {type(leaf).__name__} at "
            f"`{argument}{jtu.keystr(path)}`."
        )

    return jtu.tree_map_with_path(canonicalize, accumulator, is_leaf=_is_accumulator_leaf)


def is_accumulator(x: Any) -> bool:
    return isinstance(x, AbstractAccumulator)


def map_accumulators(fn: Any, accumulators: Any, *trees: Any, argument: str) -> Any:
    """`jax.tree.map(fn, accumulators, *trees)`, where `accumulators` is a prefix."""
    try:
        return jtu.tree_map(fn, accumulators, *trees, is_leaf=is_accumulator)
    except ValueError as error:
        if "prefix" not in str(error) and "structure" not in str(error).lower():
            raise
        raise ValueError(
            f"`{argument}` does not match the function's output: it must be one "
            "accumulator or a PyTree prefix of the output with an accumulator at each "
            f"leaf.\n  {argument}: {jtu.tree_structure(accumulators, is_accumulator)}"
            f"\n  output:    {jtu.tree_structure(trees[0])}\nPass a single "
            f"accumulator, or give `{argument}` the output's container types and keys."
        ) from None
