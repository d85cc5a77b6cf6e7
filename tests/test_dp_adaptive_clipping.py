"""Automatic clipping and quantile-adaptive clipping, against hand-written references
and `dp_accounting`; their crossings with the routes, microbatching, padding, the plans
and the trainer run in `dp_crossings.py`."""

import io
import math

import dp_accounting
import equinox as eqx
import hypothesis.extra.numpy as hnp
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import optax
import pytest
from hypothesis import given, settings

import eqx_micro.dp as dp

from .helpers import assert_tree_allclose


# Poisson sampling is accounted under these two (dp_accounting refuses replace-one).
RELATIONS = [
    dp.NeighboringRelation.ADD_OR_REMOVE_ONE,
    dp.NeighboringRelation.REPLACE_SPECIAL,
]


def _linear_loss(params, x):
    return jnp.sum(params["a"] * x[0, :2]) + jnp.sum(params["b"] * x[0, 2:]) ** 2


def _per_example_grads(x):
    params = {"a": jnp.ones(2), "b": jnp.full(3, 0.5)}
    grads = jax.vmap(jax.grad(_linear_loss), in_axes=(None, 0))(params, x[:, None])
    return params, grads


# --------------------------------------------------------------------------------------
# Automatic clipping.


@settings(max_examples=30, deadline=None)
@given(
    hnp.arrays(np.float32, (5,), elements=st.floats(-1e3, 1e3, width=32)),
    st.floats(0.1, 10.0),
    st.floats(0.0, 1.0),
)
def test_automatic_clipping_contribution_is_below_the_clip_norm(g, clip, gamma):
    clipped, norm = dp.clip_pytree(
        {"g": jnp.asarray(g)}, clip, clipping_fn=dp.AutomaticClipping(gamma)
    )
    got = float(jnp.linalg.norm(clipped["g"]))
    # Hand-derived: c * |g| / (|g| + gamma), strictly below c.
    expected = clip * float(norm) / (float(norm) + gamma) if float(norm) > 0 else 0.0
    assert got < clip * (1 + 1e-6)
    assert math.isclose(got, expected, rel_tol=1e-5, abs_tol=1e-6)


@pytest.mark.parametrize("route", ["vmap", "BOOK_KEEPING", "GHOST"])
@pytest.mark.parametrize("microbatch_size", [None, 2])
@pytest.mark.parametrize("per_layer", [False, True])
def test_automatic_clipping_equals_a_hand_written_reference(
    route, microbatch_size, per_layer
):
    if route == "GHOST" and per_layer:
        pytest.skip("GhostMethod.GHOST takes one clip norm (refused with per-layer ones)")
    x = jax.random.normal(jax.random.key(0), (6, 5)) * jnp.arange(1.0, 7.0)[:, None]
    padding = jnp.array([False, False, True, False, False, True])
    params, grads = _per_example_grads(x)
    gamma = 0.05
    clip = {"a": 2.0, "b": 0.5} if per_layer else 1.5

    def reference_scale(tree, c):
        norm = jnp.sqrt(sum(jnp.sum(leaf**2) for leaf in jtu.tree_leaves(tree)))
        return c / (norm + gamma)

    expected = jtu.tree_map(jnp.zeros_like, params)
    for i in range(6):
        if padding[i]:
            continue
        g = {k: v[i] for k, v in grads.items()}
        if per_layer:
            clipped = {k: g[k] * reference_scale(g[k], clip[k]) for k in g}
        else:
            scale = reference_scale(g, clip)
            clipped = {k: v * scale for k, v in g.items()}
        expected = jtu.tree_map(jnp.add, expected, clipped)

    options = dict(microbatch_size=microbatch_size, clipping_fn=dp.AutomaticClipping(gamma))
    if route == "vmap":
        grad_fn = dp.clipped_grad(_linear_loss, clip, **options)
    else:
        method = dp.GhostMethod[route]
        grad_fn = dp.ghost_clipped_grad(_linear_loss, clip, method=method, **options)
    got, _ = grad_fn(params, x, is_padding_example=padding)
    assert_tree_allclose(got, expected, rtol=1e-5, atol=1e-6)
    # The sensitivity is the clip norm's, as with hard clipping.
    expected_bound = math.sqrt(4.0 + 0.25) if per_layer else 1.5
    assert math.isclose(grad_fn.sensitivity(), expected_bound, rel_tol=1e-6)


def test_automatic_clipping_with_unit_rescaling_and_zero_gradients():
    auto = dp.AutomaticClipping(0.0)  # AUTO-V: exact normalization
    zeros, _ = dp.clip_pytree({"g": jnp.zeros(3)}, 1.0, clipping_fn=auto)
    assert jnp.all(zeros["g"] == 0)  # 0 / 0 is not NaN
    unit, _ = dp.clip_pytree(
        {"g": jnp.array([3.0, 4.0])}, 7.0, rescale_to_unit_norm=True, clipping_fn=auto
    )
    np.testing.assert_allclose(unit["g"], [0.6, 0.8], rtol=1e-6)
    layer = dp.ClipL2(2.0, clipping_fn=dp.AutomaticClipping(1.0))
    np.testing.assert_allclose(layer(jnp.array([3.0, 4.0])), jnp.array([1.0, 4 / 3]))


@pytest.mark.parametrize("gamma", [-1.0, math.inf, math.nan])
def test_automatic_clipping_refuses_a_bad_gamma(gamma):
    with pytest.raises(ValueError, match="gamma"):
        dp.AutomaticClipping(gamma)


def test_clipping_fn_must_be_a_clipping_module():
    # (Under the tests' jaxtyping hook, its type check names the argument first.)
    with pytest.raises(TypeError, match="clipping_fn"):
        dp.clipped_grad(_linear_loss, 1.0, clipping_fn="automatic")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="clipping_fn"):
        dp.clip_pytree(jnp.ones(2), 1.0, clipping_fn=None)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------
# Quantile-adaptive clipping: the update.


def test_adaptive_clip_norm_converges_to_the_target_quantile_without_noise():
    norms = jnp.asarray(np.random.default_rng(0).lognormal(0.0, 1.0, size=400), jnp.float32)
    for target in (0.2, 0.5, 0.9):
        adaptive = dp.QuantileAdaptiveClipping(
            400, target_unclipped_quantile=target, count_stddev=0.0, key=0
        )
        state = adaptive.init(0.01)
        update = jax.jit(adaptive.update)
        for _ in range(400):
            state, _ = update(state, norms)
        quantile = float(np.quantile(np.asarray(norms), target))
        fraction = float(jnp.mean(norms <= state.l2_clip_norm))
        assert abs(fraction - target) <= 0.01, (target, fraction)
        assert abs(float(state.l2_clip_norm) / quantile - 1) < 0.1


def test_adaptive_clip_norm_tracks_the_quantile_with_noise():
    # The paper's setting: count noise of stddev expected_batch_size / 20.
    rng = np.random.default_rng(1)
    adaptive = dp.QuantileAdaptiveClipping(200, target_unclipped_quantile=0.5, key=3)
    state = adaptive.init(10.0)
    update = jax.jit(adaptive.update)
    fractions = []
    for t in range(600):
        norms = jnp.asarray(rng.lognormal(0.0, 0.5, size=200), jnp.float32)
        state, _ = update(state, norms)
        if t >= 300:
            fractions.append(float(jnp.mean(norms <= state.l2_clip_norm)))
    # The noisy fraction has stddev 1/20; the geometric update averages it out.
    assert abs(np.mean(fractions) - 0.5) < 0.03
    assert np.std(fractions) < 0.1


def test_adaptive_update_matches_a_hand_written_reference():
    rng = np.random.default_rng(2)
    adaptive = dp.QuantileAdaptiveClipping(
        8, target_unclipped_quantile=0.4, learning_rate=0.3, count_stddev=1.5, key=7
    )
    linear = dp.QuantileAdaptiveClipping(
        8,
        target_unclipped_quantile=0.4,
        learning_rate=0.3,
        count_stddev=1.5,
        geometric_update=False,
        key=7,
    )
    for module in (adaptive, linear):
        state = module.init({"a": 1.0, "b": 2.0})
        clips = {"a": 1.0, "b": 2.0}
        key = jax.random.key(7)
        for _ in range(5):
            norms = {k: jnp.asarray(rng.exponential(2.0, 10), jnp.float32) for k in clips}
            padding = jnp.asarray(rng.random(10) < 0.3)
            state, fraction = module.update(state, norms, padding)
            key, step_key = jax.random.split(key)
            noise = np.asarray(jax.random.normal(step_key, (2,), jnp.float32))
            for k, z in zip(("a", "b"), noise):
                real = ~np.asarray(padding)
                count = np.sum(np.where(real, (np.asarray(norms[k]) <= clips[k]) - 0.5, 0))
                frac = (count + 1.5 * z) / 8 + 0.5
                if module.geometric_update:
                    clips[k] = clips[k] * math.exp(-0.3 * (frac - 0.4))
                else:
                    clips[k] = max(clips[k] - 0.3 * (frac - 0.4), 0.0)
                assert math.isclose(float(fraction[k]), frac, rel_tol=1e-5)
            for k in clips:
                assert math.isclose(float(state.l2_clip_norm[k]), clips[k], rel_tol=1e-5)


def test_padding_never_counts():
    adaptive = dp.QuantileAdaptiveClipping(3, count_stddev=0.0, key=0)
    norms = jnp.array([0.5, 2.0, 3.0])
    alone, fraction = adaptive.update(adaptive.init(1.0), norms)
    padded_norms = jnp.array([0.5, 0.0, 2.0, 0.0, 3.0])  # padded rows have norm 0
    padding = jnp.array([False, True, False, True, False])
    padded, padded_fraction = adaptive.update(adaptive.init(1.0), padded_norms, padding)
    assert fraction == padded_fraction == pytest.approx(1 / 3)
    assert alone.l2_clip_norm == padded.l2_clip_norm


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(expected_batch_size=0), "expected_batch_size"),
        (dict(expected_batch_size=10, target_unclipped_quantile=1.0), "quantile"),
        (dict(expected_batch_size=10, target_unclipped_quantile="half"), "quantile"),
        (dict(expected_batch_size=10, learning_rate=-0.1), "learning_rate"),
        (dict(expected_batch_size=10, count_stddev=math.nan), "count_stddev"),
        (dict(expected_batch_size=10, geometric_update=1), "geometric_update"),
    ],
)
def test_adaptive_clipping_refuses_bad_arguments(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        dp.QuantileAdaptiveClipping(**kwargs)


def test_adaptive_clipping_without_a_key_says_where_to_get_one():
    with pytest.raises(ValueError, match="key"):
        dp.QuantileAdaptiveClipping(10).init(1.0)
    adaptive = dp.QuantileAdaptiveClipping(10, key=0)
    with pytest.raises(ValueError, match="grad_norms"):
        adaptive.update(adaptive.init({"a": 1.0, "b": 1.0}), jnp.ones(3))


# --------------------------------------------------------------------------------------
# The plan: the split of the noise, the accounting and the release.


def _grad_fn(clip=1.0, **kwargs):
    return dp.clipped_grad(lambda w, x, key: jnp.sum(w * x), clip, key_argnum=2, **kwargs)


def test_count_sensitivity_per_relation():
    adaptive = dp.QuantileAdaptiveClipping(10)
    relation = dp.NeighboringRelation
    # One example moves each centered count by 1/2 (add, remove, zero-out) or 1
    # (replaced by another), as the gradient's bound is c or 2c.
    assert adaptive.count_sensitivity(1, relation.ADD_OR_REMOVE_ONE) == 0.5
    assert adaptive.count_sensitivity(1, relation.REPLACE_SPECIAL) == 0.5
    assert adaptive.count_sensitivity(1, relation.REPLACE_ONE) == 1.0
    assert adaptive.count_sensitivity(4, relation.REPLACE_ONE) == 2.0


@pytest.mark.parametrize("relation", RELATIONS)
@pytest.mark.parametrize("per_layer", [False, True])
def test_adaptive_event_equals_dp_accounting_on_the_composition(relation, per_layer):
    adaptive = dp.QuantileAdaptiveClipping(50, count_stddev=4.0)
    if per_layer:
        clip = {"a": 1.0, "b": 2.0}
        grad_fn = dp.clipped_grad(
            lambda p, x: jnp.sum(p["a"] * x) + jnp.sum(p["b"] * x), clip
        )
    else:
        grad_fn = dp.clipped_grad(lambda w, x: jnp.sum(w * x), 1.0)
    num_examples = None if relation == dp.NeighboringRelation.ADD_OR_REMOVE_ONE else 1000
    config = dp.DPSGDExecutionPlanConfig(
        iterations=200,
        sampling_prob=0.05,
        epsilon=3.0,
        delta=1e-6,
        num_examples=num_examples,
        neighboring_relation=relation,
        accountant=dp.Accountant.RDP,
        adaptive_clipping=adaptive,
        noise_seed=0,
    )
    plan = config.make(grad_fn)
    clips = 2 if per_layer else 1
    factor = 2.0 if relation == dp.NeighboringRelation.REPLACE_ONE else 1.0
    # The count's sensitivity, derived by hand: 1/2 per clip norm (1 for replace-one).
    z_count = 4.0 / (factor * 0.5 * math.sqrt(clips))
    z = plan.noise_multiplier
    z_grad = (z**-2 - z_count**-2) ** -0.5
    # The gradient noise is z_grad times the callable's sensitivity.
    stddev = float(plan.noise_addition_transform.stddev)
    assert math.isclose(stddev, z_grad * grad_fn.sensitivity(relation), rel_tol=1e-6)
    # dp_accounting on the explicit composition of the two Gaussian queries.
    composed = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(
            0.05,
            dp_accounting.ComposedDpEvent(
                [
                    dp_accounting.GaussianDpEvent(z_grad),
                    dp_accounting.GaussianDpEvent(z_count),
                ]
            ),
        ),
        200,
    )
    accountant = dp_accounting.rdp.RdpAccountant(neighboring_relation=relation)
    expected = accountant.compose(composed).get_epsilon(1e-6)
    assert math.isclose(plan.epsilon(1e-6), expected, rel_tol=1e-9)
    assert plan.epsilon(1e-6) <= 3.0 + 1e-9


def test_adaptive_bandmf_plan_splits_the_noise_too():
    adaptive = dp.QuantileAdaptiveClipping(50, count_stddev=10.0)
    grad_fn = _grad_fn(2.0)
    config = dp.BandMFExecutionPlanConfig(
        iterations=40,
        num_bands=4,
        sampling_prob=0.2,
        noise_multiplier=1.5,
        adaptive_clipping=adaptive,
        noise_seed=0,
    )
    plan = config.make(grad_fn)
    fixed = dp.BandMFExecutionPlanConfig(
        iterations=40, num_bands=4, sampling_prob=0.2, noise_multiplier=1.5, noise_seed=0
    ).make(grad_fn)
    z_grad = (1.5**-2 - 20.0**-2) ** -0.5
    ratio = float(plan.noise_addition_transform.stddev) / float(
        fixed.noise_addition_transform.stddev
    )
    assert math.isclose(ratio, z_grad / 1.5, rel_tol=1e-6)
    assert plan.epsilon(1e-5) == fixed.epsilon(1e-5)  # the same event
    assert plan.prefix_sum_rmse() > fixed.prefix_sum_rmse()


def test_adaptive_release_scales_the_noise_with_the_clip_norm():
    # Gradients all zero: the release is pure noise, of stddev z_grad * current clip.
    grad_fn = dp.clipped_grad(lambda w, x: jnp.sum(w * x) * 0.0, 1.0)
    adaptive = dp.QuantileAdaptiveClipping(10, count_stddev=100.0)
    plan = dp.DPSGDExecutionPlanConfig(
        5, 0.5, noise_multiplier=2.0, adaptive_clipping=adaptive, noise_seed=1
    ).make(grad_fn)
    params = jnp.zeros(200_000)
    noise_state = plan.noise_addition_transform.init(params)
    assert plan.adaptive_clipping is not None
    clip_state = plan.adaptive_clipping.init(3.0)
    noisy, _, clip_state, aux = plan.adaptive_noisy_grad(
        noise_state, clip_state, params, jnp.ones((4, 200_000))
    )
    z_grad = (2.0**-2 - (100.0 / 0.5) ** -2) ** -0.5
    assert abs(float(jnp.std(noisy)) / (3.0 * z_grad) - 1) < 0.01
    assert aux.grad_norms.shape == (4,)


def test_adaptive_plan_refuses_what_it_cannot_honor():
    adaptive = dp.QuantileAdaptiveClipping(10, count_stddev=0.5)  # z_count 1
    with pytest.raises(ValueError, match="count_stddev"):
        dp.DPSGDExecutionPlanConfig(
            5, 0.5, noise_multiplier=2.0, adaptive_clipping=adaptive
        ).make(_grad_fn())
    roomy = dp.QuantileAdaptiveClipping(10, count_stddev=50.0)
    with pytest.raises(ValueError, match="positive"):
        dp.DPSGDExecutionPlanConfig(
            5, 0.5, noise_multiplier=1.0, adaptive_clipping=roomy
        ).make(_grad_fn(0.0))
    with pytest.raises(TypeError, match="adaptive_clipping"):
        dp.DPSGDExecutionPlanConfig(
            5,
            0.5,
            noise_multiplier=1.0,
            adaptive_clipping=0.5,  # type: ignore[arg-type]
        )
    plan = dp.DPSGDExecutionPlanConfig(
        5, 0.5, noise_multiplier=1.0, adaptive_clipping=roomy, noise_seed=0
    ).make(_grad_fn())
    state = plan.noise_addition_transform.init(jnp.zeros(2))
    with pytest.raises(TypeError, match="adaptive_noisy_grad"):
        plan.noisy_grad(state, jnp.zeros(2), jnp.ones((3, 2)), jax.random.key(0))
    fixed = dp.DPSGDExecutionPlanConfig(5, 0.5, noise_multiplier=1.0).make(_grad_fn())
    with pytest.raises(TypeError, match="fixed clip norm"):
        clip_state = dp.QuantileAdaptiveClipping(10, key=0).init(1.0)
        fixed.adaptive_noisy_grad(state, clip_state, jnp.zeros(2), jnp.ones((3, 2)))


# --------------------------------------------------------------------------------------
# The trainer: the clip norm in the state, the report and resuming.


def _trainer(adaptive=True, ghost=False, microbatch_size=None):
    def loss(model, batch, key):
        return jnp.mean((jax.vmap(model)(batch["x"]) - batch["y"]) ** 2)

    make = dp.ghost_clipped_grad if ghost else dp.clipped_grad
    grad_fn = make(loss, 1.0, key_argnum=2, microbatch_size=microbatch_size)
    config = dp.DPSGDExecutionPlanConfig(
        iterations=12,
        sampling_prob=0.1,
        epsilon=4.0,
        delta=1e-5,
        accountant=dp.Accountant.RDP,
        noise_seed=3,
        adaptive_clipping=dp.QuantileAdaptiveClipping(20) if adaptive else None,
    )
    return dp.DPTrainer(config.make(grad_fn), optax.sgd(0.05), normalize_by=20)


def _data():
    x = np.random.default_rng(0).normal(size=(200, 3)).astype(np.float32)
    return {"x": x, "y": 3 * x.sum(axis=1, keepdims=True)}


FIT = dict(rng=1, key=jax.random.key(2), delta=1e-5, padding_multiple=32, progress=False)


def test_trainer_carries_reports_and_resumes_the_clip_norm():
    trainer = _trainer()
    model = eqx.nn.Linear(3, 1, key=jax.random.key(0))
    clips = []

    def record(state, metrics):
        clips.append(float(metrics["clip_norm"]))

    final, report = trainer.fit(_data(), model, callback=record, **FIT)
    # Step t used the clip norm the previous step left; the first used the initial.
    assert clips[0] == 1.0 and len(set(clips)) > 5
    assert report.l2_clip_norm is not None and report.l2_clip_norm != 1.0

    saved = io.BytesIO()

    def stop_at_5(state, metrics):
        if int(state.step) == 5:
            eqx.tree_serialise_leaves(saved, state)
            return True
        return False

    trainer.fit(_data(), model, callback=stop_at_5, **FIT)
    saved.seek(0)
    state = eqx.tree_deserialise_leaves(saved, trainer.init(model))
    resumed, resumed_report = trainer.fit(_data(), state, **FIT)
    # Bit for bit: the clip norm, its noise key and the model.
    assert resumed_report.l2_clip_norm == report.l2_clip_norm
    assert jnp.array_equal(resumed.weight, final.weight)


def test_vmap_and_ghost_give_the_same_clip_trajectory():
    results = []
    for ghost in (False, True):
        for microbatch_size in (None, 8):
            trainer = _trainer(ghost=ghost, microbatch_size=microbatch_size)
            model = eqx.nn.Linear(3, 1, key=jax.random.key(0))
            clips: list[float] = []

            def record(state, metrics, clips=clips):
                clips.append(float(metrics["clip_norm"]))

            model, _ = trainer.fit(_data(), model, callback=record, **FIT)
            results.append((np.array(clips), model))
    for clips, model in results[1:]:
        np.testing.assert_allclose(clips, results[0][0], rtol=1e-5)
        np.testing.assert_allclose(model.weight, results[0][1].weight, rtol=1e-4, atol=1e-6)


def test_trainer_refuses_a_state_from_the_other_kind_of_plan():
    adaptive, fixed = _trainer(adaptive=True), _trainer(adaptive=False)
    model = eqx.nn.Linear(3, 1, key=jax.random.key(0))
    batch = {"x": jnp.ones((4, 3)), "y": jnp.ones((4, 1))}
    padding = jnp.zeros(4, bool)
    with pytest.raises(TypeError, match="clip_state"):
        adaptive.step(fixed.init(model), batch, padding, jax.random.key(0))
    with pytest.raises(TypeError, match="clip_state"):
        fixed.step(adaptive.init(model), batch, padding, jax.random.key(0))
    with pytest.raises(TypeError, match="clip_state"):
        adaptive.fit(_data(), fixed.init(model), **FIT)
