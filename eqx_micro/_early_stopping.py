"""Early stopping: skipping the trailing microbatches that hold only padding.

A batch padded to a fixed size carries an `is_padding_example` mask. The microbatched
loop can stop after the last microbatch that holds a real example; to make that as early
as possible, place the real examples first and permute the batch with
`compute_early_stopping_order`, so that the column-major split fills whole microbatches
with real examples before any padding.
"""

from typing import Any

import jax
import jax.core
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Bool, Int

from ._arguments import check_positive_int, validate_padding_mask
from ._batch_axis import num_microbatches_for


def compute_early_stopping_order(
    batch_size: int, microbatch_size: int | None
) -> np.ndarray:
    """The permutation that makes each column-major microbatch a contiguous block.

    Microbatch `i` of `M` takes examples `i, i + M, i + 2M, ...` of the batch it is
    given. If `batch` holds its real examples first and its padding last, then
    `batch[order]` (with `order` returned here) puts examples `0 .. microbatch_size - 1`
    in microbatch 0, the next `microbatch_size` in microbatch 1, and so on, so the loop
    can stop right after the last real example.

    **Arguments:**

    - `batch_size`: the (padded) batch size.
    - `microbatch_size`: examples per microbatch; `None` gives the identity.

    **Returns:**

    An integer NumPy array, a permutation of `range(batch_size)`.

    !!! example

        ```python
        import eqx_micro as em

        order = em.compute_early_stopping_order(10, 2)
        assert order.tolist() == [0, 2, 4, 6, 8, 1, 3, 5, 7, 9]
        ```
    """
    if batch_size < 0:
        raise ValueError(
            f"`compute_early_stopping_order` got `batch_size={batch_size}`; it must be a "
            "non-negative number of examples."
        )
    if microbatch_size is None:
        return np.arange(batch_size)
    microbatch_size = check_positive_int(
        microbatch_size, "microbatch_size", "compute_early_stopping_order"
    )
    num_microbatches_for(
        batch_size, microbatch_size, "batch_size", "compute_early_stopping_order"
    )
    return np.arange(batch_size).reshape(-1, microbatch_size).T.reshape(-1)


def _real_per_microbatch(is_padding_example: Any, microbatch_size: int) -> Any:
    """`(M,)` booleans: does microbatch `i` hold at least one real example?"""
    batch_size = is_padding_example.shape[0]
    num_microbatches = batch_size // microbatch_size
    is_real = ~is_padding_example.reshape(microbatch_size, num_microbatches)
    return is_real.any(axis=0)


def count_real_microbatches(
    is_padding_example: Bool[ArrayLike, " batch"], microbatch_size: int | None
) -> Int[Array, ""]:
    """How many microbatches must run so that every real example is processed.

    That is one plus the index of the last microbatch (in the column-major split) that
    holds a real example, or 0 if every example is padding. Pass it as
    `num_real_microbatches`; `microbatch` and `micro_vmap` compute it themselves when
    the function takes an `is_padding_example` keyword. Works under `jax.jit`.

    **Arguments:**

    - `is_padding_example`: boolean vector, `True` for padding.
    - `microbatch_size`: examples per microbatch; `None` means one microbatch.

    **Returns:**

    An int32 scalar array.

    !!! example

        ```python
        import jax.numpy as jnp
        import eqx_micro as em

        mask = jnp.array([False, False, False, True, True, True])
        assert em.count_real_microbatches(mask, 3) == 2  # [0, 2, 4] and [1, 3, 5]
        order = em.compute_early_stopping_order(6, 3)
        assert em.count_real_microbatches(mask[order], 3) == 1
        ```
    """
    mask = validate_padding_mask(is_padding_example, None, "count_real_microbatches")
    batch_size = mask.shape[0]
    if microbatch_size is None:
        microbatch_size = max(batch_size, 1)
    microbatch_size = check_positive_int(
        microbatch_size, "microbatch_size", "count_real_microbatches"
    )
    num_microbatches = num_microbatches_for(
        batch_size, microbatch_size, "is_padding_example", "count_real_microbatches"
    )
    real = _real_per_microbatch(mask, microbatch_size)
    positions = jnp.arange(1, num_microbatches + 1, dtype=jnp.int32)
    return jnp.max(jnp.where(real, positions, 0), initial=0)


def verify_early_stopping_order(
    is_padding_example: Bool[ArrayLike, " batch"], microbatch_size: int | None
) -> bool:
    """Checks that padding is placed so that early stopping skips all it can.

    True when, in the column-major split, the microbatches are some full of real
    examples, then at most one mixed, then only padding: the loop then executes
    `ceil(num_real_examples / microbatch_size)` microbatches. Padding placed elsewhere is
    still correct (padded examples contribute nothing), just slower. Runs on the host:
    call it on concrete masks, not under `jax.jit`.

    **Arguments:**

    - `is_padding_example`: boolean vector, `True` for padding.
    - `microbatch_size`: examples per microbatch; `None` means one microbatch.

    **Returns:**

    A Python bool.

    !!! example

        ```python
        import numpy as np
        import eqx_micro as em

        mask = np.array([False, False, False, True, True, True])
        assert not em.verify_early_stopping_order(mask, 2)
        order = em.compute_early_stopping_order(6, 2)
        assert em.verify_early_stopping_order(mask[order], 2)
        ```
    """
    if isinstance(is_padding_example, jax.core.Tracer):
        raise TypeError(
            "`verify_early_stopping_order` runs on the host and needs a concrete mask; "
            "call it outside `jax.jit` (e.g. where the padded batch is built)."
        )
    mask = np.asarray(
        validate_padding_mask(is_padding_example, None, "verify_early_stopping_order")
    )
    batch_size = mask.shape[0]
    if microbatch_size is None or batch_size == 0:
        return True
    microbatch_size = check_positive_int(
        microbatch_size, "microbatch_size", "verify_early_stopping_order"
    )
    num_microbatches = num_microbatches_for(
        batch_size, microbatch_size, "is_padding_example", "verify_early_stopping_order"
    )
    real_counts = (~mask).reshape(microbatch_size, num_microbatches).sum(axis=0)
    not_full = real_counts != microbatch_size
    num_full = int(np.argmax(not_full)) if not_full.any() else num_microbatches
    rest = real_counts[num_full:]
    # After the full microbatches: at most one mixed one, then only padding.
    return bool((rest[1:] == 0).all())
