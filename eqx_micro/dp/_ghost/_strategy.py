"""The ghost strategy: per-example clipping without per-example gradients.

For one microbatch, in order:

1. split the arguments into parameter leaves and everything else (`_split_call`);
2. trace one example and find each parameter's tap (`_analyze`, see `_taps.py`);
3. one batched backward pass with a zero probe on every tapped output gives each tap's
   activation and output-gradient, and the exact per-example gradients of fallback
   parameters (`_tapped_backward`);
4. per-example norms from those (`_norms.py`), grouped by clip norm, give the clip
   scales (`_clip`);
5. the clipped sums: one contraction over examples per leaf (book-keeping), or the
   gradient of the clip-weighted loss in a second pass (`GhostMethod.GHOST`).
"""

import enum
from collections.abc import Callable
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu

from ...internal import ordered_after, positional_names, signature_of
from .._clipping._per_example import PerExampleGradients
from .._clipping._pytree import clip_scale
from .._clipping._spec import (
    AbstractClippingStrategy,
    ClipSettings,
    ExampleLoss,
    MicrobatchSums,
)
from ._norms import gram_or_direct, materialized_norms, Norms, tap_norms
from ._taps import analyze, Fallback, out_aval, run_tapped, Tap, TapKind, trace, Unused


class GhostMethod(enum.Enum):
    """How `dp.ghost_clipped_grad` forms the clipped sum once it has the norms.

    - `BOOK_KEEPING` (default): one contraction over the examples of the stored
        activations and clip-scaled output-gradients (Bu et al. 2023). One backward
        pass; it was faster than `GHOST` on every model we measured.
    - `GHOST`: a second backward pass of the clip-weighted loss (Li et al. 2022),
        which stores nothing per example; needs a single clip norm.

    !!! example

        ```python
        import jax.numpy as jnp
        import eqx_micro.dp as dp

        loss = lambda w, x: jnp.sum(w * x)
        grad_fn = dp.ghost_clipped_grad(loss, 1.0, method=dp.GhostMethod.GHOST)
        total, _ = grad_fn(jnp.zeros(2), jnp.array([[3.0, 4.0]]))
        assert jnp.allclose(total, jnp.array([0.6, 0.8]))
        ```
    """

    BOOK_KEEPING = "book_keeping"
    GHOST = "ghost"


class GhostFallback(enum.Enum):
    """What `dp.ghost_clipped_grad` does with a parameter it has no tap for.

    - `PER_EXAMPLE` (default): computes that parameter's per-example gradients exactly.
    - `RAISE`: refuses, naming the parameter and why.

    !!! example

        ```python
        import jax.numpy as jnp
        import pytest
        import eqx_micro.dp as dp

        tied = lambda w, x: jnp.sum((x @ w) @ w.T)  # `w` is used twice
        strict = dp.ghost_clipped_grad(tied, 1.0, fallback=dp.GhostFallback.RAISE)
        with pytest.raises(ValueError, match="used more than once"):
            strict(jnp.ones((2, 2)), jnp.ones((3, 2)))
        ```
    """

    PER_EXAMPLE = "per_example"
    RAISE = "raise"


# Taps whose clipped sum the ghost method takes from a second backward pass; the
# others (elementwise, fallback) have their per-example gradients already.
_SECOND_PASS = (TapKind.DOT, TapKind.CONV, TapKind.GATHER)


@jax.custom_vjp
def _zero_cotangent_unless(y: Any, keep: Any) -> Any:
    """The identity; its cotangent is zeroed where `keep` is 0 (NaN-proof masking)."""
    return y


def _zero_cotangent_fwd(y, keep):
    return y, keep


def _zero_cotangent_bwd(keep, ct):
    return jnp.where(keep > 0, ct, jnp.zeros((), ct.dtype)), jnp.zeros_like(keep)


_zero_cotangent_unless.defvjp(_zero_cotangent_fwd, _zero_cotangent_bwd)


class _Call(NamedTuple):
    """One call's arguments as flat lists: the parameter leaves (inexact arrays of the
    differentiated arguments) and the other array leaves, with how to rebuild them."""

    params: list
    names: list[str]
    param_treedefs: list
    rest: list
    rest_batched: tuple[bool, ...]
    rest_expand: tuple[bool, ...]
    rebuild: Callable[[list, list], tuple[tuple, dict]]

    def rest_axes(self) -> list[int | None]:
        return [0 if b else None for b in self.rest_batched]

    def example_inputs(self, params: list, rest: list) -> list:
        """The replay's inputs for one example: size-1 batch axes where `fun` has them."""
        return [*params, *(x[None] if e else x for x, e in zip(rest, self.rest_expand))]


def _split_call(loss: ExampleLoss, args: tuple, kwargs: dict) -> _Call:
    arg_names = positional_names(signature_of(loss.fun))
    arg_list: list[Any] = list(args)
    params, names, treedefs, statics = [], [], [], []
    for i in loss.argnums:
        dynamic, static = eqx.partition(arg_list[i], eqx.is_inexact_array)
        flat, treedef = jtu.tree_flatten_with_path(dynamic)
        head = arg_names[i] if i < len(arg_names) else f"args[{i}]"
        names.extend(head + jtu.keystr(path) for path, _ in flat)
        params.extend(leaf for _, leaf in flat)
        treedefs.append(treedef)
        statics.append(static)
        arg_list[i] = None
    rest_arrays, rest_static = eqx.partition((tuple(arg_list), kwargs), eqx.is_array)
    flat_rest, rest_treedef = jtu.tree_flatten_with_path(rest_arrays)
    batched = [path[0].idx == 0 and loss.is_batched(path[1].idx) for path, _ in flat_rest]
    expand = [
        b and loss.keep_batch_dim and path[1].idx != loss.key_argnum
        for b, (path, _) in zip(batched, flat_rest)
    ]

    def rebuild(param_leaves: list, rest_leaves: list) -> tuple[tuple, dict]:
        call_args, call_kwargs = eqx.combine(
            jtu.tree_unflatten(rest_treedef, list(rest_leaves)), rest_static
        )
        call_args, start = list(call_args), 0
        for i, treedef, static in zip(loss.argnums, treedefs, statics):
            count = treedef.num_leaves
            dynamic = jtu.tree_unflatten(treedef, list(param_leaves[start : start + count]))
            call_args[i] = eqx.combine(dynamic, static)
            start += count
        return tuple(call_args), call_kwargs

    return _Call(
        params=params,
        names=names,
        param_treedefs=treedefs,
        rest=[leaf for _, leaf in flat_rest],
        rest_batched=tuple(batched),
        rest_expand=tuple(expand),
        rebuild=rebuild,
    )


class _Analysis(NamedTuple):
    closed: Any  # the flat jaxpr of one example: (*params, *rest) -> [loss, *aux]
    plans: list[Tap | Fallback | Unused]
    aux_out: list  # [aux static part, aux treedef], filled when traced

    def taps(self) -> list[Tap]:
        return [p for p in self.plans if isinstance(p, Tap)]

    def fallbacks(self) -> list[Fallback]:
        return [p for p in self.plans if isinstance(p, Fallback)]


def _analyze(loss: ExampleLoss, call: _Call) -> _Analysis:
    aux_out: list = []

    def example_fn(*flat: Any) -> list:
        params, rest = flat[: len(call.params)], flat[len(call.params) :]
        args, kwargs = call.rebuild(list(params), list(rest))
        value, aux = loss(args, kwargs)
        aux_arrays, static = eqx.partition(aux, eqx.is_array)
        aux_out[:] = [static, jtu.tree_structure(aux_arrays)]
        return [value, *jtu.tree_leaves(aux_arrays)]

    def struct(leaf, batched, expand):
        shape = leaf.shape[1:] if batched else leaf.shape
        return jax.ShapeDtypeStruct((1, *shape) if expand else shape, leaf.dtype)

    structs = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in call.params] + [
        struct(x, b, e) for x, b, e in zip(call.rest, call.rest_batched, call.rest_expand)
    ]
    closed = trace(example_fn, *structs)
    return _Analysis(closed, analyze(closed, len(call.params)), aux_out)


def _clip_groups(loss: ExampleLoss, clip: ClipSettings, call: _Call) -> list[list[int]]:
    """The parameter leaves under each clip norm (in the clip tree's leaf order)."""
    index_trees, start = [], 0
    for treedef in call.param_treedefs:
        index_trees.append(
            jtu.tree_unflatten(treedef, range(start, start + treedef.num_leaves))
        )
        start += treedef.num_leaves
    grads_like = index_trees[0] if loss.single_argnum else tuple(index_trees)
    clip_treedef = jtu.tree_structure(clip.l2_clip_norm)
    try:
        subtrees = clip_treedef.flatten_up_to(grads_like)
    except ValueError as error:
        raise ValueError(
            "`l2_clip_norm` must be a number or a PyTree prefix of the gradient "
            f"(e.g. one clip norm per layer); its structure does not match ({error})."
        ) from None
    return [jtu.tree_leaves(sub) for sub in subtrees]


class _Backward(NamedTuple):
    values: jax.Array  # (B,) losses
    aux: list  # aux leaves, each (B, ...)
    norms: list[Norms]  # per parameter leaf


def _tapped_backward(analysis: _Analysis, call: _Call) -> _Backward:
    """One batched backward pass: tap activations and output-gradients, fallback
    per-example gradients, and from them every leaf's norms."""
    taps, fallbacks = analysis.taps(), analysis.fallbacks()

    def per_example(probes, fallback_leaves, params, rest):
        params = list(params)
        for plan, leaf in zip(fallbacks, fallback_leaves):
            params[plan.leaf] = leaf
        inputs = call.example_inputs(params, rest)
        outs, captured = run_tapped(analysis.closed, taps, probes, inputs)
        return outs[0], (outs[0], outs[1:], captured)

    probes = [jnp.zeros(out_aval(t.eqn).shape, out_aval(t.eqn).dtype) for t in taps]
    fallback_leaves = [call.params[p.leaf] for p in fallbacks]
    grad_fn = jax.grad(per_example, argnums=(0, 1), has_aux=True)
    (g_probes, g_fallback), (values, aux, captured) = jax.vmap(
        grad_fn, in_axes=(None, None, None, call.rest_axes())
    )(probes, fallback_leaves, call.params, call.rest)
    batch = values.shape[0]

    norms: list[Any] = [None] * len(call.params)
    for tap, x, g in zip(taps, captured, g_probes):
        norms[tap.leaf] = tap_norms(tap, x, g, call.params[tap.leaf].shape)
    for plan, g in zip(fallbacks, g_fallback):
        norms[plan.leaf] = materialized_norms(g)
    for plan in analysis.plans:
        if isinstance(plan, Unused):
            shape = call.params[plan.leaf].shape
            norms[plan.leaf] = (
                jnp.zeros((batch,), jnp.float32),
                lambda c, keep, shape=shape: jnp.zeros(shape, jnp.float32),
            )
    return _Backward(values, list(aux), norms)


class _Clip(NamedTuple):
    group_norms: list[jax.Array]  # (B,) per clip norm
    real: jax.Array  # (B,) not padding
    finite: jax.Array  # (B,) every norm finite
    keep: jax.Array  # (B,) contributes to the sum
    scales: list[jax.Array]  # (B,) per clip norm, zero where not kept


def _clip(
    backward: _Backward, groups: list[list[int]], clip: ClipSettings, is_padding: Any
) -> _Clip:
    batch = backward.values.shape[0]
    zeros = jnp.zeros((batch,), jnp.float32)
    group_norms = [
        jnp.sqrt(sum((backward.norms[i][0] for i in group), zeros)) for group in groups
    ]
    finite = jnp.ones((batch,), bool)
    for norm in group_norms:
        finite = finite & jnp.isfinite(norm)
    real = jnp.ones((batch,), bool) if is_padding is None else ~is_padding
    keep = real & finite if clip.nan_safe else real
    scales = [
        jnp.where(
            keep, clip_scale(norm, c, clip.rescale_to_unit_norm, clip.clipping_fn), 0.0
        )
        for norm, c in zip(group_norms, jtu.tree_leaves(clip.l2_clip_norm))
    ]
    return _Clip(group_norms, real, finite, keep, scales)


def _book_keeping_sums(
    backward: _Backward, groups: list[list[int]], clipped: _Clip, leaves: list[int]
) -> dict[int, jax.Array]:
    """`Σ_i c_i ∇_i` of each leaf in `leaves`, last layer first, each leaf's masked
    copies ordered after the previous leaf's sum (`Tweak.ORDERED_GHOST_COPIES`)."""
    scale_of = {i: s for group, s in zip(groups, clipped.scales) for i in group}
    sums, keep = {}, clipped.keep
    for i in reversed(leaves):
        sums[i] = backward.norms[i][1](scale_of[i], keep)
        keep = ordered_after(clipped.keep, sums[i])
    return sums


def _second_pass(
    analysis: _Analysis, call: _Call, taps: list[Tap], clipped: _Clip
) -> list[jax.Array]:
    """Ghost clipping: the gradient of `Σ_i c_i loss_i` with respect to the tapped
    parameters, with each tap's activation and output-gradient zeroed for dropped
    examples (so a NaN example contributes exactly zero)."""
    keep = clipped.keep.astype(jnp.float32)
    tap_of_leaf = {t.leaf: k for k, t in enumerate(taps)}

    def weighted_loss(tapped):
        def one(rest, weight, kept):
            params = [
                tapped[tap_of_leaf[i]] if i in tap_of_leaf else leaf
                for i, leaf in enumerate(call.params)
            ]

            def mask(tap, x):
                return jnp.where(kept > 0, x, jnp.zeros((), x.dtype))

            outs, _ = run_tapped(
                analysis.closed,
                taps,
                None,
                call.example_inputs(params, rest),
                mask_input=mask,
                hook=lambda tap, out: _zero_cotangent_unless(out, kept),
            )
            return weight * outs[0].astype(jnp.float32)

        in_axes = (call.rest_axes(), 0, 0)
        losses = jax.vmap(one, in_axes=in_axes)(call.rest, clipped.scales[0], keep)
        return jnp.sum(losses)

    grads = jax.grad(weighted_loss)([call.params[t.leaf] for t in taps])
    return [g.astype(jnp.float32) for g in grads]


class GhostClipping(AbstractClippingStrategy):
    """Per-example norms from each layer's activations and output-gradients.

    `method`: a `GhostMethod`; `fallback`: a `GhostFallback`. With a
    `pre_clipping_transform` (which needs whole per-example gradients) every parameter
    takes the per-example route.
    """

    method: GhostMethod = eqx.field(static=True)
    fallback: GhostFallback = eqx.field(static=True)

    def check(self, clip: ClipSettings, caller: str) -> None:
        if self.method is GhostMethod.GHOST and clip.num_clip_norms > 1:
            raise ValueError(
                f"`{caller}(method=dp.GhostMethod.GHOST)` weights each example's loss by "
                "one clip factor, so it needs one clip norm; with per-layer clip norms "
                "use `method=dp.GhostMethod.BOOK_KEEPING` (the default)."
            )
        if clip.pre_clipping_transform is not None and self.fallback is GhostFallback.RAISE:
            raise ValueError(
                f"`{caller}` got a `pre_clipping_transform`, which transforms whole "
                "per-example gradients, and `fallback=dp.GhostFallback.RAISE`, which "
                "refuses to form them. Drop one of the two."
            )

    def _refuse_fallbacks(self, analysis: _Analysis, call: _Call) -> None:
        fallbacks = analysis.fallbacks()
        if fallbacks and self.fallback is GhostFallback.RAISE:
            listed = "; ".join(f"`{call.names[p.leaf]}`: {p.reason}" for p in fallbacks)
            raise ValueError(
                "`ghost_clipped_grad` cannot compute the per-example norm of these "
                f"parameters from activations ({listed}). Pass "
                "`fallback=dp.GhostFallback.PER_EXAMPLE` to compute their per-example "
                "gradients exactly, or restructure the model so each parameter is used "
                "once, linearly."
            )

    def microbatch(
        self,
        loss: ExampleLoss,
        clip: ClipSettings,
        args: tuple,
        kwargs: dict,
        is_padding: jax.Array | None,
    ) -> MicrobatchSums:
        if clip.pre_clipping_transform is not None:
            return PerExampleGradients().microbatch(loss, clip, args, kwargs, is_padding)
        call = _split_call(loss, args, kwargs)
        analysis = _analyze(loss, call)
        self._refuse_fallbacks(analysis, call)
        groups = _clip_groups(loss, clip, call)
        backward = _tapped_backward(analysis, call)
        clipped = _clip(backward, groups, clip, is_padding)

        second = []
        if self.method is GhostMethod.GHOST:
            second = [t for t in analysis.taps() if t.kind in _SECOND_PASS]
        in_second = {t.leaf for t in second}
        book_kept = [i for i in range(len(call.params)) if i not in in_second]
        sums = _book_keeping_sums(backward, groups, clipped, book_kept)
        if second:
            for tap, total in zip(second, _second_pass(analysis, call, second, clipped)):
                sums[tap.leaf] = total
        leaves = [
            sums[i].astype(clip.carry_dtype(leaf.dtype))
            for i, leaf in enumerate(call.params)
        ]
        return MicrobatchSums(
            clipped_sum=self._as_grads(loss, call, leaves),
            num_nonfinite=jnp.sum(clipped.real & ~clipped.finite).astype(jnp.int32),
            values=_zero_padding(clipped.real, backward.values)
            if clip.return_values
            else None,
            grad_norms=(
                [jnp.where(clipped.real, n, 0.0) for n in clipped.group_norms]
                if clip.return_grad_norms
                else None
            ),
            aux=self._aux(loss, analysis, backward, clipped.real),
        )

    def _as_grads(self, loss: ExampleLoss, call: _Call, leaves: list) -> Any:
        trees, start = [], 0
        for treedef in call.param_treedefs:
            trees.append(
                jtu.tree_unflatten(treedef, leaves[start : start + treedef.num_leaves])
            )
            start += treedef.num_leaves
        return trees[0] if loss.single_argnum else tuple(trees)

    def _aux(
        self, loss: ExampleLoss, analysis: _Analysis, backward: _Backward, real: Any
    ) -> Any:
        if not loss.has_aux:
            return None
        static, treedef = analysis.aux_out
        leaves = [_zero_padding(real, a) for a in backward.aux]
        return eqx.combine(jtu.tree_unflatten(treedef, leaves), static)

    def describe(
        self, loss: ExampleLoss, clip: ClipSettings, args: tuple, kwargs: dict
    ) -> dict[str, str]:
        if clip.pre_clipping_transform is not None:
            return {
                name: "fallback: `pre_clipping_transform` needs whole per-example gradients"
                for name in PerExampleGradients().describe(loss, clip, args, kwargs)
            }
        call = _split_call(loss, args, kwargs)
        described = {}
        for plan in _analyze(loss, call).plans:
            name = call.names[plan.leaf]
            if isinstance(plan, Tap):
                if plan.kind in (TapKind.DOT, TapKind.CONV):
                    described[name] = f"{plan.kind.value} ({gram_or_direct(plan)})"
                else:
                    described[name] = plan.kind.value
            elif isinstance(plan, Fallback):
                described[name] = f"fallback: {plan.reason}"
            else:
                described[name] = "unused"
        return described


def _zero_padding(real: jax.Array, x: jax.Array) -> jax.Array:
    """`x` (per example) with padded rows set to zero."""
    return jnp.where(real.reshape((-1,) + (1,) * (x.ndim - 1)), x, jnp.zeros((), x.dtype))
