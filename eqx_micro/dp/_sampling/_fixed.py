"""Sampling with fixed batch sizes or fixed participation: balls-in-bins, fixed batches."""

from collections.abc import Iterator

import equinox as eqx
import numpy as np

from ._base import (
    AbstractBatchSelectionStrategy,
    as_generator,
    binomial_moments,
    check_int,
    check_num_examples,
    index_dtype,
    RngLike,
)
from ._poisson import independent_partition


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
        check_int("BallsInBinsSampling", "iterations", self.iterations, 0)
        check_int("BallsInBinsSampling", "cycle_length", self.cycle_length, 1)

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
        num_examples = check_num_examples(num_examples, "batch_iterator")
        generator = as_generator(rng, "batch_iterator")
        return self._batches(num_examples, generator)

    def _batches(self, num_examples: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
        dtype = index_dtype(num_examples)
        bins = independent_partition(num_examples, self.cycle_length, rng, dtype)
        for step in range(self.iterations):
            yield bins[step % self.cycle_length].copy()

    def min_separation(self) -> int:
        """`cycle_length`: an example joins one step of each cycle.

        !!! example

            ```python
            import eqx_micro.dp as dp

            assert dp.BallsInBinsSampling(6, cycle_length=3).min_separation() == 3
            ```
        """
        return self.cycle_length

    def expected_batch_size(self, num_examples: int) -> float:
        """`num_examples / cycle_length`.

        !!! example

            ```python
            import eqx_micro.dp as dp

            assert dp.BallsInBinsSampling(6, cycle_length=4).expected_batch_size(100) == 25
            ```
        """
        return binomial_moments(num_examples, 1.0 / self.cycle_length, None)[0]

    def batch_size_stddev(self, num_examples: int) -> float:
        """The standard deviation of `Binomial(num_examples, 1 / cycle_length)`.

        !!! example

            ```python
            import eqx_micro.dp as dp

            assert dp.BallsInBinsSampling(6, cycle_length=2).batch_size_stddev(100) == 5
            ```
        """
        return binomial_moments(num_examples, 1.0 / self.cycle_length, None)[1]


class FixedBatchSampling(AbstractBatchSelectionStrategy):
    """A uniformly random batch of fixed size at every step.

    Each batch is `batch_size` examples drawn uniformly, without replacement within the
    batch (unless `replace=True`), independently across steps. Its accounting is
    [`dp.fixed_batch_dpsgd_event`][eqx_micro.dp.fixed_batch_dpsgd_event]. The same batches
    as `jax_privacy.batch_selection.FixedBatchSampling` for the same generator.

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
        if not isinstance(self.replace, bool):
            raise TypeError(
                f"`FixedBatchSampling` needs `replace` to be True or False, got "
                f"{self.replace!r}."
            )
        check_int("FixedBatchSampling", "batch_size", self.batch_size, 0)
        check_int("FixedBatchSampling", "iterations", self.iterations, 0)

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
        num_examples = check_num_examples(num_examples, "batch_iterator")
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
        generator = as_generator(rng, "batch_iterator")
        return self._batches(num_examples, generator)

    def _batches(self, num_examples: int, rng: np.random.Generator) -> Iterator[np.ndarray]:
        dtype = index_dtype(num_examples)
        for _ in range(self.iterations):
            batch = rng.choice(num_examples, size=self.batch_size, replace=self.replace)
            yield batch.astype(dtype)

    def min_separation(self) -> int:
        """1: an example may join any step.

        !!! example

            ```python
            import eqx_micro.dp as dp

            assert dp.FixedBatchSampling(8, 10).min_separation() == 1
            ```
        """
        return 1

    def expected_batch_size(self, num_examples: int) -> float:
        """`batch_size`.

        !!! example

            ```python
            import eqx_micro.dp as dp

            assert dp.FixedBatchSampling(8, 10).expected_batch_size(1000) == 8.0
            ```
        """
        return float(self.batch_size)

    def batch_size_stddev(self, num_examples: int) -> float:
        """0: every batch has `batch_size` examples.

        !!! example

            ```python
            import eqx_micro.dp as dp

            assert dp.FixedBatchSampling(8, 10).batch_size_stddev(1000) == 0.0
            ```
        """
        return 0.0
