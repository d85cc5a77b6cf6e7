"""Independent Gaussian noise for every release: DP-SGD."""

from typing import Any

import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, ArrayLike, Float, Int, PRNGKeyArray, PyTree, UInt32

from ._base import (
    AbstractNoiseState,
    AbstractNoiseTransform,
    check_stddev,
    key_from,
    scaled_normals,
    step_keys,
)


class GaussianNoiseState(AbstractNoiseState):
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


class GaussianNoise(AbstractNoiseTransform[GaussianNoiseState]):
    """Adds N(0, stddev²) noise to every leaf of a clipped gradient sum.

    An optax-style transformation (`init(params) -> state`, `update(updates, state,
    params=None) -> (noised, state)`), usable on its own or first in `optax.chain`. The
    PRNG key lives in the state and advances on every update: no step and no leaf reuses
    a key, the same key gives the same noise stream, and a state restored with
    `eqx.tree_deserialise_leaves` continues exactly where it stopped. Each leaf's noise
    is drawn in float32 (or wider) and the result is cast back to the leaf's dtype.

    Add the noise to the output of a [`dp.clipped_grad`][eqx_micro.dp.clipped_grad] callable
    as it is: its sensitivity already includes `normalize_by`. Rescaling (e.g. dividing by
    the batch size) before the noise would shrink the noise relative to the guarantee;
    rescale after it, or better, set `normalize_by`. `dp.DPExecutionPlan.noisy_grad` does
    both steps in one call, with the noise calibrated from the callable's sensitivity.

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
        self.stddev = check_stddev(stddev)
        self.key = key_from(key)

    @property
    def state_type(self) -> type[GaussianNoiseState]:
        """`dp.GaussianNoiseState`, the class of this transform's states.

        !!! example

            ```python
            import eqx_micro.dp as dp

            assert dp.GaussianNoise(1.0, key=0).state_type is dp.GaussianNoiseState
            ```
        """
        return GaussianNoiseState

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
        next_key, step_key = step_keys(self.key, state.key_data)
        leaves, treedef = jtu.tree_flatten(updates)
        for i, noise in scaled_normals(leaves, self.stddev, step_key):
            leaves[i] = (leaves[i].astype(noise.dtype) + noise).astype(leaves[i].dtype)
        noised = jtu.tree_unflatten(treedef, leaves)
        new_state = GaussianNoiseState(
            key_data=jax.random.key_data(next_key), count=state.count + 1
        )
        return noised, new_state
