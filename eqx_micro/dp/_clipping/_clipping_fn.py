"""How a per-example norm becomes a scale: Abadi's hard clipping or automatic clipping.

Every clipping route (`dp.clip_pytree`, the per-example and ghost strategies) asks one
`AbstractClippingFn` for the factor an example's (sub)tree is multiplied by, so a new rule
is one module, not a change in each route.
"""

import abc
import math
from typing import Any

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Float


class AbstractClippingFn(eqx.Module):
    """The rule that turns a per-example L2 norm into the factor it is scaled by.

    A subclass implements `scale(norm, clip, rescale_to_unit_norm)`, returning a float32
    factor such that `scale * norm <= clip` (or `<= 1` with `rescale_to_unit_norm`), so
    the clip norm stays the bound the sensitivity is computed from. Pass one as
    `clipping_fn` to [`dp.clipped_grad`][eqx_micro.dp.clipped_grad],
    [`dp.ghost_clipped_grad`][eqx_micro.dp.ghost_clipped_grad],
    [`dp.clipped_fun`][eqx_micro.dp.clipped_fun] or
    [`dp.clip_pytree`][eqx_micro.dp.clip_pytree] (fastDP's name for the same choice).

    !!! example

        ```python
        import eqx_micro.dp as dp

        assert isinstance(dp.AutomaticClipping(), dp.AbstractClippingFn)
        assert isinstance(dp.AbadiClipping(), dp.AbstractClippingFn)
        ```
    """

    @abc.abstractmethod
    def scale(
        self,
        norm: Float[Array, "*shape"],
        clip: Float[Array, ""],
        rescale_to_unit_norm: bool,
    ) -> Float[Array, "*shape"]:
        """The factor a tree of L2 norm `norm` is multiplied by (before NaN/inf
        factors are zeroed by the caller)."""


class AbadiClipping(AbstractClippingFn):
    """Hard clipping (Abadi et al. 2016), the default: scale by `min(1, c / ‖g‖)`.

    Examples already within the clip norm are left as they are; longer ones are shrunk
    to norm `c`. With `rescale_to_unit_norm` the result is further divided by `c` (and a
    clip norm of 0 normalizes to unit norm).

    !!! example

        ```python
        import jax.numpy as jnp
        import eqx_micro.dp as dp

        scale = dp.AbadiClipping().scale(jnp.array([0.5, 4.0]), jnp.array(2.0), False)
        assert jnp.allclose(scale, jnp.array([1.0, 0.5]))
        ```

    ??? cite "References"

        ```bibtex
        @inproceedings{abadi2016deep,
            title={Deep Learning with Differential Privacy},
            author={Abadi, Martin and Chu, Andy and Goodfellow, Ian and McMahan, H.
                    Brendan and Mironov, Ilya and Talwar, Kunal and Zhang, Li},
            booktitle={CCS},
            year={2016},
            url={https://arxiv.org/abs/1607.00133}
        }
        ```
    """

    def scale(
        self,
        norm: Float[Array, "*shape"],
        clip: Float[Array, ""],
        rescale_to_unit_norm: bool,
    ) -> Float[Array, "*shape"]:
        """`min(1, clip / norm)`, divided by `clip` with `rescale_to_unit_norm`.

        !!! example

            ```python
            import jax.numpy as jnp
            import eqx_micro.dp as dp

            scale = dp.AbadiClipping().scale(jnp.array(4.0), jnp.array(2.0), True)
            assert scale == 0.25  # to norm 2, then divided by 2: norm 1
            ```
        """
        scale = jnp.minimum(1.0, clip / norm)  # norm 0: clip / 0 = inf, so scale 1.
        if rescale_to_unit_norm:
            # Unit sensitivity: divide by the clip norm; with clip 0, normalize instead.
            scale = jnp.where(clip > 0, scale / clip, 1.0 / norm)
        return scale


class AutomaticClipping(AbstractClippingFn):
    """Automatic (normalized) clipping (Bu, Wang, Zha, Karypis 2023): scale by
    `c / (‖g‖ + gamma)`.

    Every example is normalized, so each contributes norm `c ‖g‖ / (‖g‖ + gamma) < c`
    and the sensitivity is the clip norm's, as with hard clipping; but no example is
    left unscaled, so the clip norm no longer needs tuning: it only scales the update,
    which the learning rate absorbs. Use `l2_clip_norm=1.0` (sensitivity 1) and tune
    the learning rate alone. `gamma > 0` keeps small gradients from being blown up to
    norm `c` (AUTO-S); `gamma=0` normalizes every example exactly (AUTO-V; a zero
    gradient stays zero).

    **Arguments:**

    - `gamma`: the stability constant, a finite number `>= 0` (default 0.01, the
        paper's).

    !!! example

        ```python
        import jax.numpy as jnp
        import eqx_micro.dp as dp

        def loss(w, x):
            return jnp.sum(w * x)

        # Per-example gradients are the rows, of norms 5 and 0.5: scaled by 1 / (n + 0.01).
        grad_fn = dp.clipped_grad(loss, 1.0, clipping_fn=dp.AutomaticClipping(0.01))
        x = jnp.array([[3.0, 4.0], [0.3, 0.4]])
        total, _ = grad_fn(jnp.zeros(2), x)
        expected = x[0] / 5.01 + x[1] / 0.51
        assert jnp.allclose(total, expected) and grad_fn.sensitivity() == 1.0
        ```

    ??? cite "References"

        ```bibtex
        @inproceedings{bu2023automatic,
            title={Automatic Clipping: Differentially Private Deep Learning Made Easier
                   and Stronger},
            author={Bu, Zhiqi and Wang, Yu-Xiang and Zha, Sheng and Karypis, George},
            booktitle={NeurIPS},
            year={2023},
            url={https://arxiv.org/abs/2206.07136}
        }
        ```
    """

    gamma: int | float = eqx.field(static=True, default=0.01)

    def __check_init__(self):
        gamma = self.gamma
        if isinstance(gamma, bool) or not isinstance(gamma, int | float):
            raise TypeError(
                f"`AutomaticClipping` needs `gamma` to be a number, got {gamma!r}."
            )
        if not (math.isfinite(gamma) and gamma >= 0):
            raise ValueError(
                f"`AutomaticClipping` got `gamma={gamma}`; it must be a finite number "
                ">= 0 (e.g. 0.01): each gradient is scaled by `c / (norm + gamma)`."
            )

    def scale(
        self,
        norm: Float[Array, "*shape"],
        clip: Float[Array, ""],
        rescale_to_unit_norm: bool,
    ) -> Float[Array, "*shape"]:
        """`clip / (norm + gamma)`, or `1 / (norm + gamma)` with
        `rescale_to_unit_norm`.

        !!! example

            ```python
            import jax.numpy as jnp
            import eqx_micro.dp as dp

            auto = dp.AutomaticClipping(gamma=1.0)
            assert auto.scale(jnp.array(3.0), jnp.array(2.0), False) == 0.5
            ```
        """
        # norm + gamma = 0 (gamma 0, zero gradient): inf, which the caller zeroes.
        unit = 1.0 / (norm + self.gamma)
        return unit if rescale_to_unit_norm else clip * unit


def check_clipping_fn(clipping_fn: Any, caller: str) -> None:
    if not isinstance(clipping_fn, AbstractClippingFn):
        raise TypeError(
            f"`{caller}` needs `clipping_fn` to be a `dp.AbstractClippingFn`, e.g. "
            "`dp.AbadiClipping()` (the default) or `dp.AutomaticClipping(gamma=0.01)`; "
            f"got {clipping_fn!r}."
        )
