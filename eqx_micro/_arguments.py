"""Arguments as the user wrote them: signatures, batch axes, and errors that name them.

Every transform reports a bad input in the user's terms: the function they called
(`Caller.name`), the argument they passed, and how they mark arguments as batched
(`argnums` for `microbatch`, `in_axes` for `micro_vmap`, `batch_argnums` for
`micro_grad`, ...), so the fix an error suggests is one they can make.
"""

import inspect
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.core
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jaxtyping import Array

from ._custom_types import StaticInt


PADDING = "is_padding_example"


class Caller(NamedTuple):
    """The public function a user called, for error messages.

    - `name`: e.g. `"micro_grad"`.
    - `mark`: how batched arguments are chosen there, e.g. "`batch_argnums`".
    - `unbatch`: how to say that an argument is not batched there.
    - `pad`: how to mark padding there, once the batch is padded.
    """

    name: str
    mark: str
    unbatch: str
    pad: str = "pass `is_padding_example`"


def check_positive_int(value: Any, name: str, caller: str) -> int:
    """`value` as an int, or an error naming the argument `name` of `caller`."""
    if isinstance(value, bool) or not isinstance(value, StaticInt):
        raise TypeError(
            f"`{caller}` needs `{name}` to be a Python int, got {value!r} of type "
            f"{type(value).__name__}."
        )
    if value <= 0:
        raise ValueError(f"`{caller}` got `{name}={value}`; it must be a positive int.")
    return int(value)


def check_bool(value: Any, name: str, caller: str) -> None:
    """A Python bool (or NumPy's): a flag that changes the program, not a truthy value."""
    if not isinstance(value, bool | np.bool_):
        raise TypeError(
            f"`{caller}` needs `{name}` to be True or False, got {value!r} of type "
            f"{type(value).__name__}."
        )


def check_callable(fun: Any, name: str, caller: str) -> None:
    if not callable(fun):
        raise TypeError(
            f"`{caller}` needs `{name}` to be a function (or a callable `eqx.Module`), "
            f"got {fun!r} of type {type(fun).__name__}."
        )


def signature_of(fun: Callable) -> inspect.Signature | None:
    try:
        return inspect.signature(fun)
    except (TypeError, ValueError):  # Some builtins and C callables have none.
        return None


def positional_names(signature: inspect.Signature | None) -> list[str]:
    if signature is None:
        return []
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return [p.name for p in signature.parameters.values() if p.kind in kinds]


def takes_varargs(signature: inspect.Signature | None) -> bool:
    return signature is None or any(
        p.kind == inspect.Parameter.VAR_POSITIONAL for p in signature.parameters.values()
    )


def accepts_keyword(signature: inspect.Signature | None, name: str) -> bool:
    if signature is None:
        return True
    for parameter in signature.parameters.values():
        if parameter.kind == inspect.Parameter.VAR_KEYWORD:
            return True
        if parameter.name == name and parameter.kind in (
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
            inspect.Parameter.KEYWORD_ONLY,
        ):
            return True
    return False


def describe_leaf(path: tuple, param_names: Sequence[str]) -> str:
    """`(args, kwargs)` key path -> `x['a']`, the way the user passed it."""
    group, key, *rest = path
    if group.idx == 0:
        index = int(key.idx)
        head = param_names[index] if index < len(param_names) else f"args[{index}]"
    else:
        head = f"{key.key}"
    return head + jtu.keystr(tuple(rest))


def padding_mask(fun: Callable, kwargs: dict, caller: str) -> Any:
    """The `is_padding_example` keyword, checked to reach a `fun` that takes it, and
    made boolean in `kwargs` (see `validate_padding_mask`)."""
    mask = kwargs.get(PADDING)
    if mask is not None:
        mask = kwargs[PADDING] = validate_padding_mask(mask, None, caller)
    if mask is not None and not accepts_keyword(signature_of(fun), PADDING):
        raise TypeError(
            f"`is_padding_example` was passed, but the function given to `{caller}` "
            "takes no `is_padding_example` keyword, so padded examples would be "
            "counted. Add that parameter to the function (and make padded examples "
            "contribute nothing), or pass `num_real_microbatches` instead."
        )
    return mask


def broadcast_axes(axes: Any, inputs: Any, caller: str, argument: str) -> Any:
    """Expands an axis prefix tree to one axis (or None) per leaf of `inputs`."""

    def expand(axis, subtree):
        if axis is not None and (isinstance(axis, bool) or not isinstance(axis, int)):
            raise TypeError(
                f"`{caller}` got {axis!r} in `{argument}`; each entry must be an int "
                "axis, None, or a PyTree prefix of the argument with those as leaves."
            )
        return jtu.tree_map(lambda leaf: axis if eqx.is_array(leaf) else None, subtree)

    try:
        return jtu.tree_map(expand, axes, inputs, is_leaf=lambda x: x is None)
    except ValueError as error:
        raise ValueError(
            f"`{caller}`: `{argument}` must be an int, None, or a PyTree prefix of the "
            f"batched arguments; its structure does not match them ({error})."
        ) from None


def as_tuple(x: Any) -> tuple:
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def check_argnums(value: Any, name: str, caller: str) -> tuple[int, ...]:
    """An int or a sequence of them, each non-negative, as a tuple."""
    values = as_tuple(value)
    for v in values:
        if isinstance(v, bool) or not isinstance(v, StaticInt) or v < 0:
            raise TypeError(
                f"`{caller}` needs `{name}` to hold non-negative ints, got {value!r}."
            )
    return tuple(int(v) for v in values)


def check_key(key: Any, name: str, caller: str, where: str = "") -> None:
    """A PRNG key: a typed key (`jax.random.key`) or legacy raw key data (`PRNGKey`)."""
    is_typed = eqx.is_array(key) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key)
    is_raw = (
        eqx.is_array(key) and key.dtype == jnp.uint32 and key.shape[-1:] in ((2,), (4,))
    )
    if not (is_typed or is_raw):
        what = (
            f"an array of dtype {key.dtype} and shape {key.shape}"
            if eqx.is_array(key)
            else f"{key!r} of type {type(key).__name__}"
        )
        raise TypeError(
            f"`{caller}` needs `{name}`{where} to be a PRNG key, such as "
            f"`jax.random.key(0)`, got {what}."
        )
    if is_typed and key.shape != ():
        raise ValueError(
            f"`{caller}` needs `{name}` to be a single PRNG key, got a key array of "
            f"shape {key.shape}."
        )


def per_example_keys(key: Any, batch_size: int) -> Any:
    """One key per example: `fold_in(key, example_index)`, whatever the split."""
    return jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(batch_size))


def validate_padding_mask(
    is_padding_example: Any, batch_size: int | None, caller: str
) -> Array:
    """Checks `is_padding_example` is one flag per example and returns it as a boolean
    array: booleans, or integers that are all 0 or 1 (1 marks padding)."""
    if not isinstance(is_padding_example, jax.Array | np.ndarray):
        is_padding_example = np.asarray(is_padding_example)
    dtype = is_padding_example.dtype
    if dtype != np.bool_ and not jnp.issubdtype(dtype, jnp.integer):
        raise TypeError(
            f"`{caller}` needs `is_padding_example` to be a boolean array (True marks "
            f"padding) or a 0/1 integer one, got dtype {dtype}. Pass "
            "`is_padding_example=mask.astype(bool)` or compare indices, e.g. "
            "`indices == -1`."
        )
    if is_padding_example.ndim != 1:
        raise ValueError(
            f"`{caller}` needs `is_padding_example` to be one-dimensional (one flag per "
            f"example), got shape {tuple(is_padding_example.shape)}."
        )
    if batch_size is not None and is_padding_example.shape[0] != batch_size:
        raise ValueError(
            f"`{caller}` got `is_padding_example` of length "
            f"{is_padding_example.shape[0]} for a batch of {batch_size} examples; give "
            "one flag per example."
        )
    if dtype == np.bool_:
        return jnp.asarray(is_padding_example)
    return _zero_one_as_bool(is_padding_example, caller)


def _zero_one_as_bool(mask: Any, caller: str) -> Array:
    """An integer mask as booleans; anything but 0 and 1 is refused (a wrong mask would
    count padding as data)."""
    message = (
        f"`{caller}` got an integer `is_padding_example` with values other than 0 and "
        "1; give 1 (or True) for padding and 0 (or False) for real examples."
    )
    if isinstance(mask, jax.core.Tracer):
        mask = eqx.error_if(mask, (mask != 0) & (mask != 1), message)
        return mask == 1
    values = np.asarray(mask)
    if not np.isin(values, (0, 1)).all():
        raise ValueError(message)
    return jnp.asarray(values == 1)
