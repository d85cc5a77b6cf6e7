"""Building blocks under eqx_micro's transforms, for `eqx_micro.dp` and advanced users.

This is the one internal module `eqx_micro.dp` imports from: the microbatch loop
(`call_microbatched`), the argument checks every transform shares, the jaxpr
interpreter, and the backend seam. There is no stability promise: names here may change
between minor versions. See `docs/concepts/architecture.md` for how they fit together.
"""

from ._arguments import (
    as_tuple as as_tuple,
    Caller as Caller,
    check_argnums as check_argnums,
    check_bool as check_bool,
    check_callable as check_callable,
    check_key as check_key,
    check_positive_int as check_positive_int,
    PADDING as PADDING,
    per_example_keys as per_example_keys,
    positional_names as positional_names,
    signature_of as signature_of,
    takes_varargs as takes_varargs,
    validate_padding_mask as validate_padding_mask,
)
from ._backend import (
    disabled as disabled,
    dot_activation_first as dot_activation_first,
    enabled as enabled,
    ordered_after as ordered_after,
    sum_leading_axis as sum_leading_axis,
    Tweak as Tweak,
    weighted_sum as weighted_sum,
    ynnpack_barrier as ynnpack_barrier,
)
from ._custom_types import DType as DType
from ._engine import call_microbatched as call_microbatched
from ._grad import check_scalar_loss as check_scalar_loss
from ._jaxpr import (
    bind as bind,
    evaluate as evaluate,
    flatten as flatten,
    inner as inner,
    is_call as is_call,
)
