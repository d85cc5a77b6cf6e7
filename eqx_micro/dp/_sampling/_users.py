"""User-level sampling: a batch selection strategy picks users, each gives examples."""

from collections.abc import Iterator

import equinox as eqx
import numpy as np

from ._base import (
    AbstractBatchSelectionStrategy,
    as_generator,
    check_int,
    index_dtype,
    RngLike,
)


class UserLevelSampling(eqx.Module):
    """User-level batch selection: a base strategy picks users, not examples.

    Not itself a
    [`dp.AbstractBatchSelectionStrategy`][eqx_micro.dp.AbstractBatchSelectionStrategy]: its
    batches are 2-D (users by examples) and drawn from the users' ids, not from a number of
    examples. `dp.UserSelectionStrategy` is the same
    class under jax_privacy's name.

    The base strategy samples from the users (the distinct values of `user_ids`); each
    selected user then contributes `examples_per_user_per_batch` of their own examples,
    taken in turn from a per-user cycle: a user owning examples `[0, 5, 10]` gives
    `0, 5, 10, 0, 5, 10, ...` over the steps they are selected in (repeating within a
    row if they own fewer examples than a row holds). With `shuffle_per_user`, each
    user's examples are shuffled once before cycling.

    Each batch is a 2-D array `(users_in_batch, examples_per_user_per_batch)`, one row
    per user. For user-level DP, clip per user, not per example: pass the gathered
    `(users, k, ...)` batch to `dp.clipped_grad(..., keep_batch_dim=False)`, so that each
    row (a user's examples) is one clipped unit; pad with `split_and_pad_global_batch`
    (whole rows of `-1`) and gather with `gather_padded_batch`. The same batches as
    `jax_privacy.batch_selection.UserSelectionStrategy` for the same generator.

    **Arguments:**

    - `base_strategy`: an `AbstractBatchSelectionStrategy` applied to the users.
    - `examples_per_user_per_batch`: examples per user per batch (columns), `>= 1`.
    - `shuffle_per_user`: shuffle each user's examples once before cycling through them.

    !!! example

        ```python
        import numpy as np
        import eqx_micro.dp as dp

        strategy = dp.UserLevelSampling(
            dp.CyclicPoissonSampling(1.0, iterations=2), examples_per_user_per_batch=2
        )
        user_ids = np.array([0, 0, 0, 1, 1, 2])  # user 0 owns examples 0, 1, 2
        first, second = strategy.batch_iterator(user_ids, rng=np.random.default_rng(0))
        assert first.tolist() == [[5, 5], [0, 1], [3, 4]]
        assert second.tolist() == [[5, 5], [2, 0], [3, 4]]
        ```
    """

    base_strategy: AbstractBatchSelectionStrategy
    examples_per_user_per_batch: int = eqx.field(static=True, default=1)
    shuffle_per_user: bool = eqx.field(static=True, default=False)

    def __check_init__(self):
        if not isinstance(self.base_strategy, AbstractBatchSelectionStrategy):
            raise TypeError(
                "`UserLevelSampling` needs `base_strategy` to be a "
                "`dp.AbstractBatchSelectionStrategy` (e.g. `dp.PoissonSampling(...)`), "
                f"got {type(self.base_strategy).__name__}."
            )
        check_int(
            "UserLevelSampling",
            "examples_per_user_per_batch",
            self.examples_per_user_per_batch,
            1,
        )

    def batch_iterator(self, user_ids: np.ndarray, rng: RngLike) -> Iterator[np.ndarray]:
        """The batches of example indices, one row per selected user.

        **Arguments:**

        - `user_ids`: a 1-D array with the user of each example (any values
          `np.unique` can sort, e.g. ints or strings).
        - `rng`: an int seed or a `np.random.Generator`; the per-user shuffles and the
          base strategy both draw from it.

        **Returns:**

        An iterator of int32 arrays of shape `(users_in_batch, k)`, with
        `k = examples_per_user_per_batch`; every row holds examples of one user.

        !!! example

            ```python
            import numpy as np
            import eqx_micro.dp as dp

            strategy = dp.UserLevelSampling(dp.PoissonSampling(0.5, 3), 4)
            user_ids = np.array(["ann", "bob", "ann", "cy"])
            for batch in strategy.batch_iterator(user_ids, rng=0):
                assert batch.shape[1] == 4
                assert all(len(set(user_ids[row])) == 1 for row in batch)
            ```
        """
        user_ids = np.asarray(user_ids)
        if user_ids.ndim != 1:
            raise ValueError(
                "`UserLevelSampling.batch_iterator` needs `user_ids` to be 1-D (the "
                f"user of each example), got shape {user_ids.shape}."
            )
        generator = as_generator(rng, "batch_iterator")
        return self._batches(user_ids, generator)

    def _batches(
        self, user_ids: np.ndarray, rng: np.random.Generator
    ) -> Iterator[np.ndarray]:
        dtype = index_dtype(user_ids.size)
        width = self.examples_per_user_per_batch
        _, user_of_example = np.unique(user_ids, return_inverse=True)
        user_of_example = user_of_example.reshape(-1)
        num_users = int(user_of_example.max(initial=-1)) + 1
        # `owned[starts[u] : starts[u] + counts[u]]` are user `u`'s examples, in order.
        owned = np.argsort(user_of_example, kind="stable").astype(dtype)
        counts = np.bincount(user_of_example, minlength=num_users)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        if self.shuffle_per_user:
            for start, count in zip(starts, counts):
                rng.shuffle(owned[start : start + count])
        cursors = np.zeros(num_users, np.int64)  # Next position in each user's cycle.
        for users in self.base_strategy.batch_iterator(num_users, rng):
            users = np.asarray(users, np.int64)
            # A user drawn twice in one batch (sampling with replacement) continues
            # their cycle in the second row.
            occurrence = _occurrence_rank(users)
            first = cursors[users] + occurrence * width
            positions = (first[:, None] + np.arange(width)) % counts[users][:, None]
            yield owned[starts[users][:, None] + positions].reshape(-1, width)
            np.add.at(cursors, users, width)
            cursors %= np.maximum(counts, 1)


def _occurrence_rank(values: np.ndarray) -> np.ndarray:
    """`rank[j]` = how many times `values[j]` occurs in `values[:j]`."""
    order = np.argsort(values, kind="stable")
    sorted_values = values[order]
    positions = np.arange(values.size)
    is_first = np.ones(values.size, bool)
    is_first[1:] = sorted_values[1:] != sorted_values[:-1]
    run_start = np.maximum.accumulate(np.where(is_first, positions, 0))
    rank = np.empty(values.size, np.int64)
    rank[order] = positions - run_start
    return rank


# jax_privacy's name for it.
UserSelectionStrategy = UserLevelSampling
