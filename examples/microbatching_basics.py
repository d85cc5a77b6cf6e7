"""Microbatching basics: gradient accumulation, per-example results, a custom
accumulator, and early stopping on a padded batch.

Every section checks the microbatched result against the plain computation on the whole
batch. From the repository root:

    python -m examples microbatching_basics
    python -m examples microbatching_basics --quick  # smaller sizes, as in the tests
"""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, ArrayLike, Bool, Float, Int, PRNGKeyArray, PyTree

import eqx_micro as em


IN_SIZE = 4


def make_data(
    seed: int, num_examples: int
) -> tuple[Float[Array, "batch in_size"], Float[Array, " batch"]]:
    """A synthetic regression problem, `y = sin(x @ w) + noise`, from a fixed seed."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=IN_SIZE)
    x = rng.normal(size=(num_examples, IN_SIZE))
    y = np.sin(x @ w) + 0.1 * rng.normal(size=num_examples)
    return jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)


@eqx.filter_jit
def make_model(width: int, key: PRNGKeyArray) -> eqx.nn.MLP:
    """A small MLP from `IN_SIZE` features to a scalar (compiled: one program)."""
    return eqx.nn.MLP(IN_SIZE, "scalar", width, depth=2, key=key)


def loss(
    model: eqx.nn.MLP, x: Float[Array, "batch in_size"], y: Float[Array, " batch"]
) -> Float[Array, ""]:
    """Mean squared error over a batch."""
    return jnp.mean((jax.vmap(model)(x) - y) ** 2)


def example_loss(
    model: eqx.nn.MLP, x: Float[Array, " in_size"], y: Float[Array, ""]
) -> Float[Array, ""]:
    """Squared error of one example."""
    return (model(x) - y) ** 2


def assert_close(actual: PyTree, expected: PyTree, what: str) -> None:
    """Same structure, and array leaves equal up to float32 round-off."""
    assert jax.tree.structure(actual) == jax.tree.structure(expected), what
    for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(a, e, rtol=1e-4, atol=1e-6, err_msg=what)


# Each section compiles the microbatched and the plain computation together in one
# `eqx.filter_jit`, so the script compiles only a handful of programs.

# --------------------------------------------------------------------------------------
# 1. Gradient accumulation with `microbatch`.


def gradient_accumulation(
    model: eqx.nn.MLP,
    x: Float[Array, "batch in_size"],
    y: Float[Array, " batch"],
    microbatch_size: int,
    num_steps: int,
) -> eqx.nn.MLP:
    print("1. Gradient accumulation with `em.microbatch`")
    value_and_grad = eqx.filter_value_and_grad(loss)
    # `x` and `y` (positions 1 and 2) are split into microbatches; `model` is shared.
    # `Mean()` averages the per-microbatch losses and gradients: with equal-sized
    # microbatches that is the full-batch mean and its gradient.
    accumulated = em.microbatch(
        value_and_grad,
        argnums=(1, 2),
        microbatch_size=microbatch_size,
        accumulator=em.Mean(),
    )
    optimizer = optax.sgd(learning_rate=0.1)

    @eqx.filter_jit
    def train_step(
        model: eqx.nn.MLP, opt_state: PyTree
    ) -> tuple[eqx.nn.MLP, PyTree, PyTree, PyTree]:
        microbatched = accumulated(model, x, y)
        plain = value_and_grad(model, x, y)
        updates, opt_state = optimizer.update(microbatched[1], opt_state)
        return eqx.apply_updates(model, updates), opt_state, microbatched, plain

    opt_state = optimizer.init(eqx.filter(model, eqx.is_array))
    values: list[float] = []
    for _ in range(num_steps):
        model, opt_state, microbatched, plain = train_step(model, opt_state)
        assert_close(microbatched, plain, "loss and gradients")
        values.append(float(microbatched[0]))
    num_microbatches = x.shape[0] // microbatch_size
    print(
        f"   batch of {x.shape[0]} in {num_microbatches} microbatches of "
        f"{microbatch_size}: loss and gradients match the plain ones at every step"
    )
    print(f"   {num_steps} SGD steps: loss {values[0]:.5f} -> {values[-1]:.5f}")
    assert values[-1] < values[0]
    return model


# --------------------------------------------------------------------------------------
# 2. Per-example results with `micro_vmap`.


def grad_norm(
    model: eqx.nn.MLP, x: Float[Array, " in_size"], y: Float[Array, ""]
) -> Float[Array, ""]:
    """The norm of one example's gradient (what differential privacy clips)."""
    grads = eqx.filter_grad(example_loss)(model, x, y)
    return jnp.sqrt(sum(jnp.sum(g**2) for g in jax.tree.leaves(grads)))


def per_example(
    model: eqx.nn.MLP,
    x: Float[Array, "batch in_size"],
    y: Float[Array, " batch"],
    microbatch_size: int,
) -> None:
    print("2. Per-example results with `em.micro_vmap`")

    @eqx.filter_jit
    def compute(model: eqx.nn.MLP) -> tuple[PyTree, PyTree]:
        # The default accumulator `Concat()` puts the results back in batch order: the
        # result equals `jax.vmap`'s, computed `microbatch_size` examples at a time.
        predictions = em.micro_vmap(model, microbatch_size=microbatch_size)(x)
        # `in_axes=None` shares the model; its non-array leaves are never mapped.
        norms = em.micro_vmap(
            grad_norm, in_axes=(None, 0, 0), microbatch_size=microbatch_size
        )(model, x, y)
        plain_norms = eqx.filter_vmap(grad_norm, in_axes=(None, 0, 0))(model, x, y)
        return (predictions, norms), (jax.vmap(model)(x), plain_norms)

    microbatched, plain = compute(model)
    assert_close(microbatched, plain, "per-example predictions and gradient norms")
    predictions, norms = microbatched
    print(f"   {predictions.shape[0]} predictions and gradient norms match `vmap`'s")
    print(f"   largest per-example gradient norm: {np.asarray(norms).max():.5f}")


# --------------------------------------------------------------------------------------
# 3. A custom accumulator: a subclass of `AbstractAccumulator`, nothing to register.


def _top_k(values: Float[Array, "n ..."], k: int) -> Float[Array, "k ..."]:
    """The `k` largest entries along axis 0, largest first."""
    top = jax.lax.top_k(jnp.moveaxis(values, 0, -1), k)[0]
    return jnp.moveaxis(top, -1, 0)


class TopK(em.AbstractAccumulator):
    """Keeps the `k` largest values along the leading (batch) axis of each leaf.

    With `microbatch`, each output leaf has a leading batch axis; with `micro_vmap`,
    `aggregate` first reduces a microbatch's examples to its own top `k` (so `k` must
    not exceed `microbatch_size`). Leaves must be floating point.
    """

    k: int = eqx.field(static=True)

    def __check_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"`TopK` needs `k >= 1`, got `k={self.k}`.")

    def init(
        self, example: PyTree[jax.ShapeDtypeStruct], num_microbatches: int
    ) -> PyTree[Array]:
        return jax.tree.map(
            lambda s: jnp.full((self.k, *s.shape[1:]), -jnp.inf, s.dtype), example
        )

    def update(
        self,
        carry: PyTree[Array],
        value: PyTree[Array],
        index: int | Int[ArrayLike, ""],
    ) -> PyTree[Array]:
        return jax.tree.map(
            lambda c, v: _top_k(jnp.concatenate([c, v]), self.k), carry, value
        )

    def finalize(
        self,
        carry: PyTree[Array],
        num_microbatches: int,
        num_executed: int | Int[Array, ""],
    ) -> PyTree[Array]:
        return carry

    def aggregate(self, values: PyTree[Array]) -> PyTree[Array]:
        return jax.tree.map(lambda v: _top_k(v, self.k), values)


def losses(
    model: eqx.nn.MLP, x: Float[Array, "batch in_size"], y: Float[Array, " batch"]
) -> tuple[Float[Array, ""], Float[Array, " batch"]]:
    """The mean loss and the per-example losses."""
    per_example = jax.vmap(example_loss, in_axes=(None, 0, 0))(model, x, y)
    return jnp.mean(per_example), per_example


def custom_accumulator(
    model: eqx.nn.MLP,
    x: Float[Array, "batch in_size"],
    y: Float[Array, " batch"],
    microbatch_size: int,
) -> None:
    print("3. A custom accumulator (`TopK`)")
    k = min(3, microbatch_size)

    @eqx.filter_jit
    def compute(model: eqx.nn.MLP) -> tuple[PyTree, PyTree]:
        # An accumulator tree is a prefix of the output: the mean loss is averaged,
        # and of the per-example losses only the `k` largest are kept.
        microbatched = em.microbatch(
            losses,
            argnums=(1, 2),
            microbatch_size=microbatch_size,
            accumulator=(em.Mean(), TopK(k)),
        )(model, x, y)
        # With `micro_vmap`, `aggregate` reduces each microbatch before `update`.
        top_k_vmap = em.micro_vmap(
            example_loss,
            in_axes=(None, 0, 0),
            microbatch_size=microbatch_size,
            accumulator=TopK(k),
        )(model, x, y)
        mean, per_example = losses(model, x, y)
        plain = (mean, _top_k(per_example, k))
        return (microbatched, top_k_vmap), (plain, plain[1])

    microbatched, plain = compute(model)
    assert_close(microbatched, plain, "mean loss and largest losses")
    (mean, top_k), _ = microbatched
    print(f"   mean loss {mean:.5f}; the {k} largest losses: {top_k}")


# --------------------------------------------------------------------------------------
# 4. Early stopping on a padded batch.


def masked_loss_sum(
    model: eqx.nn.MLP,
    x: Float[Array, "batch in_size"],
    y: Float[Array, " batch"],
    *,
    is_padding_example: Bool[Array, " batch"],
) -> Float[Array, ""]:
    """Sum of squared errors; padded examples contribute nothing."""
    squared_errors = (jax.vmap(model)(x) - y) ** 2
    return jnp.sum(jnp.where(is_padding_example, 0.0, squared_errors))


def pad(
    x: Float[np.ndarray, "real in_size"], y: Float[np.ndarray, " real"], batch_size: int
) -> tuple[
    Float[np.ndarray, "batch in_size"],
    Float[np.ndarray, " batch"],
    Bool[np.ndarray, " batch"],
]:
    """Pads a batch with zeros to `batch_size`, real examples first (on the host)."""
    num_real = x.shape[0]
    padded_x = np.zeros((batch_size, x.shape[1]), x.dtype)
    padded_y = np.zeros((batch_size,), y.dtype)
    padded_x[:num_real], padded_y[:num_real] = x, y
    return padded_x, padded_y, np.arange(batch_size) >= num_real


def early_stopping(
    model: eqx.nn.MLP,
    x: Float[Array, "batch in_size"],
    y: Float[Array, " batch"],
    microbatch_size: int,
) -> None:
    print("4. Early stopping on a padded batch")
    batch_size = x.shape[0]
    num_microbatches = batch_size // microbatch_size
    value_and_grad = eqx.filter_value_and_grad(masked_loss_sum)
    traces: list[Any] = []
    executed: list[Any] = []

    def counted(
        model: eqx.nn.MLP,
        x: Float[Array, "mb in_size"],
        y: Float[Array, " mb"],
        *,
        is_padding_example: Bool[Array, " mb"],
    ) -> tuple[Float[Array, ""], eqx.nn.MLP]:
        traces.append(None)  # Runs when traced, not when executed.
        jax.debug.callback(lambda: executed.append(None))  # Runs per microbatch.
        return value_and_grad(model, x, y, is_padding_example=is_padding_example)

    # The function takes `is_padding_example`, so passing that mask at call time splits
    # it with the batch and stops after the last microbatch holding a real example.
    # `Sum()` (the default): padding adds zero, so this is the sum over real examples.
    summed = em.microbatch(counted, argnums=(1, 2), microbatch_size=microbatch_size)

    @eqx.filter_jit
    def run(
        model: eqx.nn.MLP,
        x: Float[Array, "batch in_size"],
        y: Float[Array, " batch"],
        mask: Bool[Array, " batch"],
    ) -> tuple[PyTree, PyTree, Int[Array, ""]]:
        needed = em.count_real_microbatches(mask, microbatch_size)
        plain = value_and_grad(model, x, y, is_padding_example=mask)
        return summed(model, x, y, is_padding_example=mask), plain, needed

    order = em.compute_early_stopping_order(batch_size, microbatch_size)
    x_host, y_host = np.asarray(x), np.asarray(y)
    for num_real in (batch_size * 2 // 3, batch_size // 3):
        padded_x, padded_y, mask = pad(x_host[:num_real], y_host[:num_real], batch_size)
        # Microbatch `i` holds examples `i, i + M, i + 2M, ...`: in batch order each
        # microbatch holds one of the first `M` (real) examples, so none is skipped.
        assert not em.verify_early_stopping_order(mask, microbatch_size)
        # Permuted, every microbatch is a contiguous block of real examples or padding.
        padded_x, padded_y, mask = padded_x[order], padded_y[order], mask[order]
        assert em.verify_early_stopping_order(mask, microbatch_size)
        executed.clear()
        microbatched, plain, needed = run(
            model, jnp.asarray(padded_x), jnp.asarray(padded_y), jnp.asarray(mask)
        )
        jax.effects_barrier()  # Wait for the callbacks that count microbatches.
        assert_close(microbatched, plain, "padded batch")
        assert len(executed) == int(needed) == -(-num_real // microbatch_size)
        print(
            f"   {num_real} real examples padded to {batch_size}: ran {len(executed)} "
            f"of {num_microbatches} microbatches (`count_real_microbatches`: "
            f"{needed}); mean loss {float(microbatched[0]) / num_real:.5f}"
        )
    # The mask is traced under `filter_jit`, so the number of microbatches to run is
    # decided at run time: a new number of real examples reuses the compiled program.
    assert len(traces) == 1
    print("   both batches ran the same compiled program")


def main(quick: bool = False) -> None:
    batch_size, microbatch_size, width, num_steps = (
        (16, 4, 8, 3) if quick else (64, 8, 32, 20)
    )
    x, y = make_data(seed=0, num_examples=batch_size)
    model = make_model(width, jax.random.key(0))
    model = gradient_accumulation(model, x, y, microbatch_size, num_steps)
    per_example(model, x, y, microbatch_size)
    custom_accumulator(model, x, y, microbatch_size)
    early_stopping(model, x, y, microbatch_size)
    print("All microbatched results match the plain computations.")


if __name__ == "__main__":
    main()
