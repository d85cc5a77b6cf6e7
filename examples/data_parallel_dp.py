"""Data-parallel DP-SGD on 8 host CPU devices, equal to the single-device run.

The DP-SGD step of `dp_digits` (the same CNN, loss, clipping, noise and optimizer,
through `dp.DPTrainer.step`) runs twice from the same state on the same batches: once
on one device, and once with every batch sharded over a mesh of 8 devices along its
batch axis (`NamedSharding(mesh, P("data"))`) and the training state replicated. XLA
partitions the compiled step: each device computes the clipped per-example gradients
of its eighth of every microbatch, and the sums are all-reduced before the noise is
added (the noise key is replicated, so every device adds the same noise; the compiled
step has all-reduces and no all-gather, so the batch is never gathered on one device).
The example checks that the two runs give the same model to float32 tolerance.

    python -m examples data_parallel_dp --quick  # 8 steps
    python -m examples data_parallel_dp          # 80 steps

JAX fixes its device count when its backend starts, and 8 host CPU devices need
`XLA_FLAGS=--xla_force_host_platform_device_count=8` before that. When this example
finds fewer than 8 devices (as under `python -m examples` or in the tests, where JAX
has already started), `main` runs itself again in a subprocess with the flag set, under
the same type-check hook (`python -m examples data_parallel_dp`).
"""

import os
import pathlib
import subprocess
import sys
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P, Sharding
from jaxtyping import Float

import eqx_micro.dp as dp
from examples.dp_digits import (
    ACCOUNTANT,
    accuracy,
    CLIP_NORM,
    CNN,
    DELTA,
    DP_OPTIMIZER,
    load_digits,
    loss,
    MICROBATCH_SIZE,  # 64: 8 examples per device in every microbatch.
    padding_multiple,
)


NUM_DEVICES = 8
EXPECTED_BATCH_SIZE = 256
EPSILON = 8.0
# Parameters of the two runs agree to this (absolute and relative, float32): the
# all-reduce of the 8 shards adds the per-example gradients in another order than the
# single-device loop, a rounding difference that training carries along.
RTOL, ATOL = 1e-4, 1e-5


def _rerun_with_devices(quick: bool) -> None:
    """Runs this example again in a fresh process that has 8 host CPU devices."""
    flag = f"--xla_force_host_platform_device_count={NUM_DEVICES}"
    if flag in os.environ.get("XLA_FLAGS", ""):
        raise RuntimeError(
            f"`XLA_FLAGS` asks for {NUM_DEVICES} host devices but JAX has "
            f"{jax.device_count()} ({jax.devices()}); this example needs the CPU "
            "backend (`JAX_PLATFORMS=cpu`)."
        )
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {flag}".strip()
    env["JAX_PLATFORMS"] = "cpu"
    command = [sys.executable, "-m", "examples", "data_parallel_dp"]
    command += ["--quick"] if quick else []
    print(
        f"JAX has {jax.device_count()} device(s); running `{' '.join(command[1:])}` "
        f"in a subprocess with XLA_FLAGS={flag}"
    )
    root = pathlib.Path(__file__).resolve().parents[1]
    # Captured and printed here (not inherited) so the caller's stdout sees it all.
    result = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True)
    print(result.stdout, end="")
    if result.returncode != 0:
        raise RuntimeError(
            f"The {NUM_DEVICES}-device run failed (exit code {result.returncode}):\n"
            f"{result.stderr}"
        )


def train(
    trainer: dp.DPTrainer,
    train_data: dict[str, np.ndarray],
    batch_sharding: Sharding,
    state_sharding: Sharding,
    seed: int,
) -> tuple[CNN, Float[np.ndarray, " steps"]]:
    """The DP-SGD loop of `DPTrainer.fit`, with every batch placed by `batch_sharding`.

    Returns the model and the training loss of every step.
    """
    model = CNN(jax.random.key(seed))
    state = jax.device_put(trainer.init(model), state_sharding)
    key = jax.device_put(jax.random.key(seed), state_sharding)
    num_examples = train_data["label"].shape[0]
    strategy = trainer.plan.batch_selection_strategy
    losses = []
    for indices in strategy.batch_iterator(num_examples, np.random.default_rng(seed)):
        # Batches of 256 +- 16 padded to 320 rows (40 a device): one compiled shape.
        multiple = padding_multiple(EXPECTED_BATCH_SIZE)
        indices = dp.pad_to_multiple_of(indices, multiple, MICROBATCH_SIZE)
        batch, is_padding = dp.gather_padded_batch(train_data, indices)
        batch, is_padding = jax.device_put((batch, is_padding), batch_sharding)
        state, metrics = trainer.step(state, batch, is_padding, key)
        losses.append(metrics["loss"])
    return state.model, np.asarray(jnp.stack(losses))


def parameters(model: CNN) -> list[np.ndarray]:
    """The model's parameters, gathered on the host."""
    return [np.asarray(x) for x in jax.tree.leaves(eqx.filter(model, eqx.is_array))]


def main(quick: bool = False) -> None:
    if jax.device_count() < NUM_DEVICES:
        _rerun_with_devices(quick)
        return
    start = time.perf_counter()
    iterations = 8 if quick else 80
    train_jax, test = load_digits()
    train_data = jax.device_get(train_jax)
    num_examples = train_data["label"].shape[0]
    sampling_prob = EXPECTED_BATCH_SIZE / num_examples
    grad_fn = dp.clipped_grad(
        loss, CLIP_NORM, microbatch_size=MICROBATCH_SIZE, key_argnum=2, return_values=True
    )
    plan = dp.DPSGDExecutionPlanConfig(
        iterations=iterations,
        sampling_prob=sampling_prob,
        epsilon=EPSILON,
        delta=DELTA,
        accountant=ACCOUNTANT,
        noise_seed=0,  # Reproducible here; leave it None (secret) in a real release.
    ).make(grad_fn)
    trainer = dp.DPTrainer(plan, DP_OPTIMIZER, normalize_by=EXPECTED_BATCH_SIZE)
    print(
        f"DP-SGD on digits: {iterations} steps, expected batch {EXPECTED_BATCH_SIZE}, "
        f"noise multiplier {plan.noise_multiplier:.3f} (epsilon {EPSILON:g} at delta "
        f"{DELTA:g}), microbatches of {MICROBATCH_SIZE}"
    )

    mesh = jax.make_mesh((NUM_DEVICES,), ("data",), axis_types=(AxisType.Auto,))
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    one_name, many_name = "1 device", f"{NUM_DEVICES} devices"
    runs = {
        one_name: (device, device),
        many_name: (
            NamedSharding(mesh, P("data")),  # Split every batch along its rows.
            NamedSharding(mesh, P()),  # Replicate the model and optimizer state.
        ),
    }
    models, losses = {}, {}
    for name, (batch_sharding, state_sharding) in runs.items():
        tic = time.perf_counter()
        models[name], losses[name] = train(
            trainer, train_data, batch_sharding, state_sharding, seed=0
        )
        weight = models[name].conv1.weight
        print(
            f"{name}: {iterations} steps in {time.perf_counter() - tic:.1f} s (with "
            f"compilation), final loss {float(losses[name][-1]):.4f}; conv1 weight on "
            f"{len(weight.sharding.device_set)} device(s)"
        )
    one, many = parameters(models[one_name]), parameters(models[many_name])
    absolute = max(np.max(np.abs(x - y)) for x, y in zip(many, one))
    scale = max(np.max(np.abs(y)) for y in one)
    loss_difference = np.max(np.abs(losses[one_name] - losses[many_name]))
    print(
        f"largest difference, {NUM_DEVICES} devices vs 1: parameters {absolute:.2e} "
        f"(the largest parameter is {scale:.2f}), training loss {loss_difference:.2e}"
    )
    for x, y in zip(many, one):
        np.testing.assert_allclose(x, y, rtol=RTOL, atol=ATOL)
    # Both models on one device: one compiled evaluation.
    on_one = [jax.device_put(models[name], device) for name in (one_name, many_name)]
    accuracies = [float(accuracy(model, test)) for model in on_one]
    print(
        f"the {NUM_DEVICES}-device model equals the 1-device model "
        f"(rtol {RTOL:g}, atol {ATOL:g}); test accuracy {accuracies[0]:.1%} (1 device) "
        f"and {accuracies[1]:.1%} ({NUM_DEVICES} devices); total time "
        f"{time.perf_counter() - start:.0f} s"
    )


if __name__ == "__main__":
    main()
