"""Batch selection for DP training: which examples (or users) join each step.

The strategies here run on the host with NumPy and yield index arrays; the data itself
is gathered with `gather_padded_batch`. Which examples join which step is part of the
privacy mechanism, so three rules hold throughout:

- The dataset size and the random generator are call arguments of `batch_iterator`,
  never fields: both may be private, while a strategy's configuration is public.
- The generator must be given explicitly, as a `np.random.Generator` or an int seed.
  There is no default (no hidden, unreproducible entropy); keep the seed secret.
- Variable-size batches are padded to a fixed size with the index `-1`, so that a jitted
  step sees one shape and never recompiles; padded rows are zero-filled and flagged by
  `is_padding_example = indices == -1`.

Index arrays are int32 (int64 for datasets of 2**31 examples or more): signed, so they
hold the padding index `-1`, and JAX's default integer type, so they go to the device
as they are. (jax_privacy uses the smallest signed type, e.g. int8 for 100 examples.)
"""

import abc
import enum
from collections.abc import Iterator
from typing import Any

import equinox as eqx
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jaxtyping import Bool, Int, PyTree

from .._early_stopping import compute_early_stopping_order


# A seed or a generator; `None` (fresh OS entropy) is refused on purpose.
RngLike = np.random.Generator | int | np.integer


def _index_dtype(num_examples: int) -> np.dtype:
    """int32, or int64 when int32 cannot hold both -1 and `num_examples`."""
    return np.result_type(np.min_scalar_type(-num_examples - 1), np.int32)


def _as_generator(rng: Any, caller: str) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    if isinstance(rng, int | np.integer) and not isinstance(rng, bool):
        if rng < 0:
            raise ValueError(
                f"`{caller}` got the seed `rng={rng}`; a seed must be a non-negative int."
            )
        return np.random.default_rng(int(rng))
    if rng is None:
        raise TypeError(
            f"`{caller}` needs an explicit `rng`, got None. Batch selection is part of "
            "the privacy mechanism and must be reproducible: pass an int seed (kept "
            "secret) or a `np.random.Generator`, e.g. `rng=np.random.default_rng(seed)`."
        )
    raise TypeError(
        f"`{caller}` needs `rng` to be an int seed or a `np.random.Generator`, got "
        f"{type(rng).__name__}. (A JAX key does not work here: batch selection runs "
        "on the host with NumPy.)"
    )


def _check_int(owner: str, name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(
            f"`{owner}` needs `{name}` to be an int, got {value!r} of type "
            f"{type(value).__name__}."
        )
    if value < minimum:
        meaning = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise ValueError(f"`{owner}` got `{name}={value}`; it must be {meaning}.")


def _check_num_examples(num_examples: Any, caller: str) -> int:
    _check_int(caller, "num_examples", num_examples, 0)
    return int(num_examples)


def _check_sampling_prob(owner: str, sampling_prob: float) -> None:
    if not 0 <= sampling_prob <= 1:
        raise ValueError(
            f"`{owner}` got `sampling_prob={sampling_prob}`; it must be a probability "
            "in [0, 1] (the chance that an eligible example joins a batch)."
        )


def _check_truncated_batch_size(owner: str, truncated_batch_size: int | None) -> None:
    if truncated_batch_size is not None:
        _check_int(owner, "truncated_batch_size", truncated_batch_size, 0)


class PartitionType(enum.Enum):
    """How `CyclicPoissonSampling` splits the examples into `cycle_length` groups.

    - `EQUAL_SPLIT`: shuffle, then cut into groups of exactly
      `num_examples // cycle_length` examples; the `num_examples % cycle_length` left
      over are never sampled. The group size depends on the dataset size, so this suits
      the replace-one and zero-out neighbouring relations (a public dataset size).
    - `INDEPENDENT`: every example picks its group uniformly at random, independently of
      the others (group sizes are multinomial). This suits add-or-remove-one.

    !!! example

        ```python
        import numpy as np
        import eqx_micro.dp as dp

        strategy = dp.CyclicPoissonSampling(
            1.0, 2, cycle_length=2, partition_type=dp.PartitionType.INDEPENDENT
        )
        first, second = strategy.batch_iterator(10, rng=0)
        assert sorted([*first, *second]) == list(range(10))
        ```
    """

    INDEPENDENT = enum.auto()
    EQUAL_SPLIT = enum.auto()


def _independent_partition(
    num_examples: int, num_groups: int, rng: np.random.Generator, dtype: np.dtype
) -> list[np.ndarray]:
    sizes = rng.multinomial(num_examples, np.full(num_groups, 1 / num_groups))
    shuffled = rng.permutation(num_examples).astype(dtype)
    return np.split(shuffled, np.cumsum(sizes)[:-1])


def _equal_split_partition(
    num_examples: int, num_groups: int, rng: np.random.Generator, dtype: np.dtype
) -> list[np.ndarray]:
    shuffled = rng.permutation(num_examples).astype(dtype)
    group_size = num_examples // num_groups
    # Cut into near-equal chunks, then drop the extra example of the larger ones.
    return [chunk[:group_size] for chunk in np.array_split(shuffled, num_groups)]


class AbstractBatchSelectionStrategy(eqx.Module):
    """A rule for which examples join each training step.

    To write your own, subclass it with your configuration as fields and implement
    `batch_iterator`. Configuration is public (it enters the privacy accounting); the
    dataset size and the generator are call arguments, as both may be private.

    **Methods:**

    - `batch_iterator(num_examples, rng)` receives the number of examples `n` and an
      int seed or `np.random.Generator`, and returns an iterator of 1-D signed integer
      arrays of example indices in `[0, n)`, one array per step; sizes may vary.

    !!! example

        ```python
        import numpy as np
        import eqx_micro.dp as dp

        class EveryExample(dp.AbstractBatchSelectionStrategy):
            iterations: int

            def batch_iterator(self, num_examples, rng):
                return (np.arange(num_examples) for _ in range(self.iterations))

        assert [b.tolist() for b in EveryExample(2).batch_iterator(3, rng=0)] == [
            [0, 1, 2],
            [0, 1, 2],
        ]
        ```
    """

    @abc.abstractmethod
    def batch_iterator(self, num_examples: int, rng: RngLike) -> Iterator[np.ndarray]:
        """The batches of example indices, one array per step.

        **Arguments:**

        - `num_examples`: the dataset size `n`; indices are in `[0, n)`.
        - `rng`: an int seed or a `np.random.Generator` (advanced as batches are drawn).

        **Returns:**

        An iterator of 1-D signed integer NumPy arrays.

        !!! example

            ```python
            import eqx_micro.dp as dp

            batches = dp.FixedBatchSampling(2, iterations=3).batch_iterator(5, rng=0)
            assert [len(b) for b in batches] == [2, 2, 2]
            ```
        """


class CyclicPoissonSampling(AbstractBatchSelectionStrategy):
    """Poisson sampling, optionally cyclic (BandMF-style) and truncated.

    The examples are split once into `cycle_length` groups (see `PartitionType`). Step
    `i` samples from group `i % cycle_length`: every example of the group joins
    independently with probability `sampling_prob`. (The batch size is drawn as
    `Binomial(len(group), sampling_prob)` and that many examples are chosen without
    replacement, which is the same distribution.) With `truncated_batch_size`, a batch
    that would be larger keeps that many of its examples, chosen uniformly.

    So an example only ever appears at steps `i` with `i % cycle_length` equal to its
    group, and the batches of one cycle are disjoint. `cycle_length=1` is plain Poisson
    sampling (`PoissonSampling`); `sampling_prob=1` is a fixed order repeated for
    several epochs. For an expected batch size `b`, set `sampling_prob` to
    `b / (num_examples // cycle_length)`. With `EQUAL_SPLIT`, the
    `num_examples % cycle_length` left-over examples are never sampled, and if
    `cycle_length > num_examples` every batch is empty.

    For the same `np.random.Generator` state the batches are exactly those of
    `jax_privacy.batch_selection.CyclicPoissonSampling` (only the index dtype differs).

    **Arguments:**

    - `sampling_prob`: the probability, in `[0, 1]`, that an eligible example joins a
      batch. (0 is allowed and gives empty batches.)
    - `iterations`: the number of batches to yield, `>= 0`.
    - `truncated_batch_size`: an upper bound on the batch size, or None.
    - `cycle_length`: the number of groups, `>= 1`.
    - `partition_type`: a `PartitionType`, how examples are assigned to groups.

    !!! example

        ```python
        import numpy as np
        import eqx_micro.dp as dp

        # Fixed order over three epochs of 12 examples, 3 per step:
        strategy = dp.CyclicPoissonSampling(1.0, 8, cycle_length=4)
        batches = list(strategy.batch_iterator(12, rng=np.random.default_rng(0)))
        assert [b.tolist() for b in batches[:4]] == [
            [9, 2, 7], [4, 5, 11], [0, 3, 6], [10, 8, 1]
        ]
        assert all((b == c).all() for b, c in zip(batches[:4], batches[4:]))
        ```

    ??? cite "References"

        ```bibtex
        @inproceedings{choquette2023amplified,
            title={(Amplified) Banded Matrix Factorization: A unified approach to
                   private training},
            author={Choquette-Choo, Christopher A. and Ganesh, Arun and McKenna, Ryan
                    and McMahan, H. Brendan and Rush, Keith and Thakurta, Abhradeep
                    Guha and Xu, Zheng},
            booktitle={NeurIPS},
            year={2023},
            url={https://arxiv.org/abs/2306.08153}
        }
        ```
    """

    sampling_prob: float = eqx.field(static=True, converter=float)
    iterations: int = eqx.field(static=True)
    truncated_batch_size: int | None = eqx.field(static=True, default=None)
    cycle_length: int = eqx.field(static=True, default=1)
    partition_type: PartitionType = eqx.field(
        static=True, default=PartitionType.EQUAL_SPLIT
    )

    def __check_init__(self):
        owner = "CyclicPoissonSampling"
        _check_sampling_prob(owner, self.sampling_prob)
        _check_int(owner, "iterations", self.iterations, 0)
        _check_truncated_batch_size(owner, self.truncated_batch_size)
        _check_int(owner, "cycle_length", self.cycle_length, 1)
        if not isinstance(self.partition_type, PartitionType):
            raise TypeError(
                "`CyclicPoissonSampling` needs `partition_type` to be a "
                f"`dp.PartitionType`, got {self.partition_type!r}."
            )

    def batch_iterator(self, num_examples: int, rng: RngLike) -> Iterator[np.ndarray]:
        """The Poisson-sampled batches of example indices, one array per step.

        **Arguments:**

        - `num_examples`: the dataset size `n`; indices are in `[0, n)`.
        - `rng`: an int seed or a `np.random.Generator` (advanced as batches are drawn).

        **Returns:**

        An iterator of `iterations` 1-D int32 arrays of distinct indices.

        !!! example

            ```python
            import eqx_micro.dp as dp

            strategy = dp.CyclicPoissonSampling(0.5, 4, truncated_batch_size=3)
            for batch in strategy.batch_iterator(10, rng=1):
                assert len(batch) <= 3 and len(set(batch.tolist())) == len(batch)
            ```
        """
        num_examples = _check_num_examples(num_examples, "batch_iterator")
        generator = _as_generator(rng, "batch_iterator")
        return self._batches(num_examples, generator)

    def _batches(self, num_examples: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
        dtype = _index_dtype(num_examples)
        if self.partition_type is PartitionType.EQUAL_SPLIT:
            groups = _equal_split_partition(num_examples, self.cycle_length, rng, dtype)
        else:
            groups = _independent_partition(num_examples, self.cycle_length, rng, dtype)
        for step in range(self.iterations):
            group = groups[step % self.cycle_length]
            # Binomial size + uniform subset = independent inclusion of each example
            # (Lemma 1 of https://arxiv.org/abs/2406.17298).
            size = rng.binomial(len(group), self.sampling_prob)
            if self.truncated_batch_size is not None:
                size = min(size, self.truncated_batch_size)
            yield rng.choice(group, size=size, replace=False, shuffle=False)


class PoissonSampling(AbstractBatchSelectionStrategy):
    """Poisson sampling: every example joins every step independently.

    This is `CyclicPoissonSampling` with `cycle_length=1` (and yields the same batches
    for the same generator): each example joins each batch with probability
    `sampling_prob`, so batch sizes are `Binomial(num_examples, sampling_prob)`, capped
    at `truncated_batch_size` if given. It is the sampling that DP-SGD's accounting
    (`dp.dpsgd_event`) assumes.

    **Arguments:**

    - `sampling_prob`: the probability, in `[0, 1]`, that an example joins a batch.
    - `iterations`: the number of batches to yield, `>= 0`.
    - `truncated_batch_size`: an upper bound on the batch size, or None.

    !!! example

        ```python
        import eqx_micro.dp as dp

        strategy = dp.PoissonSampling(0.1, iterations=1000)
        sizes = [len(b) for b in strategy.batch_iterator(100, rng=0)]
        assert abs(sum(sizes) / 1000 - 10) < 0.5  # E[size] = 0.1 * 100
        ```

    ??? cite "References"

        ```bibtex
        @inproceedings{abadi2016deep,
            title={Deep Learning with Differential Privacy},
            author={Abadi, Martin and Chu, Andy and Goodfellow, Ian and McMahan, H.
                    Brendan and Mironov, Ilya and Talwar, Kunal and Zhang, Li},
            booktitle={CCS},
            year={2016},
            url={https://arxiv.org/abs/1607.00133}
        }
        ```
    """

    sampling_prob: float = eqx.field(static=True, converter=float)
    iterations: int = eqx.field(static=True)
    truncated_batch_size: int | None = eqx.field(static=True, default=None)

    def __check_init__(self):
        _check_sampling_prob("PoissonSampling", self.sampling_prob)
        _check_int("PoissonSampling", "iterations", self.iterations, 0)
        _check_truncated_batch_size("PoissonSampling", self.truncated_batch_size)

    def batch_iterator(self, num_examples: int, rng: RngLike) -> Iterator[np.ndarray]:
        """The Poisson-sampled batches of example indices, one array per step.

        **Arguments:**

        - `num_examples`: the dataset size `n`; indices are in `[0, n)`.
        - `rng`: an int seed or a `np.random.Generator` (advanced as batches are drawn).

        **Returns:**

        An iterator of `iterations` 1-D int32 arrays of distinct indices.

        !!! example

            ```python
            import eqx_micro.dp as dp

            batches = list(dp.PoissonSampling(1.0, 2).batch_iterator(4, rng=0))
            assert all(sorted(b.tolist()) == [0, 1, 2, 3] for b in batches)
            ```
        """
        cyclic = CyclicPoissonSampling(
            self.sampling_prob, self.iterations, self.truncated_batch_size
        )
        return cyclic.batch_iterator(num_examples, rng)


class BallsInBinsSampling(AbstractBatchSelectionStrategy):
    """Balls-in-bins: every example picks one step of the cycle and joins it every cycle.

    Each example is put into one of `cycle_length` bins uniformly at random,
    independently of the others, and appears in exactly the steps `i` with
    `i % cycle_length` equal to its bin. Each cycle is thus one epoch in a random
    order, with random batch sizes (`Binomial(num_examples, 1 / cycle_length)`).
    The same batches as `jax_privacy.batch_selection.BallsInBinsSampling` for the same
    generator.

    **Arguments:**

    - `iterations`: the number of batches to yield, `>= 0`.
    - `cycle_length`: the number of bins, `>= 1`: the steps between two appearances of
      an example.

    !!! example

        ```python
        import numpy as np
        import eqx_micro.dp as dp

        batches = list(dp.BallsInBinsSampling(6, cycle_length=3).batch_iterator(10, 0))
        assert sorted(np.concatenate(batches[:3]).tolist()) == list(range(10))
        assert all((batches[i] == batches[i + 3]).all() for i in range(3))
        ```

    ??? cite "References"

        ```bibtex
        @article{chua2024scalable,
            title={Scalable DP-SGD: Shuffling vs. Poisson Subsampling},
            author={Chua, Lynn and Ghazi, Badih and Kamath, Pritish and Kumar, Ravi and
                    Manurangsi, Pasin and Sinha, Amer and Zhang, Chiyuan},
            journal={arXiv:2411.04205},
            year={2024},
            url={https://arxiv.org/abs/2411.04205}
        }
        ```
    """

    iterations: int = eqx.field(static=True)
    cycle_length: int = eqx.field(static=True)

    def __check_init__(self):
        _check_int("BallsInBinsSampling", "iterations", self.iterations, 0)
        _check_int("BallsInBinsSampling", "cycle_length", self.cycle_length, 1)

    def batch_iterator(self, num_examples: int, rng: RngLike) -> Iterator[np.ndarray]:
        """The batches of example indices, one array per step.

        **Arguments:**

        - `num_examples`: the dataset size `n`; indices are in `[0, n)`.
        - `rng`: an int seed or a `np.random.Generator` (advanced when the bins are
          drawn, at the first batch).

        **Returns:**

        An iterator of `iterations` 1-D int32 arrays (each a fresh copy).

        !!! example

            ```python
            import eqx_micro.dp as dp

            batches = dp.BallsInBinsSampling(4, cycle_length=2).batch_iterator(6, rng=0)
            assert sum(len(b) for b in batches) == 12  # every example, twice
            ```
        """
        num_examples = _check_num_examples(num_examples, "batch_iterator")
        generator = _as_generator(rng, "batch_iterator")
        return self._batches(num_examples, generator)

    def _batches(self, num_examples: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
        dtype = _index_dtype(num_examples)
        bins = _independent_partition(num_examples, self.cycle_length, rng, dtype)
        for step in range(self.iterations):
            yield bins[step % self.cycle_length].copy()


class FixedBatchSampling(AbstractBatchSelectionStrategy):
    """A uniformly random batch of fixed size at every step.

    Each batch is `batch_size` examples drawn uniformly, without replacement within the
    batch (unless `replace=True`), independently across steps. Its accounting is
    `dp.fixed_batch_dpsgd_event`. The same batches as
    `jax_privacy.batch_selection.FixedBatchSampling` for the same generator.

    **Arguments:**

    - `batch_size`: examples per batch, `>= 0`; without replacement it must be at most
      the dataset size (checked when `batch_iterator` is called).
    - `iterations`: the number of batches to yield, `>= 0`.
    - `replace`: sample with replacement within a batch (duplicates possible).

    !!! example

        ```python
        import eqx_micro.dp as dp

        for batch in dp.FixedBatchSampling(4, iterations=3).batch_iterator(10, rng=0):
            assert len(set(batch.tolist())) == 4
        ```
    """

    batch_size: int = eqx.field(static=True)
    iterations: int = eqx.field(static=True)
    replace: bool = eqx.field(static=True, default=False)

    def __check_init__(self):
        _check_int("FixedBatchSampling", "batch_size", self.batch_size, 0)
        _check_int("FixedBatchSampling", "iterations", self.iterations, 0)

    def batch_iterator(self, num_examples: int, rng: RngLike) -> Iterator[np.ndarray]:
        """The fixed-size batches of example indices, one array per step.

        **Arguments:**

        - `num_examples`: the dataset size `n`; indices are in `[0, n)`.
        - `rng`: an int seed or a `np.random.Generator` (advanced as batches are drawn).

        **Returns:**

        An iterator of `iterations` 1-D int32 arrays of length `batch_size`.

        !!! example

            ```python
            import eqx_micro.dp as dp

            strategy = dp.FixedBatchSampling(10, iterations=1, replace=True)
            (batch,) = strategy.batch_iterator(5, rng=0)
            assert batch.shape == (10,) and batch.max() < 5
            ```
        """
        num_examples = _check_num_examples(num_examples, "batch_iterator")
        if not self.replace and self.batch_size > num_examples:
            raise ValueError(
                f"`FixedBatchSampling` got `batch_size={self.batch_size}` for "
                f"{num_examples} examples; without replacement a batch cannot be larger "
                "than the dataset. Lower `batch_size` or pass `replace=True`."
            )
        if self.replace and self.batch_size > 0 and num_examples == 0:
            raise ValueError(
                f"`FixedBatchSampling` cannot draw `batch_size={self.batch_size}` "
                "examples from an empty dataset (`num_examples=0`)."
            )
        generator = _as_generator(rng, "batch_iterator")
        return self._batches(num_examples, generator)

    def _batches(self, num_examples: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
        dtype = _index_dtype(num_examples)
        for _ in range(self.iterations):
            batch = rng.choice(num_examples, size=self.batch_size, replace=self.replace)
            yield batch.astype(dtype)


class UserSelectionStrategy(eqx.Module):
    """User-level batch selection: a base strategy picks users, not examples.

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

        strategy = dp.UserSelectionStrategy(
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
                "`UserSelectionStrategy` needs `base_strategy` to be a "
                "`dp.AbstractBatchSelectionStrategy` (e.g. `dp.PoissonSampling(...)`), "
                f"got {type(self.base_strategy).__name__}."
            )
        _check_int(
            "UserSelectionStrategy",
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

            strategy = dp.UserSelectionStrategy(dp.PoissonSampling(0.5, 3), 4)
            user_ids = np.array(["ann", "bob", "ann", "cy"])
            for batch in strategy.batch_iterator(user_ids, rng=0):
                assert batch.shape[1] == 4
                assert all(len(set(user_ids[row])) == 1 for row in batch)
            ```
        """
        user_ids = np.asarray(user_ids)
        if user_ids.ndim != 1:
            raise ValueError(
                "`UserSelectionStrategy.batch_iterator` needs `user_ids` to be 1-D (the "
                f"user of each example), got shape {user_ids.shape}."
            )
        generator = _as_generator(rng, "batch_iterator")
        return self._batches(user_ids, generator)

    def _batches(
        self, user_ids: np.ndarray, rng: np.random.Generator
    ) -> Iterator[np.ndarray]:
        dtype = _index_dtype(user_ids.size)
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


def _check_padding_args(
    caller: str, size_name: str, size: Any, microbatch_size: int | None
) -> None:
    _check_int(caller, size_name, size, 1)
    if microbatch_size is not None:
        _check_int(caller, "microbatch_size", microbatch_size, 1)
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
    `em.compute_early_stopping_order`, so that in the column-major microbatch split the
    real examples fill the first microbatches and the padding lands in the last ones,
    which early stopping then skips.

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
      `(users, examples_per_user)` from `UserSelectionStrategy`; signed integers, no
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

    For user-level indices of shape `(users, k)` (from `UserSelectionStrategy`, padded
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
    num_rows = np.shape(leaves[0])[0] if leaves and np.ndim(leaves[0]) else None
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
