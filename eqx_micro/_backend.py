"""The backend seam: every tweak for one backend, in one place, each with its gate.

The rest of the package says what it computes. How one backend computes some of it
faster, or around a bug, lives here: each tweak is a `Tweak` member, gated on the
backend (and on the jaxlib version, for a bug), and the general code asks
`enabled(tweak)` at trace time. Every tweak leaves results unchanged; `disabled(...)`
switches tweaks off (`tests/test_backend.py` checks the results are equal), and
`EQX_MICRO_DISABLE_TWEAKS=all` (or a comma-separated list of names) does the same for a
whole process. Only tweaks measured to help on a backend are on for it: today all of
them are XLA:CPU's, and every other backend runs the plain formulation.

Decisions are taken when a function is traced: a function compiled before `disabled`
keeps its tweaks; trace a fresh one to see the difference.
"""

import contextlib
import enum
import importlib.metadata
import os
import re
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.extend as jex
import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array

from . import _jaxpr


class Tweak(enum.Enum):
    """A backend-specific way of computing something; `WHY` says what it works around."""

    SUM_AS_DOT = enum.auto()
    FOLD_IN_CHUNKS = enum.auto()
    CHANNELS_LAST_CONV = enum.auto()
    SINGLE_MICROBATCH_INLINE = enum.auto()
    ACTIVATION_FIRST_DOT = enum.auto()
    ORDERED_GHOST_COPIES = enum.auto()
    YNNPACK_BARRIER = enum.auto()


WHY = {
    Tweak.SUM_AS_DOT: "XLA:CPU reduces the leading axis of a fused product inside a "
    "loop far slower than it computes the same sum as a dot with ones.",
    Tweak.FOLD_IN_CHUNKS: "XLA:CPU writes a contraction to a fresh buffer before adding "
    "it to a loop carry; summing a large leaf into the carry a block at a time bounds "
    "that copy.",
    Tweak.CHANNELS_LAST_CONV: "XLA:CPU puts convolutions in its fast NHWC/HWIO layout "
    "only at the top level of a program, never inside a loop: replayed inside one, they "
    "are rewritten so.",
    Tweak.SINGLE_MICROBATCH_INLINE: "XLA:CPU does not fuse across a while loop, so a "
    "one-trip loop over a single microbatch is slower than running it at top level.",
    Tweak.ACTIVATION_FIRST_DOT: "XLA:CPU computes a vmapped weight-first dot weight-major "
    "and transposes the activations around it; activation-first is batch-major.",
    Tweak.ORDERED_GHOST_COPIES: "XLA:CPU schedules every parameter's masked copies of its "
    "activations before the first contraction (all alive at once); a data dependency "
    "orders them.",
    Tweak.YNNPACK_BARRIER: "jaxlib >= 0.10.2's XLA:CPU YNNPACK fusion miscompiles "
    "reduce(dot(a, broadcast(g))) (jax-ml/jax#39103); a barrier keeps g out of it.",
}

# The first jaxlib whose XLA:CPU hands broadcast-dot-reduce to YNNPACK. Open-ended on
# purpose: `tests/test_xla_canary.py` fails once a fixed jaxlib appears, and then the
# bound gets its upper end.
_YNNPACK_FIRST_BAD = (0, 10, 2)


def _from_environment() -> frozenset[Tweak]:
    names = os.environ.get("EQX_MICRO_DISABLE_TWEAKS", "")
    if names.strip().lower() == "all":
        return frozenset(Tweak)
    found = set()
    for name in filter(None, (n.strip().upper() for n in names.split(","))):
        if name not in Tweak.__members__:
            raise ValueError(
                f"`EQX_MICRO_DISABLE_TWEAKS` names {name!r}, which is not a tweak; use "
                f"'all' or some of {', '.join(Tweak.__members__)}."
            )
        found.add(Tweak[name])
    return frozenset(found)


_disabled: frozenset[Tweak] = _from_environment()


def _jaxlib_version() -> tuple[int, ...]:
    version = importlib.metadata.version("jaxlib")
    return tuple(int(part) for part in re.findall(r"\d+", version)[:3])


def _ynnpack_reduce_fusion_on() -> bool:
    """False when `XLA_FLAGS` takes reductions out of the YNNPACK fusions."""
    flags = os.environ.get("XLA_FLAGS", "")
    match = re.search(r"--xla_cpu_experimental_ynn_fusion_type=(\S*)", flags)
    return match is None or "-reduce" not in match.group(1).split(",")


def enabled(tweak: Tweak) -> bool:
    """Whether `tweak` applies to the default backend here (decided at trace time)."""
    if tweak in _disabled or jax.default_backend() != "cpu":
        return False
    if tweak is Tweak.YNNPACK_BARRIER:
        return _jaxlib_version() >= _YNNPACK_FIRST_BAD and _ynnpack_reduce_fusion_on()
    return True


@contextlib.contextmanager
def disabled(*tweaks: Tweak) -> Iterator[None]:
    """Switches `tweaks` (all of them if none is given) off while tracing inside."""
    global _disabled
    previous = _disabled
    _disabled = previous | frozenset(tweaks or Tweak)
    try:
        yield
    finally:
        _disabled = previous


# --------------------------------------------------------------------------------------
# Sums. A contraction standing in for a sum asks for full precision everywhere: GPUs may
# otherwise compute float32 dots in TF32.


def weighted_sum(weights: Array, values: Array, dtype: Any) -> Array:
    """`Σ_b weights[b] * values[b]` in `dtype`, one contraction over the leading axis."""
    return lax.dot_general(
        weights,
        values,
        (((0,), (0,)), ((), ())),
        precision=lax.Precision.HIGHEST,
        preferred_element_type=dtype,
    )


def sum_leading_axis(values: Array, dtype: Any) -> Array:
    """`values.sum(axis=0)` in `dtype` (on XLA:CPU, as a dot with ones)."""
    if not (jnp.issubdtype(values.dtype, jnp.inexact) and enabled(Tweak.SUM_AS_DOT)):
        return jnp.sum(values, axis=0, dtype=dtype)
    return weighted_sum(jnp.ones(values.shape[0], values.dtype), values, dtype)


# Carry leaves above this size fold a microbatch in row blocks.
_CHUNK_BYTES = 256 * 1024
_MAX_CHUNKS = 8


def rows_per_chunk(carry: Array) -> int | None:
    """Rows of a loop-carry leaf to fold a microbatch's per-example values into at a
    time (`Tweak.FOLD_IN_CHUNKS`), or None to fold the whole leaf at once."""
    if not enabled(Tweak.FOLD_IN_CHUNKS):
        return None
    size = carry.size * carry.dtype.itemsize
    if carry.ndim == 0 or size <= _CHUNK_BYTES or carry.shape[0] < 2:
        return None
    if not jax.typeof(carry).sharding.mesh.empty:
        return None  # Slicing a sharded carry would move data between devices.
    chunks = min(_MAX_CHUNKS, -(-size // _CHUNK_BYTES), carry.shape[0])
    return -(-carry.shape[0] // chunks)


# --------------------------------------------------------------------------------------
# Replaying traced functions: convolutions channels-last.

_conv_p = jex.core.primitives.conv_general_dilated_p


def _is_conv(eqn: Any) -> bool:
    return eqn.primitive is _conv_p


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
    params["dimension_numbers"] = lax.ConvDimensionNumbers(
        lhs_spec=(0, ndim - 1, *spatial),
        rhs_spec=(ndim - 1, ndim - 2, *range(ndim - 2)),
        out_spec=(0, ndim - 1, *spatial),
    )
    out = _conv_p.bind(jnp.transpose(lhs, lhs_perm), jnp.transpose(rhs, rhs_perm), **params)
    return jnp.transpose(out, tuple(int(i) for i in np.argsort(out_perm)))


def _channels_last_rule(eqn: Any, invals: list[Any]) -> list[Any] | None:
    if not _is_conv(eqn):
        return None
    with eqn.ctx.manager:
        return [_channels_last_conv(*invals, **eqn.params)]


def _holds_conv(eqn: Any) -> bool:
    return _jaxpr.contains(_jaxpr.inner(eqn).jaxpr, _is_conv)


def replay(closed_jaxpr: Any, *, in_loop: bool = True) -> Callable[..., list[Any]]:
    """`closed_jaxpr` as a function; inside a loop on XLA:CPU, its convolutions run
    channels-last (each one the same convolution of transposed operands: exact). At
    top level XLA:CPU chooses that layout itself."""
    if not (
        in_loop
        and enabled(Tweak.CHANNELS_LAST_CONV)
        and _jaxpr.contains(closed_jaxpr.jaxpr, _is_conv)
    ):
        return jex.core.jaxpr_as_fun(closed_jaxpr)
    return _jaxpr.as_function(closed_jaxpr, rule=_channels_last_rule, inline=_holds_conv)


# --------------------------------------------------------------------------------------
# Ghost clipping's products and their schedule.


def dot_activation_first(eqn: Any, invals: list[Any]) -> list[Any]:
    """A `dot_general` whose parameter is the left operand, computed with the operands
    swapped and the result transposed back (same values)."""
    (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
    lhs, rhs = invals
    params = dict(eqn.params)
    params["dimension_numbers"] = ((rc, lc), (rb, lb))
    precision = params.get("precision")
    if isinstance(precision, tuple):
        params["precision"] = precision[::-1]
    with eqn.ctx.manager:
        out = eqn.primitive.bind(rhs, lhs, **params)
    nb = len(lb)
    lhs_free = np.ndim(lhs) - len(lc) - nb
    rhs_free = np.ndim(rhs) - len(rc) - nb
    perm = (
        *range(nb),
        *range(nb + rhs_free, nb + rhs_free + lhs_free),
        *range(nb, nb + rhs_free),
    )
    return [lax.transpose(out, perm)]


def ordered_after(keep: Array, previous: Array) -> Array:
    """`keep`, computed after `previous` where that orders the schedule: the value
    `keep | (isnan(p) & keep)` equals `keep` for any `p`."""
    if previous.size == 0 or not enabled(Tweak.ORDERED_GHOST_COPIES):
        return keep
    probe = jnp.isnan(previous.reshape(-1)[0])
    return keep | (probe & keep)


def ynnpack_barrier(tree: Any) -> Any:
    """`tree` behind an `optimization_barrier` where jaxlib's YNNPACK fusion miscompiles
    a reduction of a dot of it (see `tests/test_xla_canary.py`)."""
    if not enabled(Tweak.YNNPACK_BARRIER):
        return tree
    return lax.optimization_barrier(tree)
