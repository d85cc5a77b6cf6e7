"""DP-SGD execution plans: calibration, noise scale, accounting and misuse."""

import math

import dp_accounting
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

import eqx_micro.dp as dp


RELATION = dp.NeighboringRelation


def linear_loss(w, x):
    return jnp.sum(w * x)


def grad_fn(clip=1.0, **kwargs):
    return dp.clipped_grad(linear_loss, clip, **kwargs)


def reference_epsilon(noise_multiplier, iterations, sampling_prob, delta, relation):
    """dp_accounting's own PLD computation of Poisson-sampled DP-SGD."""
    event = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(
            sampling_prob, dp_accounting.GaussianDpEvent(noise_multiplier)
        ),
        iterations,
    )
    accountant = dp_accounting.pld.PLDAccountant(relation)
    return accountant.compose(event).get_epsilon(delta)


@pytest.mark.parametrize(
    "iterations,sampling_prob,epsilon,delta,extra",
    [
        (512, 0.1, 1.0, 1e-6, {}),
        (1000, 0.01, 2.0, 1e-5, {}),
        (200, 0.02, 3.0, 1e-5, {"accountant": dp.Accountant.RDP}),
        (
            100,
            0.01,
            1.0,
            1e-6,
            # A coarse PLD keeps the truncated event's calibration at seconds.
            {
                "num_examples": 1000,
                "truncated_batch_size": 30,
                "accountant": dp_accounting.pld.PLDAccountant(
                    RELATION.REPLACE_SPECIAL, value_discretization_interval=1e-2
                ),
            },
        ),
        (300, 0.05, 4.0, 1e-5, {"neighboring_relation": RELATION.REPLACE_ONE}),
    ],
)
def test_calibrate_then_reaccount_gives_the_target(
    iterations, sampling_prob, epsilon, delta, extra
):
    config = dp.DPSGDExecutionPlanConfig(
        iterations=iterations,
        sampling_prob=sampling_prob,
        epsilon=epsilon,
        delta=delta,
        noise_seed=0,
        **extra,
    )
    plan = config.make(grad_fn())
    achieved = plan.epsilon(delta)
    assert epsilon - 0.02 <= achieved <= epsilon
    # A slightly smaller noise multiplier would break the target: calibration is tight.
    smaller = dp.DPSGDExecutionPlanConfig(
        iterations=iterations,
        sampling_prob=sampling_prob,
        noise_multiplier=plan.noise_multiplier * 0.98,
        noise_seed=0,
        **extra,
    ).make(grad_fn())
    assert smaller.epsilon(delta) > epsilon


@pytest.mark.parametrize("relation", [RELATION.ADD_OR_REMOVE_ONE, RELATION.REPLACE_ONE])
def test_event_equals_dp_accounting(relation):
    config = dp.DPSGDExecutionPlanConfig(
        iterations=400,
        sampling_prob=0.02,
        noise_multiplier=1.3,
        neighboring_relation=relation,
        noise_seed=0,
    )
    plan = config.make(grad_fn())
    expected = reference_epsilon(1.3, 400, 0.02, 1e-5, relation)
    assert math.isclose(plan.epsilon(1e-5), expected, rel_tol=1e-6)


@pytest.mark.parametrize(
    "relation,kwargs,factor",
    [
        (None, {}, 1.0),
        (RELATION.REPLACE_ONE, {}, 2.0),
        (RELATION.REPLACE_SPECIAL, {}, 1.0),
        (None, {"num_examples": 1000}, 1.0),
    ],
)
def test_noise_stddev_is_multiplier_times_sensitivity(relation, kwargs, factor):
    clipped = grad_fn(clip=3.0, normalize_by=2.0)  # sensitivity 1.5
    config = dp.DPSGDExecutionPlanConfig(
        iterations=10,
        sampling_prob=0.1,
        noise_multiplier=0.8,
        neighboring_relation=relation,
        noise_seed=0,
        **kwargs,
    )
    plan = config.make(clipped)
    assert math.isclose(
        float(plan.noise_addition_transform.stddev), 0.8 * 1.5 * factor, rel_tol=1e-6
    )
    expected_relation = relation or (
        RELATION.REPLACE_SPECIAL if kwargs else RELATION.ADD_OR_REMOVE_ONE
    )
    assert plan.neighboring_relation == expected_relation


def test_microbatching_does_not_change_accounting_or_noise():
    config = dp.DPSGDExecutionPlanConfig(
        iterations=100, sampling_prob=0.05, noise_multiplier=1.7, noise_seed=3
    )
    plans = [config.make(grad_fn(microbatch_size=m)) for m in (None, 1, 4)]
    assert len({p.noise_multiplier for p in plans}) == 1
    assert all(p.dp_event == plans[0].dp_event for p in plans)
    x = jnp.ones((8, 5))
    outputs = []
    for plan in plans:
        state = plan.noise_addition_transform.init(None)
        noisy, _, _ = plan.noisy_grad(state, jnp.zeros(5), x)
        outputs.append(noisy)
    assert all(jnp.allclose(o, outputs[0], atol=1e-5) for o in outputs)


def test_noisy_grad_adds_noise_of_the_planned_scale():
    clipped = grad_fn(clip=1.0)
    plan = dp.DPSGDExecutionPlanConfig(
        iterations=5, sampling_prob=0.1, noise_multiplier=2.0, noise_seed=1
    ).make(clipped)
    params = jnp.zeros(20_000)
    x = jnp.ones((3, 20_000)) * 1e-4  # each example's gradient has norm 0.0141
    state = plan.noise_addition_transform.init(None)
    noisy, state, aux = plan.noisy_grad(state, params, x)
    clean, _ = clipped(params, x)
    residual = np.asarray(noisy - clean, np.float64)
    assert scipy.stats.kstest(residual / 2.0, "norm").pvalue > 1e-3
    assert state.count == 1 and aux.num_nonfinite == 0


def test_seeded_noise_reproduces_and_unseeded_does_not():
    def first_release(seed):
        plan = dp.DPSGDExecutionPlanConfig(
            iterations=3, sampling_prob=0.1, noise_multiplier=1.0, noise_seed=seed
        ).make(grad_fn())
        state = plan.noise_addition_transform.init(None)
        return plan.noisy_grad(state, jnp.zeros(4), jnp.ones((2, 4)))[0]

    assert (first_release(7) == first_release(7)).all()
    assert not (first_release(None) == first_release(None)).all()


def test_running_past_the_accounted_iterations_fails():
    plan = dp.DPSGDExecutionPlanConfig(
        iterations=2, sampling_prob=0.1, noise_multiplier=1.0, noise_seed=0
    ).make(grad_fn())
    step = eqx.filter_jit(plan.noisy_grad)
    state = plan.noise_addition_transform.init(None)
    x = jnp.ones((2, 3))
    for _ in range(2):
        _, state, _ = step(state, jnp.zeros(3), x)
    with pytest.raises(Exception, match="noise state has made them all"):
        jax.block_until_ready(step(state, jnp.zeros(3), x))
    # Outside `jit` the count is known: a plain error, naming the number, comes first.
    with pytest.raises(ValueError, match="covers 2 iterations and the noise state"):
        plan.noisy_grad(state, jnp.zeros(3), x)


def test_plan_samples_as_configured():
    plan = dp.DPSGDExecutionPlanConfig(
        iterations=50,
        sampling_prob=0.2,
        noise_multiplier=1.0,
        num_examples=100,
        truncated_batch_size=22,
        noise_seed=0,
    ).make(grad_fn())
    strategy = plan.batch_selection_strategy
    assert isinstance(strategy, dp.PoissonSampling)
    sizes = [len(b) for b in strategy.batch_iterator(100, rng=0)]
    assert len(sizes) == 50 and max(sizes) <= 22
    assert abs(np.mean(sizes) - 20) < 2.5


def test_empty_batch_still_gets_noise():
    plan = dp.DPSGDExecutionPlanConfig(
        iterations=1, sampling_prob=0.01, noise_multiplier=1.0, noise_seed=0
    ).make(grad_fn())
    state = plan.noise_addition_transform.init(None)
    noisy, _, _ = plan.noisy_grad(state, jnp.zeros(50), jnp.zeros((0, 50)))
    assert noisy.shape == (50,) and 0.6 < float(jnp.std(noisy)) < 1.4


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"epsilon": 0.0, "delta": 1e-5}, r"`epsilon` must be finite and > 0"),
        ({"epsilon": -1.0, "delta": 1e-5}, r"`epsilon` must be finite and > 0"),
        ({"epsilon": 1.0, "delta": 0.0}, r"`delta` must be in \(0, 1\)"),
        ({"epsilon": 1.0, "delta": 1.0}, r"`delta` must be in \(0, 1\)"),
        ({"epsilon": 1.0}, "needs a `delta` too"),
        ({"epsilon": 1.0, "delta": 1e-5, "noise_multiplier": 1.0}, "not both"),
        ({}, "got neither"),
        ({"noise_multiplier": -1.0}, "`noise_multiplier` must be finite and >= 0"),
        ({"noise_multiplier": 1.0, "sampling_prob": 0.0}, r"`sampling_prob` must be in"),
        ({"noise_multiplier": 1.0, "sampling_prob": 1.5}, r"`sampling_prob` must be in"),
        ({"noise_multiplier": 1.0, "truncated_batch_size": 10}, "needs `num_examples`"),
        ({"noise_multiplier": 1.0, "iterations": 0}, "`iterations` must be a positive"),
        (
            {"noise_multiplier": 1.0, "num_examples": 10, "truncated_batch_size": 0},
            "`truncated_batch_size` must be >= 1",
        ),
    ],
)
def test_bad_config(kwargs, message):
    settings = {"iterations": 10, "sampling_prob": 0.1, **kwargs}
    with pytest.raises(ValueError, match=message):
        dp.DPSGDExecutionPlanConfig(**settings)


def test_accountant_and_relation_must_agree():
    accountant = dp_accounting.pld.PLDAccountant(RELATION.REPLACE_ONE)
    config = dp.DPSGDExecutionPlanConfig(
        10, 0.1, noise_multiplier=1.0, noise_seed=0, accountant=accountant
    )
    plan = config.make(grad_fn())
    assert plan.neighboring_relation == RELATION.REPLACE_ONE
    assert float(plan.noise_addition_transform.stddev) == 2.0
    clash = dp.DPSGDExecutionPlanConfig(
        10,
        0.1,
        epsilon=1.0,
        delta=1e-5,
        accountant=accountant,
        neighboring_relation=RELATION.ADD_OR_REMOVE_ONE,
    )
    with pytest.raises(ValueError, match="accounts under REPLACE_ONE but"):
        clash.make(grad_fn())


def test_make_needs_a_bounded_sensitivity_callable():
    config = dp.DPSGDExecutionPlanConfig(10, 0.1, noise_multiplier=1.0)
    with pytest.raises(TypeError, match="clipped_aggregation_fn"):
        config.make(linear_loss)  # type: ignore[arg-type]
