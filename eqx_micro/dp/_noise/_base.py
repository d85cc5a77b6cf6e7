"""The noise contract: optax-style transformations whose PRNG key lives in their state."""

import abc
import math
from typing import Any, Generic, TypeVar

import equinox as eqx
import jax
import jax.core
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jaxtyping import Array, Float, Int, PRNGKeyArray, PyTree


class AbstractNoiseState(eqx.Module):
    """The state of a noise transform: what a plan reads from it is declared here.

    - `count`: the number of noised updates so far (an int32 scalar); a plan refuses a
        release once it reaches the plan's `iterations`.

    !!! example

        ```python
        import eqx_micro.dp as dp

        state = dp.GaussianNoise(1.0, key=0).init(None)
        assert isinstance(state, dp.AbstractNoiseState) and state.count == 0
        ```
    """

    count: eqx.AbstractVar[Int[Array, ""]]


_State = TypeVar("_State", bound=AbstractNoiseState)


class AbstractNoiseTransform(eqx.Module, Generic[_State]):
    """Noise for a bounded-sensitivity output, with optax's transformation protocol.

    The contract a subclass implements:

    - `init(params) -> state`: the state before the first release; `params` gives the
        structure of the updates (a model, or its gradient).
    - `update(updates, state, params=None) -> (noised_updates, new_state)`: adds this
        step's noise to every array leaf of `updates`; `None` leaves stay `None`. The
        PRNG key lives in the state, so no step reuses noise.
    - `stddev`: the standard deviation of the underlying Gaussian draws.
    - `state_type`: the class of the states `init` returns (a subclass of
        [`dp.AbstractNoiseState`][eqx_micro.dp.AbstractNoiseState]), so a state can be
        checked against the transform.

    Subclasses work wherever optax takes a transformation by its `init`/`update`
    (`optax.chain`, `optax.masked`, `optax.MultiSteps`, `optax.apply_if_finite`, ...),
    under `jax.jit` (hashed by identity, like a function), and as an execution plan's
    `noise_addition_transform`; their states serialize with
    `eqx.tree_serialise_leaves`. Where code is typed (or checks) for an
    `optax.GradientTransformation`, wrap one: `optax.GradientTransformation(noise.init,
    noise.update)`.

    !!! example

        ```python
        import eqx_micro.dp as dp

        assert issubclass(dp.GaussianNoise, dp.AbstractNoiseTransform)
        assert issubclass(dp.BandMFNoise, dp.AbstractNoiseTransform)
        ```
    """

    stddev: eqx.AbstractVar[Float[Array, ""]]

    # `jax.jit(f)` keys its cache on `f` itself: hash by identity, so that an instance
    # holding arrays can be jitted as a function (its arrays become constants).
    __hash__ = object.__hash__

    @property
    @abc.abstractmethod
    def state_type(self) -> type[_State]:
        """The class of the states `init` returns."""

    @abc.abstractmethod
    def init(self, params: PyTree) -> _State:
        """The state before the first update."""

    @abc.abstractmethod
    def update(
        self, updates: PyTree, state: _State, params: Any = None
    ) -> tuple[PyTree, _State]:
        """Adds this step's noise to `updates`; returns `(noised, new_state)`."""

    def check_state(self, state: Any, params: PyTree) -> None:
        """Raises a clear error unless `state` is a state of this transform for
        updates shaped like `params` (its kind, then its tree, shapes and dtypes).

        !!! example

            ```python
            import jax.numpy as jnp
            import pytest
            import eqx_micro.dp as dp

            noise = dp.BandMFNoise([1.0, 0.5], stddev=1.0, key=0)
            noise.check_state(noise.init({"w": jnp.zeros(3)}), {"w": jnp.zeros(3)})
            with pytest.raises(ValueError, match="state.history"):
                noise.check_state(noise.init({"w": jnp.zeros(4)}), {"w": jnp.zeros(3)})
            ```
        """
        if not isinstance(state, self.state_type):
            raise TypeError(
                f"The noise state is a `{type(state).__name__}`, but the noise is a "
                f"`{type(self).__name__}`, whose state is a "
                f"`{self.state_type.__name__}`. Pass the state from `init(params)` of "
                "this noise (or the checkpoint of a run that used it)."
            )
        expected = eqx.filter_eval_shape(self.init, params)
        got = eqx.filter_eval_shape(lambda: state)
        expected_leaves = jtu.tree_flatten_with_path(expected)[0]
        got_leaves = jtu.tree_flatten_with_path(got)[0]
        got_by_path = dict(got_leaves)
        for path, want in expected_leaves:
            have = got_by_path.get(path)
            where = f"state{jtu.keystr(path)}"
            if have is None:
                raise ValueError(
                    f"The noise state has no `{where}`, which updates shaped like these "
                    "parameters need: it was made for another model. Make it with "
                    "`init(params)` for this model."
                )
            if (have.shape, have.dtype) != (want.shape, want.dtype):
                raise ValueError(
                    f"The noise state's `{where}` has shape {have.shape} and dtype "
                    f"{have.dtype}, but these parameters need {want.shape} and "
                    f"{want.dtype}: it was made for another model. Make it with "
                    "`init(params)` for this model."
                )
        if len(got_leaves) != len(expected_leaves):
            extra = [jtu.keystr(p) for p, _ in got_leaves if p not in dict(expected_leaves)]
            raise ValueError(
                f"The noise state has entries these parameters do not have "
                f"(`state{extra[0] if extra else ''}`): it was made for another model."
            )


def key_from(key: PRNGKeyArray | int) -> PRNGKeyArray:
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


def check_stddev(stddev: Any) -> Float[Array, ""]:
    is_number = isinstance(stddev, int | float | np.number) and not isinstance(stddev, bool)
    is_scalar_array = isinstance(stddev, jax.Array | np.ndarray) and np.ndim(stddev) == 0
    if not (is_number or is_scalar_array):
        raise TypeError(
            f"`stddev` must be a number (or a scalar array), got {stddev!r} of type "
            f"{type(stddev).__name__}."
        )
    if not isinstance(stddev, jax.core.Tracer):
        value = float(np.asarray(stddev))
        if math.isnan(value) or math.isinf(value) or value < 0:
            raise ValueError(f"`stddev` must be a finite non-negative number, got {value}.")
    return jnp.asarray(stddev, jnp.float32)


def step_keys(key: PRNGKeyArray, key_data: Array) -> tuple[PRNGKeyArray, PRNGKeyArray]:
    """`(next_key, step_key)` from a state's raw key data (of `key`'s implementation)."""
    key = jax.random.wrap_key_data(key_data, impl=jax.random.key_impl(key))
    next_key, step_key = jax.random.split(key)
    return next_key, step_key


def noise_dtype(dtype: Any) -> Any:
    # Draw narrow floats in float32 (bf16 normals are coarse), wider ones as they are.
    return dtype if jnp.finfo(dtype).bits >= 32 else jnp.dtype(jnp.float32)


def stacked_zeros(params: PyTree, depth: int) -> PyTree:
    """`depth` stacked zero copies of every inexact array leaf of `params` (in its
    noise dtype), `None` elsewhere: the per-leaf memory of a correlated-noise state."""

    def zeros(leaf):
        if not eqx.is_inexact_array(leaf):
            return None
        # zeros_like keeps the leaf's sharding, so the stack is sharded like it.
        zeros = jnp.zeros_like(leaf, dtype=noise_dtype(leaf.dtype))
        return jnp.broadcast_to(zeros[None], (depth, *leaf.shape))

    return jtu.tree_map(zeros, params)


def scaled_normals(
    leaves: list, stddev: Float[Array, ""], key: PRNGKeyArray
) -> list[tuple[int, Array]]:
    """`(index, stddev * N(0, 1) noise)` for every array leaf, one key per leaf."""
    arrays = [i for i, leaf in enumerate(leaves) if eqx.is_array(leaf)]
    for i in arrays:
        if not jnp.issubdtype(leaves[i].dtype, jnp.inexact):
            raise TypeError(
                f"Gaussian noise needs floating-point leaves, got a leaf of dtype "
                f"{leaves[i].dtype}; gradients of integer parameters are not noised."
            )
    keys = jax.random.split(key, max(len(arrays), 1))
    noises = []
    for key_index, i in enumerate(arrays):
        dtype = noise_dtype(leaves[i].dtype)
        normal = jax.random.normal(keys[key_index], leaves[i].shape, dtype)
        noises.append((i, stddev.astype(dtype) * normal))
    return noises
