"""Padding batches of indices to a few fixed sizes, and gathering them from a dataset."""

from typing import Any

import equinox as eqx
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jaxtyping import Bool, Int, PyTree

from ... import compute_early_stopping_order
from ._base import check_int


def _check_padding_args(
    caller: str, size_name: str, size: Any, microbatch_size: int | None
) -> None:
    check_int(caller, size_name, size, 1)
    if microbatch_size is not None:
        check_int(caller, "microbatch_size", microbatch_size, 1)
        if size % microbatch_size != 0:
            raise ValueError(
                f"`{caller}` got `microbatch_size={microbatch_size}`, which does not "
                f"divide `{size_name}={size}`; pick a `{size_name}` that is a multiple "
                "of the microbatch size."
            )


def _check_indices(indices: Any, caller: str, ndims: tuple[int, ...]) -> np.ndarray:
    indices = np.asarray(indices)
    if indices.ndim not in ndims:
        wanted = " or ".join(f"{n}-D" for n in ndims)
        raise ValueError(
            f"`{caller}` needs `indices` to be {wanted}, got shape {indices.shape}."
        )
    if not np.issubdtype(indices.dtype, np.signedinteger):
        raise TypeError(
            f"`{caller}` needs `indices` of a signed integer dtype (padding is -1), got "
            f"{indices.dtype}; convert with `indices.astype(np.int32)`."
        )
    if indices.size and indices.min() < 0:
        raise ValueError(
            f"`{caller}` got a negative index ({indices.min()}) in `indices`; pass the "
            "real example indices only (it adds the `-1` padding itself)."
        )
    return indices


def pad_to_multiple_of(
    indices: Int[np.ndarray, "..."], multiple: int, microbatch_size: int | None = None
) -> Int[np.ndarray, " padded"]:
    """Pads a batch of indices with `-1` to a multiple of a size, padding last.

    A Poisson-sampled batch has a random size; padding it to a multiple of a fixed size
    keeps the number of distinct shapes (and so compilations) small. An empty batch stays
    empty. With `microbatch_size`, the result is permuted by
    [`em.compute_early_stopping_order`][eqx_micro.compute_early_stopping_order], so that in
    the column-major microbatch split the real examples fill the first microbatches and the
    padding lands in the last ones, which early stopping then skips.

    **Arguments:**

    - `indices`: a 1-D signed integer array of example indices (no `-1`).
    - `multiple`: a positive int; the length is rounded up to a multiple of it.
    - `microbatch_size`: the microbatch size the padded batch will be split with, a
      divisor of `multiple`; None for no reordering.

    **Returns:**

    A 1-D array of the dtype of `indices`, `-1` marking padding.

    !!! example

        ```python
        import numpy as np
        import eqx_micro.dp as dp

        padded = dp.pad_to_multiple_of(np.arange(10), 4)
        assert padded.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, -1, -1]
        padded = dp.pad_to_multiple_of(np.arange(10), 12, microbatch_size=3)
        # Microbatch j is padded[j::4]: [0, 1, 2], [3, 4, 5], [6, 7, 8], [9, -1, -1].
        assert padded.tolist() == [0, 3, 6, 9, 1, 4, 7, -1, 2, 5, 8, -1]
        ```
    """
    caller = "pad_to_multiple_of"
    _check_padding_args(caller, "multiple", multiple, microbatch_size)
    indices = _check_indices(indices, caller, (1,))
    size = indices.shape[0]
    padded = np.full(-(-size // multiple) * multiple, -1, indices.dtype)
    padded[:size] = indices
    return padded[compute_early_stopping_order(padded.shape[0], microbatch_size)]


def split_and_pad_global_batch(
    indices: Int[np.ndarray, "..."], minibatch_size: int, microbatch_size: int | None = None
) -> list[Int[np.ndarray, "..."]]:
    """Splits a batch of indices into minibatches of one fixed size, padding the last.

    A large (e.g. Poisson-sampled) batch is processed as `ceil(len / minibatch_size)`
    minibatches of exactly `minibatch_size` rows, each one call of the same compiled
    gradient step, accumulated before the noisy update. Only the last minibatch holds
    padding (`-1`), and never only padding: except for an empty batch, which gives one
    minibatch of padding, so that the step (and its noise) still runs. With
    `microbatch_size`, the last minibatch is reordered as in `pad_to_multiple_of`, so
    early stopping skips its padding. For user-level batches (2-D, one row per user),
    whole rows are padded.

    **Arguments:**

    - `indices`: a 1-D array of example indices, or a 2-D one of shape
      `(users, examples_per_user)` from `UserLevelSampling`; signed integers, no
      `-1`.
    - `minibatch_size`: rows per minibatch, a positive int.
    - `microbatch_size`: the microbatch size each minibatch will be split with, a
      divisor of `minibatch_size`; None for no reordering.

    **Returns:**

    A list of arrays of shape `(minibatch_size, *indices.shape[1:])`, of the dtype of
    `indices`.

    !!! example

        ```python
        import numpy as np
        import eqx_micro.dp as dp

        parts = dp.split_and_pad_global_batch(np.arange(10), 4)
        assert [p.tolist() for p in parts] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, -1, -1]]
        parts = dp.split_and_pad_global_batch(np.arange(10), 4, microbatch_size=2)
        assert parts[-1].tolist() == [8, -1, 9, -1]
        ```
    """
    caller = "split_and_pad_global_batch"
    _check_padding_args(caller, "minibatch_size", minibatch_size, microbatch_size)
    indices = _check_indices(indices, caller, (1, 2))
    size = indices.shape[0]
    num_full = size // minibatch_size
    minibatches = [
        indices[start : start + minibatch_size].copy()
        for start in range(0, num_full * minibatch_size, minibatch_size)
    ]
    if size % minibatch_size or size == 0:
        last = np.full((minibatch_size, *indices.shape[1:]), -1, indices.dtype)
        rest = indices[num_full * minibatch_size :]
        last[: rest.shape[0]] = rest
        minibatches.append(
            last[compute_early_stopping_order(minibatch_size, microbatch_size)]
        )
    return minibatches


def _gather_leaf(
    path: Any, leaf: Any, safe: np.ndarray, is_padding: np.ndarray, num_rows: int | None
) -> Any:
    if not eqx.is_array(leaf):
        return leaf
    where = f"data{jtu.keystr(path)}"
    if np.ndim(leaf) == 0:
        raise ValueError(
            f"`gather_padded_batch` found a 0-d array in `{where}`; every array leaf of "
            "`data` needs a leading axis of examples (keep scalars as Python numbers to "
            "pass them through)."
        )
    if leaf.shape[0] != num_rows:
        raise ValueError(
            "`gather_padded_batch` needs every array leaf of `data` to have the same "
            f"number of examples (leading axis); got {num_rows} and {leaf.shape[0]} "
            f"in `{where}`."
        )
    mask = is_padding.reshape(is_padding.shape + (1,) * (leaf.ndim - 1))
    if isinstance(leaf, np.ndarray):
        if leaf.shape[0] == 0:  # Only padding can be gathered from no rows.
            return np.zeros(safe.shape + leaf.shape[1:], leaf.dtype)
        rows = leaf[safe]
        return np.where(mask, np.zeros((), leaf.dtype), rows)
    if leaf.shape[0] == 0:
        return jnp.zeros(safe.shape + leaf.shape[1:], leaf.dtype)
    rows = leaf[jnp.asarray(safe)]
    return jnp.where(jnp.asarray(mask), jnp.zeros((), leaf.dtype), rows)


def gather_padded_batch(
    data: PyTree, indices: Int[np.ndarray, "..."]
) -> tuple[PyTree, Bool[np.ndarray, " batch"]]:
    """Gathers a fixed-size batch from a dataset by indices, `-1` giving zero rows.

    Every array leaf of `data` (NumPy or JAX, examples along axis 0) is indexed with
    `indices`; rows at index `-1` are filled with zeros (never row `-1` of the data), so
    a padded batch has a fixed shape and a jitted step never recompiles for a new batch
    size. Non-array leaves (strings, callables, Python numbers) pass through. Call it on
    the host, where the indices are concrete; NumPy leaves give NumPy arrays and JAX
    leaves JAX arrays.

    For user-level indices of shape `(users, k)` (from `UserLevelSampling`, padded
    by `split_and_pad_global_batch`), each leaf becomes `(users, k, ...)` and a user row
    is padding when all its indices are `-1`; a row mixing `-1` with real indices is an
    error.

    **Arguments:**

    - `data`: a PyTree whose array leaves share their leading axis (the examples).
    - `indices`: a 1-D (examples) or 2-D (users, examples per user) signed integer array
      of indices in `[-1, num_examples)`.

    **Returns:**

    `(batch, is_padding_example)`: `data` with every array leaf gathered, and a NumPy
    bool vector with one flag per row (`indices == -1`, or per user row for 2-D
    indices), to pass as `is_padding_example`.

    !!! example

        ```python
        import jax.numpy as jnp
        import numpy as np
        import eqx_micro.dp as dp

        data = {"x": jnp.arange(1.0, 6.0), "name": "train"}
        indices = dp.pad_to_multiple_of(np.array([4, 0, 2]), 4)
        batch, is_padding = dp.gather_padded_batch(data, indices)
        assert batch["x"].tolist() == [5.0, 1.0, 3.0, 0.0]
        assert is_padding.tolist() == [False, False, False, True]
        assert batch["name"] == "train"
        ```

        A training loop: random-size batches, fixed-size minibatches.

        ```python
        import numpy as np
        import eqx_micro.dp as dp

        data = {"x": np.ones((1000, 8), np.float32)}
        strategy = dp.PoissonSampling(sampling_prob=0.05, iterations=3)
        for indices in strategy.batch_iterator(len(data["x"]), rng=1234):
            for minibatch in dp.split_and_pad_global_batch(indices, 32, microbatch_size=8):
                batch, is_padding = dp.gather_padded_batch(data, minibatch)
                assert batch["x"].shape == (32, 8) and is_padding.shape == (32,)
                # ... accumulate clipped gradients, passing `is_padding_example`.
        ```
    """
    caller = "gather_padded_batch"
    indices = np.asarray(indices)
    if indices.ndim not in (1, 2):
        raise ValueError(
            f"`{caller}` needs `indices` to be 1-D (examples) or 2-D (users, examples "
            f"per user), got shape {indices.shape}."
        )
    if not np.issubdtype(indices.dtype, np.signedinteger):
        raise TypeError(
            f"`{caller}` needs `indices` of a signed integer dtype (padding is -1), got "
            f"{indices.dtype}; convert with `indices.astype(np.int32)`."
        )
    is_padding = indices == -1
    if indices.ndim == 2:
        row_is_padding = is_padding.all(axis=1)
        mixed = is_padding.any(axis=1) & ~row_is_padding
        if mixed.any():
            raise ValueError(
                f"`{caller}` got user row {int(np.argmax(mixed))} of `indices` mixing "
                "`-1` with real indices; a user is either real or padding as a whole. "
                "Pad whole rows (see `split_and_pad_global_batch`)."
            )
    else:
        row_is_padding = is_padding
    leaves = [leaf for leaf in jtu.tree_leaves(data) if eqx.is_array(leaf)]
    if not leaves:
        raise ValueError(
            f"`{caller}` needs `data` to hold arrays with the examples along axis 0 "
            "(NumPy or JAX, e.g. `{'x': images, 'y': labels}`); it has no array leaf "
            f"(a list of numbers is not an array: use `np.asarray`). Got {data!r:.80}."
        )
    num_rows = np.shape(leaves[0])[0] if np.ndim(leaves[0]) else None
    if indices.size and num_rows is not None:
        low, high = int(indices.min()), int(indices.max())
        if low < -1 or high >= num_rows:
            bad = low if low < -1 else high
            raise ValueError(
                f"`{caller}` got the index {bad} for data of {num_rows} examples; "
                f"indices must be in [0, {num_rows}), or -1 for padding."
            )
    safe = np.where(is_padding, 0, indices)
    batch = jtu.tree_map_with_path(
        lambda path, leaf: _gather_leaf(path, leaf, safe, is_padding, num_rows), data
    )
    return batch, row_is_padding
