"""The one jaxpr interpreter: replays a traced function, letting a hook replace equations.

Two features replay a function's jaxpr with some equations computed differently: the
channels-last convolutions of the backend seam (`_backend.py`) and the ghost-clipping
taps of `eqx_micro.dp`. Both use `evaluate` with a `rule` hook; nested `jax.jit` calls
are inlined where the caller asks (`inline`), so the hook sees their equations too.
"""

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.extend as jex


_primitives = jex.core.primitives
# Nested `jax.jit` calls and closed calls.
_CALLS = (_primitives.jit_p, _primitives.closed_call_p)

# `rule(eqn, invals)` returns the equation's outputs, or None to bind it as it is.
Rule = Callable[[Any, list[Any]], list[Any] | None]


def is_call(eqn: Any) -> bool:
    """Whether `eqn` calls a nested jaxpr (`jax.jit`, closed calls)."""
    return eqn.primitive in _CALLS


def inner(eqn: Any) -> Any:
    """The ClosedJaxpr a call equation runs."""
    return eqn.params["jaxpr"] if "jaxpr" in eqn.params else eqn.params["call_jaxpr"]


def bind(eqn: Any, invals: Sequence[Any]) -> list[Any]:
    """Applies one equation to values (or tracers), like `jax.core.eval_jaxpr`."""
    params = eqn.primitive.get_bind_params(eqn.params)
    if isinstance(params, tuple):  # (subfuns, params) in older jax
        subfuns, params = params
        invals = [*subfuns, *invals]
    with eqn.ctx.manager:
        out = eqn.primitive.bind(*invals, **params)
    return list(out) if eqn.primitive.multiple_results else [out]


def contains(jaxpr: Any, predicate: Callable[[Any], bool]) -> bool:
    """Whether an equation of `jaxpr`, or of a call inside it, satisfies `predicate`."""
    for eqn in jaxpr.eqns:
        if predicate(eqn) or (is_call(eqn) and contains(inner(eqn).jaxpr, predicate)):
            return True
    return False


def _read(env: dict, var: Any) -> Any:
    return var.val if isinstance(var, jex.core.Literal) else env[var]


def evaluate(
    jaxpr: Any,
    consts: Sequence[Any],
    args: Sequence[Any],
    *,
    rule: Rule | None = None,
    inline: Callable[[Any], bool] = is_call,
) -> list[Any]:
    """Evaluates `jaxpr` on `args`, with `rule` computing the equations it claims.

    Call equations for which `inline(eqn)` holds are evaluated equation by equation
    (so `rule` sees their bodies); other calls are bound whole.
    """
    env: dict[Any, Any] = {}
    env.update(zip(jaxpr.constvars, consts))
    env.update(zip(jaxpr.invars, args))
    for eqn in jaxpr.eqns:
        invals = [_read(env, v) for v in eqn.invars]
        if is_call(eqn) and inline(eqn):
            body = inner(eqn)
            outvals = evaluate(body.jaxpr, body.consts, invals, rule=rule, inline=inline)
        else:
            outvals = None if rule is None else rule(eqn, invals)
            if outvals is None:
                outvals = bind(eqn, invals)
        env.update(zip(eqn.outvars, outvals))
    return [_read(env, v) for v in jaxpr.outvars]


def as_function(
    closed: Any, rule: Rule | None = None, inline: Callable[[Any], bool] = is_call
) -> Callable[..., list[Any]]:
    """`closed` (a ClosedJaxpr) as a function of its inputs, replayed with `rule`."""

    def run(*args: Any) -> list[Any]:
        return evaluate(closed.jaxpr, closed.consts, args, rule=rule, inline=inline)

    return run


def flatten(closed: Any) -> Any:
    """`closed` with every nested call inlined (retraced into one list of equations)."""
    avals = [jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype) for v in closed.jaxpr.invars]
    return jax.make_jaxpr(as_function(closed))(*avals)
