"""`ghost_clipped_grad`: `clipped_grad`'s result without per-example gradients.

One batched backward pass gives each tapped layer's activations and output-gradients
(see `_ghost_jaxpr.py`); the per-example norms and the clipped sum follow from them
(see `_ghost_norms.py`). Only fallback parameters (and the cheap elementwise ones) have
their per-example gradients formed.
"""

from collections.abc import Callable, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, ArrayLike, Float, PyTree

from .._accumulators import Concat, Sum
from .._custom_types import DType
from .._engine import positional_names, signature_of
from .._microbatch import microbatch
from ._clipped_grad import (
    _as_tuple,
    _check_padding_mask,
    AbstractBoundedSensitivityCallable,
    check_clipping_config,
    ClippedGradAux,
    l2_norm_bound,
)
from ._clipping import _scale, ClipNorm
from ._ghost_jaxpr import analyse, Fallback, out_aval, run_tapped, Tap, trace, Unused
from ._ghost_norms import gram_or_direct, materialised_norms, tap_norms


_METHODS = ("auto", "book_keeping", "ghost")
_FALLBACKS = ("per_example", "raise")
# Taps whose clipped sum the ghost method takes from a second backward pass; the
# others (elementwise, fallback) have their per-example gradients already.
_SECOND_PASS = ("dot", "conv", "gather")


@jax.custom_vjp
def _zero_cotangent_unless(y: Any, keep: Any) -> Any:
    """The identity; its cotangent is zeroed where `keep` is 0 (NaN-proof masking)."""
    return y


def _zero_cotangent_fwd(y, keep):
    return y, keep


def _zero_cotangent_bwd(keep, ct):
    return jnp.where(keep > 0, ct, jnp.zeros((), ct.dtype)), jnp.zeros_like(keep)


_zero_cotangent_unless.defvjp(_zero_cotangent_fwd, _zero_cotangent_bwd)


def _after(keep: Any, previous: Any) -> Any:
    """`keep`, computed after `previous` (a value-preserving data dependency).

    XLA:CPU otherwise schedules every leaf's masked and scaled copies of its
    activations before the first contraction, all alive at once: the MLP at batch 1024
    peaked at 17.1 MiB of temp instead of 10.1. (`optimization_barrier` does not order the
    schedule on CPU.) `keep | (isnan(p) & keep)` is `keep` for any `p`."""
    if previous.size == 0:
        return keep
    probe = jnp.isnan(previous.reshape(-1)[0])
    return keep | (probe & keep)


def _squeeze_leading(x: Any) -> Any:
    if eqx.is_array(x) and x.ndim > 0 and x.shape[0] == 1:
        return x[0]
    return x


class _Prepared(eqx.Module):
    """One call's arguments, split into parameter leaves and the other array leaves."""

    diff_leaves: list
    diff_treedefs: tuple
    diff_statics: tuple
    diff_counts: tuple[int, ...] = eqx.field(static=True)
    names: tuple[str, ...] = eqx.field(static=True)
    rest_leaves: list
    rest_batched: tuple[bool, ...] = eqx.field(static=True)
    rest_expand: tuple[bool, ...] = eqx.field(static=True)
    rest_treedef: Any = eqx.field(static=True)
    rest_static: Any
    batch_size: int = eqx.field(static=True)


class GhostClippedGrad(AbstractBoundedSensitivityCallable):
    """The sum of clipped per-example gradients, as returned by
    `dp.ghost_clipped_grad`: the result of `dp.clipped_grad` without forming
    per-example gradients.

    Call it like `fun`, with the batched arguments holding the whole batch and an
    optional `is_padding_example` keyword; it returns `(clipped_sum, dp.ClippedGradAux)`,
    exactly as a `dp.BoundedSensitivityCallable` does, so execution plans and
    `dp.DPTrainer` take it unchanged. `describe(*args)` tells how each parameter is
    handled.

    !!! example

        ```python
        import equinox as eqx
        import jax
        import jax.numpy as jnp
        import eqx_micro.dp as dp

        def loss(model, x):
            return jnp.mean(jax.vmap(model)(x) ** 2)

        model = eqx.nn.Linear(3, 2, key=jax.random.key(0))
        grad_fn = dp.ghost_clipped_grad(loss, 1.0)
        assert isinstance(grad_fn, dp.GhostClippedGrad)
        total, aux = grad_fn(model, jnp.ones((4, 3)))
        reference, _ = dp.clipped_grad(loss, 1.0)(model, jnp.ones((4, 3)))
        assert jnp.allclose(total.weight, reference.weight, rtol=1e-5)
        ```
    """

    fun: Callable
    l2_clip_norm: PyTree[Float[Array, ""]]
    l2_clip_norm_values: tuple[float, ...] = eqx.field(static=True)
    argnums: tuple[int, ...] = eqx.field(static=True)
    single_argnum: bool = eqx.field(static=True)
    batch_argnums: tuple[int, ...] = eqx.field(static=True)
    has_aux: bool = eqx.field(static=True)
    keep_batch_dim: bool = eqx.field(static=True)
    microbatch_size: int | None = eqx.field(static=True)
    normalize_by: float = eqx.field(static=True)
    rescale_to_unit_norm: bool = eqx.field(static=True)
    return_values: bool = eqx.field(static=True)
    return_grad_norms: bool = eqx.field(static=True)
    nan_safe: bool = eqx.field(static=True)
    dtype: DType = eqx.field(static=True)
    key_argnum: int | None = eqx.field(static=True)
    method: str = eqx.field(static=True)
    fallback: str = eqx.field(static=True)

    @property
    def l2_norm_bound(self) -> float:
        """`sqrt(sum of squared clip norms) / normalize_by`, as for `dp.clipped_grad`
        (`sqrt(number of clip norms) / normalize_by` with `rescale_to_unit_norm`).

        !!! example

            ```python
            import jax.numpy as jnp
            import eqx_micro.dp as dp

            loss = lambda p, x: jnp.sum(p["a"] * x) + jnp.sum(p["b"] * x)
            grad_fn = dp.ghost_clipped_grad(loss, {"a": 3.0, "b": 4.0}, normalize_by=5)
            assert grad_fn.l2_norm_bound == 1.0
            ```
        """
        return l2_norm_bound(
            self.l2_clip_norm_values, self.normalize_by, self.rescale_to_unit_norm
        )

    @property
    def privacy_unit(self) -> str:
        """`"example"`, or `"user"` with `keep_batch_dim=False`.

        !!! example

            ```python
            import jax.numpy as jnp
            import eqx_micro.dp as dp

            loss = lambda w, x: jnp.sum(w * x)
            assert dp.ghost_clipped_grad(loss, 1.0).privacy_unit == "example"
            ```
        """
        return "example" if self.keep_batch_dim else "user"

    # ----------------------------------------------------------------------------------
    # Splitting the arguments and tracing one example.

    def _prepare(self, args: tuple, kwargs: dict) -> _Prepared:
        used = [*self.argnums, *self.batch_argnums]
        if self.key_argnum is not None:
            used.append(self.key_argnum)
        if max(used) >= len(args):
            raise ValueError(
                f"`ghost_clipped_grad` was built with `argnums={self.argnums}` and "
                f"`batch_argnums={self.batch_argnums}`, but the function was called "
                f"with {len(args)} positional arguments. Pass those arguments by "
                "position, or fix the argument numbers."
            )
        arg_names = positional_names(signature_of(self.fun))
        args = list(args)
        if self.key_argnum is not None:
            args[self.key_argnum] = self._per_example_keys(args[self.key_argnum], args)
        leaves, treedefs, statics, counts, names = [], [], [], [], []
        for i in self.argnums:
            dynamic, static = eqx.partition(args[i], eqx.is_inexact_array)
            flat, treedef = jtu.tree_flatten_with_path(dynamic)
            head = arg_names[i] if i < len(arg_names) else f"args[{i}]"
            names.extend(head + jtu.keystr(path) for path, _ in flat)
            leaves.extend(leaf for _, leaf in flat)
            treedefs.append(treedef)
            statics.append(static)
            counts.append(len(flat))
            args[i] = None
        batched_args = set(self.batch_argnums)
        if self.key_argnum is not None:
            batched_args.add(self.key_argnum)
        rest_arrays, rest_static = eqx.partition((tuple(args), kwargs), eqx.is_array)
        flat_rest, rest_treedef = jtu.tree_flatten_with_path(rest_arrays)
        rest_leaves, batched, expand = [], [], []
        for path, leaf in flat_rest:
            is_batched = path[0].idx == 0 and path[1].idx in batched_args
            rest_leaves.append(leaf)
            batched.append(is_batched)
            expand.append(
                is_batched and self.keep_batch_dim and path[1].idx != self.key_argnum
            )
        sizes = {leaf.shape[0] for leaf, b in zip(rest_leaves, batched) if b and leaf.ndim}
        if len(sizes) > 1:
            raise ValueError(
                f"`ghost_clipped_grad` needs every batched array to have the same "
                f"number of rows; got {sorted(sizes)}."
            )
        if not sizes:
            raise ValueError(
                "`ghost_clipped_grad` found no arrays in the batched arguments "
                f"`batch_argnums={self.batch_argnums}`; pass the batch there."
            )
        return _Prepared(
            diff_leaves=leaves,
            diff_treedefs=tuple(treedefs),
            diff_statics=tuple(statics),
            diff_counts=tuple(counts),
            names=tuple(names),
            rest_leaves=rest_leaves,
            rest_batched=tuple(batched),
            rest_expand=tuple(expand),
            rest_treedef=rest_treedef,
            rest_static=rest_static,
            batch_size=sizes.pop(),
        )

    def _per_example_keys(self, key: Any, args: list) -> Any:
        """One key per example, `fold_in(key, example_index)`, as `clipped_grad`."""
        if not eqx.is_array(key):
            raise TypeError(
                f"`ghost_clipped_grad` was built with `key_argnum={self.key_argnum}`, "
                f"but that argument is {type(key).__name__}, not a PRNG key."
            )
        sizes = [
            leaf.shape[0]
            for i in self.batch_argnums
            for leaf in jtu.tree_leaves(args[i])
            if eqx.is_array(leaf) and leaf.ndim > 0
        ]
        batch_size = sizes[0] if sizes else 0
        return jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(batch_size))

    def _example_fn(self, prep: _Prepared, aux_static: list) -> Callable:
        """`(*param_leaves, *rest_leaves_of_one_example) -> [loss, *aux_leaves]`."""

        def run(*flat):
            num = len(prep.diff_leaves)
            diff, rest = flat[:num], flat[num:]
            args, kwargs = eqx.combine(
                jtu.tree_unflatten(prep.rest_treedef, list(rest)), prep.rest_static
            )
            args = list(args)
            start = 0
            for i, treedef, static, count in zip(
                self.argnums, prep.diff_treedefs, prep.diff_statics, prep.diff_counts
            ):
                dynamic = jtu.tree_unflatten(treedef, list(diff[start : start + count]))
                args[i] = eqx.combine(dynamic, static)
                start += count
            out = self.fun(*args, **kwargs)
            if self.has_aux:
                if not (isinstance(out, tuple) and len(out) == 2):
                    raise TypeError(
                        "`ghost_clipped_grad` was given `has_aux=True`, so `fun` must "
                        f"return a pair `(loss, aux)`; it returned {type(out).__name__}."
                    )
                loss, aux = out
            else:
                loss, aux = out, None
            if not (
                eqx.is_array(loss)
                and loss.shape == ()
                and jnp.issubdtype(loss.dtype, jnp.inexact)
            ):
                raise TypeError(
                    "`ghost_clipped_grad` needs `fun` to return a floating-point scalar "
                    f"loss for one example; got {getattr(loss, 'shape', type(loss))}."
                )
            if self.keep_batch_dim:
                aux = jtu.tree_map(_squeeze_leading, aux)
            aux_arrays, static = eqx.partition(aux, eqx.is_array)
            aux_static[:] = [static, jtu.tree_structure(aux_arrays)]
            return [loss, *jtu.tree_leaves(aux_arrays)]

        return run

    def _analyse(self, prep: _Prepared) -> tuple[Any, list, list]:
        def example_struct(leaf, batched, expand):
            shape = leaf.shape[1:] if batched else leaf.shape
            if expand:
                shape = (1, *shape)
            return jax.ShapeDtypeStruct(shape, leaf.dtype)

        structs = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in prep.diff_leaves] + [
            example_struct(x, b, e)
            for x, b, e in zip(prep.rest_leaves, prep.rest_batched, prep.rest_expand)
        ]
        aux_static: list = []
        closed = trace(self._example_fn(prep, aux_static), *structs)
        plans = analyse(closed, len(prep.diff_leaves))
        return closed, plans, aux_static

    def describe(self, *args: Any, **kwargs: Any) -> dict[str, str]:
        """How each parameter's per-example norm is computed, for these arguments.

        **Returns:**

        A dict from each parameter's path (e.g. `"model.layers[0].weight"`) to `"dot
        (gram)"`/`"dot (direct)"` (a `dot_general`: Linear layers, attention
        projections), `"conv (gram)"`/`"conv (direct)"`, `"elementwise"` (biases, norm
        scales), `"gather"` (embeddings), `"unused"`, or `"fallback: <reason>"` (exact
        per-example gradient of that parameter).

        !!! example

            ```python
            import equinox as eqx
            import jax
            import jax.numpy as jnp
            import eqx_micro.dp as dp

            def loss(model, x):
                return jnp.mean(jax.vmap(model)(x) ** 2)

            model = eqx.nn.MLP(4, 2, 8, 1, key=jax.random.key(0))
            plan = dp.ghost_clipped_grad(loss, 1.0).describe(model, jnp.ones((3, 4)))
            assert plan["model.layers[0].weight"] == "dot (gram)"
            assert plan["model.layers[0].bias"] == "elementwise"
            ```
        """
        prep = self._prepare(args, kwargs)
        _, plans, _ = self._analyse(prep)
        described = {}
        for plan in plans:
            name = prep.names[plan.leaf]
            if isinstance(plan, Tap):
                if plan.kind in ("dot", "conv"):
                    described[name] = f"{plan.kind} ({gram_or_direct(plan)})"
                else:
                    described[name] = plan.kind
            elif isinstance(plan, Fallback):
                described[name] = f"fallback: {plan.reason}"
            else:
                described[name] = "unused"
        return described

    # ----------------------------------------------------------------------------------
    # The batched computation.

    def _groups(self, prep: _Prepared) -> tuple[Any, list[list[int]]]:
        """The clip tree's structure and the parameter leaves in each clip group."""
        index_trees, start = [], 0
        for treedef, count in zip(prep.diff_treedefs, prep.diff_counts):
            indices = list(range(start, start + count))
            index_trees.append(jtu.tree_unflatten(treedef, indices))
            start += count
        grads_like = index_trees[0] if self.single_argnum else tuple(index_trees)
        clip_treedef = jtu.tree_structure(self.l2_clip_norm)
        try:
            subtrees = clip_treedef.flatten_up_to(grads_like)
        except ValueError as error:
            raise ValueError(
                "`l2_clip_norm` must be a number or a PyTree prefix of the gradient "
                f"(e.g. one clip norm per layer); its structure does not match ({error})."
            ) from None
        return clip_treedef, [jtu.tree_leaves(sub) for sub in subtrees]

    def _batched(
        self,
        closed: Any,
        plans: list,
        prep: _Prepared,
        groups: list[list[int]],
        rest_leaves: list,
        diff_leaves: list,
        clip_norms: list,
        pad: Any,
    ) -> tuple:
        """Clipped sums (float32, per leaf), non-finite count, values, norms, aux."""
        taps = [p for p in plans if isinstance(p, Tap)]
        fallbacks = [p for p in plans if isinstance(p, Fallback)]
        rest_axes = [0 if b else None for b in prep.rest_batched]
        expand = prep.rest_expand

        def inputs_of(leaves, rest):
            rest = [x[None] if e else x for x, e in zip(rest, expand)]
            return [*leaves, *rest]

        def per_example(probes, fallback_leaves, leaves, rest):
            leaves = list(leaves)
            for plan, leaf in zip(fallbacks, fallback_leaves):
                leaves[plan.leaf] = leaf
            outs, captured = run_tapped(closed, taps, probes, inputs_of(leaves, rest))
            return outs[0], (outs[0], outs[1:], captured)

        probes = [jnp.zeros(out_aval(t.eqn).shape, out_aval(t.eqn).dtype) for t in taps]
        fallback_leaves = [diff_leaves[p.leaf] for p in fallbacks]
        grad_fn = jax.grad(per_example, argnums=(0, 1), has_aux=True)
        (g_probes, g_fallback), (values, aux, captured) = jax.vmap(
            grad_fn, in_axes=(None, None, None, rest_axes)
        )(probes, fallback_leaves, diff_leaves, rest_leaves)
        batch = values.shape[0]

        norms_of: list[Any] = [None] * len(diff_leaves)
        for tap, x, g in zip(taps, captured, g_probes):
            norms_of[tap.leaf] = tap_norms(tap, x, g, diff_leaves[tap.leaf].shape)
        for plan, g in zip(fallbacks, g_fallback):
            norms_of[plan.leaf] = materialised_norms(g)
        for plan in plans:
            if isinstance(plan, Unused):
                shape = diff_leaves[plan.leaf].shape
                norms_of[plan.leaf] = (
                    jnp.zeros((batch,), jnp.float32),
                    lambda c, keep, shape=shape: jnp.zeros(shape, jnp.float32),
                )

        group_norms = [
            jnp.sqrt(sum((norms_of[i][0] for i in group), jnp.zeros((batch,), jnp.float32)))
            for group in groups
        ]
        finite = jnp.ones((batch,), bool)
        for norm in group_norms:
            finite = finite & jnp.isfinite(norm)
        real = jnp.ones((batch,), bool) if pad is None else ~pad
        keep = real & finite if self.nan_safe else real
        scales = [
            jnp.where(keep, _scale(norm, clip, self.rescale_to_unit_norm), 0.0)
            for norm, clip in zip(group_norms, clip_norms)
        ]
        scale_of = {i: s for group, s in zip(groups, scales) for i in group}
        sums: list[Any] = [None] * len(diff_leaves)
        second_pass = [
            t for t in taps if t.kind in _SECOND_PASS and self._method() == "ghost"
        ]
        book_kept = [
            i for i in range(len(norms_of)) if i not in {t.leaf for t in second_pass}
        ]

        totals, leaf_keep = [], keep
        for i in reversed(book_kept):
            scale = scale_of.get(i)
            if scale is None:  # not in any clip group: cannot happen for a prefix
                scale = jnp.zeros((batch,), jnp.float32)
            totals.append(norms_of[i][1](scale, leaf_keep))
            leaf_keep = _after(keep, totals[-1])
        totals.reverse()
        for i, total in zip(book_kept, totals):
            sums[i] = total
        if second_pass:
            weights = scales[0]
            ghost_sums = self._second_pass(
                closed, second_pass, prep, diff_leaves, rest_leaves, weights, keep
            )
            for tap, total in zip(second_pass, ghost_sums):
                sums[tap.leaf] = total.astype(jnp.float32)

        nonfinite = jnp.sum(jnp.where(real & ~finite, 1.0, 0.0).astype(jnp.float32))
        values = jnp.where(real, values, jnp.zeros((), values.dtype))
        norms = [jnp.where(real, n, 0.0) for n in group_norms]
        aux = [
            jnp.where(real.reshape((-1,) + (1,) * (a.ndim - 1)), a, jnp.zeros((), a.dtype))
            for a in aux
        ]
        return sums, nonfinite, values, norms, aux

    def _second_pass(self, closed, taps, prep, diff_leaves, rest_leaves, weights, keep):
        """Ghost clipping: the gradient of `Σ_i c_i loss_i` with respect to the tapped
        parameters, with each tap's activation and output-gradient zeroed for dropped
        examples (so a NaN example contributes exactly zero)."""
        rest_axes = [0 if b else None for b in prep.rest_batched]
        expand = prep.rest_expand
        keep_f = keep.astype(jnp.float32)
        tap_leaves = {t.leaf: k for k, t in enumerate(taps)}

        def weighted_loss(tapped):
            def one(rest, weight, kept):
                leaves = [
                    tapped[tap_leaves[i]] if i in tap_leaves else leaf
                    for i, leaf in enumerate(diff_leaves)
                ]
                rest = [x[None] if e else x for x, e in zip(rest, expand)]

                def hook(tap, invals, outvals):
                    return _zero_cotangent_unless(outvals, kept)

                def mask(tap, x):
                    return jnp.where(kept > 0, x, jnp.zeros((), x.dtype))

                outs, _ = run_tapped(
                    closed, taps, None, [*leaves, *rest], mask_input=mask, hook=hook
                )
                return weight * outs[0].astype(jnp.float32)

            losses = jax.vmap(one, in_axes=(rest_axes, 0, 0))(rest_leaves, weights, keep_f)
            return jnp.sum(losses)

        return jax.grad(weighted_loss)([diff_leaves[t.leaf] for t in taps])

    def _method(self) -> str:
        return "book_keeping" if self.method == "auto" else self.method

    # ----------------------------------------------------------------------------------

    def __call__(
        self,
        *args: Any,
        is_padding_example: ArrayLike | None = None,
        **kwargs: Any,
    ) -> tuple[PyTree, ClippedGradAux]:
        if is_padding_example is not None:
            _check_padding_mask(is_padding_example, args, self.batch_argnums)
        prep = self._prepare(args, kwargs)
        closed, plans, aux_static = self._analyse(prep)
        fallbacks = [p for p in plans if isinstance(p, Fallback)]
        if fallbacks and self.fallback == "raise":
            listed = "; ".join(f"`{prep.names[p.leaf]}`: {p.reason}" for p in fallbacks)
            raise ValueError(
                "`ghost_clipped_grad` cannot compute the per-example norm of these "
                f"parameters from activations ({listed}). Pass "
                "`fallback='per_example'` to compute their per-example gradients "
                "exactly, or restructure the model so each parameter is used once, "
                "linearly."
            )
        clip_treedef, groups = self._groups(prep)
        if self._method() == "ghost" and len(groups) > 1:
            raise ValueError(
                "`ghost_clipped_grad(method='ghost')` weights each example's loss by "
                "one clip factor, so it needs one clip norm; with per-layer clip norms "
                "use `method='book_keeping'` (or 'auto')."
            )
        clip_norms = clip_treedef.flatten_up_to(self.l2_clip_norm)

        def run(batched, unbatched, is_padding_example=None):
            diff_leaves, rest_unbatched = unbatched
            rest, b, u = [], iter(batched), iter(rest_unbatched)
            for is_batched in prep.rest_batched:
                rest.append(next(b) if is_batched else next(u))
            return self._batched(
                closed,
                plans,
                prep,
                groups,
                rest,
                diff_leaves,
                clip_norms,
                is_padding_example,
            )

        batched = [x for x, b in zip(prep.rest_leaves, prep.rest_batched) if b]
        unbatched = [x for x, b in zip(prep.rest_leaves, prep.rest_batched) if not b]
        inputs = (batched, (prep.diff_leaves, unbatched))
        if self.microbatch_size is None or prep.batch_size == 0:
            sums, nonfinite, values, norms, aux = run(
                *inputs, is_padding_example=is_padding_example
            )
        else:
            accumulator = (Sum(), Sum(), Concat(), Concat(), Concat())
            runner = microbatch(run, 0, self.microbatch_size, accumulator)
            sums, nonfinite, values, norms, aux = runner(
                *inputs, is_padding_example=is_padding_example
            )

        out_leaves = []
        for total, leaf in zip(sums, prep.diff_leaves):
            dtype = leaf.dtype if self.dtype is None else self.dtype
            if self.normalize_by != 1.0:
                total = total / self.normalize_by
            out_leaves.append(total.astype(dtype))
        trees, start = [], 0
        for treedef, count in zip(prep.diff_treedefs, prep.diff_counts):
            trees.append(jtu.tree_unflatten(treedef, out_leaves[start : start + count]))
            start += count
        clipped_sum = trees[0] if self.single_argnum else tuple(trees)
        aux_tree = None
        if self.has_aux:
            static, treedef = aux_static
            aux_tree = eqx.combine(jtu.tree_unflatten(treedef, aux), static)
        return clipped_sum, ClippedGradAux(
            values=values if self.return_values else None,
            grad_norms=clip_treedef.unflatten(norms) if self.return_grad_norms else None,
            aux=aux_tree,
            num_nonfinite=jnp.round(nonfinite).astype(jnp.int32),
        )


def ghost_clipped_grad(
    fun: Callable,
    l2_clip_norm: PyTree[ClipNorm],
    *,
    argnums: int | Sequence[int] = 0,
    has_aux: bool = False,
    batch_argnums: int | Sequence[int] = 1,
    keep_batch_dim: bool = True,
    microbatch_size: int | None = None,
    normalize_by: int | float = 1.0,
    rescale_to_unit_norm: bool = False,
    return_values: bool = False,
    return_grad_norms: bool = False,
    nan_safe: bool = True,
    dtype: DType = None,
    key_argnum: int | None = None,
    method: str = "auto",
    fallback: str = "per_example",
) -> GhostClippedGrad:
    """`dp.clipped_grad` at nearly the cost of non-private training: per-example
    clipping without per-example gradients (ghost norms and book-keeping).

    Same arguments, call and result as `dp.clipped_grad` (the sum of per-example
    gradients of `fun`, each clipped to `l2_clip_norm`, with the same sensitivity), but
    each example's gradient norm is computed from each layer's inputs and
    output-gradients, taken in one batched backward pass, so the per-example gradients
    of Linear, Conv, Embedding, bias and norm-scale parameters are never formed: memory
    and time stay close to one non-private step even for large layers.

    `fun` is traced once per call on one example; each parameter is followed to its
    one linear use: a `dot_general` (Linear layers, attention projections, on
    sequences too), a convolution (any dimension, stride, padding, dilation, groups), an
    elementwise `add`/`sub`/`mul` (biases, the affine parameters of LayerNorm,
    GroupNorm, RMSNorm), or a row `gather` (Embedding). A parameter used any other way
    (twice, as with tied weights; nonlinearly; inside a loop or a custom derivative)
    gets its per-example gradient computed exactly by `jax.grad`
    (`fallback="per_example"`), or raises an error naming it (`fallback="raise"`);
    `describe(*args)` on the result lists what each parameter gets.

    The clipped sum comes from the stored activations and output-gradients as one
    contraction over the batch (`method="book_keeping"`, the default through "auto"),
    or from a second backward pass of the clip-weighted loss (`method="ghost"`, one
    clip norm only), which stores nothing per example.

    **Arguments:**

    - `fun`, `l2_clip_norm`, `argnums`, `has_aux`, `batch_argnums`, `keep_batch_dim`,
        `microbatch_size`, `normalize_by`, `rescale_to_unit_norm`, `return_values`,
        `return_grad_norms`, `nan_safe`, `dtype`, `key_argnum`: as for
        `dp.clipped_grad`. Norms are computed in float32 whatever the parameters'
        dtype; the sum is returned in `dtype`, or in each parameter's dtype.
    - `method`: `"auto"`, `"book_keeping"` or `"ghost"`.
    - `fallback`: `"per_example"` or `"raise"`, for parameters without a tap.

    **Returns:**

    A `dp.GhostClippedGrad` with `fun`'s arguments, returning
    `(clipped_sum, dp.ClippedGradAux)`.

    !!! example

        ```python
        import equinox as eqx
        import jax
        import jax.numpy as jnp
        import eqx_micro.dp as dp

        def loss(model, x, y):
            logits = jax.vmap(model)(x)
            return jnp.mean(-jnp.take_along_axis(jax.nn.log_softmax(logits),
                                                 y[:, None], 1))

        model = eqx.nn.MLP(8, 3, 16, 2, key=jax.random.key(0))
        x = jax.random.normal(jax.random.key(1), (32, 8))
        y = jnp.arange(32) % 3
        ghost = dp.ghost_clipped_grad(loss, 0.5, batch_argnums=(1, 2))
        exact = dp.clipped_grad(loss, 0.5, batch_argnums=(1, 2))
        (g1, _), (g2, _) = ghost(model, x, y), exact(model, x, y)
        assert jnp.allclose(g1.layers[1].weight, g2.layers[1].weight, atol=1e-5)
        assert ghost.sensitivity() == exact.sensitivity() == 0.5
        ```

    ??? cite "References"

        Goodfellow, *Efficient Per-Example Gradient Computations*, arXiv 1510.01799
        (2015). Li, Tramèr, Liang, Hashimoto, *Large Language Models Can Be Strong
        Differentially Private Learners*, ICLR 2022 (ghost clipping). Bu, Wang, Zha,
        Karypis, *Differentially Private Optimization on Large Model at Small Cost*,
        ICML 2023 (book-keeping). Bu, Mao, Xu, *Scalable and Efficient Training of Large
        Convolutional Neural Networks with Differential Privacy*, NeurIPS 2022 (mixed
        ghost clipping).
    """
    clip_values = check_clipping_config(
        "ghost_clipped_grad", l2_clip_norm, normalize_by, argnums, batch_argnums
    )
    if method not in _METHODS:
        raise ValueError(
            f"`ghost_clipped_grad` got `method={method!r}`; use one of {_METHODS}."
        )
    if fallback not in _FALLBACKS:
        raise ValueError(
            f"`ghost_clipped_grad` got `fallback={fallback!r}`; use one of {_FALLBACKS}."
        )
    if microbatch_size is not None and (
        isinstance(microbatch_size, bool)
        or not isinstance(microbatch_size, int)
        or microbatch_size < 1
    ):
        raise ValueError(
            f"`ghost_clipped_grad` got `microbatch_size={microbatch_size!r}`; pass a "
            "positive int, or None for the whole batch at once."
        )
    if key_argnum is not None and key_argnum in (
        *_as_tuple(argnums),
        *_as_tuple(batch_argnums),
    ):
        raise ValueError(
            f"`ghost_clipped_grad` got `key_argnum={key_argnum}`, which is also in "
            "`argnums` or `batch_argnums`; the key must be its own argument."
        )
    return GhostClippedGrad(
        fun=fun,
        l2_clip_norm=jtu.tree_map(lambda c: jnp.asarray(c, jnp.float32), l2_clip_norm),
        l2_clip_norm_values=tuple(clip_values),
        argnums=_as_tuple(argnums),
        single_argnum=not isinstance(argnums, (tuple, list)),
        batch_argnums=_as_tuple(batch_argnums),
        has_aux=has_aux,
        keep_batch_dim=keep_batch_dim,
        microbatch_size=microbatch_size,
        normalize_by=float(normalize_by),
        rescale_to_unit_norm=rescale_to_unit_norm,
        return_values=return_values,
        return_grad_norms=return_grad_norms,
        nan_safe=nan_safe,
        dtype=dtype,
        key_argnum=key_argnum,
        method=method,
        fallback=fallback,
    )
