"""Per-example gradient norms and clipped sums of tapped parameters, from activations.

For a tap, `X` is the equation's activation operand and `G` the gradient of its output,
both for the whole batch (leading axis `B`). Everything here is in float32.

- `dot` (Linear, attention projections): with `X` as `(T, d_in)` and `G` as
  `(T, d_out)` per example (`T` the activation's free axes: sequence positions, or 1),
  the example's weight gradient is `Gᵀ X`, and
  `‖Gᵀ X‖² = Σ_{t,s} (X Xᵀ)_{ts} (G Gᵀ)_{ts}` (the Gram form, `T²(d_in + d_out)` flops),
  or `Gᵀ X` is formed (`T d_in d_out`): whichever is cheaper for the shapes.
- `conv`: the input unfolded into patches (`lax.conv_general_dilated_patches`) makes it
  the dot case, one per feature group.
- `elementwise` (bias, norm scale): the per-example gradient (`G`, or `G ⊙ X`, summed
  over broadcast axes by the layout chain's transpose) is as small as an activation:
  it is formed.
- `gather` (Embedding): `‖Σ_t e_{id_t} g_tᵀ‖² = Σ_{t,s} [id_t = id_s] ⟨g_t, g_s⟩`.

The clipped sum `Σ_i c_i ∇_i` is one contraction over examples (and `T`) of the stored
`X` and `c ⊙ G` (book-keeping), or a contraction of the formed per-example gradients
with `c`; never a product summed over the batch axis.
"""

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ._ghost_jaxpr import bind, chain_fn, operand_shape, out_aval, Tap


_F32 = jnp.float32


def _f32(x: Any) -> Any:
    return x.astype(_F32)


def _mask(keep: Any, x: Any) -> Any:
    """Rows of `x` not kept become exact zeros (`where`: 0 * NaN is NaN)."""
    return jnp.where(keep.reshape((-1,) + (1,) * (x.ndim - 1)), x, jnp.zeros((), x.dtype))


def _sum_per_example(x: Any) -> Any:
    """Sums all but the leading axis (explicit sizes: the batch may be empty)."""
    return jnp.sum(x, axis=tuple(range(1, x.ndim)))


def _contract_examples(c: Any, per_example: Any) -> Any:
    """`Σ_i c_i x_i` as a dot over the example axis."""
    return lax.dot_general(c, per_example, (((0,), (0,)), ((), ())))


def _leaf_transpose(tap: Tap, leaf_shape: tuple[int, ...]) -> Callable[[Any], Any]:
    """Maps a gradient of the tapped operand back to the leaf's layout (float32)."""
    if not tap.chain:
        return lambda g: g
    _, pullback = jax.vjp(chain_fn(tap.chain), jnp.zeros(leaf_shape, _F32))
    return lambda g: pullback(g)[0]


def _gram_is_cheaper(t: int, d_in: int, d_out: int) -> bool:
    return t * (d_in + d_out) <= d_in * d_out


# --------------------------------------------------------------------------------------
# dot_general and convolution: a (T, d_in) activation and a (T, d_out) output-gradient.


def _dot_layout(tap: Tap) -> dict:
    """Axes of the activation, output and parameter operand of a tapped dot_general."""
    eqn, side = tap.eqn, tap.side
    (lhs_c, rhs_c), _ = eqn.params["dimension_numbers"]
    sw, sx = operand_shape(eqn, side), operand_shape(eqn, 1 - side)
    cw, cx = (lhs_c, rhs_c) if side == 0 else (rhs_c, lhs_c)
    fw = [d for d in range(len(sw)) if d not in cw]
    fx = [d for d in range(len(sx)) if d not in cx]
    if side == 0:
        out_w, out_x = range(len(fw)), range(len(fw), len(fw) + len(fx))
    else:
        out_x, out_w = range(len(fx)), range(len(fx), len(fx) + len(fw))
    return dict(
        x_perm=(*fx, *cx),
        g_perm=(*out_x, *out_w),
        t=math.prod(sx[d] for d in fx),
        d_in=math.prod(sx[d] for d in cx),
        d_out=math.prod(sw[d] for d in fw),
        w_shape=(*(sw[d] for d in fw), *(sw[d] for d in cw)),
        w_perm=tuple(int(i) for i in np.argsort((*fw, *cw))),
    )


def _conv_layout(tap: Tap) -> dict:
    eqn = tap.eqn
    dn = eqn.params["dimension_numbers"]
    sw = operand_shape(eqn, 1)
    out = out_aval(eqn).shape
    groups = eqn.params["feature_group_count"]
    filter_shape = tuple(sw[d] for d in dn.rhs_spec[2:])
    c_in = operand_shape(eqn, 0)[dn.lhs_spec[1]]
    return dict(
        dn=dn,
        groups=groups,
        filter_shape=filter_shape,
        t=out[dn.out_spec[0]] * math.prod(out[d] for d in dn.out_spec[2:]),
        d_in=c_in // groups * math.prod(filter_shape),
        d_out=sw[dn.rhs_spec[0]] // groups,
        w_shape=(sw[dn.rhs_spec[0]], sw[dn.rhs_spec[1]], *filter_shape),
        w_perm=tuple(int(i) for i in np.argsort(dn.rhs_spec)),
    )


def gram_or_direct(tap: Tap) -> str:
    """How a dot/conv tap's norms are computed (static): `"gram"` or `"direct"`."""
    layout = _dot_layout(tap) if tap.kind == "dot" else _conv_layout(tap)
    cheaper = _gram_is_cheaper(layout["t"], layout["d_in"], layout["d_out"])
    return "gram" if cheaper else "direct"


def _patches(tap: Tap, layout: dict, x: Any) -> Any:
    """The unfolded input, `(B, T, groups, d_in)`."""
    eqn, dn = tap.eqn, layout["dn"]
    p = eqn.params

    def unfold(example):
        return lax.conv_general_dilated_patches(
            example,
            layout["filter_shape"],
            p["window_strides"],
            p["padding"],
            p["lhs_dilation"],
            p["rhs_dilation"],
            dn,
        )

    patches = jax.vmap(unfold)(x)
    perm = (0, 1 + dn.out_spec[0], *(1 + d for d in dn.out_spec[2:]), 1 + dn.out_spec[1])
    patches = jnp.transpose(patches, perm)
    return patches.reshape(x.shape[0], layout["t"], layout["groups"], layout["d_in"])


def _conv_output_grad(layout: dict, g: Any) -> Any:
    dn = layout["dn"]
    perm = (0, 1 + dn.out_spec[0], *(1 + d for d in dn.out_spec[2:]), 1 + dn.out_spec[1])
    g = jnp.transpose(g, perm)
    return g.reshape(g.shape[0], layout["t"], layout["groups"], layout["d_out"])


def _grouped(
    a: Any, g: Any, layout: dict, to_operand: Callable
) -> tuple[Any, Callable[[Any, Any], Any]]:
    """Norms and clipped sum from `a` `(B, T, k, d_in)` and `g` `(B, T, k, d_out)`
    (`k` feature groups, 1 for a dot)."""
    grouped = layout.get("groups", 1) > 1
    if _gram_is_cheaper(layout["t"], layout["d_in"], layout["d_out"]):
        if not grouped:
            # Plain (example x T, features) matrices: XLA:CPU then keeps one copy of
            # each activation rather than one per rank it is viewed at.
            a = a.reshape(-1, layout["d_in"])
            g = g.reshape(-1, layout["d_out"])
        if layout["t"] == 1:
            # One position: ‖g xᵀ‖² = ‖x‖² ‖g‖², per feature group.
            groups = (a.shape[0], layout.get("groups", 1))
            sq = jnp.sum(
                jnp.sum(jnp.square(a.reshape(*groups, layout["d_in"])), axis=2)
                * jnp.sum(jnp.square(g.reshape(*groups, layout["d_out"])), axis=2),
                axis=1,
            )
        else:
            a4 = a.reshape(-1, layout["t"], layout.get("groups", 1), layout["d_in"])
            g4 = g.reshape(-1, layout["t"], layout.get("groups", 1), layout["d_out"])
            aa = jnp.einsum("btkf,bskf->bkts", a4, a4)
            gg = jnp.einsum("btko,bsko->bkts", g4, g4)
            sq = jnp.sum(aa * gg, axis=(1, 2, 3))

        def clipped_sum(c, keep):
            # One contraction over (example, T): c scales whichever operand is smaller.
            if not grouped:
                # One plain matrix product over the (example, T) rows.
                def per_row(v):
                    return jnp.broadcast_to(v[:, None], (v.shape[0], layout["t"])).ravel()

                ak, gk = _mask(per_row(keep), a), _mask(per_row(keep), g)
                if layout["d_out"] <= layout["d_in"]:
                    gk = gk * per_row(c)[:, None]
                else:
                    ak = ak * per_row(c)[:, None]
                total = lax.dot_general(gk, ak, (((0,), (0,)), ((), ())))
                return to_operand(total)
            ak, gk = _mask(keep, a), _mask(keep, g)
            if layout["d_out"] <= layout["d_in"]:
                gk = gk * c[:, None, None, None]
            else:
                ak = ak * c[:, None, None, None]
            total = jnp.einsum("btko,btkf->kof", gk, ak)
            return to_operand(total)

        return sq, clipped_sum
    per_example = jnp.einsum("btko,btkf->bkof", g, a)
    sq = jnp.sum(jnp.square(per_example), axis=(1, 2, 3))

    def clipped_sum(c, keep):
        return to_operand(_contract_examples(c, _mask(keep, per_example)))

    return sq, clipped_sum


def _dot(tap: Tap, x: Any, g: Any, leaf_shape: tuple) -> tuple[Any, Callable]:
    layout = _dot_layout(tap)
    batch = x.shape[0]
    t, d_in, d_out = layout["t"], layout["d_in"], layout["d_out"]
    a = jnp.transpose(_f32(x), (0, *(1 + d for d in layout["x_perm"])))
    a = a.reshape(batch, t, 1, d_in)
    gt = jnp.transpose(_f32(g), (0, *(1 + d for d in layout["g_perm"])))
    gt = gt.reshape(batch, t, 1, d_out)
    to_leaf = _leaf_transpose(tap, leaf_shape)

    def to_operand(total):
        w = jnp.transpose(total.reshape(layout["w_shape"]), layout["w_perm"])
        return to_leaf(w)

    return _grouped(a, gt, layout, to_operand)


def _conv(tap: Tap, x: Any, g: Any, leaf_shape: tuple) -> tuple[Any, Callable]:
    layout = _conv_layout(tap)
    a = _patches(tap, layout, _f32(x))
    gt = _conv_output_grad(layout, _f32(g))
    to_leaf = _leaf_transpose(tap, leaf_shape)

    def to_operand(total):
        w = jnp.transpose(total.reshape(layout["w_shape"]), layout["w_perm"])
        return to_leaf(w)

    return _grouped(a, gt, layout, to_operand)


# --------------------------------------------------------------------------------------
# Elementwise (bias, scale) and gather (embedding).


def _elementwise(tap: Tap, x: Any, g: Any, leaf_shape: tuple) -> tuple[Any, Callable]:
    eqn, side = tap.eqn, tap.side
    grad = _f32(g)
    if eqn.primitive.name == "mul":
        grad = grad * _f32(x)
    elif eqn.primitive.name == "sub" and side == 1:
        grad = -grad
    operand = operand_shape(eqn, side)
    # Size-1 axes of the operand broadcast against the output: their gradient sums.
    summed = tuple(
        1 + i for i, (o, n) in enumerate(zip(operand, grad.shape[1:])) if o == 1 and n != 1
    )
    if summed:
        grad = jnp.sum(grad, axis=summed, keepdims=True)
    if tap.chain:
        grad = jax.vmap(_leaf_transpose(tap, leaf_shape))(grad)
    per_example = grad.reshape((grad.shape[0], *leaf_shape))
    sq = _sum_per_example(jnp.square(per_example))

    def clipped_sum(c, keep):
        return _contract_examples(c, _mask(keep, per_example))

    return sq, clipped_sum


def _gather(tap: Tap, x: Any, g: Any, leaf_shape: tuple) -> tuple[Any, Callable]:
    eqn = tap.eqn
    dims = eqn.params["dimension_numbers"]
    vocab, width = operand_shape(eqn, 0)
    batch = g.shape[0]
    offset = tuple(dims.offset_dims)
    lookup_axes = tuple(d for d in range(g.ndim - 1) if d not in offset)
    perm = (0, *(1 + d for d in lookup_axes), *(1 + d for d in offset))
    rows = jnp.transpose(_f32(g), perm)
    lookups = math.prod(g.shape[1 + d] for d in lookup_axes)
    rows = rows.reshape(batch, lookups, width)
    index_part = list(dims.start_index_map)
    ids = x[..., index_part.index(0)].reshape(batch, lookups)
    mode = eqn.params["mode"]
    if mode == lax.GatherScatterMode.FILL_OR_DROP:
        # Out-of-range lookups return the fill value and get no gradient.
        valid = (ids >= 0) & (ids < vocab)
        for k, operand_dim in enumerate(index_part):
            if operand_dim != 0:
                valid = valid & (x[..., k].reshape(batch, lookups) == 0)
        rows = jnp.where(valid[..., None], rows, 0.0)
    else:
        ids = jnp.clip(ids, 0, vocab - 1)
    same = ids[:, :, None] == ids[:, None, :]
    dots = jnp.einsum("btd,bsd->bts", rows, rows)
    sq = jnp.sum(jnp.where(same, dots, 0.0), axis=(1, 2))
    to_leaf = _leaf_transpose(tap, leaf_shape)

    def clipped_sum(c, keep):
        scaled = _mask(keep, _f32(g)) * c.reshape((-1,) + (1,) * (g.ndim - 1))

        def lookup(table):
            return jax.vmap(lambda idx: bind(eqn, [table, idx])[0])(x)

        _, pullback = jax.vjp(lookup, jnp.zeros((vocab, width), _F32))
        return to_leaf(pullback(scaled)[0])

    return sq, clipped_sum


_KINDS = {"dot": _dot, "conv": _conv, "elementwise": _elementwise, "gather": _gather}


def _contracts_output_grad(tap: Tap) -> bool:
    """Whether the norms contract the output-gradient in a dot (Gram over positions,
    a formed per-example gradient, embedding rows): the fusion the barrier below
    guards against. A one-position Linear's norm is `Σx² · Σg²`, with no such dot."""
    if tap.kind == "gather":
        return True
    if tap.kind == "elementwise":
        return False
    layout = _dot_layout(tap) if tap.kind == "dot" else _conv_layout(tap)
    gram = _gram_is_cheaper(layout["t"], layout["d_in"], layout["d_out"])
    return layout["t"] > 1 or not gram


def tap_norms(
    tap: Tap, x: Any, g: Any, leaf_shape: tuple[int, ...]
) -> tuple[Any, Callable[[Any, Any], Any]]:
    """`(squared norms (B,), clipped_sum(c, keep))` of a tapped leaf: `clipped_sum`
    returns `Σ_i c_i ∇_i` over the kept examples, in the leaf's shape, float32."""
    # A barrier between the backward pass and the norms. jaxlib 0.10.2's XLA:CPU fuses
    # `reduce(dot(a, broadcast(g)))` into a YNNPACK kernel that returns wrong sums when
    # `g` is a broadcast along the dot's output axis (cf. jax-ml/jax#39103), which an
    # output-gradient before a mean-pool is: a transformer block's MLP norms came out
    # 90% off. Behind the barrier `g` is a plain array. Regression test:
    # `test_wide_transformer_block_under_jit`; the bug itself: `test_xla_canary.py`.
    # Elsewhere the barrier only costs memory (it pins a second copy of each
    # activation: the MLP at batch 256 needed 2.0 MiB of temp instead of 1.5).
    if _contracts_output_grad(tap):
        x, g = lax.optimization_barrier((x, g))
    return _KINDS[tap.kind](tap, x, g, leaf_shape)


def materialised_norms(
    per_example: Any,
) -> tuple[Any, Callable[[Any, Any], Any]]:
    """The same for a formed per-example gradient `(B, *leaf_shape)` (fallback)."""
    grads = _f32(lax.optimization_barrier(per_example))
    sq = _sum_per_example(jnp.square(grads))

    def clipped_sum(c, keep):
        return _contract_examples(c, _mask(keep, grads))

    return sq, clipped_sum
