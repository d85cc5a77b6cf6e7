"""Buffered linear Toeplitz (BLT) strategies: their error, sensitivity, and optimizing them.

A BLT is a lower-triangular Toeplitz strategy matrix `C` (`C[i, j] = c_{i-j}`) whose
coefficients are a constant followed by a sum of `d` geometric sequences:

    c_0 = 1,    c_k = ω_1 θ_1^(k-1) + ... + ω_d θ_d^(k-1)    (k >= 1),

with buffer decays `θ` (`buf_decay`) and output scales `ω` (`output_scale`). Its generating
function `Σ_k c_k x^k = 1 + Σ_j ω_j x / (1 - θ_j x)` is a rational function `p(x) / q(x)`
of degree `d`, with `q(x) = Π_j (1 - θ_j x)`; so `C⁻¹`, whose generating function is
`q / p`, is again a BLT with `d` buffers, `θ̂_i` the reciprocals of the roots of `p`.

**Streaming.** `C w = z` reads `w_t = z_t - Σ_j ω_j s_{j,t}` with buffers
`s_{j,t} = Σ_{k>=1} θ_j^(k-1) w_{t-k}`, which update as `s_{j,t+1} = θ_j s_{j,t} + w_t`:
the noise `C⁻¹ z` streams with `d` buffers, whatever the number of steps
([`dp.BLTNoise`][eqx_micro.dp.BLTNoise]).

**The inverse, two ways.** `θ̂` are the eigenvalues of `diag(θ) - ω 1ᵀ`: by the matrix
determinant lemma its characteristic polynomial is `Π_j (x - θ_j) (1 + Σ_j ω_j / (x - θ_j))
= x^d p(1 / x)`. When all `ω_j` have one sign, scaling by `diag(sqrt|ω|)` makes that matrix
symmetric, so `θ̂` is real and well conditioned (interlaced with `θ` when `ω > 0`). Given
both decay sets, partial fractions of `p / q` give the output scales in closed form:

    ω_i = Π_j (θ_i - θ̂_j) / Π_{k≠i} (θ_i - θ_k),
    ω̂_i = Π_j (θ̂_i - θ_j) / Π_{k≠i} (θ̂_i - θ̂_k).

So the pair `(θ, θ̂)` parametrizes `C` and `C⁻¹` together, without an eigensolver. If
`1 > θ_1 > θ̂_1 > θ_2 > θ̂_2 > ... > θ_d > θ̂_d > 0`, then `ω > 0` and `ω̂ < 0`: the
coefficients of `C` are positive and decreasing (`c_1 = Σ_j (θ_j - θ̂_j) < 1`), and
`C⁻¹`'s are negative after `1`. The optimizer searches this set through the rates
`-log(decay)`, increasing along the interlaced sequence by a factor `exp(exp(g))` plus a
floor (`0.01 / n`, so that no two decays merge) for free parameters `g`: every
constraint holds without penalty terms, and `θ - θ' = -θ expm1(rate - rate')` and
`θ^m = exp(-m rate)` stay accurate near `θ = 1`.

**Error and sensitivity.** With `A` the prefix-sum matrix, the released prefix sums have
error `A C⁻¹ z`; `A C⁻¹` is lower-triangular Toeplitz with first column `β_m = Σ_{k<=m}
ĉ_k = 1 + Σ_j ω̂_j (1 - θ̂_j^m) / (1 - θ̂_j)`, so the squared error of prefix sum `i`
(unit noise) is `Σ_{m<=i} β_m²`: increasing, largest at the last step (the max error),
and averaging to `Σ_m (n - m) β_m² / n`. The sensitivity of `C g` to one participation is
the largest column norm of `C`, its first: `Σ_{k<n} c_k²`. For `k` participations at
least `b` steps apart (min separation `b`), with positive and non-increasing coefficients
the worst case is participations at steps `0, b, ..., (k - 1) b`, and the sensitivity is
the norm of the sum of those columns. Everything here is `O(n d)` in float64.
"""

import enum
import functools
import math
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float, Float64, Real


class ErrorObjective(enum.Enum):
    """Which error of the prefix sums a strategy optimizer minimizes.

    Both are scaled by the strategy's sensitivity squared, so strategies compare at the
    same privacy:

    - `MAX_ERROR`: the largest expected squared error over the `n` prefix sums (for a
        Toeplitz strategy, that of the last one): the worst-case guarantee.
    - `RMSE`: the mean over the `n` prefix sums of the expected squared error, whose
        square root is the root-mean-squared error: the typical error along training.

    !!! example

        ```python
        import eqx_micro.dp as dp

        blt = dp.optimize_blt(100, 2, objective=dp.ErrorObjective.RMSE)
        assert blt.rmse(100) <= dp.optimize_blt(100, 2).rmse(100)
        ```
    """

    MAX_ERROR = enum.auto()
    RMSE = enum.auto()


def _check_int(caller: str, name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(
            f"`{caller}` needs `{name}` to be an int, got {value!r} of type "
            f"{type(value).__name__}."
        )
    if value < minimum:
        raise ValueError(f"`{caller}` got `{name}={value}`; it must be >= {minimum}.")
    return int(value)


def _check_participation(
    caller: str, n: Any, min_sep: Any, max_participations: Any
) -> tuple[int, int, int]:
    """`(n, min_sep, k)` with `k` the most participations `n` steps allow."""
    n = _check_int(caller, "n", n, 1)
    min_sep = _check_int(caller, "min_sep", min_sep, 1)
    most = -(-n // min_sep)
    if max_participations is None:
        return n, min_sep, most
    max_participations = _check_int(caller, "max_participations", max_participations, 1)
    return n, min_sep, min(max_participations, most)


def _geometric_sums(theta: float, steps: np.ndarray) -> np.ndarray:
    """`Σ_{k<m} θ^k` for every `m` in `steps`, accurate for `θ` near 1."""
    if theta == 1.0:
        return steps.astype(np.float64)
    if 0.5 <= theta < 1.0:
        # 1 - θ is exact here (Sterbenz), and expm1/log keep the relative accuracy that
        # (1 - θ^m) / (1 - θ) loses to cancellation when θ is near 1.
        rate = -math.log(theta)
        return -np.expm1(-rate * steps) / (1.0 - theta)
    return (1.0 - np.power(theta, steps)) / (1.0 - theta)


def _minsep_sensitivity_squared(coefs: np.ndarray, min_sep: int, parts: int) -> float:
    """`‖Σ_{p<parts} C e_{p min_sep}‖²` for the Toeplitz `C` of `coefs` (length `n`)."""
    n = coefs.shape[0]
    rows = -(-n // min_sep)
    grid = np.zeros(rows * min_sep)
    grid[:n] = coefs
    # Row r, slot s is step r b + s: summing down the rows adds the columns of the
    # participations at steps 0, b, ..., r b; dropping all but the last `parts` rows
    # keeps `parts` participations.
    summed = np.cumsum(grid.reshape(rows, min_sep), axis=0)
    if parts < rows:
        summed[parts:] -= summed[:-parts].copy()
    vector = summed.reshape(-1)[:n]
    return float(np.dot(vector, vector))


class BufferedToeplitz(eqx.Module):
    """A buffered linear Toeplitz (BLT) strategy matrix `C`, with its error maths.

    `C` is the lower-triangular Toeplitz matrix with coefficients `c_0 = 1` and
    `c_k = Σ_j ω_j θ_j^(k-1)` for `k >= 1`, for buffer decays `θ = buf_decay` and output
    scales `ω = output_scale`. Its inverse is again a BLT with as many buffers, so the
    noise `C⁻¹ z` streams with `num_buffers` buffers, for any number of steps
    ([`dp.BLTNoise`][eqx_micro.dp.BLTNoise]). The same parametrization as
    `jax_privacy.matrix_factorization.buffered_toeplitz.BufferedToeplitz`; the buffers
    are kept in order of decreasing decay. All methods compute in float64 NumPy, in
    `O(n · num_buffers)` time for `n` steps.

    **Arguments:**

    - `buf_decay`: the decays `θ_1, ..., θ_d` (a 1-D array; `d = 0` is the identity,
        DP-SGD).
    - `output_scale`: the scales `ω_1, ..., ω_d`, as many as `buf_decay`.

    !!! example

        ```python
        import numpy as np
        import eqx_micro.dp as dp

        blt = dp.BufferedToeplitz(buf_decay=[0.9, 0.5], output_scale=[0.3, 0.2])
        assert np.allclose(blt.toeplitz_coefs(4), [1, 0.5, 0.37, 0.293])
        C = np.tril(np.array([[blt.toeplitz_coefs(4)[i - j] for j in range(4)]
                              for i in range(4)]))
        C_inv = blt.inverse().toeplitz_coefs(4)
        assert np.allclose(np.linalg.inv(C)[:, 0], C_inv)
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

    buf_decay: Float64[np.ndarray, " buffers"]
    output_scale: Float64[np.ndarray, " buffers"]

    def __init__(
        self,
        buf_decay: Real[ArrayLike, " buffers"] | list[float],
        # `_`: lengths unchecked by jaxtyping, so a mismatch gets the message below.
        output_scale: Real[ArrayLike, " _buffers"] | list[float],
    ):
        decay = np.array(buf_decay, np.float64)
        scale = np.array(output_scale, np.float64)
        if decay.ndim != 1 or scale.ndim != 1 or decay.shape != scale.shape:
            raise ValueError(
                "`BufferedToeplitz` needs `buf_decay` and `output_scale` to be 1-D arrays "
                f"of the same length (one decay and one scale per buffer), got shapes "
                f"{decay.shape} and {scale.shape}."
            )
        if not (np.all(np.isfinite(decay)) and np.all(np.isfinite(scale))):
            raise ValueError(
                "`BufferedToeplitz` needs finite `buf_decay` and `output_scale`, got "
                f"{decay.tolist()} and {scale.tolist()}."
            )
        # Decreasing decays: a canonical order, so equal strategies have equal fields.
        order = np.argsort(-decay, kind="stable")
        self.buf_decay = decay[order]
        self.output_scale = scale[order]

    @property
    def num_buffers(self) -> int:
        """The number of buffers `d` (the length of `buf_decay`).

        !!! example

            ```python
            import eqx_micro.dp as dp

            assert dp.BufferedToeplitz([0.9, 0.5], [0.3, 0.2]).num_buffers == 2
            ```
        """
        return self.buf_decay.shape[0]

    def toeplitz_coefs(self, n: int) -> Float64[np.ndarray, " n"]:
        """The first `n` Toeplitz coefficients of `C` (its first column).

        **Arguments:**

        - `n`: the number of coefficients (steps), `>= 1`.

        **Returns:**

        A float64 NumPy array `(1, c_1, ..., c_{n-1})`, `c_k = Σ_j ω_j θ_j^(k-1)`.

        !!! example

            ```python
            import numpy as np
            import eqx_micro.dp as dp

            blt = dp.BufferedToeplitz([0.5], [0.25])
            assert np.allclose(blt.toeplitz_coefs(4), [1, 0.25, 0.125, 0.0625])
            ```
        """
        n = _check_int("BufferedToeplitz.toeplitz_coefs", "n", n, 1)
        powers = np.arange(n - 1, dtype=np.float64)
        coefs = np.zeros(n)
        coefs[0] = 1.0
        for decay, scale in zip(self.buf_decay, self.output_scale):
            coefs[1:] += scale * np.power(decay, powers)
        return coefs

    def inverse(self) -> "BufferedToeplitz":
        """The BLT of `C⁻¹`, with as many buffers.

        Its decays `θ̂` are the eigenvalues of `diag(θ) - ω 1ᵀ` (symmetrized when all
        `ω_j` have one sign, so they are real and accurate), its scales `ω̂_i = Π_j
        (θ̂_i - θ_j) / Π_{k≠i} (θ̂_i - θ̂_k)` (partial fractions; see the module notes).

        **Returns:**

        A `dp.BufferedToeplitz` whose Toeplitz coefficients are those of `C⁻¹`.

        **Raises:**

        `ValueError` when `C⁻¹` is not a real BLT with distinct decays (complex or
        repeated decays; possible only with output scales of both signs).

        !!! example

            ```python
            import numpy as np
            import eqx_micro.dp as dp

            blt = dp.BufferedToeplitz([0.99, 0.8], [0.2, 0.1])
            inverse = blt.inverse()
            assert np.all(inverse.output_scale < 0)
            product = np.convolve(blt.toeplitz_coefs(50), inverse.toeplitz_coefs(50))
            assert np.allclose(product[:50], np.eye(50)[0])
            ```
        """
        decay, scale = self.buf_decay, self.output_scale
        if decay.size == 0:
            return self
        if np.all(scale >= 0) or np.all(scale <= 0):
            sign = 1.0 if np.all(scale >= 0) else -1.0
            root = np.sqrt(np.abs(scale))
            inverse_decay = np.linalg.eigvalsh(np.diag(decay) - sign * np.outer(root, root))
        else:
            eigenvalues = np.linalg.eigvals(
                np.diag(decay) - np.outer(scale, np.ones_like(scale))
            )
            if np.max(np.abs(eigenvalues.imag)) > 1e-12 * max(
                1.0, np.max(np.abs(eigenvalues))
            ):
                raise ValueError(
                    "`BufferedToeplitz.inverse`: C⁻¹ has complex buffer decays "
                    f"{eigenvalues.tolist()}, so it is not a real BLT. Use output "
                    "scales of one sign (as `dp.optimize_blt` returns)."
                )
            inverse_decay = eigenvalues.real
        gaps = np.abs(inverse_decay[:, None] - inverse_decay[None, :])
        np.fill_diagonal(gaps, np.inf)
        if np.min(gaps) <= 1e-14 * max(1.0, float(np.max(np.abs(inverse_decay)))):
            raise ValueError(
                "`BufferedToeplitz.inverse`: C⁻¹ has (nearly) repeated buffer decays "
                f"{inverse_decay.tolist()}: its generating function has a double pole, so "
                f"it is not a BLT with {decay.size} buffers. Use output scales of one "
                "sign (as `dp.optimize_blt` returns)."
            )
        differences = inverse_decay[:, None] - inverse_decay[None, :]
        np.fill_diagonal(differences, 1.0)
        inverse_scale = np.prod(inverse_decay[:, None] - decay[None, :], axis=1) / np.prod(
            differences, axis=1
        )
        return BufferedToeplitz(inverse_decay, inverse_scale)

    def per_query_error(self, n: int) -> Float64[np.ndarray, " n"]:
        """The expected squared error of each of the `n` prefix sums, for unit noise.

        Entry `i` is the squared norm of row `i` of `A C⁻¹` (`A` the prefix-sum matrix):
        the variance of the noise in the running sum of the first `i + 1` updates, per
        coordinate, for `z ~ N(0, 1)`, without the sensitivity. It increases with `i`.
        jax_privacy's `toeplitz.per_query_error(noising_coef=inverse.toeplitz_coefs(n))`.

        **Arguments:**

        - `n`: the number of steps, `>= 1`.

        **Returns:**

        A float64 NumPy array of shape `(n,)`.

        !!! example

            ```python
            import numpy as np
            import eqx_micro.dp as dp

            identity = dp.BufferedToeplitz([], [])
            assert np.allclose(identity.per_query_error(4), [1, 2, 3, 4])
            ```
        """
        n = _check_int("BufferedToeplitz.per_query_error", "n", n, 1)
        prefix = self._inverse_prefix_sums(n)
        return np.cumsum(prefix * prefix)

    def _inverse_prefix_sums(self, n: int) -> np.ndarray:
        """`β_m = Σ_{k<=m} ĉ_k` for `m < n`, the first column of `A C⁻¹`."""
        inverse = self.inverse()
        steps = np.arange(n)
        prefix = np.ones(n)
        for decay, scale in zip(inverse.buf_decay, inverse.output_scale):
            prefix += scale * _geometric_sums(float(decay), steps)
        return prefix

    def max_error(self, n: int) -> float:
        """The largest expected squared error over `n` prefix sums, for unit noise.

        That of the last prefix sum, `Σ_{m<n} β_m²` (see the module notes): jax_privacy's
        `buffered_toeplitz.max_error(blt.inverse(), n)`. Multiply by the sensitivity
        squared for the loss ([`max_loss`][eqx_micro.dp.BufferedToeplitz.max_loss]).

        **Arguments:**

        - `n`: the number of steps, `>= 1`.

        **Returns:**

        The max squared error, a Python float.

        !!! example

            ```python
            import eqx_micro.dp as dp

            assert dp.BufferedToeplitz([], []).max_error(10) == 10.0
            blt = dp.optimize_blt(100, 2)
            assert blt.max_error(100) < 10
            ```
        """
        n = _check_int("BufferedToeplitz.max_error", "n", n, 1)
        prefix = self._inverse_prefix_sums(n)
        return float(np.dot(prefix, prefix))

    def sensitivity_squared(
        self, n: int, *, min_sep: int = 1, max_participations: int | None = 1
    ) -> float:
        """The squared L2 sensitivity of `C g` over `n` steps (unit clip norm).

        With one participation (`max_participations=1`), the largest squared column
        norm of `C`, `Σ_{k<n} c_k²` (jax_privacy's
        `buffered_toeplitz.sensitivity_squared(blt, n)`). With up to `max_participations`
        participations at least `min_sep` steps apart (`None`: as many as `n` steps
        allow), the squared norm of the sum of the columns at steps `0, min_sep, ...`,
        the worst case when the coefficients are non-negative and non-increasing
        (jax_privacy's `toeplitz.minsep_sensitivity_squared`). Cyclic Poisson sampling
        with cycle length `b` is `min_sep=b, max_participations=None`.

        **Arguments:**

        - `n`: the number of steps, `>= 1`.
        - `min_sep`: the fewest steps between two participations of an example, `>= 1`.
        - `max_participations`: the most participations of an example, `>= 1`, or
            `None`.

        **Returns:**

        The sensitivity squared, a Python float (`>= 1`, as `c_0 = 1`).

        **Raises:**

        `ValueError` for several participations when the coefficients are not
        non-negative and non-increasing (the worst case is then not known in closed
        form). BLTs from [`dp.optimize_blt`][eqx_micro.dp.optimize_blt] qualify.

        !!! example

            ```python
            import numpy as np
            import eqx_micro.dp as dp

            blt = dp.BufferedToeplitz([0.5], [0.5])  # c = 1, 1/2, 1/4, ...
            assert np.isclose(blt.sensitivity_squared(3), 1 + 1 / 4 + 1 / 16)
            # Participations at steps 0 and 2: columns 0 and 2 add up.
            both = blt.sensitivity_squared(3, min_sep=2, max_participations=2)
            assert np.isclose(both, 1 + 1 / 4 + (1 / 4 + 1) ** 2)
            ```
        """
        caller = "BufferedToeplitz.sensitivity_squared"
        n, min_sep, parts = _check_participation(caller, n, min_sep, max_participations)
        coefs = self.toeplitz_coefs(n)
        if parts == 1:
            return float(np.dot(coefs, coefs))
        if np.any(coefs < 0) or np.any(np.diff(coefs) > 0):
            raise ValueError(
                f"`{caller}` got {parts} participations, but this BLT's Toeplitz "
                "coefficients are not non-negative and non-increasing (the first ones are "
                f"{np.round(coefs[:6], 6).tolist()}), so the worst case is not known in "
                "closed form. Use output scales >= 0 summing to <= 1 and decays in "
                "[0, 1] (as `dp.optimize_blt` returns)."
            )
        return _minsep_sensitivity_squared(coefs, min_sep, parts)

    def sensitivity(
        self, n: int, *, min_sep: int = 1, max_participations: int | None = 1
    ) -> float:
        """The L2 sensitivity of `C g` over `n` steps, for a unit clip norm.

        The square root of
        [`sensitivity_squared`][eqx_micro.dp.BufferedToeplitz.sensitivity_squared]
        (same arguments). The noise `C⁻¹ z` needs `stddev = noise_multiplier · clip_norm
        · sensitivity` for the guarantee of a Gaussian mechanism with that noise
        multiplier.

        !!! example

            ```python
            import numpy as np
            import eqx_micro.dp as dp

            blt = dp.BufferedToeplitz([0.5], [0.5])
            assert np.isclose(blt.sensitivity(3), np.sqrt(1 + 1 / 4 + 1 / 16))
            ```
        """
        squared = self.sensitivity_squared(
            n, min_sep=min_sep, max_participations=max_participations
        )
        return math.sqrt(squared)

    def max_loss(
        self, n: int, *, min_sep: int = 1, max_participations: int | None = 1
    ) -> float:
        """The max squared error times the sensitivity squared.

        `max_error(n) · sensitivity_squared(n, ...)`: the worst prefix sum's squared
        error at a noise multiplier and clip norm of 1, the objective of
        `dp.optimize_blt(..., objective=dp.ErrorObjective.MAX_ERROR)` (jax_privacy's
        `buffered_toeplitz.max_loss` for one participation).

        !!! example

            ```python
            import eqx_micro.dp as dp

            assert dp.BufferedToeplitz([], []).max_loss(10) == 10.0
            ```
        """
        sensitivity = self.sensitivity_squared(
            n, min_sep=min_sep, max_participations=max_participations
        )
        return self.max_error(n) * sensitivity

    def rmse(
        self, n: int, *, min_sep: int = 1, max_participations: int | None = 1
    ) -> float:
        """The root-mean-squared error of the `n` prefix sums, at the same privacy.

        `sqrt(mean(per_query_error(n)) · sensitivity_squared(n, ...))`: the typical
        noise in a running sum of updates, per coordinate, for a noise multiplier of 1
        and a clip norm of 1 (comparable to `dp.strategy_rmse` of BandMF). Its square is
        the objective of `dp.optimize_blt(..., objective=dp.ErrorObjective.RMSE)`.
        DP-SGD (no buffers) gives `sqrt((n + 1) / 2)`.

        !!! example

            ```python
            import math
            import eqx_micro.dp as dp

            assert math.isclose(dp.BufferedToeplitz([], []).rmse(9), math.sqrt(5))
            blt = dp.optimize_blt(1000, 3, objective=dp.ErrorObjective.RMSE)
            assert blt.rmse(1000) < 0.2 * math.sqrt(1001 / 2)
            ```
        """
        sensitivity = self.sensitivity_squared(
            n, min_sep=min_sep, max_participations=max_participations
        )
        return math.sqrt(float(np.mean(self.per_query_error(n))) * sensitivity)

    def loss(
        self,
        n: int,
        objective: ErrorObjective = ErrorObjective.MAX_ERROR,
        *,
        min_sep: int = 1,
        max_participations: int | None = 1,
    ) -> float:
        """The value of an optimizer objective: squared error times sensitivity squared.

        [`max_loss`][eqx_micro.dp.BufferedToeplitz.max_loss] for
        `ErrorObjective.MAX_ERROR`, `rmse²` for `ErrorObjective.RMSE`: what
        [`dp.optimize_blt`][eqx_micro.dp.optimize_blt] minimizes, and jax_privacy's
        `LossFn.loss` for the same setting.

        !!! example

            ```python
            import math
            import eqx_micro.dp as dp

            blt = dp.BufferedToeplitz([0.9], [0.4])
            rmse = blt.rmse(50, min_sep=10, max_participations=5)
            loss = blt.loss(50, dp.ErrorObjective.RMSE, min_sep=10, max_participations=5)
            assert math.isclose(loss, rmse**2)
            ```
        """
        if not isinstance(objective, ErrorObjective):
            raise TypeError(
                "`BufferedToeplitz.loss` needs `objective` to be a `dp.ErrorObjective` "
                f"(`MAX_ERROR` or `RMSE`), got {objective!r}."
            )
        if objective is ErrorObjective.MAX_ERROR:
            return self.max_loss(n, min_sep=min_sep, max_participations=max_participations)
        rmse = self.rmse(n, min_sep=min_sep, max_participations=max_participations)
        return rmse * rmse


# ---------------------------------------------------------------------------------------
# The optimizer: the loss of the interlaced decays in JAX (float64), minimized by L-BFGS.


def _rate_floor(n: int) -> float:
    # The least gap between consecutive rates: far below the gaps of optimal BLTs (about
    # 3 / n), and keeps the optimizer from merging buffers into numerically coincident
    # decays (whose inverse is ill-conditioned, and which float32 cannot tell apart).
    return 0.01 / n


def _decay_rates(params: Float[Array, " params"], n: int) -> tuple[Array, Array]:
    """`(-log θ, -log θ̂)` from the optimizer's parameters (see the module notes).

    The rates `-log(decay)` along `θ_1 > θ̂_1 > θ_2 > ... > θ̂_d` increase: the first is
    `exp(params[0])`, each next one `floor + previous · exp(exp(params[i]))`.
    """
    floor = _rate_floor(n)
    rates = [jnp.exp(params[0])]
    for gap in params[1:]:
        rates.append(floor + rates[-1] * jnp.exp(jnp.exp(gap)))
    return jnp.stack(rates[0::2]), jnp.stack(rates[1::2])


def _decay_differences(rates: Array, others: Array) -> Array:
    """`θ_i - θ'_j` for `θ = exp(-rates)`, without cancellation near `θ = 1`."""
    return -jnp.exp(-rates[:, None]) * jnp.expm1(rates[:, None] - others[None, :])


def _output_scales(rates: Array, other_rates: Array) -> Array:
    """`ω_i = Π_j (θ_i - θ'_j) / Π_{k≠i} (θ_i - θ_k)` (partial fractions)."""
    across = _decay_differences(rates, other_rates)
    own = _decay_differences(rates, rates)
    own = jnp.where(jnp.eye(rates.shape[0], dtype=bool), 1.0, own)
    # Products unrolled over the (few, static) buffers: `jnp.prod`'s gradient compiles
    # to a larger program.
    numerator, denominator = across[:, 0], own[:, 0]
    for j in range(1, rates.shape[0]):
        numerator = numerator * across[:, j]
        denominator = denominator * own[:, j]
    return numerator / denominator


def _jax_minsep_sensitivity_squared(coefs: Array, min_sep: int, parts: int) -> Array:
    n = coefs.shape[0]
    rows = -(-n // min_sep)
    grid = jnp.pad(coefs, (0, rows * min_sep - n)).reshape(rows, min_sep)
    # As in `_minsep_sensitivity_squared`: row r adds the latest `parts` participations.
    summed = jnp.cumsum(grid, axis=0)
    if parts < rows:
        earlier = jnp.concatenate(
            [jnp.zeros((parts, min_sep), coefs.dtype), summed[:-parts]]
        )
        summed = summed - earlier
    vector = summed.reshape(-1)[:n]
    return jnp.dot(vector, vector)


def _log_loss(
    params: Float[Array, " params"],
    n: int,
    objective: ErrorObjective,
    min_sep: int,
    parts: int,
) -> Float[Array, ""]:
    rates, inverse_rates = _decay_rates(params, n)
    scales = _output_scales(rates, inverse_rates)
    inverse_scales = _output_scales(inverse_rates, rates)
    steps = jnp.arange(n, dtype=params.dtype)
    highest = jax.lax.Precision.HIGHEST
    # β_m = 1 + Σ_j ω̂_j (1 - θ̂_j^m) / (1 - θ̂_j), with θ̂^m = exp(-m rate). (Matrix
    # products, not per-buffer sums of `n`-vectors: XLA fuses a chain of those into one
    # kernel whose compilation grows steeply with the number of buffers.)
    sums = jnp.expm1(-steps[:, None] * inverse_rates) / jnp.expm1(-inverse_rates)
    prefix = 1.0 + jnp.matmul(sums, inverse_scales, precision=highest)
    if objective is ErrorObjective.MAX_ERROR:
        error = jnp.dot(prefix, prefix)
    else:
        error = jnp.dot(n - steps, prefix * prefix) / n
    powers = jnp.exp(-steps[:-1, None] * rates)
    tail = jnp.matmul(powers, scales, precision=highest)
    coefs = jnp.concatenate([jnp.ones(1, params.dtype), tail])
    if parts == 1:
        sensitivity = jnp.dot(coefs, coefs)
    else:
        sensitivity = _jax_minsep_sensitivity_squared(coefs, min_sep, parts)
    return jnp.log(error) + jnp.log(sensitivity)


@functools.partial(jax.jit, static_argnames=("n", "objective", "min_sep", "parts"))
def _log_loss_and_grad(
    params: Float[Array, " params"],
    n: int,
    objective: ErrorObjective,
    min_sep: int,
    parts: int,
) -> tuple[Float[Array, ""], Float[Array, " params"]]:
    return jax.value_and_grad(_log_loss)(params, n, objective, min_sep, parts)


def _lbfgs(
    value_and_grad: Any, start: np.ndarray, max_steps: int, tol: float
) -> np.ndarray:
    """Minimizes a smooth function of a few variables by L-BFGS with Armijo backtracking.

    In NumPy on the host, calling the jitted loss once per trial point: only that small
    function compiles (a jitted optax loop compiles the loss several times over), and
    nothing here calls a threaded BLAS (SciPy's L-BFGS-B does, and stalls on a busy
    machine).
    """
    memory = 20
    x = np.asarray(start, np.float64)
    value, grad = value_and_grad(x)
    pairs: list[tuple[np.ndarray, np.ndarray, float]] = []
    for _ in range(max_steps):
        if not np.max(np.abs(grad)) > tol:
            break
        # Two-loop recursion: `direction = -H grad` for the L-BFGS inverse Hessian H.
        q = grad.copy()
        alphas = []
        for s, y, rho in reversed(pairs):
            alpha = rho * np.dot(s, q)
            q -= alpha * y
            alphas.append(alpha)
        if pairs:
            s, y, _ = pairs[-1]
            q *= np.dot(s, y) / np.dot(y, y)
        else:
            q /= max(1.0, float(np.linalg.norm(q)))
        for (s, y, rho), alpha in zip(pairs, reversed(alphas)):
            q += (alpha - rho * np.dot(y, q)) * s
        direction = -q
        slope = float(np.dot(grad, direction))
        if not slope < 0:
            direction, slope, pairs = -grad, -float(np.dot(grad, grad)), []
        step = 1.0
        while True:
            new_x = x + step * direction
            new_value, new_grad = value_and_grad(new_x)
            if new_value <= value + 1e-4 * step * slope:
                break
            step *= 0.5
            if step < 1e-20:
                return x
        s, y = new_x - x, new_grad - grad
        curvature = float(np.dot(s, y))
        if curvature > 1e-14 * float(np.dot(s, s)) ** 0.5 * float(np.dot(y, y)) ** 0.5:
            pairs = [*pairs[-(memory - 1) :], (s, y, 1.0 / curvature)]
        progress = value - new_value
        x, value, grad = new_x, new_value, new_grad
        if progress <= 1e-15 * max(abs(value), 1.0):
            break
    return x


def _minimize(
    start: np.ndarray,
    n: int,
    objective: ErrorObjective,
    min_sep: int,
    parts: int,
    max_steps: int,
    tol: float,
) -> np.ndarray:
    """L-BFGS on the log-loss from `start`; x64 must be on."""

    def value_and_grad(params: np.ndarray) -> tuple[float, np.ndarray]:
        value, grad = _log_loss_and_grad(
            jnp.asarray(params, jnp.float64),
            n=n,
            objective=objective,
            min_sep=min_sep,
            parts=parts,
        )
        grad = np.asarray(grad, np.float64)
        if not (np.isfinite(value) and np.all(np.isfinite(grad))):
            # Outside where the loss is computable: the line search steps back.
            return math.inf, np.zeros_like(grad)
        return float(value), grad

    return _lbfgs(value_and_grad, start, max_steps, tol)


@functools.partial(jax.jit, static_argnames="n")
def _strategy_arrays(params: Float[Array, " params"], n: int) -> tuple[Array, Array]:
    rates, inverse_rates = _decay_rates(params, n)
    return jnp.exp(-rates), _output_scales(rates, inverse_rates)


def _starts(n: int, num_buffers: int, min_sep: int, parts: int) -> list[np.ndarray]:
    """Initial parameters: interlaced decay rates spread geometrically.

    For one participation, optimal BLTs have a buffer decaying over about the whole
    horizon (rate near `1 / n`) and one over a few steps (rate near 1), the others
    spread geometrically between. With several participations the loss has more local
    minima, and the optimum may keep a buffer decaying much slower (rate near 0) or
    over about `min_sep` steps; those spreads are tried too.
    """
    spreads = [(1 / n, 1.0), (0.3 / n, 3.0), (3 / n, 0.5)]
    if parts > 1:
        spreads += [(0.01 / n, 1.0), (0.01 / n, 10.0), (1 / min_sep, 1.0)]
        spreads += [(0.1 / min_sep, 3.0)]
    starts = []
    for slowest, fastest in spreads:
        # (At least doubling: for a few steps, `1 / n` is no slower than the fastest.)
        ratio = max((fastest / slowest) ** (1 / (2 * num_buffers - 1)), 2.0)
        gaps = np.full(2 * num_buffers - 1, math.log(math.log(ratio)))
        starts.append(np.concatenate([[math.log(slowest)], gaps]))
    return starts


def _blt_from_params(params: np.ndarray, n: int) -> BufferedToeplitz:
    with jax.enable_x64(True), jax.numpy_dtype_promotion("standard"):
        decay, scale = _strategy_arrays(jnp.asarray(params, jnp.float64), n)
        return BufferedToeplitz(np.asarray(decay), np.asarray(scale))


def optimize_blt(
    n: int,
    num_buffers: int,
    *,
    objective: ErrorObjective = ErrorObjective.MAX_ERROR,
    min_sep: int = 1,
    max_participations: int | None = 1,
    max_optimizer_steps: int = 1000,
    tol: float = 1e-10,
) -> BufferedToeplitz:
    """The BLT strategy with `num_buffers` buffers with the least error over `n` steps.

    Minimizes `error · sensitivity²`
    ([`loss`][eqx_micro.dp.BufferedToeplitz.loss]): the max or the mean squared error
    of the `n` prefix sums, times the sensitivity squared for the given participation
    pattern, so the result is the best at a fixed privacy level. The search is over BLTs
    whose decays and their inverse's interlace in `(0, 1)` (`θ_1 > θ̂_1 > ... > θ_d >
    θ̂_d`), which makes the coefficients of `C` positive and decreasing (so the
    min-separation sensitivity is exact) and `C⁻¹`'s noise a smooth decay, with decay
    rates (`-log θ`) at least `0.01 / n` apart so that no two buffers merge; there are no
    penalty terms. L-BFGS (on a jitted JAX loss and gradient) runs from a few geometric
    spreads of decays (more for several participations, whose loss has more local
    minima), in float64 (x64 is enabled only inside this call), and the best result is
    returned. Each loss costs `O(n · num_buffers)`, after one small compilation per
    setting.

    The counterpart of jax_privacy's `buffered_toeplitz.optimize_loss` for a fixed
    number of buffers (its `optimize` also searches the number of buffers).

    **Arguments:**

    - `n`: the number of training steps, `>= 1`.
    - `num_buffers`: the number of buffers `d >= 0` (`0` is DP-SGD, the identity).
    - `objective`: a [`dp.ErrorObjective`][eqx_micro.dp.ErrorObjective]: `MAX_ERROR`
        (the default) or `RMSE`.
    - `min_sep`: the fewest steps between two participations of an example, `>= 1`.
    - `max_participations`: the most participations of an example (`1`, the default,
        is a single pass over the data), or `None` for as many as `n` and `min_sep`
        allow (cyclic Poisson sampling with cycle length `min_sep`).
    - `max_optimizer_steps`: the most L-BFGS steps per start, `>= 0`.
    - `tol`: stop when every entry of the gradient of the log-loss is at most `tol`
        in magnitude, `>= 0`.

    **Returns:**

    A [`dp.BufferedToeplitz`][eqx_micro.dp.BufferedToeplitz] with decays in `(0, 1)` and
    positive output scales.

    !!! example

        ```python
        import numpy as np
        import eqx_micro.dp as dp

        blt = dp.optimize_blt(1000, 3)
        assert blt.num_buffers == 3 and np.all((0 < blt.buf_decay) & (blt.buf_decay < 1))
        dpsgd = dp.BufferedToeplitz([], []).max_loss(1000)
        assert blt.max_loss(1000) < dpsgd / 50
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
    caller = "optimize_blt"
    n, min_sep, parts = _check_participation(caller, n, min_sep, max_participations)
    num_buffers = _check_int(caller, "num_buffers", num_buffers, 0)
    max_optimizer_steps = _check_int(caller, "max_optimizer_steps", max_optimizer_steps, 0)
    if not isinstance(objective, ErrorObjective):
        raise TypeError(
            f"`{caller}` needs `objective` to be a `dp.ErrorObjective` (`MAX_ERROR` or "
            f"`RMSE`), got {objective!r}."
        )
    if isinstance(tol, bool) or not isinstance(tol, int | float) or not tol >= 0:
        raise ValueError(f"`{caller}` needs `tol` to be a number >= 0, got {tol!r}.")
    if num_buffers == 0:
        return BufferedToeplitz(np.zeros(0), np.zeros(0))

    starts = _starts(n, num_buffers, min_sep, parts)
    if max_optimizer_steps > 0:
        with jax.enable_x64(True), jax.numpy_dtype_promotion("standard"):
            starts += [
                _minimize(start, n, objective, min_sep, parts, max_optimizer_steps, tol)
                for start in starts
            ]
    best, best_loss = None, math.inf
    for start in starts:
        if not np.all(np.isfinite(start)):
            continue
        candidate = _blt_from_params(start, n)
        try:
            value = candidate.loss(
                n, objective, min_sep=min_sep, max_participations=max_participations
            )
        except ValueError:
            continue
        if math.isfinite(value) and value < best_loss:
            best, best_loss = candidate, value
    if best is None:
        raise RuntimeError(
            f"`{caller}` found no BLT with a finite loss for n={n}, "
            f"num_buffers={num_buffers}; try fewer buffers."
        )
    return best
