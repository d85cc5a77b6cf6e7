"""The non-private baseline's parts: the plain sum of per-example gradients, and no
noise, behind the same contracts as the private ones."""

import math
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, Int, PyTree

from .._clipping._contract import (
    AbstractBoundedSensitivityCallable,
    ClippedGradAux,
    PrivacyUnit,
)
from .._noise._base import AbstractNoiseState, AbstractNoiseTransform


class UnclippedGrad(AbstractBoundedSensitivityCallable):
    """The plain sum of per-example gradients: no clipping, so no sensitivity bound."""

    grad_fn: Callable
    microbatch_size: int | None

    @property
    def l2_norm_bound(self) -> float:
        return math.inf

    @property
    def privacy_unit(self) -> PrivacyUnit:
        return PrivacyUnit.EXAMPLE

    def __call__(
        self, *args: Any, is_padding_example: ArrayLike | None = None, **kwargs: Any
    ) -> tuple[PyTree, ClippedGradAux]:
        if is_padding_example is not None:
            kwargs["is_padding_example"] = is_padding_example
        total, per_example = self.grad_fn(*args, **kwargs)
        aux = ClippedGradAux(
            values=per_example.values,
            grad_norms=None,
            aux=per_example.aux,
            num_nonfinite=jnp.zeros((), jnp.int32),
        )
        return total, aux


class NoNoiseState(AbstractNoiseState):
    count: Int[Array, ""]


class NoNoise(AbstractNoiseTransform[NoNoiseState]):
    """Adds nothing; counts the updates like the real noise transforms."""

    stddev: Float[Array, ""]

    def __init__(self):
        self.stddev = jnp.zeros((), jnp.float32)

    @property
    def state_type(self) -> type[NoNoiseState]:
        """`NoNoiseState`."""
        return NoNoiseState

    def init(self, params: PyTree) -> NoNoiseState:
        del params
        return NoNoiseState(count=jnp.zeros((), jnp.int32))

    def update(
        self, updates: PyTree, state: NoNoiseState, params: Any = None
    ) -> tuple[PyTree, NoNoiseState]:
        del params
        return updates, NoNoiseState(count=state.count + 1)
