"""`dp.BLTExecutionPlanConfig`: its event and calibration against `dp_accounting`, its
noise scale against the strategy's sensitivity, its participation pattern, and its
crossings with the trainer (microbatching, ghost clipping, resume, adaptive clipping)."""

import io
import math

import dp_accounting
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import eqx_micro.dp as dp


STRATEGY = dp.BufferedToeplitz([0.8, 0.3], [0.2, 0.1])


def _grad_fn(clip=1.0, **kwargs):
    return dp.clipped_grad(lambda w, x, key: jnp.sum(w * x), clip, key_argnum=2, **kwargs)


@pytest.mark.parametrize("accountant", [dp.Accountant.PLD, dp.Accountant.RDP])
def test_event_is_one_gaussian_and_calibrates_to_the_target(accountant):
    config = dp.BLTExecutionPlanConfig(
        iterations=60,
        num_examples=600,
        cycle_length=6,
        strategy=STRATEGY,
        epsilon=2.0,
        delta=1e-6,
        accountant=accountant,
        noise_seed=0,
    )
    plan = config.make(_grad_fn())
    z = plan.noise_multiplier
    assert plan.dp_event == dp_accounting.GaussianDpEvent(z)
    relation = dp.NeighboringRelation.REPLACE_SPECIAL  # the dataset size is public
    pld = dp_accounting.pld.PLDAccountant(relation)
    expected = pld.compose(dp_accounting.GaussianDpEvent(z)).get_epsilon(1e-6)
    assert plan.epsilon(1e-6) <= 2.0 + 1e-9
    if accountant == dp.Accountant.PLD:
        assert math.isclose(plan.epsilon(1e-6), expected, rel_tol=1e-9)
    # Calibrated tight: a little less noise would miss the target.
    assert pld.compose(dp_accounting.GaussianDpEvent(0.98 * z)).get_epsilon(1e-6) > 2.0


@pytest.mark.parametrize("relation", list(dp.NeighboringRelation))
def test_noise_is_scaled_by_both_sensitivities(relation):
    grad_fn = _grad_fn(2.5)
    plan = dp.BLTExecutionPlanConfig(
        iterations=20,
        num_examples=100,
        cycle_length=4,
        strategy=STRATEGY,
        noise_multiplier=1.3,
        neighboring_relation=relation,
    ).make(grad_fn)
    noise = plan.noise_addition_transform
    assert isinstance(noise, dp.BLTNoise)
    # 20 steps, every 4th: 5 participations, 4 apart, of the float32 strategy streamed.
    column = noise.strategy.sensitivity(20, min_sep=4, max_participations=5)
    expected = 1.3 * grad_fn.sensitivity(relation) * column
    assert math.isclose(float(noise.stddev), expected, rel_tol=1e-6)
    # Hand-derived: the sum of the columns at steps 0, 4, ..., 16 of C.
    coefs = STRATEGY.toeplitz_coefs(20)
    summed = sum(np.concatenate([np.zeros(s), coefs[: 20 - s]]) for s in range(0, 20, 4))
    assert math.isclose(column, float(np.linalg.norm(summed)), rel_tol=1e-5)


def test_prefix_sum_rmse_and_the_identity_strategy():
    grad_fn = _grad_fn()
    settings = dict(iterations=30, num_examples=90, cycle_length=3, noise_multiplier=2.0)
    identity = dp.BLTExecutionPlanConfig(num_buffers=0, **settings).make(grad_fn)
    # No buffers: independent noise, 10 participations add in quadrature.
    assert math.isclose(
        identity.prefix_sum_rmse(), 2.0 * math.sqrt(10) * math.sqrt(31 / 2), rel_tol=1e-6
    )
    blt = dp.BLTExecutionPlanConfig(num_buffers=3, **settings).make(grad_fn)
    noise = blt.noise_addition_transform
    assert isinstance(noise, dp.BLTNoise)
    expected = 2.0 * noise.strategy.rmse(30, min_sep=3, max_participations=10)
    assert math.isclose(blt.prefix_sum_rmse(), expected, rel_tol=1e-9)
    assert blt.prefix_sum_rmse() < 0.75 * identity.prefix_sum_rmse()  # measured 0.70


def test_every_example_participates_every_cycle_length_steps():
    config = dp.BLTExecutionPlanConfig(
        iterations=12, num_examples=40, cycle_length=4, num_buffers=1, noise_multiplier=1.0
    )
    plan = config.make(_grad_fn())
    steps: dict[int, list[int]] = {}
    batches = plan.batch_selection_strategy.batch_iterator(40, rng=0)
    for t, batch in enumerate(batches):
        assert len(batch) == 10  # a whole group: sampling_prob 1
        for i in batch.tolist():
            steps.setdefault(i, []).append(t)
    assert sorted(steps) == list(range(40))
    for seen in steps.values():
        assert len(seen) == config.max_participations == 3
        assert np.all(np.diff(seen) == 4)


def _trainer(route="vmap", microbatch_size=None, adaptive=None, buffers=3):
    def loss(model, batch, key):
        return jnp.mean((jax.vmap(model)(batch["x"]) - batch["y"]) ** 2)

    make = dp.clipped_grad if route == "vmap" else dp.ghost_clipped_grad
    grad_fn = make(loss, 1.0, key_argnum=2, microbatch_size=microbatch_size)
    plan = dp.BLTExecutionPlanConfig(
        iterations=12,
        num_examples=96,
        cycle_length=4,
        num_buffers=buffers,
        epsilon=8.0,
        delta=1e-5,
        accountant=dp.Accountant.RDP,
        noise_seed=5,
        adaptive_clipping=adaptive,
    ).make(grad_fn)
    return dp.DPTrainer(plan, optax.sgd(0.1), normalize_by=24)


def _data():
    x = np.random.default_rng(0).normal(size=(96, 3)).astype(np.float32)
    return {"x": x, "y": x.sum(axis=1, keepdims=True)}


FIT = dict(rng=1, key=jax.random.key(2), delta=1e-5, padding_multiple=32, progress=False)


def test_trainer_routes_microbatching_and_resume_agree():
    model = eqx.nn.Linear(3, 1, key=jax.random.key(0))
    reference, report = _trainer().fit(_data(), model, **FIT)
    assert report.steps == 12 and report.epsilon <= 8.0
    assert not np.allclose(reference.weight, model.weight)
    for route, microbatch_size in (("vmap", 8), ("ghost", None), ("ghost", 8)):
        trained, _ = _trainer(route, microbatch_size).fit(_data(), model, **FIT)
        np.testing.assert_allclose(trained.weight, reference.weight, rtol=1e-4, atol=1e-6)

    trainer = _trainer()
    saved = io.BytesIO()

    def stop_at_5(state, metrics):
        if int(state.step) == 5:
            eqx.tree_serialise_leaves(saved, state)
            return True
        return False

    trainer.fit(_data(), model, callback=stop_at_5, **FIT)
    saved.seek(0)
    state = eqx.tree_deserialise_leaves(saved, trainer.init(model))
    assert state.noise_state.buffers.weight.shape == (3, 1, 3)
    resumed, _ = trainer.fit(_data(), state, **FIT)
    assert jnp.array_equal(resumed.weight, reference.weight)


def test_adaptive_clipping_with_blt_noise():
    adaptive = dp.QuantileAdaptiveClipping(24, count_stddev=6.0)
    trainer = _trainer(adaptive=adaptive)
    model = eqx.nn.Linear(3, 1, key=jax.random.key(0))
    _, report = trainer.fit(_data(), model, **FIT)
    assert report.l2_clip_norm is not None and report.l2_clip_norm != 1.0
    assert report.epsilon <= 8.0


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(cycle_length=0), ValueError, "cycle_length"),
        (dict(cycle_length=500), ValueError, "cycle_length"),
        (dict(num_buffers=-1), ValueError, "num_buffers"),
        (dict(strategy=[0.5]), TypeError, "strategy"),
        (dict(objective="rmse"), TypeError, "objective"),
        (dict(sampling_prob=0.0), ValueError, "sampling_prob"),
    ],
)
def test_config_refuses_bad_arguments(kwargs, error, match):
    settings = dict(iterations=10, num_examples=100, noise_multiplier=1.0)
    # (Under the tests' jaxtyping hook, a type check may name the argument first.)
    with pytest.raises((error, TypeError), match=match):
        dp.BLTExecutionPlanConfig(**{**settings, **kwargs})
