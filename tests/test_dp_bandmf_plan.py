"""`dp.BandMFExecutionPlanConfig`: accounting against jax_privacy, the DP-SGD special
case, noise scale and misuse."""

import math

import dp_accounting
import jax.numpy as jnp
import numpy as np
import pytest
from jax_privacy.experimental import execution_plan as jp_plan

import eqx_micro.dp as dp


RELATION = dp.NeighboringRelation


def grad_fn(clip=1.0, **kwargs):
    return dp.clipped_grad(lambda w, x: jnp.sum(w * x), clip, **kwargs)


def jax_privacy_noise_multiplier(coefs, **settings):
    """jax_privacy's calibrated sigma, read off its plan's event."""
    with np.errstate(all="ignore"):
        plan = jp_plan.BandMFExecutionPlanConfig(
            strategy=np.asarray(coefs), **settings
        ).plan
    event = plan.dp_event
    while not isinstance(event, dp_accounting.GaussianDpEvent):
        event = getattr(event, "event", None) or getattr(event, "noise_multiplier", None)
        if isinstance(event, float):
            return event
    return event.noise_multiplier


@pytest.mark.parametrize(
    "settings",
    [
        dict(iterations=100, num_bands=4, sampling_prob=0.2, epsilon=2.0, delta=1e-5),
        dict(iterations=300, num_bands=8, sampling_prob=0.5, epsilon=8.0, delta=1e-6),
        dict(
            iterations=60,
            num_bands=3,
            sampling_prob=0.1,
            epsilon=4.0,
            delta=1e-5,
            truncated_batch_size=40,
        ),
    ],
)
def test_calibration_equals_jax_privacy(settings):
    num_examples = 1200  # public: zero-out relation, equal groups
    # A coarse PLD keeps calibration (about 20 accountings) at seconds; both libraries
    # get the same accountant.
    accountant = dp_accounting.pld.PLDAccountant(
        RELATION.REPLACE_SPECIAL, value_discretization_interval=1e-3
    )
    config = dp.BandMFExecutionPlanConfig(
        num_examples=num_examples,
        noise_seed=0,
        strategy_optimization_steps=50,
        accountant=accountant,
        **settings,
    )
    plan = config.make(grad_fn())
    assert plan.neighboring_relation == RELATION.REPLACE_SPECIAL
    assert abs(plan.epsilon(settings["delta"]) - settings["epsilon"]) < 0.02
    coefs = np.asarray(plan.noise_addition_transform.coefs, np.float64)
    reference = jax_privacy_noise_multiplier(
        coefs,
        iterations=settings["iterations"],
        epsilon=settings["epsilon"],
        delta=settings["delta"],
        sampling_prob=settings["sampling_prob"],
        truncated_batch_size=settings.get("truncated_batch_size"),
        num_examples=num_examples,
        accountant=accountant,
    )
    assert math.isclose(plan.noise_multiplier, reference, rel_tol=1e-3)


def test_one_band_is_the_dpsgd_plan():
    common = dict(iterations=50, sampling_prob=0.1, noise_multiplier=1.1, noise_seed=9)
    bandmf = dp.BandMFExecutionPlanConfig(num_bands=1, **common).make(grad_fn())
    dpsgd = dp.DPSGDExecutionPlanConfig(**common).make(grad_fn())
    assert bandmf.dp_event == dpsgd.dp_event
    assert bandmf.noise_multiplier == dpsgd.noise_multiplier
    batches = [
        [b.tolist() for b in plan.batch_selection_strategy.batch_iterator(200, rng=1)]
        for plan in (bandmf, dpsgd)
    ]
    assert batches[0] == batches[1]
    params = jnp.zeros(6)
    x = jnp.ones((4, 6))
    states = [p.noise_addition_transform.init(params) for p in (bandmf, dpsgd)]
    for _ in range(3):
        (a, states[0], _), (b, states[1], _) = (
            bandmf.noisy_grad(states[0], params, x),
            dpsgd.noisy_grad(states[1], params, x),
        )
        assert (a == b).all()


def test_noise_scale_and_sampling():
    clipped = grad_fn(clip=2.0)
    config = dp.BandMFExecutionPlanConfig(
        iterations=40,
        num_bands=4,
        sampling_prob=0.5,
        noise_multiplier=1.5,
        num_examples=103,
        neighboring_relation=RELATION.REPLACE_ONE,
        strategy_optimization_steps=20,
    )
    plan = config.make(clipped)
    noise = plan.noise_addition_transform
    assert isinstance(noise, dp.BandMFNoise) and noise.num_bands == 4
    # Unit-norm strategy: stddev = multiplier x sensitivity (2 x clip under replace-one).
    assert math.isclose(float(jnp.linalg.norm(noise.coefs)), 1.0, rel_tol=1e-5)
    assert math.isclose(float(noise.stddev), 1.5 * 4.0, rel_tol=1e-5)
    strategy = plan.batch_selection_strategy
    assert isinstance(strategy, dp.CyclicPoissonSampling)
    assert strategy.cycle_length == 4
    assert strategy.partition_type == dp.PartitionType.EQUAL_SPLIT
    batches = list(strategy.batch_iterator(103, rng=0))
    # Within a cycle the groups are disjoint.
    for start in range(0, 40, 4):
        cycle = np.concatenate(batches[start : start + 4])
        assert len(np.unique(cycle)) == cycle.size
    private_n = dp.BandMFExecutionPlanConfig(
        iterations=40, num_bands=4, sampling_prob=0.5, noise_multiplier=1.0
    ).make(clipped)
    assert private_n.neighboring_relation == RELATION.ADD_OR_REMOVE_ONE
    assert private_n.batch_selection_strategy.partition_type == dp.PartitionType.INDEPENDENT


def test_more_bands_give_lower_rmse_at_equal_batch_size():
    # 1000 examples, expected batch 50, 100 steps, epsilon 4: the per-group rate grows
    # with the bands so that the batch size stays the same.
    rmses = []
    for bands in (1, 4, 10):
        config = dp.BandMFExecutionPlanConfig(
            iterations=100,
            num_bands=bands,
            sampling_prob=0.05 * bands,
            epsilon=4.0,
            delta=1e-5,
            num_examples=1000,
            noise_seed=0,
            strategy_optimization_steps=30,
            accountant=dp_accounting.pld.PLDAccountant(
                RELATION.REPLACE_SPECIAL, value_discretization_interval=1e-3
            ),
        )
        rmses.append(config.make(grad_fn()).prefix_sum_rmse())
    assert rmses[1] < rmses[0] and rmses[2] < rmses[0]


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"num_bands": 0}, r"`num_bands` must be in \[1, iterations=20\]"),
        ({"num_bands": 21}, r"`num_bands` must be in \[1, iterations=20\]"),
        ({"partition_type": dp.PartitionType.EQUAL_SPLIT}, "only valid under a replace"),
        (
            {
                "num_examples": 100,
                "truncated_batch_size": 10,
                "partition_type": dp.PartitionType.INDEPENDENT,
            },
            "needs `EQUAL_SPLIT` groups",
        ),
        ({"truncated_batch_size": 10}, "needs `num_examples`"),
        ({"num_examples": 3}, "smaller than `num_bands=4`"),
        ({"strategy_optimization_steps": -1}, "`strategy_optimization_steps` must be >= 0"),
        ({"epsilon": 1.0, "delta": 1e-5}, "not both"),
        ({"sampling_prob": 0.0}, r"`sampling_prob` must be in \(0, 1\]"),
    ],
)
def test_bad_config(kwargs, message):
    settings = {
        "iterations": 20,
        "num_bands": 4,
        "sampling_prob": 0.5,
        "noise_multiplier": 1.0,
        **kwargs,
    }
    with pytest.raises(ValueError, match=message):
        dp.BandMFExecutionPlanConfig(**settings)


def test_choose_num_bands_picks_the_least_rmse():
    accountant = dp_accounting.pld.PLDAccountant(
        RELATION.REPLACE_SPECIAL, value_discretization_interval=1e-3
    )
    best, rmses = dp.choose_num_bands(
        iterations=24,
        num_examples=240,
        expected_batch_size=30,
        epsilon=4.0,
        delta=1e-5,
        accountant=accountant,
        strategy_optimization_steps=20,
    )
    assert set(rmses) == {1, 2, 4, 8}  # 8 x 30 <= 240 < 16 x 30
    assert rmses[best] == min(rmses.values()) and best > 1
    # One band is DP-SGD: its RMSE is that of the DP-SGD plan at the same epsilon.
    dpsgd = dp.DPSGDExecutionPlanConfig(
        iterations=24,
        sampling_prob=0.125,
        epsilon=4.0,
        delta=1e-5,
        num_examples=240,
        accountant=accountant,
    ).make(grad_fn())
    assert math.isclose(rmses[1], dpsgd.prefix_sum_rmse(), rel_tol=1e-9)
    with pytest.raises(ValueError, match="`expected_batch_size` must be in"):
        dp.choose_num_bands(24, 240, 0, 4.0, 1e-5)
