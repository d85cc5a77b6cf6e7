"""DP batch selection: sampling statistics, cyclic structure, padding and gathering."""

import math

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import jaxtyping
import numpy as np
import pytest
from hypothesis import given, settings

import eqx_micro as em
import eqx_micro.dp as dp


SIGMAS = 5.0  # Statistical checks allow 5 standard deviations (seeds are fixed anyway).


def _batches(strategy, num_examples, seed=0) -> list[np.ndarray]:
    return list(strategy.batch_iterator(num_examples, rng=np.random.default_rng(seed)))


def _assert_streams_equal(actual, expected) -> None:
    actual, expected = list(actual), list(expected)
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        np.testing.assert_array_equal(a, np.asarray(e).reshape(a.shape))


@pytest.fixture
def no_runtime_typecheck():
    """Turns jaxtyping's runtime checks off, to reach our own checks behind them."""
    previous = jaxtyping.config.jaxtyping_disable
    jaxtyping.config.update("jaxtyping_disable", True)
    yield
    jaxtyping.config.update("jaxtyping_disable", previous)


class _Fixed(dp.AbstractBatchSelectionStrategy):
    """Yields the given batches: a user-defined strategy is just a subclass."""

    batches: tuple[tuple[int, ...], ...]

    def batch_iterator(self, num_examples, rng):
        return (np.array(b, np.int32) for b in self.batches)

    def expected_batch_size(self, num_examples):
        return float(np.mean([len(b) for b in self.batches]))

    def batch_size_stddev(self, num_examples):
        return float(np.std([len(b) for b in self.batches]))

    def min_separation(self):
        return 1


# ---------------------------------------------------------------- Poisson sampling


def test_fixed_order_schedule_doc_fact():
    strategy = dp.CyclicPoissonSampling(1, 8, cycle_length=4)
    batches = _batches(strategy, 12)
    expected = [[9, 2, 7], [4, 5, 11], [0, 3, 6], [10, 8, 1]] * 2
    assert [b.tolist() for b in batches] == expected


@pytest.mark.parametrize("num_examples", [0, 1, 13, 100])
@pytest.mark.parametrize("cycle_length", [1, 3, 11])
@pytest.mark.parametrize("partition_type", list(dp.PartitionType))
@pytest.mark.parametrize("sampling_prob,truncated", [(0.0, None), (0.3, None), (1, 2)])
def test_cyclic_poisson_matches_jax_privacy(
    num_examples, cycle_length, partition_type, sampling_prob, truncated
):
    jp = pytest.importorskip("jax_privacy.batch_selection")
    ours = dp.CyclicPoissonSampling(
        sampling_prob, 12, truncated, cycle_length, partition_type
    )
    theirs = jp.CyclicPoissonSampling(
        sampling_prob, 12, truncated, cycle_length, jp.PartitionType[partition_type.name]
    )
    _assert_streams_equal(
        ours.batch_iterator(num_examples, np.random.default_rng(5)),
        theirs.batch_iterator(num_examples, np.random.default_rng(5)),
    )


@pytest.mark.parametrize("num_examples", [0, 10, 37])
def test_other_strategies_match_jax_privacy(num_examples):
    jp = pytest.importorskip("jax_privacy.batch_selection")
    pairs = [
        (dp.BallsInBinsSampling(7, 3), jp.BallsInBinsSampling(7, 3)),
        (dp.FixedBatchSampling(0, 3), jp.FixedBatchSampling(0, 3)),
        (dp.PoissonSampling(0.2, 5, 4), jp.CyclicPoissonSampling(0.2, 5, 4)),
    ]
    if num_examples:
        pairs += [
            (dp.FixedBatchSampling(5, 6), jp.FixedBatchSampling(5, 6)),
            (dp.FixedBatchSampling(50, 2, True), jp.FixedBatchSampling(50, 2, True)),
        ]
    for ours, theirs in pairs:
        _assert_streams_equal(
            ours.batch_iterator(num_examples, 3), theirs.batch_iterator(num_examples, 3)
        )


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("width", [1, 3])
@pytest.mark.parametrize("replace", [False, True])
def test_user_selection_matches_jax_privacy(shuffle, width, replace):
    jp = pytest.importorskip("jax_privacy.batch_selection")
    user_ids = np.random.default_rng(1).integers(0, 7, 40)
    if replace:  # Users drawn twice in a batch continue their cycle.
        ours_base, theirs_base = (
            dp.FixedBatchSampling(6, 8, True),
            jp.FixedBatchSampling(6, 8, True),
        )
    else:
        ours_base, theirs_base = (
            dp.PoissonSampling(0.6, 8),
            jp.CyclicPoissonSampling(0.6, 8),
        )
    ours = dp.UserSelectionStrategy(ours_base, width, shuffle)
    theirs = jp.UserSelectionStrategy(theirs_base, width, shuffle)
    _assert_streams_equal(
        ours.batch_iterator(user_ids, 9), theirs.batch_iterator(user_ids, 9)
    )


@pytest.mark.parametrize("cycle_length", [1, 3])
@pytest.mark.parametrize("partition_type", list(dp.PartitionType))
def test_inclusion_frequency_is_sampling_prob(cycle_length, partition_type):
    num_examples, prob, iterations = 60, 0.25, 3000
    strategy = dp.CyclicPoissonSampling(
        prob, iterations, cycle_length=cycle_length, partition_type=partition_type
    )
    batches = _batches(strategy, num_examples)
    counts = np.bincount(np.concatenate(batches), minlength=num_examples)
    used = counts > 0  # EQUAL_SPLIT leaves no example out here (60 % 3 == 0).
    assert used.all()
    eligible = iterations // cycle_length
    mean, std = eligible * prob, math.sqrt(eligible * prob * (1 - prob))
    assert np.abs(counts - mean).max() <= SIGMAS * std
    total, total_std = num_examples * mean, math.sqrt(num_examples) * std
    assert abs(counts.sum() - total) <= SIGMAS * total_std


def test_independent_partition_is_uniform():
    num_examples, cycle_length = 4000, 4
    strategy = dp.CyclicPoissonSampling(
        1.0,
        cycle_length,
        cycle_length=cycle_length,
        partition_type=dp.PartitionType.INDEPENDENT,
    )
    sizes = np.array([len(b) for b in _batches(strategy, num_examples)])
    assert sizes.sum() == num_examples
    q = 1 / cycle_length
    std = math.sqrt(num_examples * q * (1 - q))
    assert np.abs(sizes - num_examples * q).max() <= SIGMAS * std


@pytest.mark.parametrize("cycle_length", [1, 3])
@pytest.mark.parametrize("truncated", [None, 4])
@pytest.mark.parametrize("partition_type", list(dp.PartitionType))
def test_cyclic_structure_and_truncation(cycle_length, truncated, partition_type):
    num_examples, iterations = 100, 600
    prob = 3 / (num_examples // cycle_length)  # Expected batch size 3.
    strategy = dp.CyclicPoissonSampling(
        prob, iterations, truncated, cycle_length, partition_type
    )
    batches = _batches(strategy, num_examples)
    assert len(batches) == iterations
    bound = truncated if truncated is not None else num_examples
    group_of = {}
    for step, batch in enumerate(batches):
        assert batch.dtype == np.int32 and batch.ndim == 1
        assert len(batch) <= bound
        assert len(set(batch.tolist())) == len(batch)
        assert ((batch >= 0) & (batch < num_examples)).all()
        for example in batch.tolist():  # One fixed group per example.
            assert group_of.setdefault(example, step % cycle_length) == step % cycle_length
    for start in range(0, iterations, cycle_length):
        window = np.concatenate(batches[start : start + cycle_length])
        assert len(set(window.tolist())) == len(window)
    if truncated is not None:
        assert max(len(b) for b in batches) == truncated  # The bound is reached.


def test_fixed_order_multi_epoch():
    strategy = dp.CyclicPoissonSampling(1, 5, cycle_length=3)
    batches = _batches(strategy, 10)
    assert [len(b) for b in batches] == [3, 3, 3, 3, 3]  # EQUAL_SPLIT: 10 // 3
    assert len(set(np.concatenate(batches[:3]).tolist())) == 9
    for i in range(2):
        assert set(batches[i].tolist()) == set(batches[i + 3].tolist())


@pytest.mark.parametrize("prob", [0.5, 1.0])
def test_cycle_longer_than_dataset_gives_empty_batches(prob):
    strategy = dp.CyclicPoissonSampling(prob, 30, cycle_length=11)
    assert all(b.shape == (0,) for b in _batches(strategy, 10))


def test_zero_probability_gives_empty_batches():
    assert all(len(b) == 0 for b in _batches(dp.PoissonSampling(0, 10), 50))


@pytest.mark.parametrize(
    "strategy",
    [
        dp.PoissonSampling(0.3, 20),
        dp.CyclicPoissonSampling(0.3, 20, cycle_length=2),
        dp.BallsInBinsSampling(20, 3),
        dp.FixedBatchSampling(4, 20),
    ],
)
def test_reproducible_from_seed(strategy):
    def run(rng):
        return [b.tolist() for b in strategy.batch_iterator(30, rng)]

    assert run(7) == run(7) == run(np.int64(7)) == run(np.random.default_rng(7))
    assert run(7) != run(8)
    generator = np.random.default_rng(7)
    assert run(generator) != run(generator)  # A Generator is advanced, not copied.


def test_poisson_is_cyclic_with_one_group():
    poisson = dp.PoissonSampling(0.2, 50, truncated_batch_size=5)
    cyclic = dp.CyclicPoissonSampling(0.2, 50, truncated_batch_size=5)
    _assert_streams_equal(poisson.batch_iterator(40, 3), cyclic.batch_iterator(40, 3))


def test_large_dataset_uses_int64():
    assert dp.FixedBatchSampling(1, 1).batch_iterator(2**31, 0).__next__().dtype == np.int64
    assert next(dp.FixedBatchSampling(1, 1).batch_iterator(2**31 - 1, 0)).dtype == np.int32


# ------------------------------------------------------- balls in bins, fixed batch


def test_balls_in_bins_partitions_every_cycle():
    batches = _batches(dp.BallsInBinsSampling(25, 10), 100)
    assert sorted(np.concatenate(batches[:10]).tolist()) == list(range(100))
    for step in range(10, 25):
        np.testing.assert_array_equal(batches[step], batches[step - 10])
    batches[0][:] = -5  # Every batch is its own array.
    assert (batches[10] >= 0).all()


def test_fixed_batch_sizes_and_uniqueness():
    batches = _batches(dp.FixedBatchSampling(7, 200), 10)
    assert all(len(b) == 7 and len(set(b.tolist())) == 7 for b in batches)
    counts = np.bincount(np.concatenate(batches), minlength=10)
    std = math.sqrt(200 * 0.7 * 0.3)
    assert np.abs(counts - 140).max() <= SIGMAS * std


def test_fixed_batch_with_replacement():
    (batch,) = _batches(dp.FixedBatchSampling(10, 1, replace=True), 5)
    assert batch.shape == (10,) and ((batch >= 0) & (batch < 5)).all()


# -------------------------------------------------------------------- user level


def test_user_selection_rows_cycle_through_each_user():
    strategy = dp.UserSelectionStrategy(_Fixed(((2, 0, 1), (1,))), 2)
    user_ids = np.array([10, 10, 20, 20, 20, 30])
    first, second = strategy.batch_iterator(user_ids, 0)
    assert first.tolist() == [[5, 5], [0, 1], [2, 3]]
    assert second.tolist() == [[4, 2]]  # User 20 continues their cycle.
    assert first.dtype == np.int32


@pytest.mark.parametrize("shuffle", [False, True])
def test_user_selection_rows_belong_to_their_user(shuffle):
    rng = np.random.default_rng(0)
    user_ids = rng.integers(0, 12, 80)
    strategy = dp.UserSelectionStrategy(dp.PoissonSampling(0.5, 40), 3, shuffle)
    seen = {}
    for batch in strategy.batch_iterator(user_ids, 1):
        assert batch.ndim == 2 and batch.shape[1] == 3
        for row in batch:
            (user,) = set(user_ids[row].tolist())
            seen.setdefault(user, []).extend(row.tolist())
        assert len({user_ids[row[0]] for row in batch}) == len(batch)
    for user, examples in seen.items():  # Each user's cycle covers all they own.
        owned = np.flatnonzero(user_ids == user)
        if len(examples) >= len(owned):
            assert set(examples) == set(owned.tolist())
        if not shuffle:
            cycle = np.resize(owned, len(examples))
            assert examples == cycle.tolist()


def test_user_selection_empty_batch_keeps_its_width():
    strategy = dp.UserSelectionStrategy(dp.PoissonSampling(0.0, 2), 4)
    batches = list(strategy.batch_iterator(np.array([0, 1, 1]), 0))
    assert [b.shape for b in batches] == [(0, 4), (0, 4)]
    assert batches[0].dtype == np.int32


# ------------------------------------------------------------------------ padding


def test_pad_to_multiple_of_facts():
    assert dp.pad_to_multiple_of(np.arange(10), 4).tolist() == [*range(10), -1, -1]
    padded = dp.pad_to_multiple_of(np.arange(10), 12, microbatch_size=3)
    assert padded.tolist() == [0, 3, 6, 9, 1, 4, 7, -1, 2, 5, 8, -1]
    microbatches = padded.reshape(3, 4).T  # Microbatch j is padded[j::4].
    assert [(m == -1).sum() for m in microbatches] == [0, 0, 0, 2]
    empty = dp.pad_to_multiple_of(np.array([], np.int32), 4)
    assert empty.shape == (0,) and empty.dtype == np.int32
    assert dp.pad_to_multiple_of(np.arange(8, dtype=np.int8), 8).dtype == np.int8


def _microbatches(padded: np.ndarray, microbatch_size: int) -> np.ndarray:
    """`(M, microbatch_size)`: row j is the column-major microbatch padded[j::M]."""
    return padded.reshape(microbatch_size, -1).T


@settings(max_examples=60, deadline=None)
@given(
    size=st.integers(0, 40),
    multiple=st.integers(1, 16),
    factor=st.integers(1, 16),
    data=st.data(),
)
def test_pad_to_multiple_of_properties(size, multiple, factor, data):
    divisors = [d for d in range(1, multiple + 1) if multiple % d == 0]
    microbatch_size = data.draw(st.sampled_from([None, *divisors]))
    indices = np.random.default_rng(size).permutation(factor * 50)[:size]
    padded = dp.pad_to_multiple_of(indices, multiple, microbatch_size)
    assert len(padded) % multiple == 0 and 0 <= len(padded) - size < multiple
    assert sorted(padded[padded >= 0].tolist()) == sorted(indices.tolist())
    assert (padded == -1).sum() == len(padded) - size
    if microbatch_size is not None and len(padded):
        is_padding = _microbatches(padded, microbatch_size) == -1
        first_padded = int(np.argmax(is_padding.any(axis=1)))
        if is_padding.any():
            assert is_padding[first_padded + 1 :].all()
        assert em.verify_early_stopping_order(padded == -1, microbatch_size)


def test_split_and_pad_global_batch_facts():
    parts = dp.split_and_pad_global_batch(np.arange(10), 4)
    assert [p.tolist() for p in parts] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, -1, -1]]
    parts = dp.split_and_pad_global_batch(np.arange(10), 4, microbatch_size=2)
    assert parts[-1].tolist() == [8, -1, 9, -1]
    (only,) = dp.split_and_pad_global_batch(np.array([], np.int32), 3)
    assert only.tolist() == [-1, -1, -1]  # An empty batch still runs one step.
    users = np.arange(10, dtype=np.int32).reshape(5, 2)
    parts = dp.split_and_pad_global_batch(users, 2)
    assert parts[-1].tolist() == [[8, 9], [-1, -1]] and parts[-1].dtype == np.int32


@settings(max_examples=60, deadline=None)
@given(size=st.integers(1, 40), minibatch_size=st.integers(1, 12), data=st.data())
def test_split_and_pad_global_batch_properties(size, minibatch_size, data):
    divisors = [d for d in range(1, minibatch_size + 1) if minibatch_size % d == 0]
    microbatch_size = data.draw(st.sampled_from([None, *divisors]))
    indices = np.random.default_rng(size).permutation(100)[:size]
    parts = dp.split_and_pad_global_batch(indices, minibatch_size, microbatch_size)
    assert len(parts) == -(-size // minibatch_size)
    assert all(p.shape == (minibatch_size,) for p in parts)
    assert all((p >= 0).all() for p in parts[:-1])
    assert (parts[-1] >= 0).any()  # Never a minibatch of padding only.
    real = np.concatenate(parts)
    assert sorted(real[real >= 0].tolist()) == sorted(indices.tolist())
    if microbatch_size is not None:
        assert em.verify_early_stopping_order(parts[-1] == -1, microbatch_size)


# ---------------------------------------------------------------------- gathering


@pytest.mark.parametrize("to_array", [np.asarray, jnp.asarray])
def test_gather_zero_fills_padding(to_array):
    x = to_array(np.arange(1.0, 13.0, dtype=np.float32).reshape(6, 2))
    data = {"x": x, "label": to_array(np.arange(6, dtype=np.int32)), "tag": "train"}
    indices = np.array([5, -1, 0, -1], np.int32)
    batch, is_padding = dp.gather_padded_batch(data, indices)
    assert type(batch["x"]) is type(x)
    np.testing.assert_array_equal(batch["x"], [[11, 12], [0, 0], [1, 2], [0, 0]])
    np.testing.assert_array_equal(batch["label"], [5, 0, 0, 0])
    assert batch["x"].dtype == np.float32 and batch["label"].dtype == np.int32
    assert batch["tag"] == "train"
    assert isinstance(is_padding, np.ndarray)
    assert is_padding.tolist() == [False, True, False, True]


def test_gather_user_level_rows():
    data = np.arange(1, 7, dtype=np.int32)
    indices = np.array([[0, 1], [-1, -1], [5, 5]], np.int32)
    batch, is_padding = dp.gather_padded_batch(data, indices)
    assert batch.tolist() == [[1, 2], [0, 0], [6, 6]]
    assert is_padding.tolist() == [False, True, False]


def test_gather_from_empty_dataset():
    batch, is_padding = dp.gather_padded_batch(np.zeros((0, 3)), np.full(2, -1))
    assert batch.shape == (2, 3) and (batch == 0).all() and is_padding.all()


def test_gathered_batches_share_one_compilation():
    traces = []

    @jax.jit
    def step(batch, is_padding):
        traces.append(None)
        return jnp.sum(jnp.where(is_padding, 0.0, batch["x"]))

    data = {"x": np.arange(1.0, 21.0, dtype=np.float32)}
    for size in [3, 5, 8]:
        indices = dp.pad_to_multiple_of(np.arange(size), 8)
        batch, is_padding = dp.gather_padded_batch(data, indices)
        assert step(batch, is_padding) == size * (size + 1) / 2
    assert len(traces) == 1


# ------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: dp.CyclicPoissonSampling(1.5, 3), r"`sampling_prob=1.5`; it must be a"),
        (lambda: dp.PoissonSampling(-0.1, 3), r"probability in \[0, 1\]"),
        (lambda: dp.PoissonSampling(float("nan"), 3), r"`sampling_prob=nan`"),
        (lambda: dp.CyclicPoissonSampling(0.5, -1), r"`iterations=-1`; it must be an int"),
        (lambda: dp.CyclicPoissonSampling(0.5, 3, cycle_length=0), r"`cycle_length=0`"),
        (
            lambda: dp.CyclicPoissonSampling(0.5, 3, truncated_batch_size=-1),
            r"`truncated_batch_size=-1`; it must be an int >= 0",
        ),
        (lambda: dp.BallsInBinsSampling(3, 0), r"`cycle_length=0`; it must be a positive"),
        (lambda: dp.BallsInBinsSampling(-2, 3), r"`iterations=-2`"),
        (lambda: dp.FixedBatchSampling(-1, 3), r"`batch_size=-1`"),
        (
            lambda: dp.UserSelectionStrategy(dp.PoissonSampling(0.5, 3), 0),
            r"`examples_per_user_per_batch=0`; it must be a positive int",
        ),
        (lambda: dp.pad_to_multiple_of(np.arange(3), 0), r"`multiple=0`"),
        (
            lambda: dp.pad_to_multiple_of(np.arange(3), 4, microbatch_size=3),
            r"`microbatch_size=3`, which does not divide `multiple=4`",
        ),
        (
            lambda: dp.pad_to_multiple_of(np.arange(3), 4, microbatch_size=0),
            r"`microbatch_size=0`; it must be a positive int",
        ),
        (
            lambda: dp.pad_to_multiple_of(np.zeros((2, 2), np.int32), 4),
            r"`indices` to be 1-D, got shape \(2, 2\)",
        ),
        (
            lambda: dp.pad_to_multiple_of(np.array([3, -1]), 4),
            r"negative index \(-1\) in `indices`",
        ),
        (
            lambda: dp.split_and_pad_global_batch(np.arange(3), 0),
            r"`minibatch_size=0`",
        ),
        (
            lambda: dp.split_and_pad_global_batch(np.arange(3), 4, 3),
            r"does not divide `minibatch_size=4`",
        ),
        (
            lambda: dp.split_and_pad_global_batch(np.zeros((1, 1, 1), np.int32), 4),
            r"`indices` to be 1-D or 2-D",
        ),
        (
            lambda: dp.gather_padded_batch(np.zeros(3), np.array([0, 3])),
            r"index 3 for data of 3 examples",
        ),
        (
            lambda: dp.gather_padded_batch(np.zeros(3), np.array([0, -2])),
            r"index -2 for data of 3 examples",
        ),
        (
            lambda: dp.gather_padded_batch(np.zeros(3), np.zeros((1, 1, 1), np.int32)),
            r"`indices` to be 1-D \(examples\) or 2-D",
        ),
        (
            lambda: dp.gather_padded_batch(np.zeros(3), np.array([[0, -1]])),
            r"user row 0 of `indices` mixing `-1` with real indices",
        ),
        (
            lambda: dp.gather_padded_batch(
                {"x": np.zeros(3), "y": np.zeros(4)}, np.array([0])
            ),
            r"got 3 and 4 in `data\['y'\]`",
        ),
        (
            lambda: dp.gather_padded_batch({"s": np.float32(1.0)}, np.array([0])),
            r"0-d array in `data\['s'\]`",
        ),
    ],
)
def test_construction_and_helper_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize(
    "strategy",
    [dp.PoissonSampling(0.5, 3), dp.BallsInBinsSampling(3, 2), dp.FixedBatchSampling(1, 3)],
)
def test_batch_iterator_errors(strategy):
    with pytest.raises(ValueError, match=r"`num_examples=-1`; it must be an int >= 0"):
        strategy.batch_iterator(-1, 0)
    with pytest.raises(ValueError, match=r"seed `rng=-3`; a seed must be a non-negative"):
        strategy.batch_iterator(5, -3)
    # Our own check, or jaxtyping's runtime check first: both name `rng`.
    with pytest.raises(TypeError, match="rng"):
        strategy.batch_iterator(5, None)  # type: ignore[arg-type]


def test_fixed_batch_larger_than_dataset():
    with pytest.raises(ValueError, match=r"`batch_size=11` for 10 examples; without"):
        dp.FixedBatchSampling(11, 3).batch_iterator(10, 0)
    with pytest.raises(ValueError, match=r"from an empty dataset"):
        dp.FixedBatchSampling(2, 3, replace=True).batch_iterator(0, 0)


def test_user_ids_must_be_one_dimensional():
    strategy = dp.UserSelectionStrategy(dp.PoissonSampling(0.5, 3))
    with pytest.raises(ValueError, match=r"`user_ids` to be 1-D .* got shape \(2, 2\)"):
        strategy.batch_iterator(np.zeros((2, 2)), 0)


@pytest.mark.usefixtures("no_runtime_typecheck")
@pytest.mark.parametrize(
    "call,match",
    [
        (
            lambda: dp.PoissonSampling(0.5, 3).batch_iterator(5, None),
            r"needs an explicit `rng`, got None\. .* `rng=np.random.default_rng\(seed\)`",
        ),
        (
            lambda: dp.PoissonSampling(0.5, 3).batch_iterator(5, jax.random.key(0)),
            r"`rng` to be an int seed or a `np.random.Generator`, got .*JAX key",
        ),
        (
            lambda: dp.PoissonSampling(0.5, 3).batch_iterator(5.0, 0),
            r"`num_examples` to be an int, got 5.0",
        ),
        (lambda: dp.PoissonSampling(0.5, 2.5), r"`iterations` to be an int, got 2.5"),
        (
            lambda: dp.CyclicPoissonSampling(0.5, 3, partition_type="EQUAL_SPLIT"),
            r"`partition_type` to be a `dp.PartitionType`",
        ),
        (
            lambda: dp.UserSelectionStrategy("poisson"),
            r"`base_strategy` to be a `dp.AbstractBatchSelectionStrategy`",
        ),
        (
            lambda: dp.pad_to_multiple_of(np.arange(3.0), 4),
            r"signed integer dtype .* got float64",
        ),
        (
            lambda: dp.split_and_pad_global_batch(np.arange(3, dtype=np.uint8), 4),
            r"signed integer dtype .* got uint8",
        ),
        (
            lambda: dp.gather_padded_batch(np.zeros(3), np.array([0.0])),
            r"signed integer dtype .* got float64",
        ),
    ],
)
def test_type_errors_behind_runtime_checks(call, match):
    with pytest.raises(TypeError, match=match):
        call()


def test_abstract_strategy_cannot_be_instantiated():
    with pytest.raises(TypeError, match="abstract"):
        dp.AbstractBatchSelectionStrategy()  # type: ignore[abstract]


# ----------------------------- batch-size moments (the trainer pads by them)


@pytest.mark.parametrize(
    "strategy",
    [
        dp.PoissonSampling(0.2, 4000),
        dp.CyclicPoissonSampling(0.6, 4000, cycle_length=3),
        dp.CyclicPoissonSampling(
            0.6, 4000, cycle_length=3, partition_type=dp.PartitionType.INDEPENDENT
        ),
        dp.BallsInBinsSampling(4000, cycle_length=5),
        dp.FixedBatchSampling(7, 50),
    ],
)
def test_declared_batch_size_moments_match_the_batches(strategy):
    sizes = np.array([len(b) for b in strategy.batch_iterator(101, rng=3)])
    expected = strategy.expected_batch_size(101)
    stddev = strategy.batch_size_stddev(101)
    # Sample mean within 5 standard errors; sample spread within 15%.
    assert abs(sizes.mean() - expected) <= 5 * max(stddev, 1e-9) / np.sqrt(sizes.size)
    if stddev == 0:
        assert (sizes == expected).all()
    else:
        assert abs(sizes.std() / stddev - 1) < 0.15
