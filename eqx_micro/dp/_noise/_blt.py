"""Correlated noise for a buffered linear Toeplitz (BLT) strategy, streamed step by step."""

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
from ._buffered_toeplitz import BufferedToeplitz


class BLTNoiseState(AbstractNoiseState):
    """The state of `dp.BLTNoise`: the key and one buffer per BLT buffer.

    **Fields:**

    - `key_data`: the raw data of the key the next step draws from.
    - `count`: the number of noised updates so far.
    - `buffers`: for every array leaf of the updates, the `num_buffers` buffers of past
        noise (shape `(num_buffers, *leaf.shape)`): buffer `j` holds
        `Σ_{k>=1} θ_j^(k-1) w_{t-k}`, the past noises decayed by `buf_decay[j]`; `None`
        for non-array leaves. Its size does not depend on the number of steps.

    !!! example

        ```python
        import jax.numpy as jnp
        import eqx_micro.dp as dp

        strategy = dp.BufferedToeplitz([0.9, 0.5], [0.3, 0.1])
        noise = dp.BLTNoise(strategy, stddev=1.0, key=0)
        state = noise.init({"w": jnp.zeros(3)})
        assert state.buffers["w"].shape == (2, 3) and state.count == 0
        ```
    """

    key_data: UInt32[Array, "..."]
    count: Int[Array, ""]
    buffers: PyTree[Float[Array, "buffers ..."]]


class BLTNoise(AbstractNoiseTransform[BLTNoiseState]):
    """Correlated noise `C⁻¹ z` for a buffered linear Toeplitz (BLT) strategy `C`.

    `C` is the lower-triangular Toeplitz matrix of a
    [`dp.BufferedToeplitz`][eqx_micro.dp.BufferedToeplitz] (`c_0 = 1`, `c_k = Σ_j ω_j
    θ_j^(k-1)`). Step `t` adds `w_t`, the `t`-th entry of `C⁻¹ z` with `z_t ~ N(0,
    stddev²)` iid, computed as it streams: `C w = z` reads `w_t = z_t - Σ_j ω_j s_j`, and
    then each buffer decays and takes the new noise, `s_j ← θ_j s_j + w_t`. The state
    keeps `num_buffers` buffers the size of the model (however many steps run, unlike
    BandMF's `bands - 1` past noises), each step draws a fresh key, and a serialized
    state resumes the exact same sequence. The draws `z` are those of
    [`dp.GaussianNoise`][eqx_micro.dp.GaussianNoise] with the same key, so the first
    step adds the same noise (`c_0 = 1`), and with no buffers all steps do.

    The guarantee needs `stddev = noise_multiplier · clip_norm · sensitivity`, with the
    sensitivity of `C` for the run's participation pattern:
    `noise.strategy.sensitivity(n, min_sep=..., max_participations=...)` (`strategy` is
    the BLT as streamed, with the float32 parameters, whose sensitivity is the one that
    applies).

    **Arguments:**

    - `strategy`: the BLT `C`, a `dp.BufferedToeplitz` (e.g. from
        [`dp.optimize_blt`][eqx_micro.dp.optimize_blt]) with decays in `[-1, 1]`.
    - `stddev`: the standard deviation of `z`; finite and non-negative.
    - `key`: a PRNG key or an int seed (secret in real training).

    !!! example

        ```python
        import jax.numpy as jnp
        import eqx_micro.dp as dp

        strategy = dp.BufferedToeplitz(buf_decay=[0.5], output_scale=[0.5])
        noise = dp.BLTNoise(strategy, stddev=1.0, key=0)
        gaussian = dp.GaussianNoise(1.0, key=0)
        zeros = {"w": jnp.zeros(4)}
        state, g_state = noise.init(zeros), gaussian.init(zeros)
        w0, state = noise.update(zeros, state)
        z0, g_state = gaussian.update(zeros, g_state)
        w1, state = noise.update(zeros, state)
        z1, _ = gaussian.update(zeros, g_state)
        # C w = z with c = (1, 0.5, 0.25, ...): w_0 = z_0 and w_1 = z_1 - 0.5 w_0.
        assert jnp.array_equal(w0["w"], z0["w"])
        assert jnp.allclose(w1["w"], z1["w"] - 0.5 * w0["w"], atol=1e-6)
        ```

    ??? cite "References"

        ```bibtex
        @article{dvijotham2024efficient,
            title={Efficient and Near-Optimal Noise Generation for Streaming
                   Differential Privacy},
            author={Dvijotham, Krishnamurthy and McMahan, H. Brendan and Pillutla,
                    Krishna and Steinke, Thomas and Thakurta, Abhradeep},
            journal={arXiv preprint arXiv:2404.16706},
            year={2024},
            url={https://arxiv.org/abs/2404.16706}
        }

        @article{mcmahan2024hassle,
            title={A Hassle-free Algorithm for Private Learning in Practice: Don't Use
                   Tree Aggregation, Use BLTs},
            author={McMahan, H. Brendan and Xu, Zheng and Zhang, Yanxiang},
            journal={arXiv preprint arXiv:2408.08868},
            year={2024},
            url={https://arxiv.org/abs/2408.08868}
        }
        ```
    """

    buf_decay: Float[Array, " buffers"]
    output_scale: Float[Array, " buffers"]
    stddev: Float[Array, ""]
    key: PRNGKeyArray

    def __init__(
        self,
        strategy: BufferedToeplitz,
        stddev: float | Float[ArrayLike, ""],
        key: PRNGKeyArray | int,
    ):
        if not isinstance(strategy, BufferedToeplitz):
            raise TypeError(
                "`BLTNoise` needs `strategy` to be a `dp.BufferedToeplitz`, got "
                f"{type(strategy).__name__}; build one with "
                "`dp.BufferedToeplitz(buf_decay, output_scale)` or `dp.optimize_blt`."
            )
        decay = np.asarray(strategy.buf_decay, np.float32)
        if np.any(np.abs(decay) > 1):
            raise ValueError(
                "`BLTNoise` needs the strategy's `buf_decay` in [-1, 1] (a larger decay "
                f"makes its buffer grow without bound), got {strategy.buf_decay.tolist()}."
            )
        self.buf_decay = jnp.asarray(decay)
        self.output_scale = jnp.asarray(strategy.output_scale, jnp.float32)
        self.stddev = check_stddev(stddev)
        self.key = key_from(key)

    @property
    def num_buffers(self) -> int:
        """The number of buffers `d` (kept per array leaf in the state).

        !!! example

            ```python
            import eqx_micro.dp as dp

            strategy = dp.BufferedToeplitz([0.9, 0.5], [0.3, 0.1])
            assert dp.BLTNoise(strategy, 1.0, key=0).num_buffers == 2
            ```
        """
        return self.buf_decay.shape[0]

    @property
    def strategy(self) -> BufferedToeplitz:
        """The BLT this noise streams: the given one, with float32 parameters.

        Compute the sensitivity (and so the `stddev`) and the errors of this strategy:
        they are those of the noise actually added.

        !!! example

            ```python
            import math
            import eqx_micro.dp as dp

            strategy = dp.optimize_blt(100, 2)
            noise = dp.BLTNoise(strategy, 1.0, key=0)
            assert noise.strategy.num_buffers == 2
            streamed, given = noise.strategy.sensitivity(100), strategy.sensitivity(100)
            assert math.isclose(streamed, given, rel_tol=1e-5)
            ```
        """
        return BufferedToeplitz(
            np.asarray(self.buf_decay, np.float64),
            np.asarray(self.output_scale, np.float64),
        )

    @property
    def state_type(self) -> type[BLTNoiseState]:
        """`dp.BLTNoiseState`, the class of this transform's states.

        !!! example

            ```python
            import eqx_micro.dp as dp

            noise = dp.BLTNoise(dp.BufferedToeplitz([0.5], [0.5]), 1.0, key=0)
            assert noise.state_type is dp.BLTNoiseState
            ```
        """
        return BLTNoiseState

    def init(self, params: PyTree) -> BLTNoiseState:
        """The state before the first update: zero buffers shaped like `params`.

        `params` is the model (or a gradient of it): every inexact array leaf gets
        `num_buffers` buffers, other leaves (whose gradient is `None`) get `None`.

        !!! example

            ```python
            import equinox as eqx
            import jax
            import eqx_micro.dp as dp

            model = eqx.nn.Linear(3, 2, key=jax.random.key(0))
            strategy = dp.BufferedToeplitz([0.9, 0.6, 0.2], [0.2, 0.1, 0.1])
            state = dp.BLTNoise(strategy, 1.0, key=0).init(model)
            assert state.buffers.weight.shape == (3, 2, 3)
            ```
        """

        return BLTNoiseState(
            key_data=jax.random.key_data(self.key),
            count=jnp.zeros((), jnp.int32),
            buffers=stacked_zeros(params, self.num_buffers),
        )

    def update(
        self, updates: PyTree, state: BLTNoiseState, params: Any = None
    ) -> tuple[PyTree, BLTNoiseState]:
        """Adds this step's correlated noise `w_t` to every array leaf of `updates`.

        `updates` must have the structure `init` was given, up to `None` leaves.

        !!! example

            ```python
            import jax
            import jax.numpy as jnp
            import eqx_micro.dp as dp

            noise = dp.BLTNoise(dp.BufferedToeplitz([0.9], [0.4]), stddev=1.0, key=0)
            state = noise.init({"w": jnp.zeros(2)})
            noised, state = jax.jit(noise.update)({"w": jnp.ones(2)}, state)
            assert state.count == 1 and noised["w"].shape == (2,)
            ```
        """
        del params
        next_key, step_key = step_keys(self.key, state.key_data)
        leaves, treedef = jtu.tree_flatten(updates)
        try:
            buffers = treedef.flatten_up_to(state.buffers)
        except ValueError as error:
            raise ValueError(
                "`updates` does not have the structure `BLTNoise.init` was given "
                f"(pass the model, or its gradient, to `init`): {error}"
            ) from None
        new_buffers = list(buffers)
        for i, noise in scaled_normals(leaves, self.stddev, step_key):
            past = buffers[i]
            if past is None or past.shape[1:] != leaves[i].shape:
                raise ValueError(
                    "`updates` has a leaf of shape "
                    f"{leaves[i].shape} with no matching buffers in the state; pass "
                    "the model, or its gradient, to `BLTNoise.init`."
                )
            decay = self.buf_decay.astype(noise.dtype)
            scale = self.output_scale.astype(noise.dtype)
            # w_t = z_t - Σ_j ω_j s_j, as an explicit sum over the few buffers: a dot
            # could run in TF32 on a GPU.
            for j in range(self.num_buffers):
                noise = noise - scale[j] * past[j]
            decay = decay.reshape((-1,) + (1,) * leaves[i].ndim)
            new_buffers[i] = decay * past + noise[None]
            leaves[i] = (leaves[i].astype(noise.dtype) + noise).astype(leaves[i].dtype)
        new_state = BLTNoiseState(
            key_data=jax.random.key_data(next_key),
            count=state.count + 1,
            buffers=jtu.tree_unflatten(treedef, new_buffers),
        )
        return jtu.tree_unflatten(treedef, leaves), new_state
