"""Multi-device checks, run by `test_sharding.py` in a process with 8 CPU devices.

Run directly:
    XLA_FLAGS=--xla_force_host_platform_device_count=8 \
        python -m tests.multidevice_checks
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import eqx_micro as em
import eqx_micro.dp as dp


def per_example(x):
    return jnp.tanh(x) * 2


def loss(x):
    return jnp.sum(jnp.tanh(x) ** 2, axis=0)


def check_auto_sharding() -> None:
    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
    x_host = np.random.default_rng(0).normal(size=(64, 3)).astype(np.float32)
    x = jax.device_put(x_host, NamedSharding(mesh, P("data")))
    total = jax.jit(em.microbatch(loss, 0, 16))(x)
    np.testing.assert_allclose(total, loss(x_host), rtol=1e-5)
    concat = jax.jit(em.microbatch(per_example, 0, 16, em.Concat()))(x)
    np.testing.assert_allclose(concat, per_example(x_host), rtol=1e-5)
    assert concat.sharding.is_equivalent_to(x.sharding, 2), concat.sharding
    vmapped = jax.jit(em.micro_vmap(per_example, microbatch_size=8))(x)
    np.testing.assert_allclose(vmapped, per_example(x_host), rtol=1e-5)
    assert vmapped.sharding.is_equivalent_to(x.sharding, 2), vmapped.sharding


def check_explicit_sharding() -> None:
    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Explicit,))
    x_host = np.random.default_rng(1).normal(size=(64, 3)).astype(np.float32)
    with jax.set_mesh(mesh):
        x = jax.device_put(x_host, P("data"))
        seen = []

        def spy(x):
            seen.append(jax.typeof(x).sharding.spec)
            return per_example(x)

        concat = jax.jit(em.microbatch(spy, 0, 16, em.Concat()))(x)
        # Every microbatch stays sharded over all 8 devices.
        assert seen and all(spec[0] == "data" for spec in seen), seen
        assert jax.typeof(concat).sharding.spec[0] == "data"
        np.testing.assert_allclose(concat, per_example(x_host), rtol=1e-5)
        total = jax.jit(em.microbatch(loss, 0, 8, em.Mean()))(x)
        np.testing.assert_allclose(total, loss(x_host) / 8, rtol=1e-5)
        split = em.reshape_batch_axis(x, 16)
        assert split.shape == (4, 16, 3)
        assert tuple(jax.typeof(split).sharding.spec)[:2] == (None, "data")
        np.testing.assert_array_equal(
            split[1], x_host[np.arange(16) * 4 + 1]
        )  # column-major: examples 1, 5, 9, ...
        try:
            em.microbatch(loss, 0, 4)(x)
        except ValueError as error:
            assert "multiple of 8" in str(error), error
        else:
            raise AssertionError("microbatch_size=4 over 8 shards did not raise")


def check_sharded_dp_step() -> None:
    """Clipped grads of a sharded batch and BandMF noise on sharded parameters."""
    mesh = jax.make_mesh((8,), ("data",), axis_types=(AxisType.Auto,))
    rng = np.random.default_rng(2)
    x_host = rng.normal(size=(64, 16)).astype(np.float32)
    w_host = rng.normal(size=(16, 8)).astype(np.float32)

    def example_loss(w, x):
        return jnp.sum(jnp.tanh(x @ w) ** 2)

    grad_fn = dp.clipped_grad(example_loss, 1.0, microbatch_size=16)
    x = jax.device_put(x_host, NamedSharding(mesh, P("data")))
    w = jax.device_put(w_host, NamedSharding(mesh, P("data", None)))
    total, _ = eqx.filter_jit(grad_fn)(w, x)
    expected, _ = grad_fn(jnp.asarray(w_host), jnp.asarray(x_host))
    # float32 sums of 64 clipped gradients, reduced in another order across devices.
    np.testing.assert_allclose(total, expected, rtol=2e-5, atol=1e-5)

    noise = dp.BandMFNoise([0.7, 0.5, 0.5], stddev=1.0, key=5)
    state = noise.init({"w": w})
    assert state.history["w"].sharding.spec[1] == "data", state.history["w"].sharding
    step = eqx.filter_jit(noise.update)
    local_state = noise.init({"w": jnp.asarray(w_host)})
    for _ in range(4):
        noised, state = step({"w": w}, state)
        local, local_state = noise.update({"w": jnp.asarray(w_host)}, local_state)
        # The same noise whatever the sharding, and the output stays sharded.
        np.testing.assert_allclose(noised["w"], local["w"], rtol=1e-6, atol=1e-6)
        assert noised["w"].sharding.is_equivalent_to(w.sharding, 2), noised["w"].sharding
        assert state.history["w"].sharding.spec[1] == "data", state.history["w"].sharding


if __name__ == "__main__":
    assert jax.device_count() == 8, jax.devices()
    check_auto_sharding()
    check_explicit_sharding()
    check_sharded_dp_step()
    print("multidevice checks passed")
