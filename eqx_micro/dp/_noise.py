"""Gaussian noise for a clipped gradient sum, as an optax-style transformation."""

import math
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jaxtyping import Array, ArrayLike, Float, Int, PRNGKeyArray, PyTree, UInt32


class GaussianNoiseState(eqx.Module):
    """The state of `dp.GaussianNoise`: where the noise stream stands.

    **Fields:**

    - `key_data`: the raw data of the key the next step draws from (raw, so the state
        survives `eqx.tree_serialise_leaves`).
    - `count`: the number of noised updates so far.

    !!! example

        ```python
        import jax.numpy as jnp
        import eqx_micro.dp as dp

        noise = dp.GaussianNoise(1.0, key=0)
        state = noise.init(None)
        _, state = noise.update(jnp.zeros(3), state)
        assert isinstance(state, dp.GaussianNoiseState) and state.count == 1
        ```
    """

    key_data: UInt32[Array, "..."]
    count: Int[Array, ""]


def _key_from(key: PRNGKeyArray | int) -> PRNGKeyArray:
    if isinstance(key, bool) or not (isinstance(key, int) or eqx.is_array(key)):
        raise TypeError(
            "`key` must be a PRNG key (e.g. `jax.random.key(seed)`) or an int seed, got "
            f"{type(key).__name__}."
        )
    if isinstance(key, int):
        return jax.random.key(key)
    if not jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        raise TypeError(
            "`key` must be a typed PRNG key from `jax.random.key`, got an array of dtype "
            f"{key.dtype}; wrap raw key data with `jax.random.wrap_key_data`."
        )
    if key.shape != ():
        raise ValueError(f"`key` must be a single key, got shape {key.shape}.")
    return key


class GaussianNoise(eqx.Module):
    """Adds N(0, stddev²) noise to every leaf of a clipped gradient sum.

    An optax-style transformation (`init(params) -> state`, `update(updates, state,
    params=None) -> (noised, state)`), usable on its own or first in `optax.chain`. The
    PRNG key lives in the state and advances on every update: no step and no leaf reuses
    a key, the same key gives the same noise stream, and a state restored with
    `eqx.tree_deserialise_leaves` continues exactly where it stopped. Each leaf's noise
    is drawn in float32 (or wider) and the result is cast back to the leaf's dtype.

    Add the noise to the output of a `dp.clipped_grad` callable as it is: its
    sensitivity already includes `normalize_by`. Rescaling (e.g. dividing by the batch
    size) before the noise would shrink the noise relative to the guarantee; rescale
    after it, or better, set `normalize_by`. `dp.DPExecutionPlan.noisy_grad` does both
    steps in one call, with the noise calibrated from the callable's sensitivity.

    **Arguments:**

    - `stddev`: the noise standard deviation, `noise_multiplier * sensitivity`; finite
        and non-negative. An array field: changing it does not recompile.
    - `key`: a PRNG key (`jax.random.key(seed)`) or an int seed. Draw the seed from a
        secret source in real training: noise an adversary can predict protects nothing.

    !!! example

        ```python
        import jax.numpy as jnp
        import optax
        import eqx_micro.dp as dp

        noise = dp.GaussianNoise(stddev=1.0, key=0)
        optimizer = optax.chain(noise, optax.sgd(0.1))
        grads = {"w": jnp.zeros(3)}
        state = optimizer.init(grads)
        updates, state = optimizer.update(grads, state)
        updates_again, _ = optimizer.update(grads, state)
        assert not jnp.allclose(updates["w"], updates_again["w"])  # fresh noise
        ```
    """

    stddev: Float[Array, ""]
    key: PRNGKeyArray

    def __init__(self, stddev: float | Float[ArrayLike, ""], key: PRNGKeyArray | int):
        if not isinstance(stddev, jax.core.Tracer):
            value = float(np.asarray(stddev))
            if math.isnan(value) or math.isinf(value) or value < 0:
                raise ValueError(
                    f"`stddev` must be a finite non-negative number, got {value}."
                )
        self.stddev = jnp.asarray(stddev, jnp.float32)
        self.key = _key_from(key)

    def init(self, params: PyTree) -> GaussianNoiseState:
        """The state before the first update; `params` is ignored.

        !!! example

            ```python
            import eqx_micro.dp as dp

            state = dp.GaussianNoise(1.0, key=0).init(None)
            assert state.count == 0
            ```
        """
        del params
        return GaussianNoiseState(
            key_data=jax.random.key_data(self.key), count=jnp.zeros((), jnp.int32)
        )

    def update(
        self, updates: PyTree, state: GaussianNoiseState, params: Any = None
    ) -> tuple[PyTree, GaussianNoiseState]:
        """Adds fresh noise to every array leaf of `updates`; returns the new state.

        `None` leaves (e.g. the gradient of a frozen part) stay `None`.

        !!! example

            ```python
            import jax.numpy as jnp
            import eqx_micro.dp as dp

            noise = dp.GaussianNoise(0.5, key=0)
            state = noise.init(None)
            noised, state = noise.update({"w": jnp.zeros(4), "frozen": None}, state)
            assert noised["frozen"] is None and noised["w"].shape == (4,)
            ```
        """
        del params
        key = jax.random.wrap_key_data(state.key_data, impl=jax.random.key_impl(self.key))
        next_key, step_key = jax.random.split(key)
        noised = add_gaussian_noise(updates, self.stddev, step_key)
        new_state = GaussianNoiseState(
            key_data=jax.random.key_data(next_key), count=state.count + 1
        )
        return noised, new_state


def add_gaussian_noise(
    tree: PyTree, stddev: Float[ArrayLike, ""], key: PRNGKeyArray
) -> PyTree:
    """`tree` plus independent N(0, stddev²) noise in every entry of every array leaf."""
    leaves, treedef = jtu.tree_flatten(tree)
    arrays = [i for i, leaf in enumerate(leaves) if eqx.is_array(leaf)]
    for i in arrays:
        if not jnp.issubdtype(leaves[i].dtype, jnp.inexact):
            raise TypeError(
                f"Gaussian noise needs floating-point leaves, got a leaf of dtype "
                f"{leaves[i].dtype}; gradients of integer parameters are not noised."
            )
    keys = jax.random.split(key, max(len(arrays), 1))
    for key_index, i in enumerate(arrays):
        leaf = leaves[i]
        # Draw narrow floats in float32 (bf16 normals are coarse), wider ones as is.
        wide = jnp.finfo(leaf.dtype).bits >= 32
        noise_dtype = leaf.dtype if wide else jnp.dtype(jnp.float32)
        noise = jax.random.normal(keys[key_index], leaf.shape, noise_dtype)
        noised = leaf.astype(noise_dtype) + jnp.asarray(stddev, noise_dtype) * noise
        leaves[i] = noised.astype(leaf.dtype)
    return jtu.tree_unflatten(treedef, leaves)
