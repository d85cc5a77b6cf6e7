"""Splitting a batch axis into microbatches, column-major so that sharding is kept.

Microbatch `i` of `M` holds examples `i, i + M, i + 2M, ...`. Written as a row-major
reshape of the batch axis `B` into `(microbatch_size, M)`, microbatch `i` is the slice
`[:, i]`: if `B` is sharded over devices, the `microbatch_size` axis keeps that sharding
and every microbatch is spread over all devices, with no data movement.
"""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jaxtyping import Array, ArrayLike, PyTree

from ._arguments import check_positive_int


def num_microbatches_for(
    batch_size: int,
    microbatch_size: int,
    where: str,
    caller: str,
    pad: str = "pass `is_padding_example`",
) -> int:
    """The number of microbatches, or a clear error if the batch does not split; `pad`
    says how `caller` marks padding (`Caller.pad`)."""
    if batch_size % microbatch_size != 0:
        raise ValueError(
            f"`{caller}` got a batch of {batch_size} examples in `{where}`, not "
            f"divisible by `microbatch_size={microbatch_size}`. Pad the batch to a "
            f"multiple of {microbatch_size} and {pad}, or pick a `microbatch_size` "
            f"that divides {batch_size}."
        )
    return batch_size // microbatch_size


def _explicit_shards(x: Any, axis: int) -> int:
    """How many devices axis `axis` of `x` is split over under an explicit mesh."""
    try:
        sharding = jax.typeof(x).sharding
    except Exception:  # NumPy arrays and other non-JAX values carry no sharding type.
        return 1
    if not isinstance(sharding, jax.sharding.NamedSharding):
        return 1
    spec = tuple(sharding.spec) + (None,) * (len(x.shape) - len(sharding.spec))
    names = spec[axis]
    if names is None:
        return 1
    names = names if isinstance(names, tuple) else (names,)
    return int(np.prod([sharding.mesh.shape[name] for name in names]))


def split_batch_axis(x: ArrayLike, microbatch_size: int, axis: int) -> Array:
    """`(..., B, ...) -> (..., microbatch_size, B // microbatch_size, ...)`."""
    x = jnp.asarray(x)
    shards = _explicit_shards(x, axis)
    if microbatch_size % shards != 0:
        raise ValueError(
            f"The batch axis is sharded over {shards} devices, so `microbatch_size` "
            f"must be a multiple of {shards} to keep every microbatch sharded; got "
            f"`microbatch_size={microbatch_size}`."
        )
    batch_size = x.shape[axis]
    shape = (
        *x.shape[:axis],
        microbatch_size,
        batch_size // microbatch_size,
        *x.shape[axis + 1 :],
    )
    return jnp.reshape(x, shape)


def reshape_batch_axis(
    tree: PyTree[Any], microbatch_size: int, axis: int = 0
) -> PyTree[Any]:
    """Splits the batch axis of every array into `(num_microbatches, microbatch_size)`.

    The split is column-major: row `i` of the new axis holds examples
    `i, i + M, i + 2M, ...` where `M` is the number of microbatches. This is the order in
    which `microbatch`, `micro_vmap` and `micro_grad` visit examples; it keeps a batch
    that is sharded over devices sharded inside every microbatch (also under
    explicit-sharding meshes, where `microbatch_size` must then be a multiple of the
    number of shards). Non-array leaves are returned unchanged.

    **Arguments:**

    - `tree`: a PyTree whose array leaves all have the same size along `axis`.
    - `microbatch_size`: examples per microbatch; must divide the batch size.
    - `axis`: the batch axis.

    **Returns:**

    `tree` with each array of shape `(..., B, ...)` reshaped to
    `(..., B // microbatch_size, microbatch_size, ...)`.

    !!! example

        ```python
        import jax.numpy as jnp
        import eqx_micro as em

        split = em.reshape_batch_axis(jnp.arange(6), microbatch_size=2)
        assert split.tolist() == [[0, 3], [1, 4], [2, 5]]
        ```
    """
    microbatch_size = check_positive_int(
        microbatch_size, "microbatch_size", "reshape_batch_axis"
    )
    leaves = jtu.tree_flatten_with_path(tree)[0]
    sizes = {}
    for path, leaf in leaves:
        if eqx.is_array(leaf):
            if not -leaf.ndim <= axis < leaf.ndim:
                raise ValueError(
                    f"`reshape_batch_axis` got `axis={axis}` but `tree{jtu.keystr(path)}`"
                    f" has shape {leaf.shape}; pass an axis that every array has."
                )
            sizes[jtu.keystr(path)] = leaf.shape[axis]
    if len(set(sizes.values())) > 1:
        raise ValueError(
            "`reshape_batch_axis` needs every array to have the same batch size along "
            f"`axis={axis}`, got {sizes}."
        )
    for where, size in sizes.items():
        num_microbatches_for(size, microbatch_size, f"tree{where}", "reshape_batch_axis")

    def reshape(leaf):
        if not eqx.is_array(leaf):
            return leaf
        leaf_axis = axis % leaf.ndim
        split = split_batch_axis(leaf, microbatch_size, leaf_axis)
        return jnp.swapaxes(split, leaf_axis, leaf_axis + 1)

    return jtu.tree_map(reshape, tree)
