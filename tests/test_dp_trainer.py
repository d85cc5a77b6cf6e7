"""`dp.DPTrainer`: resume identity, clipped SGD without noise, accounting, padding,
compilation count and the BatchNorm error."""

import math

import dp_accounting
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import optax
import pytest

import eqx_micro.dp as dp

from .helpers import assert_tree_allclose


NUM_EXAMPLES = 40
DELTA = 1e-5


def make_data(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(NUM_EXAMPLES, 3)).astype(np.float32)
    y = (x @ np.array([1.0, -2.0, 0.5], np.float32) + 1.0)[:, None]
    return {"x": x, "y": y}


def make_model() -> eqx.nn.MLP:
    return eqx.nn.MLP(3, 1, width_size=4, depth=1, key=jax.random.key(0))


def loss(model, batch, key):
    """One example (a batch axis of size 1); the key scales a tiny input jitter."""
    jitter = 1e-3 * jax.random.normal(key, batch["x"].shape)
    prediction = jax.vmap(model)(batch["x"] + jitter)
    return jnp.mean((prediction - batch["y"]) ** 2)


def dpsgd_trainer(
    fun=loss,
    *,
    iterations: int = 12,
    sampling_prob: float = 0.25,
    noise_multiplier: float = 1.0,
    microbatch_size: int | None = 2,
    clip: float = 0.5,
    optimizer=None,
) -> dp.DPTrainer:
    grad_fn = dp.clipped_grad(
        fun, clip, microbatch_size=microbatch_size, key_argnum=2, return_values=True
    )
    plan = dp.DPSGDExecutionPlanConfig(
        iterations=iterations,
        sampling_prob=sampling_prob,
        noise_multiplier=noise_multiplier,
        accountant=dp.Accountant.RDP,
        noise_seed=3,
    ).make(grad_fn)
    optimizer = optax.sgd(0.1, momentum=0.5) if optimizer is None else optimizer
    return dp.DPTrainer(plan, optimizer, normalize_by=sampling_prob * NUM_EXAMPLES)


def fit(trainer, model_or_state, seed=1, **kwargs):
    return trainer.fit(
        make_data(),
        model_or_state,
        rng=np.random.default_rng(seed),
        key=jax.random.key(7),
        delta=DELTA,
        progress=False,
        **kwargs,
    )


def assert_bit_identical(actual, expected):
    actual_leaves = jtu.tree_leaves(eqx.filter(actual, eqx.is_array))
    expected_leaves = jtu.tree_leaves(eqx.filter(expected, eqx.is_array))
    assert len(actual_leaves) == len(expected_leaves)
    for a, e in zip(actual_leaves, expected_leaves):
        assert a.dtype == e.dtype and np.array_equal(np.asarray(a), np.asarray(e))


# Compiling a step takes seconds: the tests share trainers (and so compiled steps).
TRAINER = dpsgd_trainer()


def test_resume_is_bit_identical(tmp_path):
    trainer = TRAINER
    uninterrupted, full_report = fit(trainer, make_model())

    checkpoint = tmp_path / "state.eqx"

    def save_and_stop(state, metrics):
        if int(state.step) == 5:
            eqx.tree_serialise_leaves(checkpoint, state)
            return True
        return False

    _, partial_report = fit(trainer, make_model(), callback=save_and_stop)
    assert partial_report.steps == 5
    state = eqx.tree_deserialise_leaves(checkpoint, trainer.init(make_model()))
    assert int(state.step) == 5 and int(state.noise_state.count) == 5
    resumed, resumed_report = fit(trainer, state)
    assert_bit_identical(resumed, uninterrupted)
    assert resumed_report == full_report and full_report.steps == 12


def clip(tree, norm):
    leaves = jtu.tree_leaves(tree)
    total = math.sqrt(sum(float(jnp.sum(g.astype(jnp.float64) ** 2)) for g in leaves))
    scale = min(1.0, norm / total) if total > 0 else 1.0
    return jtu.tree_map(lambda g: g * scale, tree)


example_grad = eqx.filter_jit(eqx.filter_grad(loss))


@pytest.mark.parametrize("microbatch_size", [None, 4])
def test_noise_free_matches_hand_written_clipped_sgd(microbatch_size):
    iterations, prob, lr, clip_norm = 6, 0.25, 0.2, 0.5
    trainer = dpsgd_trainer(
        iterations=iterations,
        sampling_prob=prob,
        noise_multiplier=0.0,
        microbatch_size=microbatch_size,
        clip=clip_norm,
        optimizer=optax.sgd(lr),
    )
    trained, _ = fit(trainer, make_model(), seed=4)

    data, model = make_data(), make_model()
    normalize = prob * NUM_EXAMPLES
    base_key = jax.random.key(7)
    batches = dp.PoissonSampling(prob, iterations).batch_iterator(
        NUM_EXAMPLES, np.random.default_rng(4)
    )
    for step, indices in enumerate(batches):
        key = jax.random.fold_in(base_key, step)
        # `fit` pads the batch in the early-stopping order; an example's key is
        # `fold_in(key, its row in the padded batch)`.
        multiple = math.ceil(2 * math.sqrt(prob * NUM_EXAMPLES) / (microbatch_size or 1))
        multiple *= microbatch_size or 1
        padded = dp.pad_to_multiple_of(indices, multiple, microbatch_size)
        total = jtu.tree_map(jnp.zeros_like, eqx.filter(model, eqx.is_inexact_array))
        for row, index in enumerate(padded):
            if index < 0:
                continue
            example = {"x": data["x"][index : index + 1], "y": data["y"][index : index + 1]}
            example_key = jax.random.fold_in(key, row)
            grads = example_grad(model, example, example_key)
            total = jtu.tree_map(jnp.add, total, clip(grads, clip_norm))
        model = jtu.tree_map(
            lambda p, g: p - lr * g / normalize if eqx.is_array(p) else p,
            model,
            total,
            is_leaf=lambda x: x is None,
        )
    assert_tree_allclose(trained, model, rtol=1e-5, atol=1e-6)


def test_privacy_report_is_the_event_of_the_steps_taken():
    trainer = TRAINER  # 12 iterations, sampling_prob 0.25, noise_multiplier 1
    _, report = fit(trainer, make_model(), callback=lambda state, _: state.step == 7)
    event = dp.dpsgd_event(1.0, 7, sampling_prob=0.25)
    expected = dp.compute_epsilon(event, DELTA, accountant=dp.Accountant.RDP)
    assert report.steps == 7 and report.iterations == 12
    assert report.dp_event == event and report.epsilon == expected
    full = trainer.privacy_report(12, DELTA)
    assert full.epsilon == trainer.plan.epsilon(DELTA) > report.epsilon
    assert trainer.privacy_report(0, DELTA).epsilon == 0.0


def test_privacy_report_of_partial_bandmf_run():
    grad_fn = dp.clipped_grad(loss, 1.0, key_argnum=2)
    plan = dp.BandMFExecutionPlanConfig(
        iterations=12,
        num_bands=4,
        sampling_prob=0.5,
        noise_multiplier=1.0,
        accountant=dp.Accountant.RDP,
        strategy_optimization_steps=20,
    ).make(grad_fn)
    trainer = dp.DPTrainer(plan, optax.sgd(0.1))
    for steps in (1, 4, 5, 12):
        # One round per cycle of 4 steps: an example joins at most once per cycle.
        event = dp.dpsgd_event(1.0, math.ceil(steps / 4), sampling_prob=0.5)
        expected = dp.compute_epsilon(event, DELTA, accountant=dp.Accountant.RDP)
        assert trainer.privacy_report(steps, DELTA).epsilon == expected
    report = trainer.privacy_report(5, DELTA)
    assert report.steps == 5
    assert report.dp_event == dp.dpsgd_event(1.0, 2, sampling_prob=0.5)


def test_padding_changes_neither_the_result_nor_the_compilation_count():
    traces = []

    def counted(model, batch, key):
        # Without randomness: an example's key depends on its row in the padded batch.
        traces.append(None)  # Runs when traced, never when executed.
        return jnp.mean((jax.vmap(model)(batch["x"]) - batch["y"]) ** 2)

    trainer = dpsgd_trainer(counted, microbatch_size=2)
    multiple = 8
    first_state = None

    def stop_at_1(state, metrics):
        nonlocal first_state
        first_state = state
        return True

    fit(trainer, make_model(), padding_multiple=multiple, callback=stop_at_1)
    per_compilation = len(traces)
    assert per_compilation > 0
    reference, reference_report = fit(trainer, first_state, padding_multiple=multiple)
    batches = trainer.plan.batch_selection_strategy.batch_iterator(
        NUM_EXAMPLES, np.random.default_rng(1)
    )
    sizes = {max(1, math.ceil(len(b) / multiple)) * multiple for b in batches}
    # One compilation per padded size, and only a few sizes.
    assert len(traces) == per_compilation * len(sizes) and len(sizes) <= 4

    trained, report = fit(trainer, make_model(), padding_multiple=40)
    assert_tree_allclose(trained, reference, rtol=1e-5, atol=1e-6)
    assert report == reference_report


@pytest.mark.parametrize("ghost", [False, True])
def test_new_clip_norm_or_target_epsilon_does_not_recompile(ghost):
    traces = []

    def counted(model, batch, key):
        traces.append(None)  # Runs when traced, never when executed.
        return jnp.mean((jax.vmap(model)(batch["x"]) - batch["y"]) ** 2)

    optimizer = optax.sgd(0.1)  # One optimizer: its functions are part of the step.
    builder = dp.ghost_clipped_grad if ghost else dp.clipped_grad
    accountant = dp_accounting.rdp.RdpAccountant(orders=list(range(2, 65)))

    def trainer(clip, epsilon):
        grad_fn = builder(counted, clip, microbatch_size=2, key_argnum=2)
        plan = dp.DPSGDExecutionPlanConfig(
            iterations=5,
            sampling_prob=0.25,
            epsilon=epsilon,
            delta=DELTA,
            accountant=accountant,
            noise_seed=0,
        ).make(grad_fn)
        return dp.DPTrainer(plan, optimizer, normalize_by=10)

    data = make_data()
    batch = {"x": data["x"][:8], "y": data["y"][:8]}
    is_padding = jnp.arange(8) >= 6
    outputs = []
    for clip, epsilon in ((0.5, 2.0), (1.0, 8.0), (0.1, 2.0)):
        t = trainer(clip, epsilon)
        state, _ = t.step(t.init(make_model()), batch, is_padding, jax.random.key(0))
        outputs.append((float(t.plan.noise_addition_transform.stddev), state.model))
        if len(outputs) == 1:
            per_compilation = len(traces)
            assert per_compilation > 0
    assert len(traces) == per_compilation  # traced (so compiled) once for all three
    stddevs = [stddev for stddev, _ in outputs]
    assert len(set(stddevs)) == 3  # the plans really differ...
    first, second, third = (model for _, model in outputs)
    assert not eqx.tree_equal(first, second)  # ...and so do their updates


def test_empty_batches_still_step():
    trainer = dpsgd_trainer(sampling_prob=0.01, iterations=5)
    sizes = [
        len(b)
        for b in trainer.plan.batch_selection_strategy.batch_iterator(
            NUM_EXAMPLES, np.random.default_rng(1)
        )
    ]
    assert 0 in sizes
    steps = []
    model, report = fit(trainer, make_model(), callback=lambda s, _: steps.append(s.step))
    assert report.steps == 5 and [int(s) for s in steps] == [1, 2, 3, 4, 5]
    leaves = jtu.tree_leaves(eqx.filter(model, eqx.is_array))
    assert all(jnp.all(jnp.isfinite(leaf)) for leaf in leaves)


def test_non_private_baseline_learns():
    trainer = dp.DPTrainer.non_private(
        loss, optax.sgd(0.05, momentum=0.9), batch_size=8, iterations=150, microbatch_size=4
    )
    model, report = fit(trainer, make_model())
    assert report.epsilon == math.inf and report.steps == 150
    data = make_data()
    final = jnp.mean((jax.vmap(model)(data["x"]) - data["y"]) ** 2)
    initial = jnp.mean((jax.vmap(make_model())(data["x"]) - data["y"]) ** 2)
    assert final < 0.1 * initial


def test_batch_norm_is_refused():
    model = eqx.nn.Sequential(
        [eqx.nn.Linear(3, 4, key=jax.random.key(0)), eqx.nn.BatchNorm(4, "batch")]
    )
    trainer = TRAINER
    with pytest.raises(
        ValueError, match=r"`eqx.nn.BatchNorm` layer at `model.layers\[1\]`"
    ):
        trainer.init(model)
    with pytest.raises(ValueError, match="Use `eqx.nn.GroupNorm` or `eqx.nn.LayerNorm`"):
        fit(trainer, model)


def test_bad_arguments():
    # Under the runtime type checker the annotation catches it first.
    with pytest.raises(TypeError, match="DPExecutionPlan"):
        dp.DPTrainer("plan", optax.sgd(0.1))
    with pytest.raises(ValueError, match="`normalize_by=0`"):
        dp.DPTrainer(TRAINER.plan, optax.sgd(0.1), normalize_by=0)


@pytest.mark.parametrize(
    "epsilon,shown",
    [(0.0, "0.0"), (0.3456, "0.35"), (1.0, "1.0"), (1.04, "1.0"), (2.96, "3.0")]
    + [(12.4, "12"), (123.6, "124"), (math.inf, "inf")],
)
def test_progress_shows_two_significant_digits(epsilon, shown):
    from eqx_micro.dp._trainer._progress import format_epsilon

    assert format_epsilon(epsilon) == shown


def test_progress_line_has_a_finite_epsilon_once_a_step_has_run(capsys):
    """The bar's last postfix and the closing line: epsilon from the report, never
    `inf`; a non-private run shows none."""
    _, report = TRAINER.fit(
        make_data(), make_model(), rng=1, key=jax.random.key(7), delta=DELTA, progress=True
    )
    captured = capsys.readouterr()
    text = captured.out + captured.err
    assert f"epsilon {report.epsilon:.4g} at delta {DELTA:g}" in text
    assert "inf" not in text
    non_private = dp.DPTrainer.non_private(
        loss, optax.sgd(0.1), batch_size=10, iterations=3
    )
    non_private.fit(make_data(), make_model(), rng=1, key=jax.random.key(7), progress=True)
    captured = capsys.readouterr()
    text = captured.out + captured.err
    assert "not private (no epsilon)" in text and "eps=" not in text
