"""Gradient accumulation: one optimizer step over a batch that does not fit at once.

A small classifier with dropout and batch normalization is trained with
`em.accumulate_gradients`: each step's batch is processed a microbatch at a time, each
microbatch gets its own dropout key, and the batch-norm statistics (`eqx.nn.State`) are
threaded through the microbatches in order. Without dropout and batch norm, the
accumulated gradient equals the full-batch gradient, which is checked first.

    python -m examples gradient_accumulation
    python -m examples gradient_accumulation --quick  # smaller sizes, as in the tests
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Float, Int, PRNGKeyArray, PyTree

import eqx_micro as em


NUM_CLASSES = 3
IN_SIZE = 8


def make_data(seed: int, num_examples: int) -> dict[str, Array]:
    """Three Gaussian blobs in `IN_SIZE` dimensions, from a fixed seed."""
    rng = np.random.default_rng(seed)
    centers = 2.0 * rng.normal(size=(NUM_CLASSES, IN_SIZE))
    labels = rng.integers(0, NUM_CLASSES, num_examples)
    x = centers[labels] + rng.normal(size=(num_examples, IN_SIZE))
    return {"x": jnp.asarray(x, jnp.float32), "y": jnp.asarray(labels, jnp.int32)}


class Classifier(eqx.Module):
    """Linear -> BatchNorm -> ReLU -> Dropout -> Linear."""

    hidden: eqx.nn.Linear
    norm: eqx.nn.BatchNorm
    dropout: eqx.nn.Dropout
    head: eqx.nn.Linear

    def __init__(self, width: int, key: PRNGKeyArray):
        k1, k2 = jax.random.split(key)
        self.hidden = eqx.nn.Linear(IN_SIZE, width, key=k1)
        self.norm = eqx.nn.BatchNorm(width, axis_name="batch", mode="ema")
        self.dropout = eqx.nn.Dropout(0.2)
        self.head = eqx.nn.Linear(width, NUM_CLASSES, key=k2)

    def __call__(
        self,
        x: Float[Array, " in_size"],
        state: eqx.nn.State,
        key: PRNGKeyArray | None,
        inference: bool = False,
    ) -> tuple[Float[Array, " classes"], eqx.nn.State]:
        h, state = self.norm(self.hidden(x), state, inference=inference)
        h = self.dropout(jax.nn.relu(h), key=key, inference=inference)
        return self.head(h), state


def cross_entropy(logits: Float[Array, "batch classes"], y: Int[Array, " batch"]) -> Array:
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1))


def loss_fn(
    model: Classifier, batch: dict[str, Array], *, key: PRNGKeyArray, state: eqx.nn.State
) -> tuple[Float[Array, ""], dict[str, Array], eqx.nn.State]:
    """Mean cross-entropy of a (micro)batch, its accuracy, and the new state."""
    keys = jax.random.split(key, batch["x"].shape[0])
    logits, state = jax.vmap(
        model, axis_name="batch", in_axes=(0, None, 0), out_axes=(0, None)
    )(batch["x"], state, keys)
    accuracy = jnp.mean((jnp.argmax(logits, 1) == batch["y"]).astype(jnp.float32))
    return cross_entropy(logits, batch["y"]), {"accuracy": accuracy}, state


def check_full_batch_equivalence(batch: dict[str, Array], key: PRNGKeyArray) -> None:
    """With no randomness and no state, accumulation gives the full-batch gradient."""
    model = eqx.nn.MLP(IN_SIZE, NUM_CLASSES, 16, 1, key=key)

    def plain_loss(model: eqx.nn.MLP, batch: dict[str, Array]) -> Float[Array, ""]:
        return cross_entropy(jax.vmap(model)(batch["x"]), batch["y"])

    full = eqx.filter_grad(plain_loss)(model, batch)
    for num_microbatches in (2, 8):
        accumulated = em.accumulate_gradients(
            plain_loss, model, batch, num_microbatches=num_microbatches
        ).grads
        error = max(
            float(jnp.max(jnp.abs(a - b)))
            for a, b in zip(jax.tree.leaves(accumulated), jax.tree.leaves(full))
        )
        assert error < 1e-5, error
        print(f"{num_microbatches} microbatches: max |accumulated - full| = {error:.1e}")


def train(
    batch_size: int, microbatch_size: int, steps: int, seed: int = 0
) -> tuple[float, float]:
    data = make_data(seed, 4 * batch_size)
    model, state = eqx.nn.make_with_state(Classifier)(32, jax.random.key(seed))
    optimizer = optax.sgd(0.1, momentum=0.9)
    opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))

    @eqx.filter_jit
    def step(
        model: Classifier,
        state: eqx.nn.State,
        opt_state: PyTree,
        batch: dict[str, Array],
        key: PRNGKeyArray,
    ) -> tuple[Classifier, eqx.nn.State, PyTree, Array, dict[str, Array]]:
        out = em.accumulate_gradients(
            loss_fn,
            model,
            batch,
            microbatch_size=microbatch_size,
            key=key,
            state=state,
            has_aux=True,
        )
        params = eqx.filter(model, eqx.is_array)
        updates, opt_state = optimizer.update(out.grads, opt_state, params)
        return eqx.apply_updates(model, updates), out.state, opt_state, out.loss, out.aux

    rng = np.random.default_rng(seed)
    first_loss = last_loss = float("nan")
    for i in range(steps):
        idx = rng.choice(data["x"].shape[0], batch_size, replace=False)
        batch = {name: array[idx] for name, array in data.items()}
        model, state, opt_state, loss, metrics = step(
            model, state, opt_state, batch, jax.random.key(1000 + i)
        )
        first_loss = float(loss) if i == 0 else first_loss
        last_loss = float(loss)
        if i % max(1, steps // 5) == 0 or i == steps - 1:
            print(
                f"step {i:3d}: loss {float(loss):.3f}, "
                f"accuracy {float(metrics['accuracy']):.2f} "
                f"({batch_size // microbatch_size} microbatches of {microbatch_size})"
            )
    return first_loss, last_loss


def main(quick: bool = False) -> None:
    batch_size = 64 if quick else 512
    check_full_batch_equivalence(make_data(1, batch_size), jax.random.key(1))
    first, last = train(batch_size, batch_size // 8, steps=10 if quick else 60)
    assert last < first, (first, last)
    print(f"loss {first:.3f} -> {last:.3f}")


if __name__ == "__main__":
    main()
