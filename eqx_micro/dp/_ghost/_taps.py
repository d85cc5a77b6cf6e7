"""Finding each parameter's one linear use in a traced loss, and replaying it with taps.

`ghost_clipped_grad` needs, for every parameter leaf, the equation that consumes it
linearly: the `dot_general` of a Linear layer, the `conv_general_dilated` of a Conv, the
`add`/`mul` of a bias or a norm's affine scale, the `gather` of an Embedding. From that
equation's other operand (the activation) and the gradient of its output, each
example's gradient norm of the parameter follows without forming the gradient.

The per-example loss is traced once (`trace`), nested `jax.jit` calls are inlined so the
analysis sees one flat list of equations, and `analyze` follows each
parameter forward through layout-only equations (reshape, transpose, convert, ...) to
its single consuming equation. Anything else (a second use, a nonlinear use, a use
inside a loop, a `custom_jvp` or a `cond`) makes that parameter a fallback: its
per-example gradient is computed exactly, by `jax.grad`. Never a guessed norm.

`run_tapped` replays the flat jaxpr (with the package's one interpreter,
`eqx_micro.internal.evaluate`) adding a zero "probe" to each tapped equation's
output and returning the tapped activations: the gradient with respect to a probe is
the gradient of that equation's output.
"""

import enum
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.extend as jex
import jax.numpy as jnp

from ...internal import bind, dot_activation_first, enabled, evaluate, flatten, Tweak


# Equations that only move, cast or relabel entries: a parameter passes through them
# on its way to its linear use. `broadcast_in_dim` repeats entries (it does not keep
# the norm), which only the elementwise taps accept.
_LAYOUT = frozenset(
    {
        "convert_element_type",
        "transpose",
        "reshape",
        "squeeze",
        "expand_dims",
        "broadcast_in_dim",
        "copy",
        "copy_p",
    }
)
_ELEMENTWISE = frozenset({"add", "sub", "mul", "add_any"})


class TapKind(enum.Enum):
    """How a tapped equation consumes its parameter."""

    DOT = "dot"  # `dot_general`: Linear layers, attention projections, einsums
    CONV = "conv"  # `conv_general_dilated`
    ELEMENTWISE = "elementwise"  # `add`/`sub`/`mul`: biases, norm scales
    GATHER = "gather"  # a row `gather`: Embedding


class Tap(NamedTuple):
    """A parameter leaf consumed linearly by one equation of the flat jaxpr.

    - `kind`: a `TapKind`.
    - `leaf`: index of the parameter leaf.
    - `eqn`: index of the consuming equation.
    - `side`: which operand of that equation the parameter (after `chain`) is.
    - `chain`: the layout equations from the leaf to that operand, in order.
    """

    kind: TapKind
    leaf: int
    eqn: Any
    side: int
    chain: tuple[Any, ...]


class Fallback(NamedTuple):
    """A parameter leaf whose per-example gradient is computed exactly; `reason` says
    why it has no tap."""

    leaf: int
    reason: str


class Unused(NamedTuple):
    """A parameter leaf the loss does not depend on: its gradient is zero."""

    leaf: int


def trace(fun: Any, *example: Any) -> Any:
    """The flat ClosedJaxpr of `fun(*example)` (array arguments, array outputs)."""
    return flatten(jax.make_jaxpr(fun)(*example))


def _keeps_norm(chain: Sequence[Any]) -> bool:
    """Whether the layout chain only permutes entries (so it keeps the L2 norm)."""
    for eqn in chain:
        if eqn.primitive.name == "broadcast_in_dim":
            in_size = math.prod(eqn.invars[0].aval.shape)
            if in_size != math.prod(eqn.outvars[0].aval.shape):
                return False
        if eqn.primitive.name == "convert_element_type" and not jnp.issubdtype(
            eqn.params["new_dtype"], jnp.inexact
        ):
            return False
    return True


def _is_row_gather(eqn: Any) -> bool:
    """A gather of whole rows of a matrix (what `eqx.nn.Embedding` lowers to)."""
    operand = eqn.invars[0].aval
    dims = eqn.params["dimension_numbers"]
    return (
        len(operand.shape) == 2
        and tuple(eqn.params["slice_sizes"]) == (1, operand.shape[1])
        and not dims.operand_batching_dims
        and 0 in dims.start_index_map
        and set(dims.collapsed_slice_dims) <= {0}
    )


def _classify(eqn: Any, side: int, chain: tuple, derived: dict) -> TapKind | None:
    """The tap kind of a terminal use, or None if it has none."""
    name = eqn.primitive.name
    others = [
        v
        for i, v in enumerate(eqn.invars)
        if i != side and not isinstance(v, jex.core.Literal)
    ]
    if any(v in derived for v in others):
        return None  # two parameter-derived operands: not linear in this one
    if name == "dot_general":
        (_, _), (lhs_batch, rhs_batch) = eqn.params["dimension_numbers"]
        if lhs_batch or rhs_batch or not _keeps_norm(chain):
            return None
        return TapKind.DOT
    if name == "conv_general_dilated":
        if side != 1 or eqn.params["batch_group_count"] != 1 or not _keeps_norm(chain):
            return None
        return TapKind.CONV
    if name in _ELEMENTWISE:
        dtype = eqn.outvars[0].aval.dtype
        if not jnp.issubdtype(dtype, jnp.inexact) or len(eqn.invars) != 2:
            return None
        return TapKind.ELEMENTWISE
    if name == "gather" and side == 0 and _keeps_norm(chain) and _is_row_gather(eqn):
        return TapKind.GATHER
    return None


def analyze(closed: Any, num_params: int) -> list[Tap | Fallback | Unused]:
    """How each of the first `num_params` inputs of the flat jaxpr is consumed."""
    jaxpr = closed.jaxpr
    derived: dict[Any, tuple[int, tuple]] = {
        v: (i, ()) for i, v in enumerate(jaxpr.invars[:num_params])
    }
    var_uses: dict[Any, int] = {}
    terminals: dict[int, list] = {i: [] for i in range(num_params)}
    for eqn in jaxpr.eqns:
        hits = [
            (i, v)
            for i, v in enumerate(eqn.invars)
            if not isinstance(v, jex.core.Literal) and v in derived
        ]
        for _, v in hits:
            var_uses[v] = var_uses.get(v, 0) + 1
        if not hits:
            continue
        if eqn.primitive.name in _LAYOUT and len(hits) == 1 and hits[0][0] == 0:
            leaf, chain = derived[hits[0][1]]
            derived[eqn.outvars[0]] = (leaf, (*chain, eqn))
            continue
        for side, v in hits:
            leaf, chain = derived[v]
            terminals[leaf].append((eqn, side, chain))
    for v in jaxpr.outvars:
        if not isinstance(v, jex.core.Literal) and v in derived:
            var_uses[v] = var_uses.get(v, 0) + 1
            terminals[derived[v][0]].append((None, 0, ()))
    twice = {derived[v][0] for v, n in var_uses.items() if n > 1}

    plans: list[Tap | Fallback | Unused] = []
    for leaf in range(num_params):
        uses = terminals[leaf]
        if not uses:
            plans.append(Unused(leaf))
            continue
        if leaf in twice or len(uses) > 1:
            plans.append(Fallback(leaf, "it is used more than once (e.g. a tied weight)"))
            continue
        eqn, side, chain = uses[0]
        if eqn is None:
            plans.append(Fallback(leaf, "the function returns it"))
            continue
        kind = _classify(eqn, side, chain, derived)
        if kind is None:
            plans.append(Fallback(leaf, f"its use by `{eqn.primitive.name}` is not a tap"))
            continue
        plans.append(Tap(kind, leaf, eqn, side, chain))
    return plans


def run_tapped(
    closed: Any,
    taps: Sequence[Tap],
    probes: Sequence[Any] | None,
    inputs: Sequence[Any],
    *,
    mask_input: Callable[[Tap, Any], Any] | None = None,
    hook: Callable[[Tap, Any], Any] | None = None,
) -> tuple[list[Any], list[Any]]:
    """Evaluates the flat jaxpr, adding `probes[k]` to the output of `taps[k]`'s
    equation; returns the outputs and each tap's activation operand (None for
    add/sub, whose parameter gradient does not need it).

    `mask_input(tap, x)` replaces a tap's activation operand before the equation runs
    and `hook(tap, out)` its output (the ghost method's second pass)."""
    by_eqn = {id(tap.eqn): k for k, tap in enumerate(taps)}
    captured: list[Any] = [None] * len(taps)

    def rule(eqn: Any, invals: list[Any]) -> list[Any] | None:
        k = by_eqn.get(id(eqn))
        if k is None:
            return None
        tap = taps[k]
        other = 1 - tap.side
        if mask_input is not None and not isinstance(eqn.invars[other], jex.core.Literal):
            invals[other] = mask_input(tap, invals[other])
        if (
            tap.kind is TapKind.DOT
            and tap.side == 0
            and enabled(Tweak.ACTIVATION_FIRST_DOT)
        ):
            (out,) = dot_activation_first(eqn, invals)
        else:
            (out,) = bind(eqn, invals)
        if not (tap.kind is TapKind.ELEMENTWISE and eqn.primitive.name != "mul"):
            captured[k] = invals[other]
        if probes is not None:
            out = out + probes[k]
        if hook is not None:
            out = hook(tap, out)
        return [out]

    outs = evaluate(closed.jaxpr, closed.consts, inputs, rule=rule)
    return outs, captured


def chain_fn(chain: Sequence[Any]) -> Any:
    """The layout chain as a function, without its casts (it runs in float32)."""

    def run(x: Any) -> Any:
        for eqn in chain:
            if eqn.primitive.name in ("convert_element_type", "copy", "copy_p"):
                continue
            (x,) = bind(eqn, [x])
        return x

    return run


def out_aval(eqn: Any) -> Any:
    """The abstract value of an equation's (single) output."""
    return eqn.outvars[0].aval


def operand_shape(eqn: Any, index: int) -> tuple[int, ...]:
    """The shape of an equation's operand `index`."""
    return tuple(eqn.invars[index].aval.shape)
