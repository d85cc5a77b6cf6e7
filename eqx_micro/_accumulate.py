"""`accumulate_gradients`: one optimizer step's gradient over a batch too big for memory."""

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.tree_util as jtu
from jaxtyping import Array, PRNGKeyArray, PyTree

from ._accumulators import (
    AbstractAccumulator,
    AccumulatorTree,
    canonicalize_accumulators,
    is_accumulator,
    Mean,
)
from ._arguments import (
    broadcast_axes,
    Caller,
    check_bool,
    check_callable,
    check_key,
    check_positive_int,
    signature_of,
)
from ._engine import call_microbatched


_ACCUMULATE = Caller(
    "accumulate_gradients",
    "`batch`",
    "keep it out of `batch` (close over it in `loss_fn`)",
)


class AccumulatedGradients(eqx.Module):
    """The result of `accumulate_gradients`.

    **Fields:**

    - `loss`: the accumulated loss (by default the mean of the microbatch losses).
    - `grads`: the accumulated gradient, shaped like the model (`None` for leaves that
        are not inexact arrays), in the dtypes of the model's parameters.
    - `aux`: the accumulated auxiliary output (metrics), or None.
    - `state`: the `eqx.nn.State` after the last microbatch, or None.

    !!! example

        ```python
        import jax.numpy as jnp
        import eqx_micro as em

        out = em.AccumulatedGradients(loss=jnp.array(0.0), grads=None, aux=None,
                                      state=None)
        assert out.loss == 0
        ```
    """

    loss: Array
    grads: PyTree
    aux: PyTree
    state: PyTree


def _check_keywords(loss_fn: Callable, key: Any, state: Any) -> None:
    """`key`/`state` are passed iff `loss_fn` takes them (when its signature is known)."""
    signature = signature_of(loss_fn)
    if signature is None:
        return
    parameters = signature.parameters
    takes_any = any(p.kind == p.VAR_KEYWORD for p in parameters.values())
    for name, value in (("key", key), ("state", state)):
        parameter = parameters.get(name)
        if value is not None and parameter is None and not takes_any:
            raise TypeError(
                f"`accumulate_gradients` got `{name}=...`, but `loss_fn` takes no "
                f"`{name}` keyword. Add a `{name}` parameter to `loss_fn`, or do not "
                f"pass `{name}`."
            )
        if value is None and parameter is not None and parameter.default is parameter.empty:
            fix = (
                "jax.random.key(seed)` (a fresh key each step)."
                if name == "key"
                else "state` (e.g. from `eqx.nn.make_with_state`)."
            )
            raise TypeError(
                f"`loss_fn` needs a `{name}` argument, but `accumulate_gradients` "
                f"got `{name}=None`. Pass `{name}={fix}"
            )


def _unpack(out: Any, has_aux: bool, has_state: bool) -> tuple[Any, Any, Any]:
    """loss_fn output -> (loss, aux, state)."""
    expected = 1 + has_aux + has_state
    if expected == 1:
        return out, None, None
    if not (isinstance(out, tuple) and len(out) == expected):
        shape = ", ".join(
            ["loss"] + (["aux"] if has_aux else []) + (["state"] if has_state else [])
        )
        raise TypeError(
            f"`loss_fn` must return `({shape})` here (has_aux={has_aux}, state "
            f"{'given' if has_state else 'not given'}), but it returned "
            f"{type(out).__name__}"
            + (f" of length {len(out)}." if isinstance(out, tuple) else ".")
        )
    loss, *rest = out
    aux = rest.pop(0) if has_aux else None
    state = rest.pop(0) if has_state else None
    return loss, aux, state


def _cast_like(grads: Any, model: Any) -> Any:
    """Casts each gradient leaf to its parameter's dtype (undoing a wider carry)."""
    return jtu.tree_map(
        lambda g, p: g.astype(p.dtype) if eqx.is_array(g) else g,
        grads,
        model,
        is_leaf=lambda x: x is None,
    )


def _check_arguments(
    loss_fn: Callable,
    batch: Any,
    microbatch_size: Any,
    num_microbatches: Any,
    key: Any,
    accumulator: Any,
    unroll: Any,
) -> int | None:
    """Checks `accumulate_gradients`' arguments; returns the microbatch size."""
    check_callable(loss_fn, "loss_fn", "accumulate_gradients")
    if microbatch_size is not None and num_microbatches is not None:
        raise TypeError(
            "`accumulate_gradients` takes one of `microbatch_size` and "
            f"`num_microbatches`, not both; got microbatch_size={microbatch_size}, "
            f"num_microbatches={num_microbatches}."
        )
    if key is not None:
        check_key(key, "key", "accumulate_gradients")
    if not is_accumulator(accumulator):
        raise TypeError(
            "`accumulate_gradients` needs `accumulator` to be one accumulator (it "
            f"combines the loss and every gradient leaf), got {accumulator!r}."
        )
    batch_arrays = [leaf for leaf in jtu.tree_leaves(batch) if eqx.is_array(leaf)]
    if not batch_arrays or batch_arrays[0].ndim == 0:
        raise ValueError(
            "`accumulate_gradients` needs `batch` to hold arrays with a leading batch axis."
        )
    batch_size = batch_arrays[0].shape[0]
    if num_microbatches is not None:
        num_microbatches = check_positive_int(
            num_microbatches, "num_microbatches", "accumulate_gradients"
        )
        if batch_size % num_microbatches != 0:
            raise ValueError(
                f"`accumulate_gradients` got a batch of {batch_size} examples, which "
                f"does not split into `num_microbatches={num_microbatches}` equal "
                "microbatches; no example is dropped silently. Pad the batch or pick a "
                f"divisor of {batch_size}."
            )
        microbatch_size = batch_size // num_microbatches
    if microbatch_size is not None:
        microbatch_size = check_positive_int(
            microbatch_size, "microbatch_size", "accumulate_gradients"
        )
    if not isinstance(unroll, bool) and (not isinstance(unroll, int) or unroll < 1):
        raise ValueError(
            "`accumulate_gradients` needs `unroll` to be True, False, or a positive int "
            f"(microbatches per loop iteration); got unroll={unroll!r}."
        )
    return microbatch_size


def accumulate_gradients(
    loss_fn: Callable,
    model: PyTree,
    batch: PyTree,
    *,
    microbatch_size: int | None = None,
    num_microbatches: int | None = None,
    key: PRNGKeyArray | None = None,
    state: PyTree | None = None,
    has_aux: bool = False,
    accumulator: AbstractAccumulator = Mean(),
    aux_accumulator: AccumulatorTree = Mean(),
    unroll: bool | int = False,
) -> AccumulatedGradients:
    """The gradient of a loss over a large batch, computed one microbatch at a time.

    Splits `batch` into microbatches, computes `loss_fn`'s value and gradient with
    respect to `model` on each, and accumulates them: with the default `Mean()` and a
    loss that is a mean over examples, the result equals the full-batch gradient, while
    memory holds one microbatch's activations. Use it for one optimizer step over a
    batch that does not fit.

    - Randomness: with `key`, microbatch `i` gets `jax.random.fold_in(key, i)`, so no
        two microbatches share a key (e.g. dropout masks).
    - State: with `state` (an `eqx.nn.State`, e.g. `BatchNorm` statistics), it is
        threaded through the microbatches in order and the final one is returned, not
        averaged.
    - Mixed precision: `accumulator=em.Mean(dtype=jnp.float32)` sums bfloat16 gradients
        in float32; the gradients are cast back to the parameters' dtypes.
    - The batch must split evenly: no example is ever dropped.

    Loop or unrolled: `unroll=False` (default) runs the microbatches one at a time in
    one `lax` loop: memory holds one microbatch and compile time does not grow with
    their number. `unroll=True` writes every microbatch out as straight-line code, so
    the compiler may run independent microbatches concurrently, at the price of several
    microbatches' buffers alive at once and compile time proportional to their number.
    `unroll=k` (an int) writes `k` microbatches per loop iteration: straight-line code
    when there are at most `k`, otherwise a loop whose compile time stays flat. Keep the
    loop when memory is what you accumulate for; the measured trade-off is in the
    [gradients guide](../concepts/gradients.md) and `benchmarks/results/`.

    **Arguments:**

    - `loss_fn`: `loss_fn(model, minibatch, **extras)`, where `extras` holds `key=`
        and/or `state=` when those are given. Returns `loss`, `(loss, aux)` with
        `has_aux`, `(loss, state)` with `state`, or `(loss, aux, state)` with both.
    - `model`: the model (any PyTree, e.g. an `eqx.Module`); gradients are taken with
        respect to its inexact arrays, as `eqx.filter_grad` does.
    - `batch`: a PyTree whose array leaves share a leading batch axis; non-array leaves
        reach `loss_fn` unchanged.
    - `microbatch_size` / `num_microbatches`: at most one of them; with neither, the
        whole batch is one microbatch.
    - `key`: optional PRNG key, split per microbatch.
    - `state`: optional state threaded through the microbatches.
    - `has_aux`: whether `loss_fn` returns auxiliary outputs (metrics).
    - `accumulator`: how the loss and gradients combine (default `Mean()`).
    - `aux_accumulator`: how `aux` combines (default `Mean()`; any PyTree prefix).
    - `unroll`: `False` (a loop), `True` (straight-line code), or an int: that many
        microbatches per loop iteration (see above).

    **Returns:**

    An `AccumulatedGradients(loss, grads, aux, state)`.

    !!! example

        ```python
        import equinox as eqx
        import jax
        import jax.numpy as jnp
        import eqx_micro as em

        model = eqx.nn.Linear(3, 1, key=jax.random.key(0))
        batch = {"x": jnp.ones((8, 3)), "y": jnp.arange(8.0)}

        def loss_fn(model, batch):
            preds = jax.vmap(model)(batch["x"])[:, 0]
            return jnp.mean((preds - batch["y"]) ** 2)

        out = em.accumulate_gradients(loss_fn, model, batch, num_microbatches=4)
        full = eqx.filter_grad(loss_fn)(model, batch)
        assert jnp.allclose(out.grads.weight, full.weight, rtol=1e-5)
        ```
    """
    check_bool(has_aux, "has_aux", "accumulate_gradients")
    microbatch_size = _check_arguments(
        loss_fn, batch, microbatch_size, num_microbatches, key, accumulator, unroll
    )
    _check_keywords(loss_fn, key, state)

    def per_microbatch(minibatch, index, threaded):
        extras = {}
        if key is not None:
            extras["key"] = jax.random.fold_in(key, index)
        if state is not None:
            extras["state"] = threaded

        def loss_and_rest(model):
            loss, aux, new_state = _unpack(
                loss_fn(model, minibatch, **extras), has_aux, state is not None
            )
            return loss, (aux, new_state)

        (loss, (aux, new_state)), grads = eqx.filter_value_and_grad(
            loss_and_rest, has_aux=True
        )(model)
        return ((loss, grads), aux), new_state

    aux_tree = canonicalize_accumulators(aux_accumulator, "aux_accumulator")
    accumulators = ((accumulator, accumulator), aux_tree)
    inputs = ((batch,), {})
    axes = broadcast_axes(((0,), {}), inputs, "accumulate_gradients", "batch")
    ((loss, grads), aux), final_state = call_microbatched(
        lambda mb, index, threaded: per_microbatch(mb[0][0], index, threaded),
        inputs,
        axes,
        microbatch_size,
        accumulators,
        threaded=state,
        unroll=unroll,
        param_names=("batch",),
        caller=_ACCUMULATE,
        argument="aux_accumulator",
    )
    return AccumulatedGradients(
        loss=loss, grads=_cast_like(grads, model), aux=aux, state=final_state
    )
