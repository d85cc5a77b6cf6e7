"""Poisson sampling, plain and cyclic (BandMF's), with its partitions into groups."""

import enum
from collections.abc import Iterator

import equinox as eqx
import numpy as np

from ._base import (
    AbstractBatchSelectionStrategy,
    as_generator,
    binomial_moments,
    check_int,
    check_num_examples,
    check_sampling_prob,
    check_truncated_batch_size,
    index_dtype,
    RngLike,
)


class PartitionType(enum.Enum):
    """How `CyclicPoissonSampling` splits the examples into `cycle_length` groups.

    - `EQUAL_SPLIT`: shuffle, then cut into groups of exactly
      `num_examples // cycle_length` examples; the `num_examples % cycle_length` left
      over are never sampled. The group size depends on the dataset size, so this suits
      the replace-one and zero-out neighboring relations (a public dataset size).
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


def independent_partition(
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
        check_sampling_prob(owner, self.sampling_prob)
        check_int(owner, "iterations", self.iterations, 0)
        check_truncated_batch_size(owner, self.truncated_batch_size)
        check_int(owner, "cycle_length", self.cycle_length, 1)
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
        num_examples = check_num_examples(num_examples, "batch_iterator")
        generator = as_generator(rng, "batch_iterator")
        return self._batches(num_examples, generator)

    def _batches(self, num_examples: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
        dtype = index_dtype(num_examples)
        if self.partition_type is PartitionType.EQUAL_SPLIT:
            groups = _equal_split_partition(num_examples, self.cycle_length, rng, dtype)
        else:
            groups = independent_partition(num_examples, self.cycle_length, rng, dtype)
        for step in range(self.iterations):
            group = groups[step % self.cycle_length]
            # Binomial size + uniform subset = independent inclusion of each example
            # (Lemma 1 of https://arxiv.org/abs/2406.17298).
            size = rng.binomial(len(group), self.sampling_prob)
            if self.truncated_batch_size is not None:
                size = min(size, self.truncated_batch_size)
            yield rng.choice(group, size=size, replace=False, shuffle=False)

    def min_separation(self) -> int:
        """`cycle_length`: an example joins at most one step of each cycle.

        !!! example

            ```python
            import eqx_micro.dp as dp

            assert dp.CyclicPoissonSampling(0.5, 8, cycle_length=4).min_separation() == 4
            ```
        """
        return self.cycle_length

    def _group_size(self, num_examples: int) -> float:
        if self.partition_type is PartitionType.EQUAL_SPLIT:
            return float(num_examples // self.cycle_length)
        return num_examples / self.cycle_length

    def expected_batch_size(self, num_examples: int) -> float:
        """`sampling_prob` times the group size (capped at `truncated_batch_size`).

        !!! example

            ```python
            import eqx_micro.dp as dp

            strategy = dp.CyclicPoissonSampling(0.5, 8, cycle_length=4)
            assert strategy.expected_batch_size(100) == 12.5
            ```
        """
        size = self._group_size(num_examples)
        return binomial_moments(size, self.sampling_prob, self.truncated_batch_size)[0]

    def batch_size_stddev(self, num_examples: int) -> float:
        """The binomial standard deviation over a group.

        !!! example

            ```python
            import eqx_micro.dp as dp

            strategy = dp.CyclicPoissonSampling(0.5, 8, cycle_length=4)
            assert strategy.batch_size_stddev(100) == 2.5
            ```
        """
        size = self._group_size(num_examples)
        return binomial_moments(size, self.sampling_prob, self.truncated_batch_size)[1]


class PoissonSampling(AbstractBatchSelectionStrategy):
    """Poisson sampling: every example joins every step independently.

    This is `CyclicPoissonSampling` with `cycle_length=1` (and yields the same batches
    for the same generator): each example joins each batch with probability
    `sampling_prob`, so batch sizes are `Binomial(num_examples, sampling_prob)`, capped
    at `truncated_batch_size` if given. It is the sampling that DP-SGD's accounting
    ([`dp.dpsgd_event`][eqx_micro.dp.dpsgd_event]) assumes.

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
        check_sampling_prob("PoissonSampling", self.sampling_prob)
        check_int("PoissonSampling", "iterations", self.iterations, 0)
        check_truncated_batch_size("PoissonSampling", self.truncated_batch_size)

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

    def min_separation(self) -> int:
        """1: an example may join any step.

        !!! example

            ```python
            import eqx_micro.dp as dp

            assert dp.PoissonSampling(0.1, 10).min_separation() == 1
            ```
        """
        return 1

    def expected_batch_size(self, num_examples: int) -> float:
        """`sampling_prob * num_examples` (capped at `truncated_batch_size`).

        !!! example

            ```python
            import eqx_micro.dp as dp

            assert dp.PoissonSampling(0.1, 10).expected_batch_size(1000) == 100.0
            ```
        """
        moments = binomial_moments(
            num_examples, self.sampling_prob, self.truncated_batch_size
        )
        return moments[0]

    def batch_size_stddev(self, num_examples: int) -> float:
        """`sqrt(num_examples * sampling_prob * (1 - sampling_prob))`.

        !!! example

            ```python
            import eqx_micro.dp as dp

            assert dp.PoissonSampling(0.5, 10).batch_size_stddev(100) == 5.0
            ```
        """
        moments = binomial_moments(
            num_examples, self.sampling_prob, self.truncated_batch_size
        )
        return moments[1]
