"""Replaying a traced function with its convolutions in channels-last layout.

XLA:CPU runs a convolution on its fast (Eigen) path only when the input is NHWC, the
kernel HWIO and the output NHWC. At the top level of a program its
`ConvCanonicalization` pass rewrites every other convolution into that form, with
transposes around it. That pass visits only the entry computation, though, so a
convolution inside a `while` loop, such as every microbatch loop, keeps the layout it
was written in (NCHW for `eqx.nn.Conv`, and other layouts for the convolutions of its
gradient). On 2 CPU cores, that makes a convolutional network's gradient step about
3x slower, even with a single iteration.

`replay_channels_last` does the same rewrite on the traced jaxpr, so it also holds
inside the loop. The result is exact: each convolution becomes the same convolution of
transposed operands. Only convolutions at the top level of the jaxpr, or inside nested
`jax.jit` calls, are rewritten; a jaxpr without them is replayed unchanged.
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.extend as jex
import jax.numpy as jnp
import numpy as np


_primitives = jex.core.primitives
_conv_p = _primitives.conv_general_dilated_p
# Nested `jax.jit` calls (named `pjit` before jax 0.7) and closed calls: their bodies
# are inlined when they hold a convolution.
_calls = tuple(
    p
    for p in (
        getattr(_primitives, "jit_p", None),
        getattr(_primitives, "pjit_p", None),
        getattr(_primitives, "closed_call_p", None),
    )
    if p is not None
)


def _inner(eqn: Any) -> Any:
    """The ClosedJaxpr of a call equation."""
    return eqn.params["jaxpr"] if "jaxpr" in eqn.params else eqn.params["call_jaxpr"]


def _has_conv(jaxpr: Any) -> bool:
    """Whether `jaxpr` holds a convolution that `replay_channels_last` rewrites."""
    for eqn in jaxpr.eqns:
        if eqn.primitive is _conv_p:
            return True
        if eqn.primitive in _calls and _has_conv(_inner(eqn).jaxpr):
            return True
    return False


def _channels_last_conv(lhs: Any, rhs: Any, **params: Any) -> Any:
    """`conv_general_dilated` computed with NHWC input, HWIO kernel and NHWC output."""
    lhs_spec, rhs_spec, out_spec = params["dimension_numbers"]
    ndim = len(lhs_spec)
    lhs_perm = (lhs_spec[0], *lhs_spec[2:], lhs_spec[1])
    rhs_perm = (*rhs_spec[2:], rhs_spec[1], rhs_spec[0])
    out_perm = (out_spec[0], *out_spec[2:], out_spec[1])
    identity = tuple(range(ndim))
    if params.get("out_sharding") is not None or (
        lhs_perm == rhs_perm == out_perm == identity
    ):
        return _conv_p.bind(lhs, rhs, **params)
    spatial = tuple(range(1, ndim - 1))
    params["dimension_numbers"] = jax.lax.ConvDimensionNumbers(
        lhs_spec=(0, ndim - 1, *spatial),
        rhs_spec=(ndim - 1, ndim - 2, *range(ndim - 2)),
        out_spec=(0, ndim - 1, *spatial),
    )
    out = _conv_p.bind(jnp.transpose(lhs, lhs_perm), jnp.transpose(rhs, rhs_perm), **params)
    return jnp.transpose(out, tuple(int(i) for i in np.argsort(out_perm)))


def _eval(jaxpr: Any, consts: Any, *args: Any) -> list[Any]:
    """Evaluates `jaxpr` like `jax.core.eval_jaxpr`, with convolutions channels-last."""
    env: dict[Any, Any] = {}

    def read(var: Any) -> Any:
        return var.val if isinstance(var, jex.core.Literal) else env[var]

    env.update(zip(jaxpr.constvars, consts))
    env.update(zip(jaxpr.invars, args))
    for eqn in jaxpr.eqns:
        inputs = [read(var) for var in eqn.invars]
        with eqn.ctx.manager:
            if eqn.primitive is _conv_p:
                outputs = [_channels_last_conv(*inputs, **eqn.params)]
            elif eqn.primitive in _calls and _has_conv(_inner(eqn).jaxpr):
                inner = _inner(eqn)
                outputs = _eval(inner.jaxpr, inner.consts, *inputs)
            else:
                params = eqn.primitive.get_bind_params(eqn.params)
                if isinstance(params, tuple):  # (subfuns, params) in older jax
                    subfuns, params = params
                    inputs = [*subfuns, *inputs]
                outputs = eqn.primitive.bind(*inputs, **params)
                if not eqn.primitive.multiple_results:
                    outputs = [outputs]
        env.update(zip(eqn.outvars, outputs))
    return [read(var) for var in jaxpr.outvars]


def replay_channels_last(closed_jaxpr: Any) -> Callable[..., list[Any]]:
    """A function evaluating `closed_jaxpr`, with channels-last convolutions on CPU.

    Off CPU, or without a convolution to rewrite, this is `jaxpr_as_fun`.
    """
    if jax.default_backend() != "cpu" or not _has_conv(closed_jaxpr.jaxpr):
        return jex.core.jaxpr_as_fun(closed_jaxpr)

    def run(*args: Any) -> list[Any]:
        return _eval(closed_jaxpr.jaxpr, closed_jaxpr.consts, *args)

    return run
