"""The bad-input catalogue: misuses across the public API, each raising the right
exception type with a message that names the argument the user passed.

Under the test suite's runtime type checking, a value of the wrong type may be caught by
jaxtyping before our own check: its message names the parameter too, so the patterns
below match the bare argument name.
"""

import io
from collections.abc import Callable
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import eqx_micro as em
import eqx_micro.dp as dp


class Case(NamedTuple):
    name: str
    run: Callable[[], Any]
    error: type[Exception]
    names: str  # a regex the message must match: the argument, at least


CASES: list[Case] = []


def case(name: str, error: type[Exception], names: str):
    def register(run: Callable[[], Any]) -> Callable[[], Any]:
        CASES.append(Case(name, run, error, names))
        return run

    return register


def loss(w, x):
    return jnp.sum(jnp.tanh(x @ w))


def key_loss(model, batch, key):
    return jnp.mean((jax.vmap(model)(batch["x"]) - batch["y"]) ** 2)


def with_mask(x, is_padding_example):
    return jnp.sum(jnp.where(is_padding_example, 0.0, x))


X = jnp.ones((4, 3))
W = jnp.zeros(3)


def linear_model():
    return eqx.nn.Linear(3, 1, key=jax.random.key(0))


def data(n=40):
    x = np.random.default_rng(0).normal(size=(n, 3)).astype(np.float32)
    return {"x": x, "y": x.sum(axis=1, keepdims=True)}


def dpsgd_plan(grad_fn=None, iterations=5):
    grad_fn = grad_fn or dp.clipped_grad(key_loss, 1.0, key_argnum=2)
    return dp.DPSGDExecutionPlanConfig(
        iterations, 0.25, noise_multiplier=1.0, noise_seed=0
    ).make(grad_fn)


def bandmf_plan(grad_fn=None):
    grad_fn = grad_fn or dp.clipped_grad(key_loss, 1.0, key_argnum=2)
    return dp.BandMFExecutionPlanConfig(
        iterations=4, num_bands=2, sampling_prob=0.5, noise_multiplier=1.0, noise_seed=0
    ).make(grad_fn)


# ------------------------------------------------------------- em.microbatch, micro_vmap

case("microbatch: fun not callable", TypeError, "fun")(lambda: em.microbatch(42, 0, 2))
case("microbatch: zero size", ValueError, "microbatch_size")(
    lambda: em.microbatch(jnp.sum, 0, 0)
)
case("microbatch: float size", TypeError, "microbatch_size")(
    lambda: em.microbatch(jnp.sum, 0, 2.0)
)
case("microbatch: bool size", TypeError, "microbatch_size")(
    lambda: em.microbatch(jnp.sum, 0, True)
)
case("microbatch: negative argnum", TypeError, "argnums")(
    lambda: em.microbatch(jnp.sum, -1, 2)
)
case("microbatch: string argnum", TypeError, "argnums")(
    lambda: em.microbatch(jnp.sum, "x", 2)
)
case("microbatch: repeated argnums", ValueError, "argnums")(
    lambda: em.microbatch(lambda a, b: a, (0, 0), 2)
)
case("microbatch: nothing batched", ValueError, "argnums")(
    lambda: em.microbatch(jnp.sum, (), 2)
)
case("microbatch: argnum past the signature", ValueError, "argnums")(
    lambda: em.microbatch(lambda x, y: x, 2, 2)
)
case("microbatch: non-string argname", TypeError, "argnames")(
    lambda: em.microbatch(lambda x: x, (), 2, argnames=1)
)
case("microbatch: unknown argname", ValueError, "argnames")(
    lambda: em.microbatch(lambda x: x, (), 2, argnames="y")
)
case("microbatch: in_axes entries", ValueError, "in_axes")(
    lambda: em.microbatch(jnp.sum, 0, 2, in_axes=(0, 0))
)
case("microbatch: in_axes of the wrong type", TypeError, "in_axes")(
    lambda: em.microbatch(jnp.sum, 0, 2, in_axes="a")(jnp.ones(4))
)
case("microbatch: batch not divisible", ValueError, "microbatch_size=3")(
    lambda: em.microbatch(jnp.sum, 0, 3)(jnp.ones(10))
)
case("microbatch: unequal batch sizes", ValueError, "`x`.*`y`")(
    lambda: em.microbatch(lambda x, y: jnp.sum(x) + jnp.sum(y), (0, 1), 2)(
        jnp.ones(10), jnp.ones(6)
    )
)
case("microbatch: 0-d batched array", ValueError, "`s`")(
    lambda: em.microbatch(lambda x, s: jnp.sum(x) * s, (0, 1), 2)(
        jnp.ones(4), jnp.array(2.0)
    )
)
case("microbatch: accumulator of the wrong type", TypeError, "accumulator")(
    lambda: em.microbatch(jnp.sum, 0, 2, {"a": "sum"})
)
case("microbatch: accumulator tree", ValueError, "accumulator")(
    lambda: em.microbatch(lambda x: {"a": jnp.sum(x)}, 0, 2, {"b": em.Sum()})(jnp.ones(4))
)
case("microbatch: too many real microbatches", ValueError, "num_real_microbatches")(
    lambda: em.microbatch(jnp.sum, 0, 2, num_real_microbatches=3)(jnp.ones(4))
)
case(
    "microbatch: traced real microbatches out of range", Exception, "num_real_microbatches"
)(
    lambda: jax.jit(lambda x, n: em.microbatch(jnp.sum, 0, 2, num_real_microbatches=n)(x))(
        jnp.ones(4), 5
    ).block_until_ready()
)
case("microbatch: negative real microbatches", ValueError, "num_real_microbatches")(
    lambda: em.microbatch(jnp.sum, 0, 2, num_real_microbatches=-1)(jnp.ones(4))
)
case("microbatch: float real microbatches", TypeError, "num_real_microbatches")(
    lambda: em.microbatch(jnp.sum, 0, 2, num_real_microbatches=1.5)(jnp.ones(4))
)
case("microbatch: float padding mask", TypeError, "is_padding_example")(
    lambda: em.microbatch(with_mask, 0, 2)(
        jnp.ones(4), is_padding_example=jnp.array([0.0, 0.0, 1.0, 1.0])
    )
)
case("microbatch: padding mask with a 2", ValueError, "is_padding_example")(
    lambda: em.microbatch(with_mask, 0, 2)(
        jnp.ones(4), is_padding_example=np.array([0, 0, 2, 1])
    )
)
case("microbatch: padding mask length", ValueError, "is_padding_example")(
    lambda: em.microbatch(with_mask, 0, 2)(
        jnp.ones(4), is_padding_example=jnp.zeros(6, bool)
    )
)
case("microbatch: 2-D padding mask", ValueError, "is_padding_example")(
    lambda: em.microbatch(with_mask, 0, 2)(
        jnp.ones(4), is_padding_example=jnp.zeros((4, 1), bool)
    )
)
case("microbatch: mask for a function without it", TypeError, "is_padding_example")(
    lambda: em.microbatch(jnp.sum, 0, 2)(jnp.ones(4), is_padding_example=jnp.zeros(4, bool))
)
case("Mean of integers", ValueError, "Mean")(
    lambda: em.microbatch(jnp.sum, 0, 2, em.Mean())(jnp.arange(4))
)
case("Concat of a scalar", ValueError, "Concat")(
    lambda: em.microbatch(jnp.sum, 0, 2, em.Concat())(jnp.ones(4))
)


class _Grow(em.AbstractAccumulator):
    def init(self, example, num_microbatches):
        return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), example)

    def update(self, carry, value, index):
        return jax.tree.map(lambda c, v: jnp.concatenate([c, v]), carry, value)

    def finalize(self, carry, num_microbatches, num_executed):
        return carry

    def aggregate(self, values):
        return values


case("an accumulator's update changes the carry", ValueError, r"_Grow\.update")(
    lambda: em.microbatch(lambda x: x, 0, 2, _Grow())(jnp.arange(4.0))
)
case("micro_vmap: fun not callable", TypeError, "fun")(lambda: em.micro_vmap(None))
case("micro_vmap: out_axes of the wrong type", TypeError, "out_axes")(
    lambda: em.micro_vmap(jnp.sum, out_axes="0")
)
case("micro_vmap: out_axes with a reduction", ValueError, "out_axes")(
    lambda: em.micro_vmap(jnp.sum, out_axes=1, accumulator=em.Sum(), microbatch_size=2)(
        jnp.ones((4, 3))
    )
)
case("micro_vmap: in_axes entries", ValueError, "in_axes")(
    lambda: em.micro_vmap(jnp.add, in_axes=(0,), microbatch_size=2)(
        jnp.ones(4), jnp.ones(4)
    )
)
case("micro_vmap: negative size", ValueError, "microbatch_size")(
    lambda: em.micro_vmap(jnp.sum, microbatch_size=-1)
)

# ------------------------------------------------------------------------ em.micro_grad

case("micro_grad: fun not callable", TypeError, "fun")(lambda: em.micro_grad(1))
case("micro_grad: overlapping argnums", ValueError, "argnums")(
    lambda: em.micro_grad(loss, argnums=1, batch_argnums=1)
)
case("micro_grad: no batched argument", ValueError, "batch_argnums")(
    lambda: em.micro_grad(loss, batch_argnums=())
)
case("micro_grad: negative argnum", TypeError, "argnums")(
    lambda: em.micro_grad(loss, argnums=-1)
)
case("micro_grad: key in batch_argnums", ValueError, "key_argnum")(
    lambda: em.micro_grad(loss, key_argnum=1)
)
case("micro_grad: key not a key", TypeError, "key_argnum")(
    lambda: em.micro_grad(lambda w, x, k: loss(w, x), key_argnum=2)(W, X, jnp.ones(2))
)
case("micro_grad: non-scalar loss", TypeError, r"fun.*\(1,\)")(
    lambda: em.micro_grad(lambda w, x: x @ w)(W, X)
)
case("micro_grad: has_aux without a pair", TypeError, "has_aux")(
    lambda: em.micro_grad(loss, has_aux=True)(W, X)
)
case("micro_grad: too few arguments", ValueError, "batch_argnums")(
    lambda: em.micro_grad(loss, batch_argnums=(1, 2))(W, X)
)
case("micro_grad: argnum past the signature", ValueError, "argnums")(
    lambda: em.micro_grad(loss, argnums=3)
)

# --------------------------------------------------------------- em.accumulate_gradients


def mean_loss(model, batch):
    return jnp.mean((jax.vmap(model)(batch["x"]) - batch["y"]) ** 2)


def keyed_loss(model, batch, *, key):
    return mean_loss(model, batch)


def batch10():
    return {"x": jnp.ones((10, 3)), "y": jnp.ones((10, 1))}


case("accumulate: loss_fn not callable", TypeError, "loss_fn")(
    lambda: em.accumulate_gradients(None, linear_model(), batch10())
)
case("accumulate: both sizes", TypeError, "microbatch_size.*num_microbatches")(
    lambda: em.accumulate_gradients(
        mean_loss, linear_model(), batch10(), microbatch_size=5, num_microbatches=2
    )
)
case("accumulate: float num_microbatches", TypeError, "num_microbatches")(
    lambda: em.accumulate_gradients(
        mean_loss, linear_model(), batch10(), num_microbatches=2.5
    )
)
case("accumulate: zero num_microbatches", ValueError, "num_microbatches")(
    lambda: em.accumulate_gradients(
        mean_loss, linear_model(), batch10(), num_microbatches=0
    )
)
case("accumulate: indivisible num_microbatches", ValueError, "num_microbatches=3")(
    lambda: em.accumulate_gradients(
        mean_loss, linear_model(), batch10(), num_microbatches=3
    )
)
case("accumulate: indivisible microbatch_size", ValueError, "microbatch_size=4")(
    lambda: em.accumulate_gradients(mean_loss, linear_model(), batch10(), microbatch_size=4)
)
case("accumulate: an int key", TypeError, "key")(
    lambda: em.accumulate_gradients(keyed_loss, linear_model(), batch10(), key=0)
)
case("accumulate: key for a loss without one", TypeError, "key")(
    lambda: em.accumulate_gradients(
        mean_loss, linear_model(), batch10(), key=jax.random.key(0)
    )
)
case("accumulate: missing key", TypeError, "key")(
    lambda: em.accumulate_gradients(keyed_loss, linear_model(), batch10())
)
case("accumulate: zero unroll", ValueError, "unroll")(
    lambda: em.accumulate_gradients(
        mean_loss, linear_model(), batch10(), num_microbatches=2, unroll=0
    )
)
case("accumulate: accumulator tree", TypeError, "accumulator")(
    lambda: em.accumulate_gradients(
        mean_loss, linear_model(), batch10(), accumulator={"a": em.Sum()}
    )
)
case("accumulate: batch without arrays", ValueError, "batch")(
    lambda: em.accumulate_gradients(mean_loss, linear_model(), {"x": "none"})
)
case("accumulate: has_aux without aux", TypeError, "has_aux")(
    lambda: em.accumulate_gradients(mean_loss, linear_model(), batch10(), has_aux=True)
)

# ------------------------------------------------------- batch axis and early stopping

case("reshape_batch_axis: zero size", ValueError, "microbatch_size")(
    lambda: em.reshape_batch_axis(jnp.ones(4), 0)
)
case("reshape_batch_axis: axis", ValueError, "axis=2")(
    lambda: em.reshape_batch_axis(jnp.ones((4, 2)), 2, axis=2)
)
case("compute_early_stopping_order: indivisible", ValueError, "microbatch_size=3")(
    lambda: em.compute_early_stopping_order(10, 3)
)
case("compute_early_stopping_order: negative size", ValueError, "batch_size")(
    lambda: em.compute_early_stopping_order(-1, 3)
)
case("count_real_microbatches: float mask", TypeError, "is_padding_example")(
    lambda: em.count_real_microbatches(jnp.zeros(4), 2)
)
case("verify_early_stopping_order: traced", TypeError, "verify_early_stopping_order")(
    lambda: jax.jit(lambda m: em.verify_early_stopping_order(m, 2))(jnp.zeros(4, bool))
)

# ----------------------------------------------------------- dp.clipped_grad and kin

case("clipped_grad: fun not callable", TypeError, "fun")(lambda: dp.clipped_grad(3, 1.0))
case("clipped_grad: string clip norm", TypeError, "l2_clip_norm")(
    lambda: dp.clipped_grad(loss, "1.0")
)
case("clipped_grad: negative clip norm", ValueError, "l2_clip_norm")(
    lambda: dp.clipped_grad(loss, -1.0)
)
case("clipped_grad: infinite clip norm", ValueError, "l2_clip_norm")(
    lambda: dp.clipped_grad(loss, float("inf"))
)
case("clipped_grad: empty clip tree", ValueError, "l2_clip_norm")(
    lambda: dp.clipped_grad(loss, {})
)
case("clipped_grad: zero normalize_by", ValueError, "normalize_by")(
    lambda: dp.clipped_grad(loss, 1.0, normalize_by=0)
)
case("clipped_grad: string normalize_by", TypeError, "normalize_by")(
    lambda: dp.clipped_grad(loss, 1.0, normalize_by="2")
)
case("clipped_grad: overlapping argnums", ValueError, "argnums")(
    lambda: dp.clipped_grad(loss, 1.0, argnums=1)
)
case("clipped_grad: key in argnums", ValueError, "key_argnum")(
    lambda: dp.clipped_grad(loss, 1.0, key_argnum=0)
)
case("clipped_grad: zero microbatch size", ValueError, "microbatch_size")(
    lambda: dp.clipped_grad(loss, 1.0, microbatch_size=0)
)
case("clipped_grad: transform not callable", TypeError, "pre_clipping_transform")(
    lambda: dp.clipped_grad(loss, 1.0, pre_clipping_transform=1)
)
case("clipped_grad: too few arguments", ValueError, "batch_argnums")(
    lambda: dp.clipped_grad(loss, 1.0, batch_argnums=(1, 2))(W, X)
)
case("clipped_grad: key not a key", TypeError, "key_argnum")(
    lambda: dp.clipped_grad(lambda w, x, k: loss(w, x), 1.0, key_argnum=2)(
        W, X, jnp.ones(3)
    )
)
case("clipped_grad: float padding mask", TypeError, "is_padding_example")(
    lambda: dp.clipped_grad(loss, 1.0)(W, X, is_padding_example=jnp.zeros(4))
)
case("clipped_grad: non-scalar loss", TypeError, r"fun.*\(1,\)")(
    lambda: dp.clipped_grad(lambda w, x: x @ w, 1.0)(W, X)
)
case("clipped_grad: clip tree not a prefix", ValueError, "l2_clip_norm")(
    lambda: dp.clipped_grad(lambda p, x: loss(p["a"], x), {"b": 1.0})({"a": W}, X)
)
case("clipped_grad: a clip norm for a leaf with no gradient", ValueError, "l2_clip_norm")(
    lambda: dp.clipped_grad(
        lambda p, x: jnp.mean((p["scale"] * p["w"] - x) ** 2), {"w": 1.0, "scale": 1.0}
    )({"w": jnp.array(2.0), "scale": 1.0}, jnp.ones((2, 1)))
)
case("clipped_grad: rescale_to_unit_norm not a bool", TypeError, "rescale_to_unit_norm")(
    lambda: dp.clipped_grad(lambda w, x: jnp.sum(w * x), 1.0, rescale_to_unit_norm="y")
)
case("clipped_fun: nan_safe not a bool", TypeError, "nan_safe")(
    lambda: dp.clipped_fun(jnp.sum, nan_safe="no")
)
case("ClipL2: rescale_to_unit_norm not a bool", TypeError, "rescale_to_unit_norm")(
    lambda: dp.ClipL2(1.0, rescale_to_unit_norm="y")
)
case("micro_grad: transform_fn not callable", TypeError, "transform_fn")(
    lambda: em.micro_grad(lambda w, x: jnp.sum(w * x), transform_fn=3)
)
case("FixedBatchSampling: replace not a bool", TypeError, "replace")(
    lambda: dp.FixedBatchSampling(10, 2, replace="y")
)
case("gather_padded_batch: data without arrays", ValueError, "data")(
    lambda: dp.gather_padded_batch([1, 2, 3], np.array([0, 1]))
)
case("non_private: zero batch size", ValueError, "batch_size")(
    lambda: dp.DPTrainer.non_private(
        lambda m, b, k: jnp.sum(m * b), optax.sgd(0.1), batch_size=0, iterations=3
    )
)
case("ghost: method as a string", TypeError, "method")(
    lambda: dp.ghost_clipped_grad(loss, 1.0, method="ghost")
)
case("ghost: fallback as a string", TypeError, "fallback")(
    lambda: dp.ghost_clipped_grad(loss, 1.0, fallback="raise")
)
case("ghost: second pass with per-layer norms", ValueError, "method")(
    lambda: dp.ghost_clipped_grad(
        lambda p, x: loss(p["a"], x) + loss(p["b"], x),
        {"a": 1.0, "b": 1.0},
        method=dp.GhostMethod.GHOST,
    )
)
case("ghost: a transform that needs per-example gradients", ValueError, "fallback")(
    lambda: dp.ghost_clipped_grad(
        loss, 1.0, pre_clipping_transform=lambda g: g, fallback=dp.GhostFallback.RAISE
    )
)
case("ghost: a tied weight under RAISE", ValueError, "fallback")(
    lambda: dp.ghost_clipped_grad(
        lambda w, x: jnp.sum((x @ w) @ w.T), 1.0, fallback=dp.GhostFallback.RAISE
    )(jnp.ones((3, 3)), X)
)
case("clipped_fun: nothing batched", ValueError, "batch_argnums")(
    lambda: dp.clipped_fun(jnp.sum, batch_argnums=())
)
case("clip_pytree: string clip norm", TypeError, "l2_clip_norm")(
    lambda: dp.clip_pytree({"w": W}, "1")
)
case("clip_pytree: float return_zero", TypeError, "return_zero")(
    lambda: dp.clip_pytree({"w": W}, 1.0, return_zero=1.0)
)
case("ClipL2: negative clip norm", ValueError, "l2_clip_norm")(lambda: dp.ClipL2(-1.0))

# --------------------------------------------------------------------------------- noise

case("GaussianNoise: negative stddev", ValueError, "stddev")(
    lambda: dp.GaussianNoise(-1.0, key=0)
)
case("GaussianNoise: string key", TypeError, "key")(lambda: dp.GaussianNoise(1.0, key="a"))
case("BandMFNoise: zero first coefficient", ValueError, "coefs")(
    lambda: dp.BandMFNoise([0.0, 1.0], 1.0, key=0)
)
case("BandMFNoise: no coefficients", ValueError, "coefs")(
    lambda: dp.BandMFNoise([], 1.0, key=0)
)


def _bandmf_update_of_another_tree():
    noise = dp.BandMFNoise([1.0, 0.5], 1.0, key=0)
    noise.update({"v": jnp.ones(3)}, noise.init({"w": jnp.ones(3)}))


case("BandMFNoise: updates of another tree", ValueError, "updates")(
    _bandmf_update_of_another_tree
)


def _noisy_grad_with_another_kind_of_state():
    plan = dpsgd_plan(dp.clipped_grad(loss, 1.0))
    state = dp.BandMFNoise([1.0, 0.5], 1.0, key=0).init(W)
    plan.noisy_grad(state, W, X)


def _noisy_grad_with_a_state_for_another_model():
    plan = bandmf_plan(dp.clipped_grad(loss, 1.0))
    plan.noisy_grad(plan.noise_addition_transform.init(jnp.zeros(4)), W, X)


def _noisy_grad_past_the_budget():
    plan = dpsgd_plan(dp.clipped_grad(loss, 1.0), iterations=1)
    state = plan.noise_addition_transform.init(W)
    _, state, _ = plan.noisy_grad(state, W, X)
    plan.noisy_grad(state, W, X)


case("noisy_grad: a BandMF state for DP-SGD", TypeError, "state")(
    _noisy_grad_with_another_kind_of_state
)
case("noisy_grad: a state for another model", ValueError, "state")(
    _noisy_grad_with_a_state_for_another_model
)
case("noisy_grad: past the budget", ValueError, "iterations")(_noisy_grad_past_the_budget)

# ------------------------------------------------------------ plans and accounting


def dpsgd_config(**kwargs):
    settings = dict(iterations=10, sampling_prob=0.1, noise_multiplier=1.0)
    return dp.DPSGDExecutionPlanConfig(**(settings | kwargs))


case("config: float iterations", TypeError, "iterations")(
    lambda: dpsgd_config(iterations=2.5)
)
case("config: accountant as a string", TypeError, "accountant")(
    lambda: dpsgd_config(accountant="pld")
)
case("config: relation as a string", TypeError, "neighboring_relation")(
    lambda: dpsgd_config(neighboring_relation="add")
)
case("compute_epsilon: not an event", TypeError, "event")(
    lambda: dp.compute_epsilon(3, 1e-5)
)
case("compute_epsilon: relation as a string", TypeError, "neighboring_relation")(
    lambda: dp.compute_epsilon(
        dp.dpsgd_event(1.0, 3, sampling_prob=0.5), 1e-5, neighboring_relation="add"
    )
)
case("GaussianNoise: string stddev", TypeError, "stddev")(
    lambda: dp.GaussianNoise("1", key=0)
)
case("micro_grad: has_aux not a bool", TypeError, "has_aux")(
    lambda: em.micro_grad(lambda w, x: jnp.sum(w * x), has_aux="yes")
)
case("clipped_grad: has_aux not a bool", TypeError, "has_aux")(
    lambda: dp.clipped_grad(lambda w, x: jnp.sum(w * x), 1.0, has_aux="yes")
)
case("privacy_report: steps past the plan", ValueError, "steps")(
    lambda: dp.DPTrainer(dpsgd_plan(iterations=3), optax.sgd(0.1)).privacy_report(10, 1e-5)
)
case("config: zero iterations", ValueError, "iterations")(
    lambda: dpsgd_config(iterations=0)
)
case("config: sampling_prob above 1", ValueError, "sampling_prob")(
    lambda: dpsgd_config(sampling_prob=1.5)
)
case("config: epsilon and noise_multiplier", ValueError, "epsilon.*noise_multiplier")(
    lambda: dpsgd_config(epsilon=1.0, delta=1e-5)
)
case("config: neither", ValueError, "noise_multiplier")(
    lambda: dpsgd_config(noise_multiplier=None)
)
case("config: epsilon without delta", ValueError, "delta")(
    lambda: dpsgd_config(noise_multiplier=None, epsilon=1.0)
)
case("config: delta without epsilon", ValueError, "delta")(lambda: dpsgd_config(delta=1e-5))
case("config: delta of 1", ValueError, "delta")(
    lambda: dpsgd_config(noise_multiplier=None, epsilon=1.0, delta=1.0)
)
case("config: truncation without num_examples", ValueError, "num_examples")(
    lambda: dpsgd_config(truncated_batch_size=10)
)
case("BandMF config: more bands than iterations", ValueError, "num_bands")(
    lambda: dp.BandMFExecutionPlanConfig(
        iterations=4, num_bands=5, sampling_prob=0.5, noise_multiplier=1.0
    )
)
case("BandMF config: equal split under add-or-remove", ValueError, "partition_type")(
    lambda: dp.BandMFExecutionPlanConfig(
        iterations=4,
        num_bands=2,
        sampling_prob=0.5,
        noise_multiplier=1.0,
        partition_type=dp.PartitionType.EQUAL_SPLIT,
    )
)
case("make: not a bounded-sensitivity callable", TypeError, "clipped_aggregation_fn")(
    lambda: dpsgd_config().make(loss)
)
case("compute_epsilon: delta of 0", ValueError, "delta")(
    lambda: dp.compute_epsilon(dp.dpsgd_event(1.0, 10, sampling_prob=0.1), 0.0)
)
case("compute_epsilon: accountant as a string", TypeError, "accountant")(
    lambda: dp.compute_epsilon(
        dp.dpsgd_event(1.0, 10, sampling_prob=0.1), 1e-5, accountant="pld"
    )
)
case("calibrate: zero epsilon", ValueError, "target_epsilon")(
    lambda: dp.calibrate_noise_multiplier(
        lambda s: dp.dpsgd_event(s, 10, sampling_prob=0.1), 0.0, 1e-5
    )
)
case("calibrate: delta of 1", ValueError, "target_delta")(
    lambda: dp.calibrate_noise_multiplier(
        lambda s: dp.dpsgd_event(s, 10, sampling_prob=0.1), 1.0, 1.0
    )
)
case("dpsgd_event: zero sampling_prob", ValueError, "sampling_prob")(
    lambda: dp.dpsgd_event(1.0, 10, sampling_prob=0.0)
)
case("dpsgd_event: negative noise", ValueError, "noise_multiplier")(
    lambda: dp.dpsgd_event(-1.0, 10, sampling_prob=0.1)
)
case("fixed_batch_dpsgd_event: batch above the data", ValueError, "batch_size")(
    lambda: dp.fixed_batch_dpsgd_event(1.0, 10, num_examples=5, batch_size=10)
)
case("fixed batches with replacement: wrong relation", ValueError, "neighboring_relation")(
    lambda: dp.compute_epsilon(
        dp.fixed_batch_dpsgd_event(1.0, 10, num_examples=50, batch_size=5, replace=True),
        1e-5,
    )
)
case("amplified_bandmf_event: zero bands", ValueError, "num_bands")(
    lambda: dp.amplified_bandmf_event(1.0, 10, num_bands=0, sampling_prob=0.1)
)
case("accountant with another relation", ValueError, "accountant")(
    lambda: dp.compute_epsilon(
        dp.dpsgd_event(1.0, 10, sampling_prob=0.1),
        1e-5,
        accountant=__import__("dp_accounting").pld.PLDAccountant(
            dp.NeighboringRelation.REPLACE_ONE
        ),
    )
)

# --------------------------------------------------------------------------- sampling

case("PoissonSampling: sampling_prob above 1", ValueError, "sampling_prob")(
    lambda: dp.PoissonSampling(2.0, 10)
)
case("PoissonSampling: negative iterations", ValueError, "iterations")(
    lambda: dp.PoissonSampling(0.5, -1)
)
case("CyclicPoissonSampling: zero cycle", ValueError, "cycle_length")(
    lambda: dp.CyclicPoissonSampling(0.5, 4, cycle_length=0)
)
case("CyclicPoissonSampling: partition as a string", TypeError, "partition_type")(
    lambda: dp.CyclicPoissonSampling(0.5, 4, partition_type="equal")
)
case("batch_iterator: no rng", TypeError, "rng")(
    lambda: dp.PoissonSampling(0.5, 2).batch_iterator(10, None)
)
case("batch_iterator: negative seed", ValueError, "rng")(
    lambda: dp.PoissonSampling(0.5, 2).batch_iterator(10, -1)
)
case("batch_iterator: negative num_examples", ValueError, "num_examples")(
    lambda: dp.PoissonSampling(0.5, 2).batch_iterator(-1, 0)
)
case("FixedBatchSampling: batch above the data", ValueError, "batch_size")(
    lambda: dp.FixedBatchSampling(10, 2).batch_iterator(5, 0)
)
case("UserLevelSampling: base strategy", TypeError, "base_strategy")(
    lambda: dp.UserLevelSampling("poisson")
)
case("UserLevelSampling: 2-D user ids", ValueError, "user_ids")(
    lambda: dp.UserLevelSampling(dp.PoissonSampling(0.5, 2)).batch_iterator(
        np.zeros((2, 2)), 0
    )
)
case("pad_to_multiple_of: zero multiple", ValueError, "multiple")(
    lambda: dp.pad_to_multiple_of(np.arange(3), 0)
)
case("pad_to_multiple_of: microbatch size", ValueError, "microbatch_size")(
    lambda: dp.pad_to_multiple_of(np.arange(3), 6, microbatch_size=4)
)
case("pad_to_multiple_of: float indices", TypeError, "indices")(
    lambda: dp.pad_to_multiple_of(np.arange(3.0), 4)
)
case("pad_to_multiple_of: negative indices", ValueError, "indices")(
    lambda: dp.pad_to_multiple_of(np.array([-1, 2]), 4)
)
case("gather_padded_batch: index out of range", ValueError, "index")(
    lambda: dp.gather_padded_batch({"x": np.ones(3)}, np.array([5]))
)
case("gather_padded_batch: unsigned indices", TypeError, "indices")(
    lambda: dp.gather_padded_batch({"x": np.ones(3)}, np.array([1], np.uint8))
)
case("split_and_pad_global_batch: zero size", ValueError, "minibatch_size")(
    lambda: dp.split_and_pad_global_batch(np.arange(3), 0)
)

# ---------------------------------------------------------------------------- trainer

case("DPTrainer: a learning rate for the optimizer", TypeError, "optimizer")(
    lambda: dp.DPTrainer(dpsgd_plan(), 0.1)
)
case("DPTrainer: not a plan", TypeError, "plan")(
    lambda: dp.DPTrainer("plan", optax.sgd(0.1))
)
case("DPTrainer: zero normalize_by", ValueError, "normalize_by")(
    lambda: dp.DPTrainer(dpsgd_plan(), optax.sgd(0.1), normalize_by=0)
)
case("DPTrainer: a loss without a key", ValueError, "key_argnum")(
    lambda: dp.DPTrainer(
        dpsgd_plan(dp.clipped_grad(lambda m, b: key_loss(m, b, None), 1.0)),
        optax.sgd(0.1),
    )
)


def _fit(trainer=None, model_or_state=None, **kwargs):
    trainer = trainer or dp.DPTrainer(dpsgd_plan(), optax.sgd(0.1), normalize_by=10)
    options = dict(rng=0, key=jax.random.key(0), delta=1e-5, progress=False)
    return trainer.fit(data(), model_or_state or linear_model(), **(options | kwargs))


def _fit_with_a_bandmf_state():
    bandmf = dp.DPTrainer(bandmf_plan(), optax.sgd(0.1), normalize_by=10)
    _fit(model_or_state=bandmf.init(linear_model()))


def _step_past_the_budget():
    trainer = dp.DPTrainer(dpsgd_plan(iterations=1), optax.sgd(0.1), normalize_by=10)
    state = trainer.init(linear_model())
    batch = {"x": jnp.ones((4, 3)), "y": jnp.ones((4, 1))}
    state, _ = trainer.step(state, batch, jnp.zeros(4, bool), jax.random.key(0))
    trainer.step(state, batch, jnp.zeros(4, bool), jax.random.key(0))


case(
    "fit: padding_multiple not a multiple of the microbatch", ValueError, "padding_multiple"
)(
    lambda: _fit(
        dp.DPTrainer(
            dpsgd_plan(dp.clipped_grad(key_loss, 1.0, key_argnum=2, microbatch_size=4)),
            optax.sgd(0.1),
        ),
        padding_multiple=6,
    )
)
case("fit: delta of 1", ValueError, "delta")(lambda: _fit(delta=1.0))
case("fit: an int key", TypeError, "key")(lambda: _fit(key=0))
case("fit: a callback that is not a function", TypeError, "callback")(
    lambda: _fit(callback=3)
)
case("fit: a private plan without delta", ValueError, "delta")(lambda: _fit(delta=None))
case("fit: a BandMF state in a DP-SGD trainer", TypeError, "state")(
    _fit_with_a_bandmf_state
)
case("fit: a 0-d array in data", ValueError, "data")(
    lambda: dp.DPTrainer(dpsgd_plan(), optax.sgd(0.1)).fit(
        {"x": np.array(1.0)}, linear_model(), rng=0, key=jax.random.key(0), delta=1e-5
    )
)
case("init: BatchNorm", ValueError, "BatchNorm")(
    lambda: dp.DPTrainer(dpsgd_plan(), optax.sgd(0.1)).init(
        eqx.nn.BatchNorm(3, "batch", mode="batch")
    )
)
case("step: not a TrainState", TypeError, "state")(
    lambda: dp.DPTrainer(dpsgd_plan(), optax.sgd(0.1)).step(
        {}, {"x": X}, jnp.zeros(4, bool), jax.random.key(0)
    )
)
case("step: past the budget", ValueError, "iterations")(_step_past_the_budget)
case("privacy_report: negative steps", ValueError, "steps")(
    lambda: dp.DPTrainer(dpsgd_plan(), optax.sgd(0.1)).privacy_report(-1, 1e-5)
)


@pytest.mark.parametrize("bad", CASES, ids=lambda c: c.name)
def test_bad_input_gets_a_clear_error(bad):
    with pytest.raises(bad.error, match=bad.names) as raised:
        bad.run()
    message = str(raised.value)
    assert len(message) > 40, message  # a sentence, not a bare name


def test_the_catalogue_is_large():
    assert len(CASES) >= 90
    assert len({c.name for c in CASES}) == len(CASES)


def test_serialized_noise_state_restores():
    noise = dp.BandMFNoise([1.0, 0.5], 1.0, key=0)
    state = noise.init({"w": W})
    _, state = noise.update({"w": W}, state)
    buffer = io.BytesIO()
    eqx.tree_serialise_leaves(buffer, state)
    buffer.seek(0)
    restored = eqx.tree_deserialise_leaves(buffer, noise.init({"w": W}))
    assert eqx.tree_equal(restored, state)
