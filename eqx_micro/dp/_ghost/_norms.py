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
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ...internal import weighted_sum, ynnpack_barrier
from ._taps import bind, chain_fn, operand_shape, out_aval, Tap, TapKind


_F32 = jnp.float32
# Norms bound the sensitivity: their contractions run at full float32 precision.
_HIGHEST = lax.Precision.HIGHEST

# (squared norms (B,), clipped_sum(c, keep) -> Σ_i c_i ∇_i over kept examples)
Norms = tuple[jax.Array, Callable[[jax.Array, jax.Array], jax.Array]]


def _f32(x: Any) -> Any:
    return x.astype(_F32)


def _mask(keep: Any, x: Any) -> Any:
    """Rows of `x` not kept become exact zeros (`where`: 0 * NaN is NaN)."""
    return jnp.where(keep.reshape((-1,) + (1,) * (x.ndim - 1)), x, jnp.zeros((), x.dtype))


def _sum_per_example(x: Any) -> Any:
    """Sums all but the leading axis (explicit sizes: the batch may be empty)."""
    return jnp.sum(x, axis=tuple(range(1, x.ndim)))


def _einsum(spec: str, *operands: Any) -> Any:
    return jnp.einsum(spec, *operands, precision=_HIGHEST)


def _leaf_transpose(tap: Tap, leaf_shape: tuple[int, ...]) -> Callable[[Any], Any]:
    """Maps a gradient of the tapped operand back to the leaf's layout (float32)."""
    if not tap.chain:
        return lambda g: g
    _, pullback = jax.vjp(chain_fn(tap.chain), jnp.zeros(leaf_shape, _F32))
    return lambda g: pullback(g)[0]


# --------------------------------------------------------------------------------------
# dot_general and convolution: a (T, d_in) activation and a (T, d_out) output-gradient.


class _Product(NamedTuple):
    """A tapped product seen per example as `(T, k, d_in) x (T, k, d_out)`: `T`
    positions, `k` feature groups (1 for a dot), and how the `(k, d_out, d_in)` sum maps
    back to the parameter operand (`w_shape`, then the permutation `w_perm`)."""

    t: int
    groups: int
    d_in: int
    d_out: int
    w_shape: tuple[int, ...]
    w_perm: tuple[int, ...]

    @property
    def gram_is_cheaper(self) -> bool:
        """Whether `‖Gᵀ X‖²` is cheaper from Grams (`T²(d_in + d_out)`) than formed."""
        return self.t * (self.d_in + self.d_out) <= self.d_in * self.d_out


class _DotAxes(NamedTuple):
    """Where the activation's and the output's axes are, in a tapped dot_general."""

    x_perm: tuple[int, ...]  # activation -> (free..., contracted...)
    g_perm: tuple[int, ...]  # output -> (activation free..., parameter free...)


def _dot_layout(tap: Tap) -> tuple[_Product, _DotAxes]:
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
    product = _Product(
        t=math.prod(sx[d] for d in fx),
        groups=1,
        d_in=math.prod(sx[d] for d in cx),
        d_out=math.prod(sw[d] for d in fw),
        w_shape=(*(sw[d] for d in fw), *(sw[d] for d in cw)),
        w_perm=tuple(int(i) for i in np.argsort((*fw, *cw))),
    )
    return product, _DotAxes(x_perm=(*fx, *cx), g_perm=(*out_x, *out_w))


def _conv_layout(tap: Tap) -> _Product:
    eqn = tap.eqn
    dn = eqn.params["dimension_numbers"]
    sw = operand_shape(eqn, 1)
    out = out_aval(eqn).shape
    groups = eqn.params["feature_group_count"]
    filter_shape = tuple(sw[d] for d in dn.rhs_spec[2:])
    c_in = operand_shape(eqn, 0)[dn.lhs_spec[1]]
    return _Product(
        t=out[dn.out_spec[0]] * math.prod(out[d] for d in dn.out_spec[2:]),
        groups=groups,
        d_in=c_in // groups * math.prod(filter_shape),
        d_out=sw[dn.rhs_spec[0]] // groups,
        w_shape=(sw[dn.rhs_spec[0]], sw[dn.rhs_spec[1]], *filter_shape),
        w_perm=tuple(int(i) for i in np.argsort(dn.rhs_spec)),
    )


def _product_layout(tap: Tap) -> _Product:
    return _dot_layout(tap)[0] if tap.kind is TapKind.DOT else _conv_layout(tap)


def gram_or_direct(tap: Tap) -> str:
    """How a dot/conv tap's norms are computed (static): `"gram"` or `"direct"`."""
    return "gram" if _product_layout(tap).gram_is_cheaper else "direct"


def _patches(tap: Tap, layout: _Product, x: Any) -> Any:
    """The unfolded input, `(B, T, groups, d_in)`."""
    p = tap.eqn.params
    dn = p["dimension_numbers"]
    filter_shape = tuple(operand_shape(tap.eqn, 1)[d] for d in dn.rhs_spec[2:])

    def unfold(example):
        return lax.conv_general_dilated_patches(
            example,
            filter_shape,
            p["window_strides"],
            p["padding"],
            p["lhs_dilation"],
            p["rhs_dilation"],
            dn,
            precision=_HIGHEST,
        )

    patches = jax.vmap(unfold)(x)
    perm = (0, 1 + dn.out_spec[0], *(1 + d for d in dn.out_spec[2:]), 1 + dn.out_spec[1])
    patches = jnp.transpose(patches, perm)
    return patches.reshape(x.shape[0], layout.t, layout.groups, layout.d_in)


def _conv_output_grad(tap: Tap, layout: _Product, g: Any) -> Any:
    dn = tap.eqn.params["dimension_numbers"]
    perm = (0, 1 + dn.out_spec[0], *(1 + d for d in dn.out_spec[2:]), 1 + dn.out_spec[1])
    g = jnp.transpose(g, perm)
    return g.reshape(g.shape[0], layout.t, layout.groups, layout.d_out)


def _gram_norms(a: Any, g: Any, layout: _Product) -> Any:
    """`‖Gᵀ X‖²` per example from the Grams of `a` `(B·T, k·d_in)` and `g`."""
    k = layout.groups
    if layout.t == 1:
        # One position: ‖g xᵀ‖² = ‖x‖² ‖g‖², per feature group.
        groups = (a.shape[0], k)
        return jnp.sum(
            jnp.sum(jnp.square(a.reshape(*groups, layout.d_in)), axis=2)
            * jnp.sum(jnp.square(g.reshape(*groups, layout.d_out)), axis=2),
            axis=1,
        )
    a4 = a.reshape(-1, layout.t, k, layout.d_in)
    g4 = g.reshape(-1, layout.t, k, layout.d_out)
    aa = _einsum("btkf,bskf->bkts", a4, a4)
    gg = _einsum("btko,bsko->bkts", g4, g4)
    return jnp.sum(aa * gg, axis=(1, 2, 3))


def _book_keeping_sum(a: Any, g: Any, layout: _Product, c: Any, keep: Any) -> Any:
    """`Σ_i c_i G_iᵀ X_i` as one contraction over (example, T) of the stored
    activations and output-gradients; `c` scales whichever operand is smaller."""
    scale_g = layout.d_out <= layout.d_in
    if layout.groups == 1:
        # Plain (example x T, features) matrices: one matrix product.
        def per_row(v):
            return jnp.broadcast_to(v[:, None], (v.shape[0], layout.t)).ravel()

        ak, gk = _mask(per_row(keep), a), _mask(per_row(keep), g)
        if scale_g:
            gk = gk * per_row(c)[:, None]
        else:
            ak = ak * per_row(c)[:, None]
        return lax.dot_general(gk, ak, (((0,), (0,)), ((), ())), precision=_HIGHEST)
    ak, gk = _mask(keep, a), _mask(keep, g)
    if scale_g:
        gk = gk * c[:, None, None, None]
    else:
        ak = ak * c[:, None, None, None]
    return _einsum("btko,btkf->kof", gk, ak)


def _product_norms(
    a: Any, g: Any, layout: _Product, to_operand: Callable[[Any], Any]
) -> Norms:
    """Norms and clipped sum from `a` `(B, T, k, d_in)` and `g` `(B, T, k, d_out)`."""
    if layout.gram_is_cheaper:
        if layout.groups == 1:
            # Plain (example x T, features) matrices: XLA then keeps one copy of each
            # activation rather than one per rank it is viewed at.
            a = a.reshape(-1, layout.d_in)
            g = g.reshape(-1, layout.d_out)
        sq = _gram_norms(a, g, layout)

        def clipped_sum(c, keep):
            return to_operand(_book_keeping_sum(a, g, layout, c, keep))

        return sq, clipped_sum
    per_example = _einsum("btko,btkf->bkof", g, a)
    sq = jnp.sum(jnp.square(per_example), axis=(1, 2, 3))

    def clipped_sum(c, keep):
        return to_operand(weighted_sum(c, _mask(keep, per_example), _F32))

    return sq, clipped_sum


def _to_operand(tap: Tap, layout: _Product, leaf_shape: tuple) -> Callable[[Any], Any]:
    to_leaf = _leaf_transpose(tap, leaf_shape)

    def to_operand(total):
        w = jnp.transpose(total.reshape(layout.w_shape), layout.w_perm)
        return to_leaf(w)

    return to_operand


def _dot(tap: Tap, x: Any, g: Any, leaf_shape: tuple) -> Norms:
    layout, axes = _dot_layout(tap)
    batch = x.shape[0]
    a = jnp.transpose(_f32(x), (0, *(1 + d for d in axes.x_perm)))
    a = a.reshape(batch, layout.t, 1, layout.d_in)
    gt = jnp.transpose(_f32(g), (0, *(1 + d for d in axes.g_perm)))
    gt = gt.reshape(batch, layout.t, 1, layout.d_out)
    return _product_norms(a, gt, layout, _to_operand(tap, layout, leaf_shape))


def _conv(tap: Tap, x: Any, g: Any, leaf_shape: tuple) -> Norms:
    layout = _conv_layout(tap)
    a = _patches(tap, layout, _f32(x))
    gt = _conv_output_grad(tap, layout, _f32(g))
    return _product_norms(a, gt, layout, _to_operand(tap, layout, leaf_shape))


# --------------------------------------------------------------------------------------
# Elementwise (bias, scale) and gather (embedding).


def _elementwise(tap: Tap, x: Any, g: Any, leaf_shape: tuple) -> Norms:
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
        return weighted_sum(c, _mask(keep, per_example), _F32)

    return sq, clipped_sum


def _gather(tap: Tap, x: Any, g: Any, leaf_shape: tuple) -> Norms:
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
    if eqn.params["mode"] == lax.GatherScatterMode.FILL_OR_DROP:
        # Out-of-range lookups return the fill value and get no gradient.
        valid = (ids >= 0) & (ids < vocab)
        for k, operand_dim in enumerate(index_part):
            if operand_dim != 0:
                valid = valid & (x[..., k].reshape(batch, lookups) == 0)
        rows = jnp.where(valid[..., None], rows, 0.0)
    else:
        ids = jnp.clip(ids, 0, vocab - 1)
    same = ids[:, :, None] == ids[:, None, :]
    dots = _einsum("btd,bsd->bts", rows, rows)
    sq = jnp.sum(jnp.where(same, dots, 0.0), axis=(1, 2))
    to_leaf = _leaf_transpose(tap, leaf_shape)

    def clipped_sum(c, keep):
        scaled = _mask(keep, _f32(g)) * c.reshape((-1,) + (1,) * (g.ndim - 1))

        def lookup(table):
            return jax.vmap(lambda idx: bind(eqn, [table, idx])[0])(x)

        _, pullback = jax.vjp(lookup, jnp.zeros((vocab, width), _F32))
        return to_leaf(pullback(scaled)[0])

    return sq, clipped_sum


_BY_KIND = {
    TapKind.DOT: _dot,
    TapKind.CONV: _conv,
    TapKind.ELEMENTWISE: _elementwise,
    TapKind.GATHER: _gather,
}


def _contracts_output_grad(tap: Tap) -> bool:
    """Whether the norms contract the output-gradient in a dot (Gram over positions,
    a formed per-example gradient, embedding rows). A one-position Linear's norm is
    `Σx² · Σg²`, with no such dot."""
    if tap.kind is TapKind.GATHER:
        return True
    if tap.kind is TapKind.ELEMENTWISE:
        return False
    layout = _product_layout(tap)
    return layout.t > 1 or not layout.gram_is_cheaper


def tap_norms(tap: Tap, x: Any, g: Any, leaf_shape: tuple[int, ...]) -> Norms:
    """`(squared norms (B,), clipped_sum(c, keep))` of a tapped leaf: `clipped_sum`
    returns `Σ_i c_i ∇_i` over the kept examples, in the leaf's shape, float32."""
    if _contracts_output_grad(tap):
        # Where XLA:CPU's YNNPACK fusion would see reduce(dot(a, broadcast(g))): an
        # output-gradient before a mean-pool is such a broadcast.
        x, g = ynnpack_barrier((x, g))
    return _BY_KIND[tap.kind](tap, x, g, leaf_shape)


def materialized_norms(per_example: Any) -> Norms:
    """The same for a formed per-example gradient `(B, *leaf_shape)` (fallback)."""
    grads = _f32(ynnpack_barrier(per_example))
    sq = _sum_per_example(jnp.square(grads))

    def clipped_sum(c, keep):
        return weighted_sum(c, _mask(keep, grads), _F32)

    return sq, clipped_sum
