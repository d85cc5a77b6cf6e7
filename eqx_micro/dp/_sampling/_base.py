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
import math
from collections.abc import Iterator
from typing import Any

import equinox as eqx
import numpy as np


# A seed or a generator; `None` (fresh OS entropy) is refused on purpose.
RngLike = np.random.Generator | int | np.integer


def index_dtype(num_examples: int) -> np.dtype:
    """int32, or int64 when int32 cannot hold both -1 and `num_examples`."""
    return np.result_type(np.min_scalar_type(-num_examples - 1), np.int32)


def as_generator(rng: Any, caller: str) -> np.random.Generator:
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


def check_int(owner: str, name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(
            f"`{owner}` needs `{name}` to be an int, got {value!r} of type "
            f"{type(value).__name__}."
        )
    if value < minimum:
        meaning = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise ValueError(f"`{owner}` got `{name}={value}`; it must be {meaning}.")


def check_num_examples(num_examples: Any, caller: str) -> int:
    check_int(caller, "num_examples", num_examples, 0)
    return int(num_examples)


def check_sampling_prob(owner: str, sampling_prob: float) -> None:
    if not 0 <= sampling_prob <= 1:
        raise ValueError(
            f"`{owner}` got `sampling_prob={sampling_prob}`; it must be a probability "
            "in [0, 1] (the chance that an eligible example joins a batch)."
        )


def check_truncated_batch_size(owner: str, truncated_batch_size: int | None) -> None:
    if truncated_batch_size is not None:
        check_int(owner, "truncated_batch_size", truncated_batch_size, 0)


class AbstractBatchSelectionStrategy(eqx.Module):
    """A rule for which examples join each training step.

    To write your own, subclass it with your configuration as fields. Configuration is
    public (it enters the privacy accounting); the dataset size and the generator are
    call arguments, as both may be private. What a subclass provides:

    - `batch_iterator(num_examples, rng)`: the batches, as 1-D signed integer arrays
        of example indices in `[0, num_examples)`; sizes may vary.
    - `expected_batch_size(num_examples)` and `batch_size_stddev(num_examples)`: the
        mean and standard deviation of the batch size, from which a trainer picks the
        few padded shapes it compiles for.
    - `min_separation()`: the least number of steps between two batches one example
        can both be in (1 if it can be in consecutive ones); accounting a partial run
        counts one round per that many steps.

    !!! example

        ```python
        import numpy as np
        import eqx_micro.dp as dp

        class EveryExample(dp.AbstractBatchSelectionStrategy):
            iterations: int

            def batch_iterator(self, num_examples, rng):
                return (np.arange(num_examples) for _ in range(self.iterations))

            def expected_batch_size(self, num_examples):
                return float(num_examples)

            def batch_size_stddev(self, num_examples):
                return 0.0

            def min_separation(self):
                return 1

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

    @abc.abstractmethod
    def expected_batch_size(self, num_examples: int) -> float:
        """The mean batch size for a dataset of `num_examples`.

        !!! example

            ```python
            import eqx_micro.dp as dp

            assert dp.PoissonSampling(0.1, 10).expected_batch_size(1000) == 100.0
            ```
        """

    @abc.abstractmethod
    def batch_size_stddev(self, num_examples: int) -> float:
        """The standard deviation of the batch size (0 for fixed sizes).

        !!! example

            ```python
            import eqx_micro.dp as dp

            assert dp.FixedBatchSampling(8, 10).batch_size_stddev(1000) == 0.0
            ```
        """

    @abc.abstractmethod
    def min_separation(self) -> int:
        """The least number of steps between two batches one example can both be in.

        !!! example

            ```python
            import eqx_micro.dp as dp

            assert dp.PoissonSampling(0.1, 10).min_separation() == 1
            assert dp.BallsInBinsSampling(10, cycle_length=5).min_separation() == 5
            ```
        """


def binomial_moments(
    size: int | float, prob: float, cap: int | None
) -> tuple[float, float]:
    """Mean and standard deviation of `Binomial(size, prob)` (of its mean capped at
    `cap`: truncation only lowers both, so the uncapped spread is an upper bound)."""
    mean = size * prob
    std = math.sqrt(size * prob * (1.0 - prob))
    return (mean if cap is None else min(mean, float(cap))), std
