"""The contract of a clipped aggregation: what a DP plan and `DPTrainer` read from it.

A plan adds noise of standard deviation `noise_multiplier * fn.sensitivity(relation)` to
`fn`'s output, and the trainer pads batches to multiples of `fn.microbatch_size` and reads
its aux. All of that is declared here, on the abstract class, so that any implementation
([`dp.clipped_grad`][eqx_micro.dp.clipped_grad],
[`dp.ghost_clipped_grad`][eqx_micro.dp.ghost_clipped_grad], a user's own) is used the same
way.
"""

import abc
import enum
from typing import Any

import equinox as eqx
from jaxtyping import Array, Int, PyTree

from .._accounting import NeighboringRelation


class PrivacyUnit(enum.StrEnum):
    """What one row of a batch is, and so what the guarantee protects.

    - `EXAMPLE`: one example.
    - `USER`: one user's group of examples, clipped together
        (`keep_batch_dim=False` with rows shaped `(examples_per_user, ...)`).

    Members compare equal to their values, `"example"` and `"user"`.

    !!! example

        ```python
        import eqx_micro.dp as dp

        assert dp.PrivacyUnit.USER == "user"
        ```
    """

    EXAMPLE = "example"
    USER = "user"


class ClippedGradAux(eqx.Module):
    """The side outputs of a clipped aggregation (`dp.clipped_grad` and its kin).

    **Fields:**

    - `values`: the value of `fun` for each example (with `return_values=True`), else
        None.
    - `grad_norms`: the L2 norm of each example's gradient before clipping, shaped like
        `l2_clip_norm` with a leading batch axis (with `return_grad_norms=True`), else
        None.
    - `aux`: `fun`'s auxiliary output per example (with `has_aux=True`), else None.
    - `num_nonfinite`: how many examples had a NaN or infinite gradient norm. With
        `nan_safe=True` they contributed zero to the sum.

    Per-example outputs are not privatized: releasing them is the caller's
    responsibility. Padded examples have zeros everywhere.

    !!! example

        ```python
        import jax.numpy as jnp
        import eqx_micro.dp as dp

        aux = dp.ClippedGradAux(values=None, grad_norms=None, aux=None,
                                num_nonfinite=jnp.array(0))
        assert aux.num_nonfinite == 0
        ```
    """

    values: Any
    grad_norms: Any
    aux: Any
    num_nonfinite: Int[Array, ""]


class AbstractBoundedSensitivityCallable(eqx.Module):
    """A function of a batch whose output has a known L2 sensitivity.

    The contract a subclass implements:

    - `__call__(*args, is_padding_example=None, **kwargs)` returns
        `(output, dp.ClippedGradAux)`, where adding or removing one row of the batch
        changes `output` by at most `l2_norm_bound` in L2 norm, and padded rows
        (`is_padding_example`, a bool vector) contribute nothing.
    - `l2_norm_bound`: that bound, a float.
    - `privacy_unit`: a [`dp.PrivacyUnit`][eqx_micro.dp.PrivacyUnit], what one row is.
    - `microbatch_size`: the rows it processes at a time (`None`: all at once). A
        trainer pads batches to a multiple of it.

    `sensitivity(neighboring_relation)` follows from the bound. Execution plans and
    [`dp.DPTrainer`][eqx_micro.dp.DPTrainer] accept any subclass.

    !!! example

        ```python
        import jax.numpy as jnp
        import eqx_micro.dp as dp

        class ThresholdCount(dp.AbstractBoundedSensitivityCallable):
            # How many rows exceed a threshold: each row adds 0 or 1.
            threshold: float
            microbatch_size: int | None = None

            @property
            def l2_norm_bound(self):
                return 1.0

            @property
            def privacy_unit(self):
                return dp.PrivacyUnit.EXAMPLE

            def __call__(self, x, is_padding_example=None):
                hits = (x > self.threshold).astype(jnp.float32)
                if is_padding_example is not None:
                    hits = jnp.where(is_padding_example, 0.0, hits)
                aux = dp.ClippedGradAux(None, None, None, jnp.array(0))
                return jnp.sum(hits), aux

        count = ThresholdCount(threshold=0.5)
        assert count(jnp.array([0.1, 0.7, 0.9]))[0] == 2.0
        assert count.sensitivity(dp.NeighboringRelation.REPLACE_ONE) == 2.0
        ```
    """

    microbatch_size: eqx.AbstractVar[int | None]

    # `jax.jit(f)` keys its cache on `f` itself: hash by identity, so that an instance
    # holding arrays can be jitted as a function (its arrays become constants).
    __hash__ = object.__hash__

    @property
    @abc.abstractmethod
    def l2_norm_bound(self) -> float:
        """The L2 sensitivity under add-or-remove-one."""

    @property
    @abc.abstractmethod
    def privacy_unit(self) -> PrivacyUnit:
        """What one row of the batch is."""

    @abc.abstractmethod
    def __call__(self, *args: Any, **kwargs: Any) -> tuple[PyTree, ClippedGradAux]:
        """The bounded-sensitivity output and its side outputs."""

    def sensitivity(
        self,
        neighboring_relation: NeighboringRelation = NeighboringRelation.ADD_OR_REMOVE_ONE,
    ) -> float:
        """The L2 sensitivity of the output under `neighboring_relation`.

        `ADD_OR_REMOVE_ONE` and `REPLACE_SPECIAL` (replacing one row by a zero
        contribution) give `l2_norm_bound`; `REPLACE_ONE` (one row replaced by any other)
        gives twice it.

        !!! example

            ```python
            import jax.numpy as jnp
            import eqx_micro.dp as dp

            grad_fn = dp.clipped_grad(lambda w, x: jnp.sum(w * x), 2.0)
            assert grad_fn.sensitivity() == 2.0  # ADD_OR_REMOVE_ONE
            assert grad_fn.sensitivity(dp.NeighboringRelation.REPLACE_ONE) == 4.0
            ```
        """
        if neighboring_relation in (
            NeighboringRelation.ADD_OR_REMOVE_ONE,
            NeighboringRelation.REPLACE_SPECIAL,
        ):
            return float(self.l2_norm_bound)
        if neighboring_relation == NeighboringRelation.REPLACE_ONE:
            return 2.0 * float(self.l2_norm_bound)
        raise ValueError(
            "`neighboring_relation` must be a `dp.NeighboringRelation`, got "
            f"{neighboring_relation!r}."
        )
