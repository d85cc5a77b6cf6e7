"""A known XLA:CPU miscompile that can corrupt per-example norms, watched for here.

jaxlib 0.10.2 hands `reduce(dot(a, broadcast(g)))` on CPU to one YNNPACK fusion, which
returns wrong sums and reads out of bounds for the last batch element when the dot's
operand is a broadcast along its output axis (cf. jax-ml/jax#39103, google/XNNPACK#11243).
Per-example gradient norms of a layer whose output-gradient is a broadcast (e.g. before a
mean-pool) have exactly that shape, so `dp.ghost_clipped_grad` keeps its output-gradients
out of the fusion with `lax.optimization_barrier` (regression test:
`test_dp_ghost.py::test_wide_transformer_block_under_jit`). The workaround for user code
is `XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=-reduce`, checked here in a fresh
process. When the canary stops failing (a fixed jaxlib), the barrier can go.
"""

import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest


PROGRAM = textwrap.dedent(
    """
    import jax, numpy as np
    from jax import lax

    B, M, K, N = 4, 32, 64, 32
    a = jax.random.normal(jax.random.key(2), (B, M, K))
    g = jax.random.normal(jax.random.key(1), (B, K))

    @jax.jit
    def f(a, g):
        rhs = lax.broadcast_in_dim(g, (B, K, N), (0, 1))  # broadcast along output dim
        d = lax.dot_general(a, rhs, (([2], [1]), ([0], [0])))
        return d.sum(axis=(1, 2))

    expected = N * np.einsum("bmk,bk->b", np.float64(a), np.float64(g))
    print("OK" if np.allclose(f(a, g), expected, rtol=1e-4, atol=1e-3) else "MISMATCH")
    """
)


def _run(xla_flags: str | None) -> str:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    if xla_flags is None:
        env.pop("XLA_FLAGS", None)
    else:
        env["XLA_FLAGS"] = xla_flags
    result = subprocess.run(
        [sys.executable, "-c", PROGRAM], env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="an XLA:CPU bug")
def test_broadcast_dot_reduce_canary():
    if _run(None) == "MISMATCH":
        # The workaround we document must fix it, or the docs are wrong.
        assert _run("--xla_cpu_experimental_ynn_fusion_type=-reduce") == "OK"
        pytest.xfail(
            f"jaxlib {jax.lib.__version__}: XLA:CPU miscompiles a dot of a broadcast "
            "followed by a reduce (YNNPACK fusion); see this module's docstring."
        )


def test_reference_arithmetic():
    # The canary's expected value: sum over (m, n) of a @ broadcast(g) is N * a.g summed.
    rng = np.random.default_rng(0)
    a, g = rng.normal(size=(2, 3, 4)), rng.normal(size=(2, 4))
    rhs = np.broadcast_to(g[:, :, None], (2, 4, 5))
    direct = np.einsum("bmk,bkn->b", a, rhs)
    np.testing.assert_allclose(direct, 5 * np.einsum("bmk,bk->b", a, g))
