"""The DP crossing matrix: every clipping route through every way of training.

{`clipped_grad`, `ghost_clipped_grad` with each `GhostMethod`} x {no microbatching,
microbatches of 8} x {batches padded to 16 rows, to 32 rows} x {a hand-written loop over
`plan.noisy_grad`, `DPTrainer.fit`, `fit` interrupted, checkpointed and resumed}, with a
fixed clip norm; and the same with automatic clipping and with quantile-adaptive
clipping (batches padded to 32): the same seeds must give the same trained parameters
(to float tolerance) and the same reported epsilon as the clipping kind's reference.
`test_dp_crossings.py` runs it in one process, and in a subprocess with 8 host CPU
devices, where the data and batches are sharded over the devices (automatic clipping,
which changes nothing a device layout touches, on one device only):

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m tests.dp_crossings
"""

import io
import itertools
from typing import Any, NamedTuple

import dp_accounting
import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

import eqx_micro.dp as dp


NUM_EXAMPLES = 48
ITERATIONS = 4
SAMPLING_PROB = 0.25
DELTA = 1e-5
LEARNING_RATE = 0.5
RTOL, ATOL = 1e-4, 1e-5


class Variant(NamedTuple):
    route: str  # "vmap", or a `dp.GhostMethod` name
    microbatch_size: int | None
    padded: bool  # pad every batch to 32 rows (mostly padding), else to 16
    entry: str  # "noisy_grad", "fit" or "resume"
    clipping: str = "fixed"  # "fixed", "automatic" or "adaptive"

    def __str__(self) -> str:
        return "-".join(map(str, self))


VARIANTS = [
    Variant(*combo)
    for combo in itertools.product(
        ("vmap", "BOOK_KEEPING", "GHOST"),
        (None, 8),
        (False, True),
        ("noisy_grad", "fit", "resume"),
    )
]
# Automatic and adaptive clipping: every route meets every entry once, and the
# microbatch size alternates so that each pair of (route, microbatching, entry) values
# is covered (a pairwise design: 9 variants a kind instead of 18; CI time).
VARIANTS += [
    Variant(route, (None, 8)[(r + e) % 2], True, entry, clipping)
    for clipping in ("automatic", "adaptive")
    for r, route in enumerate(("vmap", "BOOK_KEEPING", "GHOST"))
    for e, entry in enumerate(("noisy_grad", "fit", "resume"))
]
CLIPPINGS = ("fixed", "automatic", "adaptive")
REFERENCES = {c: Variant("vmap", None, False, "noisy_grad", c) for c in CLIPPINGS}


def make_data() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(NUM_EXAMPLES, 5)).astype(np.float32)
    y = (x @ rng.normal(size=5) > 0).astype(np.int32)
    return {"x": x, "y": y}


def make_model() -> eqx.nn.MLP:
    return eqx.nn.MLP(5, 2, width_size=6, depth=2, key=jax.random.key(1))


def loss(model: Any, batch: dict, key: Any) -> jax.Array:
    """Cross-entropy of one example (a batch axis of size 1). The key is split per
    example but unused: an example's key depends on its position in the padded batch,
    which padding for early stopping permutes, so only key-free losses train the same
    whatever the padding."""
    del key
    logits = jax.vmap(model)(batch["x"])
    log_p = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(log_p, batch["y"][:, None], axis=1))


def make_plan(variant: Variant) -> dp.DPExecutionPlan:
    options: dict[str, Any] = dict(microbatch_size=variant.microbatch_size, key_argnum=2)
    adaptive = None
    if variant.clipping == "automatic":
        options["clipping_fn"] = dp.AutomaticClipping(0.01)
    elif variant.clipping == "adaptive":
        adaptive = dp.QuantileAdaptiveClipping(
            expected_batch_size=SAMPLING_PROB * NUM_EXAMPLES,
            target_unclipped_quantile=0.3,
            learning_rate=0.5,
            count_stddev=2.0,
        )
    if variant.route == "vmap":
        grad_fn = dp.clipped_grad(loss, 0.5, **options)
    else:
        method = dp.GhostMethod[variant.route]
        grad_fn = dp.ghost_clipped_grad(loss, 0.5, method=method, **options)
    return dp.DPSGDExecutionPlanConfig(
        iterations=ITERATIONS,
        sampling_prob=SAMPLING_PROB,
        noise_multiplier=2.0,
        # RDP at integer orders: fast to account, and no convergence warnings.
        accountant=dp_accounting.rdp.RdpAccountant(orders=list(range(2, 65))),
        noise_seed=4,
        adaptive_clipping=adaptive,
    ).make(grad_fn)


def padding_multiple(variant: Variant) -> int:
    """32 rows (mostly padding, most microbatches skipped by early stopping), or 16:
    the batches here have 7 to 16 examples, so one compiled shape either way."""
    return 32 if variant.padded else 16


def _sharded(tree: Any, mesh: jax.sharding.Mesh | None) -> Any:
    """Array leaves split over the mesh's devices along axis 0 (where they divide)."""
    if mesh is None:
        return tree

    def place(leaf):
        if not eqx.is_array(leaf) or leaf.shape[0] % mesh.size:
            return leaf
        return jax.device_put(leaf, NamedSharding(mesh, PartitionSpec("data")))

    return jtu.tree_map(place, tree)


def train_by_hand(variant: Variant, mesh: Any) -> tuple[Any, float]:
    """The loop a user writes around `plan.noisy_grad` (what `DPTrainer.step` does)."""
    plan = make_plan(variant)
    data, model = make_data(), make_model()
    optimizer = optax.sgd(LEARNING_RATE)
    params = eqx.filter(model, eqx.is_inexact_array)
    opt_state = optimizer.init(params)
    noise_state = plan.noise_addition_transform.init(params)
    key = jax.random.key(9)
    normalize_by = SAMPLING_PROB * NUM_EXAMPLES

    # Adaptive plans carry a clip state beside the noise state.
    adaptive = plan.adaptive_clipping
    assert isinstance(plan.clipped_aggregation_fn, dp.BoundedSensitivityCallable)
    clip_norm = plan.clipped_aggregation_fn.l2_clip_norm
    clip_state = None if adaptive is None else adaptive.init(clip_norm)

    @eqx.filter_jit
    def step(model, opt_state, states, batch, is_padding, key):
        noise_state, clip_state = states
        if clip_state is None:
            grads, noise_state, _ = plan.noisy_grad(
                noise_state, model, batch, key, is_padding_example=is_padding
            )
        else:
            grads, noise_state, clip_state, _ = plan.adaptive_noisy_grad(
                noise_state, clip_state, model, batch, key, is_padding_example=is_padding
            )
        grads = jtu.tree_map(lambda g: g / normalize_by, grads)
        params = eqx.filter(model, eqx.is_inexact_array)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return eqx.apply_updates(model, updates), opt_state, (noise_state, clip_state)

    batches = plan.batch_selection_strategy.batch_iterator(NUM_EXAMPLES, rng=2)
    for t, indices in enumerate(batches):
        indices = dp.pad_to_multiple_of(
            indices, padding_multiple(variant), variant.microbatch_size
        )
        batch, is_padding = dp.gather_padded_batch(data, indices)
        batch, is_padding = _sharded((batch, jnp.asarray(is_padding)), mesh)
        model, opt_state, (noise_state, clip_state) = step(
            model,
            opt_state,
            (noise_state, clip_state),
            batch,
            is_padding,
            jax.random.fold_in(key, t),
        )
    report = dp.DPTrainer(plan, optimizer).privacy_report(ITERATIONS, DELTA)
    return model, report.epsilon


def train_with_fit(variant: Variant, mesh: Any) -> tuple[Any, float]:
    plan = make_plan(variant)
    trainer = dp.DPTrainer(
        plan, optax.sgd(LEARNING_RATE), normalize_by=SAMPLING_PROB * NUM_EXAMPLES
    )
    data = make_data()  # NumPy: batches are gathered on the host
    if mesh is not None:
        data = _sharded(jtu.tree_map(jnp.asarray, data), mesh)
    options = dict(
        rng=2,
        key=jax.random.key(9),
        delta=DELTA,
        padding_multiple=padding_multiple(variant),
        progress=False,
    )
    if variant.entry == "fit":
        model, report = trainer.fit(data, make_model(), **options)
        return model, report.epsilon

    # Interrupted after 2 steps, checkpointed to bytes, restored into a fresh template.
    saved = io.BytesIO()

    def stop_at_two(state, metrics):
        if int(state.step) == 2:
            eqx.tree_serialise_leaves(saved, state)
            return True
        return False

    trainer.fit(data, make_model(), callback=stop_at_two, **options)
    saved.seek(0)
    state = eqx.tree_deserialise_leaves(saved, trainer.init(make_model()))
    model, report = trainer.fit(data, state, **options)
    return model, report.epsilon


def train(variant: Variant, mesh: Any = None) -> tuple[Any, float]:
    if variant.entry == "noisy_grad":
        return train_by_hand(variant, mesh)
    return train_with_fit(variant, mesh)


def assert_same_training(actual: tuple, expected: tuple, variant: Variant) -> None:
    (model, epsilon), (reference, reference_epsilon) = actual, expected
    assert epsilon == reference_epsilon, (str(variant), epsilon, reference_epsilon)
    leaves = jtu.tree_leaves(eqx.filter(model, eqx.is_array))
    reference_leaves = jtu.tree_leaves(eqx.filter(reference, eqx.is_array))
    for got, want in zip(leaves, reference_leaves, strict=True):
        np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL, err_msg=str(variant))
    # Training moved the parameters: the comparison is not of two initial models.
    initial = jtu.tree_leaves(eqx.filter(make_model(), eqx.is_array))
    assert any(not np.allclose(a, b) for a, b in zip(leaves, initial)), str(variant)


if __name__ == "__main__":
    # `python -m tests.dp_crossings [ROUTE]`: the variants of one route, or all.
    import sys

    assert jax.device_count() == 8, jax.devices()
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    routes = sys.argv[1:] or ["vmap", "BOOK_KEEPING", "GHOST"]
    # Automatic clipping changes only the per-example scale, nothing a device layout
    # touches: its variants run on one device only (the adaptive clip state does run).
    variants = [v for v in VARIANTS if v.route in routes and v.clipping != "automatic"]
    with jax.default_device(jax.devices()[0]):
        # One device's results, for every 8-device variant.
        clippings = {v.clipping for v in variants}
        references = {c: train(v) for c, v in REFERENCES.items() if c in clippings}
    for variant in variants:
        assert_same_training(train(variant, mesh), references[variant.clipping], variant)
    print(f"dp crossings passed on 8 devices: {len(variants)} variants")
