"""Banded Toeplitz strategies for BandMF: their error, and optimizing them.

BandMF releases the prefix sums `A g` of the (clipped, summed) gradients `g` of `n`
steps as `A g + B z`, where `A` is the `n x n` lower-triangular matrix of ones, `A = B C`
is a factorization, and `C⁻¹ z` is the correlated noise added to the step updates. Here
`C` is lower-triangular, banded and Toeplitz: its first column is the `b` coefficients
`c = (c_0, ..., c_{b-1})` followed by zeros, and `C[i, j] = c_{i-j}`.

**The error in `O(n b)`.** Lower-triangular Toeplitz `n x n` matrices are polynomials in
the down-shift `S` (`C = Σ_j c_j S^j`, `A = Σ_{k<n} S^k`), so they commute, and the
inverse of one is again lower-triangular Toeplitz. Hence `B = A C⁻¹ = C⁻¹ A` is
lower-triangular Toeplitz with first column `β = C⁻¹ A e_0 = C⁻¹ 1`, which `C β = 1`
gives by the recurrence

    β_t = (1 - c_1 β_{t-1} - ... - c_{b-1} β_{t-b+1}) / c_0        (β_{<0} = 0).

(`β` is also the running sum of `C⁻¹`'s first column.) Row `i` of `B` is
`(β_i, ..., β_0, 0, ...)`, so with `z ~ N(0, σ² I)` the squared error of prefix sum `i`
is `σ² (β_0² + ... + β_i²)`, and `‖B‖_F² = Σ_i Σ_{k≤i} β_k² = Σ_k (n - k) β_k²`. Column
`j` of `C` holds `c_0, ..., c_{min(b, n-j)-1}`, so (as `b ≤ n`) the largest column norm
is `‖c‖₂`: the sensitivity of `C g` to one participation of an example, in units of the
clip norm. (Participations at least `b` steps apart touch disjoint rows of `C`, which is
what amplified BandMF with cyclic Poisson sampling relies on.) With
`σ = noise_multiplier · ‖c‖₂`, everything is scale-free in `c`:

- `per_query_error(c, n)_i = ‖c‖₂² Σ_{k≤i} β_k²`,
- `banded_toeplitz_loss(c, n) = ‖c‖₂² ‖B‖_F² = ‖c‖₂² Σ_k (n - k) β_k²` (the sum of the
    per-query errors; `‖A C⁻¹‖_F² · max_j ‖C e_j‖²`),
- `strategy_rmse(c, n) = sqrt(loss / n)` (jax_privacy's `toeplitz.loss` with its
    default mean reduction is `loss / n`).

**Streaming the noise.** The same recurrence with `z` in place of the ones gives the
noise `w = C⁻¹ z` one step at a time, keeping only the last `b - 1` outputs:
`w_t = (z_t - c_1 w_{t-1} - ... - c_{b-1} w_{t-b+1}) / c_0` (Algorithm 9 of
Choquette-Choo et al. 2023); [`dp.BandMFNoise`][eqx_micro.dp.BandMFNoise] does this.

**Two implementations.** The public error functions run the recurrence in NumPy
(`scipy.signal.lfilter`, float64, no compilation). The optimizer needs gradients, so
`_prefix_sums` runs it in JAX, blocked: with blocks of `m` steps, block `k` of `β`
is `x_k = T⁻¹ 1 - T⁻¹ U s_{k-1}`, where `T` is the `m x m` Toeplitz matrix of `c`, `s`
the `b - 1` entries of `β` before the block and `U` their coupling
(`U[i, l] = c_{i+b-1-l}` for `l ≥ i`). `T⁻¹ 1` and `Q = T⁻¹ U` are one triangular solve,
so a `lax.scan` of `n / m` steps of a `(m, b-1)` matrix-vector product does the rest,
and reverse-mode autodiff through it is `O(n b)` too.
"""

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.tree_utils as otu
import scipy.signal
from jaxtyping import Array, ArrayLike, Float, Float64, Int, Real


# Block length of the JAX recurrence: the fastest block length measured on CPU
# (`benchmarks/bench_bandmf.py`).
_BLOCK = 128


def _check_int(caller: str, name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(
            f"`{caller}` needs `{name}` to be an int, got {value!r} of type "
            f"{type(value).__name__}."
        )
    if value < minimum:
        raise ValueError(f"`{caller}` got `{name}={value}`; it must be >= {minimum}.")
    return int(value)


def _check_coefs(
    caller: str, coefs: Real[ArrayLike, " bands"] | list[float], iterations: int
) -> np.ndarray:
    iterations = _check_int(caller, "iterations", iterations, 1)
    values = np.asarray(coefs, np.float64)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(
            f"`{caller}` needs `coefs` to be a non-empty 1-D array of Toeplitz "
            f"coefficients (c_0, ..., c_(b-1)), got shape {values.shape}."
        )
    if values.size > iterations:
        raise ValueError(
            f"`{caller}` got {values.size} coefficients for `iterations={iterations}`; "
            "a strategy has at most `iterations` bands, so drop the extra coefficients."
        )
    if not np.all(np.isfinite(values)):
        raise ValueError(f"`{caller}` needs finite `coefs`, got {values.tolist()[:8]}.")
    if values[0] == 0:
        raise ValueError(
            f"`{caller}` needs `coefs[0] != 0`: with a zero diagonal the strategy matrix "
            "C is singular and its noise C⁻¹ z does not exist."
        )
    return values


def _prefix_sums_numpy(coefs: np.ndarray, iterations: int) -> np.ndarray:
    """β = C⁻¹ 1 by the recurrence, in float64."""
    return np.asarray(scipy.signal.lfilter([1.0], coefs, np.ones(iterations)))


def sqrt_toeplitz_coefs(num_bands: int) -> Float64[np.ndarray, " num_bands"]:
    """The first `num_bands` coefficients of the square root of the prefix-sum matrix.

    `c_k = binom(2k, k) / 4^k` (1, 1/2, 3/8, 5/16, ...), the power series of `(1 -
    x)^(-1/2)`. Its square is `(1 - x)^(-1) = 1 + x + x² + ...`, so the `n x n`
    lower-triangular Toeplitz matrix `S` of the first `n` coefficients satisfies `S S = A`,
    the lower-triangular matrix of ones: the factorization with the optimal worst-case (max)
    error for a single participation. Truncated to `num_bands < n` it is the banded square
    root, where [`dp.optimize_banded_toeplitz`][eqx_micro.dp.optimize_banded_toeplitz]
    starts.

    **Arguments:**

    - `num_bands`: the number of coefficients, `>= 1`.

    **Returns:**

    A float64 NumPy array of shape `(num_bands,)`, with `c_0 = 1` (not unit norm).

    !!! example

        ```python
        import numpy as np
        import eqx_micro.dp as dp

        c = dp.sqrt_toeplitz_coefs(4)
        assert np.allclose(c, [1, 1 / 2, 3 / 8, 5 / 16])
        S = sum(ck * np.eye(4, k=-k) for k, ck in enumerate(c))
        assert np.allclose(S @ S, np.tri(4))
        ```

    ??? cite "References"

        ```bibtex
        @inproceedings{fichtenberger2023constant,
            title={Constant Matters: Fine-grained Error Bound on Differentially Private
                   Continual Observation},
            author={Fichtenberger, Hendrik and Henzinger, Monika and Upadhyay,
                    Jalaj},
            booktitle={ICML},
            year={2023},
            url={https://arxiv.org/abs/2202.11205}
        }

        @inproceedings{kalinin2024banded,
            title={Banded Square Root Matrix Factorization for Differentially Private
                   Model Training},
            author={Kalinin, Nikita and Lampert, Christoph},
            booktitle={NeurIPS},
            year={2024},
            url={https://arxiv.org/abs/2405.13763}
        }
        ```
    """
    num_bands = _check_int("sqrt_toeplitz_coefs", "num_bands", num_bands, 1)
    k = np.arange(1, num_bands, dtype=np.float64)
    return np.concatenate([[1.0], np.cumprod((2 * k - 1) / (2 * k))])


def per_query_error(
    coefs: Real[ArrayLike, " bands"] | list[float], iterations: int
) -> Float64[np.ndarray, " iterations"]:
    """The expected squared error of each prefix sum under a banded Toeplitz strategy.

    Entry `i` is `‖c‖₂² Σ_{k≤i} β_k²`, the squared norm of row `i` of `A C⁻¹` times the
    squared single-participation sensitivity `‖c‖₂²` (see the module notes): the
    variance of the noise in the running sum of the first `i + 1` updates, per
    coordinate, for a noise multiplier of 1 and a clip norm of 1. It does not change
    when `coefs` is scaled, and `coefs = [1]` (DP-SGD) gives `i + 1`. Computed in
    `O(iterations · bands)` time in float64.

    **Arguments:**

    - `coefs`: the strategy's Toeplitz coefficients `c_0, ..., c_{b-1}` (a 1-D array,
        `c_0 != 0`, `b <= iterations`).
    - `iterations`: the number of steps `n`, `>= 1`.

    **Returns:**

    A float64 NumPy array of shape `(iterations,)`, non-decreasing.

    !!! example

        ```python
        import numpy as np
        import eqx_micro.dp as dp

        assert np.allclose(dp.per_query_error(np.array([1.0]), 5), [1, 2, 3, 4, 5])
        error = dp.per_query_error(dp.sqrt_toeplitz_coefs(8), 100)
        assert error.shape == (100,) and error[-1] < 100
        ```
    """
    values = _check_coefs("per_query_error", coefs, iterations)
    prefix = _prefix_sums_numpy(values, iterations)
    return np.dot(values, values) * np.cumsum(prefix * prefix)


def banded_toeplitz_loss(
    coefs: Real[ArrayLike, " bands"] | list[float], iterations: int
) -> float:
    """The total squared error of a banded Toeplitz strategy on the prefix sums.

    `‖A C⁻¹‖_F² · max_j ‖C e_j‖²`, with `A` the `n x n` lower-triangular ones and `C` the
    banded Toeplitz matrix of `coefs`: the sum over `i` of
    [`dp.per_query_error`][eqx_micro.dp.per_query_error], the objective
    [`dp.optimize_banded_toeplitz`][eqx_micro.dp.optimize_banded_toeplitz] minimizes.
    Scale-invariant in `coefs`. Computed as `‖c‖₂² Σ_k (n - k) β_k²` with `C β = 1` (see the
    module notes), in `O(iterations · bands)` time in float64. DP-SGD (`coefs = [1]`) gives
    `n (n + 1) / 2`.

    **Arguments:**

    - `coefs`: the strategy's Toeplitz coefficients `c_0, ..., c_{b-1}` (a 1-D array,
        `c_0 != 0`, `b <= iterations`).
    - `iterations`: the number of steps `n`, `>= 1`.

    **Returns:**

    The loss, a Python float.

    !!! example

        ```python
        import numpy as np
        import eqx_micro.dp as dp

        assert dp.banded_toeplitz_loss(np.array([1.0]), 10) == 55.0
        c = dp.sqrt_toeplitz_coefs(4)
        scaled = dp.banded_toeplitz_loss(3 * c, 10)
        assert np.isclose(scaled, dp.banded_toeplitz_loss(c, 10))
        ```

    ??? cite "References"

        ```bibtex
        @article{mckenna2024scaling,
            title={Scaling up the Banded Matrix Factorization Mechanism for
                   Differentially Private ML},
            author={McKenna, Ryan},
            journal={arXiv preprint arXiv:2405.15913},
            year={2024},
            url={https://arxiv.org/abs/2405.15913}
        }
        ```
    """
    values = _check_coefs("banded_toeplitz_loss", coefs, iterations)
    prefix = _prefix_sums_numpy(values, iterations)
    weights = np.arange(iterations, 0, -1, dtype=np.float64)
    return float(np.dot(values, values) * np.dot(weights, prefix * prefix))


def strategy_rmse(coefs: Real[ArrayLike, " bands"] | list[float], iterations: int) -> float:
    """The root-mean-squared error of the prefix sums under a banded Toeplitz strategy.

    `sqrt(mean(dp.per_query_error(coefs, iterations)))`: the typical noise in a running
    sum of updates, per coordinate, for a noise multiplier of 1 and a clip norm of 1.
    Multiply by the noise multiplier to compare plans at the same privacy (as
    `prefix_sum_rmse` of an execution plan does). DP-SGD (`coefs = [1]`) gives
    `sqrt((n + 1) / 2)`.

    **Arguments:**

    - `coefs`: the strategy's Toeplitz coefficients `c_0, ..., c_{b-1}` (a 1-D array,
        `c_0 != 0`, `b <= iterations`).
    - `iterations`: the number of steps `n`, `>= 1`.

    **Returns:**

    The RMSE, a Python float.

    !!! example

        ```python
        import math
        import numpy as np
        import eqx_micro.dp as dp

        dpsgd = dp.strategy_rmse(np.array([1.0]), 1000)
        assert math.isclose(dpsgd, math.sqrt(1001 / 2))
        banded = dp.strategy_rmse(dp.optimize_banded_toeplitz(1000, 8), 1000)
        assert banded < 0.5 * dpsgd
        ```
    """
    loss = banded_toeplitz_loss(coefs, iterations)
    return math.sqrt(loss / iterations)


# ---------------------------------------------------------------------------------------
# The optimizer: the same loss in JAX (float64, blocked scan), minimized with L-BFGS.


def _lower_toeplitz(coefs: Float[Array, " bands"], size: int) -> Float[Array, "m m"]:
    """The `size x size` lower-triangular Toeplitz matrix of `coefs`, without a gather.

    Row `i` of a `(size, 2 size - 1)` window over `v` tiled is `v` rotated by `i`, so
    `v = (c_0, 0 (size times), c_{size-1}, ..., c_1)` puts `c_{i-j}` at `[i, j]`, `j<=i`.
    """
    bands = coefs.shape[0]
    padded = jnp.pad(coefs, (0, size - bands)) if size > bands else coefs[:size]
    zeros = jnp.zeros(size, coefs.dtype)
    pattern = jnp.concatenate([padded[:1], zeros, padded[:0:-1]])
    window = jnp.tile(pattern, size)[: size * (2 * size - 1)]
    return window.reshape(size, 2 * size - 1)[:, :size]


def _prefix_sums(
    coefs: Float[Array, " bands"], iterations: int, block: int
) -> Float[Array, " iterations"]:
    """β = C⁻¹ 1 in blocks of `block` steps (see the module notes)."""
    bands = coefs.shape[0]
    block = min(block, iterations)
    num_blocks = -(-iterations // block)
    row = np.arange(block)[:, None]
    col = np.arange(bands - 1)[None, :]
    coupling = jnp.where(
        col >= row, coefs[np.where(col >= row, bands - 1 + row - col, 0)], 0
    )
    rhs = jnp.concatenate([jnp.ones((block, 1), coefs.dtype), coupling], axis=1)
    solved = jax.scipy.linalg.solve_triangular(
        _lower_toeplitz(coefs, block), rhs, lower=True
    )
    ones_part, transfer = solved[:, 0], solved[:, 1:]

    def step(state, _):
        x = ones_part - transfer @ state
        return jnp.concatenate([state, x])[block:], x

    _, blocks = jax.lax.scan(step, jnp.zeros(bands - 1, coefs.dtype), length=num_blocks)
    return blocks.reshape(-1)[:iterations]


def _log_loss(
    coefs: Float[Array, " bands"], iterations: int, block: int
) -> Float[Array, ""]:
    prefix = _prefix_sums(coefs, iterations, block)
    weights = jnp.arange(iterations, 0, -1, dtype=coefs.dtype)
    return jnp.log(jnp.dot(coefs, coefs)) + jnp.log(jnp.dot(weights, prefix * prefix))


@functools.partial(jax.jit, static_argnames=("iterations", "block", "max_steps"))
def _minimize(
    init: Float[Array, " bands"],
    tol: Float[Array, ""],
    iterations: int,
    block: int,
    max_steps: int,
) -> tuple[Float[Array, " bands"], Int[Array, ""], Float[Array, ""]]:
    """L-BFGS on the log-loss from `init`: `(coefs, steps taken, final stationarity)`."""
    objective = functools.partial(_log_loss, iterations=iterations, block=block)
    # Backtracking (Armijo) line search: as fast to converge here as optax's default
    # zoom line search, and quicker to compile.
    linesearch = optax.scale_by_backtracking_linesearch(
        max_backtracking_steps=30, store_grad=True
    )
    optimizer = optax.lbfgs(linesearch=linesearch)
    value_and_grad = optax.value_and_grad_from_state(objective)

    def step(carry):
        coefs, state, _ = carry
        value, grad = value_and_grad(coefs, state=state)
        updates, state = optimizer.update(
            grad, state, coefs, value=value, grad=grad, value_fn=objective
        )
        return optax.apply_updates(coefs, updates), state, value

    def stationarity(coefs, state):
        # The loss is scale-invariant: its gradient is orthogonal to `coefs` and shrinks
        # as `1 / ‖coefs‖`, so `‖grad‖ ‖coefs‖` is the scale-free stationarity measure.
        return jnp.linalg.norm(otu.tree_get(state, "grad")) * jnp.linalg.norm(coefs)

    def keep_going(carry):
        coefs, state, previous = carry
        count = otu.tree_get(state, "count")
        value = otu.tree_get(state, "value")
        progressing = (value < previous) & jnp.isfinite(value)
        unconverged = stationarity(coefs, state) > tol
        return (count == 0) | ((count < max_steps) & unconverged & progressing)

    initial = (init, optimizer.init(init), jnp.asarray(jnp.inf, init.dtype))
    coefs, state, _ = jax.lax.while_loop(keep_going, step, initial)
    steps = jnp.asarray(otu.tree_get(state, "count"))
    return jnp.asarray(coefs), steps, stationarity(coefs, state)


def _run_minimize(
    start: np.ndarray, iterations: int, max_steps: int, tol: float
) -> tuple[np.ndarray, int, float]:
    """`_minimize` in float64, returning NumPy values: `(coefs, steps, stationarity)`.

    x64 is enabled only for this call, with standard dtype promotion (optax's L-BFGS
    mixes int32 and int64 counters, which a user's `strict` promotion would reject).
    """
    with jax.enable_x64(True), jax.numpy_dtype_promotion("standard"):
        coefs, steps, stationarity = _minimize(
            jnp.asarray(start, jnp.float64),
            jnp.asarray(tol, jnp.float64),
            iterations=iterations,
            block=_BLOCK,
            max_steps=max_steps,
        )
        return np.asarray(coefs, np.float64), int(steps), float(stationarity)


def optimize_banded_toeplitz(
    iterations: int,
    num_bands: int,
    *,
    max_optimizer_steps: int = 500,
    tol: float = 1e-8,
) -> Float64[np.ndarray, " num_bands"]:
    """The banded Toeplitz strategy with the least squared error on the prefix sums.

    Minimizes [`dp.banded_toeplitz_loss`][eqx_micro.dp.banded_toeplitz_loss] (`‖A C⁻¹‖_F²
    ‖c‖₂²`: the total expected squared error of the `iterations` prefix sums, times the
    single-participation sensitivity squared) over the `num_bands` coefficients of `C`.
    Starts from the banded square root `dp.sqrt_toeplitz_coefs(num_bands)` and runs
    `optax.lbfgs` (backtracking line search) on the log of the loss, in float64 (x64 is
    enabled only inside this call, not globally). It stops when the scale-free stationarity
    `‖∇ log loss(c)‖₂ ‖c‖₂` is at most `tol` (the loss is then within about `tol²`,
    relatively, of a local minimum), when a step no longer lowers the loss (float64
    precision is reached), or after `max_optimizer_steps` steps. The loss and its gradient
    cost `O(iterations · num_bands)`, after one compilation per `(iterations, num_bands)`
    pair (timings: `benchmarks/results/bandmf.md`).

    The result is never worse than the square-root start nor than DP-SGD
    (`[1, 0, ..., 0]`): the best of the three is returned. With at least `num_bands`
    steps between two participations of an example (cyclic Poisson sampling with
    `cycle_length=num_bands`), the columns of `C` one example touches do not overlap,
    so each participation has sensitivity `‖c‖₂` (times the clip norm): the setting of
    amplified BandMF.

    To add the noise `C⁻¹ z` while training, keep the last `num_bands - 1` outputs: `w_t =
    (z_t - c_1 w_{t-1} - ... - c_{b-1} w_{t-b+1}) / c_0`
    ([`dp.BandMFNoise`][eqx_micro.dp.BandMFNoise]).

    **Arguments:**

    - `iterations`: the number of training steps `n`, `>= 1`.
    - `num_bands`: the number of bands `b`, in `[1, iterations]`. `1` is DP-SGD.
    - `max_optimizer_steps`: the most L-BFGS steps, `>= 0` (`0` returns the start).
    - `tol`: the stationarity at which to stop, `>= 0`.

    **Returns:**

    The coefficients `c_0, ..., c_{b-1}` as a float64 NumPy array of shape
    `(num_bands,)`, with unit L2 norm (so the sensitivity per participation is the clip
    norm) and `c_0 > 0`.

    !!! example

        ```python
        import numpy as np
        import eqx_micro.dp as dp

        coefs = dp.optimize_banded_toeplitz(1000, 8)
        assert coefs.shape == (8,) and np.isclose(np.linalg.norm(coefs), 1.0)
        dpsgd = dp.banded_toeplitz_loss(np.array([1.0]), 1000)
        start = dp.banded_toeplitz_loss(dp.sqrt_toeplitz_coefs(8), 1000)
        assert dp.banded_toeplitz_loss(coefs, 1000) < start < dpsgd
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

        @article{mckenna2024scaling,
            title={Scaling up the Banded Matrix Factorization Mechanism for
                   Differentially Private ML},
            author={McKenna, Ryan},
            journal={arXiv preprint arXiv:2405.15913},
            year={2024},
            url={https://arxiv.org/abs/2405.15913}
        }
        ```
    """
    caller = "optimize_banded_toeplitz"
    iterations = _check_int(caller, "iterations", iterations, 1)
    num_bands = _check_int(caller, "num_bands", num_bands, 1)
    max_optimizer_steps = _check_int(caller, "max_optimizer_steps", max_optimizer_steps, 0)
    if num_bands > iterations:
        raise ValueError(
            f"`{caller}` got `num_bands={num_bands}` > `iterations={iterations}`; a "
            f"strategy for {iterations} steps has at most {iterations} bands."
        )
    if isinstance(tol, bool) or not isinstance(tol, int | float) or not tol >= 0:
        raise ValueError(f"`{caller}` needs `tol` to be a number >= 0, got {tol!r}.")

    start = sqrt_toeplitz_coefs(num_bands)
    start = start / np.linalg.norm(start)
    dpsgd = np.zeros(num_bands)
    dpsgd[0] = 1.0
    candidates = [dpsgd, start]
    if num_bands > 1 and max_optimizer_steps > 0:
        coefs, _, _ = _run_minimize(start, iterations, max_optimizer_steps, tol)
        if np.all(np.isfinite(coefs)) and coefs[0] != 0:
            candidates.append(coefs * np.sign(coefs[0]) / np.linalg.norm(coefs))
    losses = [banded_toeplitz_loss(c, iterations) for c in candidates]
    # The least loss; of equal ones, the later candidate (optimized, then square root).
    best = min(range(len(candidates)), key=lambda i: (losses[i], -i))
    return candidates[best]
