"""Correlated noise for banded matrix factorization (BandMF), streamed step by step."""

from typing import Any

import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jaxtyping import Array, ArrayLike, Float, Int, PRNGKeyArray, PyTree, UInt32

from ._base import (
    AbstractNoiseState,
    AbstractNoiseTransform,
    check_stddev,
    key_from,
    scaled_normals,
    stacked_zeros,
    step_keys,
)


class BandMFNoiseState(AbstractNoiseState):
    """The state of `dp.BandMFNoise`: the key and the last `num_bands - 1` noises.

    **Fields:**

    - `key_data`: the raw data of the key the next step draws from.
    - `count`: the number of noised updates so far.
    - `history`: for every array leaf of the updates, the noise added in the last
        `num_bands - 1` steps (shape `(num_bands - 1, *leaf.shape)`, a ring buffer:
        slot `t % (num_bands - 1)` holds step `t`'s noise); `None` for non-array leaves.

    !!! example

        ```python
        import jax.numpy as jnp
        import eqx_micro.dp as dp

        noise = dp.BandMFNoise([0.8, 0.6], stddev=1.0, key=0)
        state = noise.init({"w": jnp.zeros(3)})
        assert state.history["w"].shape == (1, 3) and state.count == 0
        ```
    """

    key_data: UInt32[Array, "..."]
    count: Int[Array, ""]
    history: PyTree[Float[Array, "bands_minus_one ..."]]


class BandMFNoise(AbstractNoiseTransform[BandMFNoiseState]):
    """Correlated noise `C⁻¹ z` for banded matrix factorization (BandMF).

    `C` is the lower-triangular banded Toeplitz strategy matrix with first column `coefs`
    (`c_0, ..., c_{b-1}`, then zeros). Step `t` adds `w_t`, the `t`-th entry of `C⁻¹ z` with
    `z_t ~ N(0, stddev²)` iid, computed as it streams: `C w = z` is the recurrence `w_t =
    (z_t - c_1 w_{t-1} - ... - c_{b-1} w_{t-b+1}) / c_0`. The state keeps the last `b - 1`
    noises (memory `b - 1` times the model), any number of steps can run (each draws a fresh
    key, so nothing repeats or runs out), and a serialized state resumes the exact same
    sequence. With `coefs=[1]` this is [`dp.GaussianNoise`][eqx_micro.dp.GaussianNoise] bit
    for bit, for the same key.

    The guarantee needs `stddev = noise_multiplier * sensitivity * (max column norm of C)`,
    with each example participating at most once every `b` steps (cyclic Poisson sampling
    with `cycle_length=b`);
    [`dp.BandMFExecutionPlanConfig`][eqx_micro.dp.BandMFExecutionPlanConfig] sets all of
    this.

    **Arguments:**

    - `coefs`: the strategy's `b >= 1` Toeplitz coefficients, with `c_0 > 0`.
    - `stddev`: the standard deviation of `z`; finite and non-negative.
    - `key`: a PRNG key or an int seed (secret in real training).

    !!! example

        ```python
        import jax.numpy as jnp
        import eqx_micro.dp as dp

        noise = dp.BandMFNoise([1.0, 0.5], stddev=1.0, key=0)
        gaussian = dp.GaussianNoise(1.0, key=0)
        zeros = {"w": jnp.zeros(4)}
        state, g_state = noise.init(zeros), gaussian.init(zeros)
        w0, state = noise.update(zeros, state)
        z0, g_state = gaussian.update(zeros, g_state)
        w1, state = noise.update(zeros, state)
        z1, _ = gaussian.update(zeros, g_state)
        # C w = z: w_0 = z_0 and w_1 = z_1 - 0.5 w_0.
        assert jnp.allclose(w0["w"], z0["w"])
        assert jnp.allclose(w1["w"], z1["w"] - 0.5 * w0["w"], atol=1e-6)
        ```

    ??? cite "References"

        ```bibtex
        @inproceedings{choquettechoo2023amplified,
            title={(Amplified) Banded Matrix Factorization: A unified approach to
                   private training},
            author={Choquette-Choo, Christopher A. and Ganesh, Arun and McKenna, Ryan
                    and McMahan, H. Brendan and Rush, Keith and Thakurta, Abhradeep
                    and Xu, Zheng},
            booktitle={NeurIPS},
            year={2023},
            url={https://arxiv.org/abs/2306.08153}
        }
        ```
    """

    coefs: Float[Array, " bands"]
    stddev: Float[Array, ""]
    key: PRNGKeyArray

    def __init__(
        self,
        coefs: Float[ArrayLike, " bands"] | list[float],
        stddev: float | Float[ArrayLike, ""],
        key: PRNGKeyArray | int,
    ):
        values = np.asarray(coefs, np.float64)
        if values.ndim != 1 or values.size < 1:
            raise ValueError(
                f"`coefs` must be a non-empty 1-D array of Toeplitz coefficients, got "
                f"shape {values.shape}."
            )
        if not np.all(np.isfinite(values)) or not values[0] > 0:
            raise ValueError(
                "`coefs` must be finite with `coefs[0] > 0` (C must be invertible), got "
                f"{values.tolist()[:4]}{'...' if values.size > 4 else ''}."
            )
        self.coefs = jnp.asarray(values, jnp.float32)
        self.stddev = check_stddev(stddev)
        self.key = key_from(key)

    @property
    def num_bands(self) -> int:
        """The number of bands `b` (the length of `coefs`).

        !!! example

            ```python
            import eqx_micro.dp as dp

            assert dp.BandMFNoise([0.8, 0.6], stddev=1.0, key=0).num_bands == 2
            ```
        """
        return self.coefs.shape[0]

    @property
    def state_type(self) -> type[BandMFNoiseState]:
        """`dp.BandMFNoiseState`, the class of this transform's states.

        !!! example

            ```python
            import eqx_micro.dp as dp

            assert dp.BandMFNoise([1.0, 0.5], 1.0, key=0).state_type is dp.BandMFNoiseState
            ```
        """
        return BandMFNoiseState

    def init(self, params: PyTree) -> BandMFNoiseState:
        """The state before the first update: zero history shaped like `params`.

        `params` is the model (or a gradient of it): every inexact array leaf gets a
        history, other leaves (whose gradient is `None`) get `None`.

        !!! example

            ```python
            import equinox as eqx
            import jax
            import eqx_micro.dp as dp

            model = eqx.nn.Linear(3, 2, key=jax.random.key(0))
            state = dp.BandMFNoise([0.6, 0.6, 0.53], 1.0, key=0).init(model)
            assert state.history.weight.shape == (2, 2, 3)
            ```
        """

        return BandMFNoiseState(
            key_data=jax.random.key_data(self.key),
            count=jnp.zeros((), jnp.int32),
            history=stacked_zeros(params, self.num_bands - 1),
        )

    def update(
        self, updates: PyTree, state: BandMFNoiseState, params: Any = None
    ) -> tuple[PyTree, BandMFNoiseState]:
        """Adds this step's correlated noise `w_t` to every array leaf of `updates`.

        `updates` must have the structure `init` was given, up to `None` leaves.

        !!! example

            ```python
            import jax.numpy as jnp
            import eqx_micro.dp as dp

            noise = dp.BandMFNoise([0.8, 0.6], stddev=1.0, key=0)
            state = noise.init({"w": jnp.zeros(2)})
            noised, state = noise.update({"w": jnp.ones(2)}, state)
            assert state.count == 1 and noised["w"].shape == (2,)
            ```
        """
        del params
        next_key, step_key = step_keys(self.key, state.key_data)
        leaves, treedef = jtu.tree_flatten(updates)
        try:
            history = treedef.flatten_up_to(state.history)
        except ValueError as error:
            raise ValueError(
                "`updates` does not have the structure `BandMFNoise.init` was given "
                f"(pass the model, or its gradient, to `init`): {error}"
            ) from None
        new_history = list(history)
        for i, noise in scaled_normals(leaves, self.stddev, step_key):
            past = history[i]
            if past is None or past.shape[1:] != leaves[i].shape:
                raise ValueError(
                    "`updates` has a leaf of shape "
                    f"{leaves[i].shape} with no matching history in the state; pass "
                    "the model, or its gradient, to `BandMFNoise.init`."
                )
            coefs = self.coefs.astype(noise.dtype)
            depth = past.shape[0]
            if depth > 0:
                # w_t = (z_t - sum_j c_j w_{t-j}) / c_0. The history is a ring buffer
                # (slot t mod depth holds w_t), so a step writes one slot and reads the
                # rest once: slot s holds w_{t-j} with j = (t - s - 1) mod depth + 1.
                slots = jnp.arange(depth)
                lags = (state.count - slots - 1) % depth + 1
                noise = noise - jnp.tensordot(
                    coefs[lags], past, axes=1, precision=jax.lax.Precision.HIGHEST
                )
            noise = noise / coefs[0]
            if depth > 0:
                new_history[i] = past.at[state.count % depth].set(noise)
            leaves[i] = (leaves[i].astype(noise.dtype) + noise).astype(leaves[i].dtype)
        new_state = BandMFNoiseState(
            key_data=jax.random.key_data(next_key),
            count=state.count + 1,
            history=jtu.tree_unflatten(treedef, new_history),
        )
        return jtu.tree_unflatten(treedef, leaves), new_state
