"""Canaries inserted into a DP training run, and the audit of their scores.

The one-run design of Steinke, Nasr and Jagielski (2023): `m` canaries, each included in
the training data independently with probability 1/2, one training run, a score per
canary (higher means "in"), and [`dp.CanaryScoreAuditor`][eqx_micro.dp.CanaryScoreAuditor]
turns the scores into a lower bound on epsilon.

Everything here goes through the public training API: canaries are rows of the dataset,
and gradient canaries act through the per-example loss, so the plan (DP-SGD or BandMF),
its sampling, clipping (per-example or ghost), microbatching and noise are the ones under
audit, unchanged.
"""

import enum
import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jaxtyping import Array, ArrayLike, Bool, Float, Float64, PRNGKeyArray, PyTree, Real

from ..internal import check_bool, check_callable, check_key, check_positive_int
from ._auditing import CanaryScoreAuditor


def _check_real(owner: str, name: str, value: Any, *, positive: bool, hint: str) -> float:
    if isinstance(value, bool | np.bool_) or not isinstance(
        value, int | float | np.integer | np.floating
    ):
        raise TypeError(
            f"`{owner}` needs `{name}` to be a real number, got {value!r} of type "
            f"{type(value).__name__}."
        )
    value = float(value)
    low_ok = value > 0 if positive else value >= 0
    if not (math.isfinite(value) and low_ok):
        bound = "positive" if positive else "non-negative"
        raise ValueError(
            f"`{owner}` got `{name}={value}`; it must be a finite {bound} number: {hint}."
        )
    return value


def _inexact_leaves(tree: PyTree) -> list[Any]:
    # The leaves DP training differentiates (`eqx.filter_grad`'s rule), in tree order.
    return [leaf for leaf in jtu.tree_leaves(tree) if eqx.is_inexact_array(leaf)]


def _check_data(owner: str, data: Any) -> tuple[dict, int]:
    """`data` as a dict, and its number of examples (rows along axis 0)."""
    if not isinstance(data, Mapping):
        raise TypeError(
            f"`{owner}` needs `data` to be a dict of arrays with the examples along axis "
            f"0, got {type(data).__name__}. Wrap other PyTrees in a dict, e.g. "
            "`{'x': x, 'y': y}`, and unpack it in the loss."
        )
    arrays = [leaf for leaf in jtu.tree_leaves(dict(data)) if eqx.is_array(leaf)]
    if not arrays or any(np.ndim(leaf) == 0 for leaf in arrays):
        raise ValueError(
            f"`{owner}` needs `data` to hold arrays with the examples along axis 0 "
            "(e.g. `{'x': images, 'label': labels}`); it has "
            + ("no array leaves." if not arrays else "a 0-d array leaf.")
        )
    sizes = {np.shape(leaf)[0] for leaf in arrays}
    if len(sizes) != 1:
        raise ValueError(
            f"`{owner}` needs every array of `data` to hold the same number of examples "
            f"along axis 0, got {sorted(sizes)}."
        )
    return dict(data), int(sizes.pop())


def _append_rows(leaf: Any, rows: Any) -> Any:
    # NumPy data stays NumPy (the trainer gathers batches on the host), JAX stays JAX.
    if isinstance(leaf, np.ndarray):
        return np.concatenate([leaf, np.asarray(rows, leaf.dtype)])
    return jnp.concatenate([leaf, jnp.asarray(rows, leaf.dtype)])


def _unit_direction(
    key: PRNGKeyArray, index: Any, shapes: Sequence[tuple[int, ...]]
) -> list[Array]:
    """Canary `index`'s direction: a standard normal vector over all the parameters,
    scaled to unit norm, drawn again from `key` wherever it is needed (never stored)."""
    sizes = [math.prod(shape) for shape in shapes]
    # One draw for the whole model, cut into leaves: one random-number kernel to
    # compile, not one per parameter array.
    flat = jax.random.normal(jax.random.fold_in(key, index), (sum(sizes),), jnp.float32)
    flat = flat * jax.lax.rsqrt(jnp.sum(jnp.square(flat)))
    parts = jnp.split(flat, np.cumsum(sizes)[:-1].tolist())
    return [part.reshape(shape) for part, shape in zip(parts, shapes)]


@eqx.filter_jit
def _projections(
    key: PRNGKeyArray, update: list[Array], num_canaries: int
) -> Float[Array, " canaries"]:
    shapes = [u.shape for u in update]

    def project(index: Array) -> Array:
        direction = _unit_direction(key, index, shapes)
        # An elementwise product and a sum, not a dot: no TF32 on GPUs.
        terms = (jnp.sum(u.astype(jnp.float32) * d) for u, d in zip(update, direction))
        return sum(terms, jnp.float32(0))

    # One canary at a time: the memory of one direction, whatever the model's size.
    return jax.lax.map(project, jnp.arange(num_canaries))


class GradientCanaries(eqx.Module):
    """White-box canaries: examples whose gradient is a chosen direction.

    Canary `i` is a random unit direction `u_i` over the model's inexact parameters,
    scaled to `l2_norm`. `insert(data)` appends one row per *included* canary (each
    canary is included independently with probability 1/2, the one-run design) and
    adds a marker field to the data (`-1` for real rows, `i` for canary `i`);
    `wrap_loss(loss)` gives the per-example loss to build the plan's clipped gradient
    from: on a canary row it is linear in the parameters with gradient exactly
    `l2_norm * u_i`, whatever the model, and `loss` elsewhere. Pick `l2_norm` at least
    the clip norm, so that clipping leaves each canary's gradient at the clip norm:
    the largest change one example may make.

    After training, `scores(initial_model, final_model)` projects the total update onto
    every direction. Gradient descent moves against the gradients it sees, so an
    included canary pushes its score up at every step it is sampled (by the learning
    rate times the clip norm, over the trainer's `normalize_by`, for SGD); a held-out
    one only sees the noise, the real data's updates and the other canaries. Hand the
    scores to [`dp.audit`][eqx_micro.dp.audit].

    Directions are random, so they are nearly orthogonal only when the model has many
    more parameters than there are canaries: each canary's score also picks up about
    `1 / sqrt(num_parameters)` of every other included canary. The real data's updates
    add to the scores too; both blur the audit (the bound stays valid, only weaker).
    Canary rows contribute 0 to the loss values (`return_values=True`), not their
    gradient's size. With `dp.ghost_clipped_grad`, every parameter of a wrapped loss
    is used twice (by the loss and by the canary), so its norm is computed from
    per-example gradients (`fallback=dp.GhostFallback.PER_EXAMPLE`, the default).

    **Arguments:**

    - `num_canaries`: the number of canaries `m`, a positive int; about half are
        included. The one-run bound needs some of each.
    - `model_or_params`: the model (or any PyTree) to be trained: its inexact arrays
        are the parameters the directions span.
    - `l2_norm`: the norm of each canary's gradient before clipping, finite, positive,
        and at least the clip norm.
    - `key`: a PRNG key for the directions and the in/out draw, separate from the
        training's keys.
    - `marker`: the name of the field `insert` adds to the data.

    !!! example

        ```python
        import jax
        import jax.numpy as jnp
        import numpy as np
        import eqx_micro.dp as dp

        def loss(params, batch, key):  # real examples: a linear model
            return jnp.mean((batch["x"] @ params["w"] - batch["y"]) ** 2)

        params = {"w": jnp.zeros(256)}
        canaries = dp.GradientCanaries(100, params, l2_norm=2.0, key=jax.random.key(0))
        data = {"x": np.zeros((10, 256), np.float32), "y": np.zeros(10, np.float32)}
        data = canaries.insert(data)
        assert data["canary_index"].shape == (10 + int(canaries.included.sum()),)

        # One noiseless, full-batch DP-SGD step: the canaries' gradients, clipped to 1.
        grad_fn = dp.clipped_grad(canaries.wrap_loss(loss), 1.0, key_argnum=2)
        grads, _ = grad_fn(params, data, jax.random.key(1))
        trained = {"w": params["w"] - 0.1 * grads["w"]}
        in_scores, out_scores = canaries.scores(params, trained)
        assert in_scores.mean() > 0.08 > 0.02 > abs(out_scores.mean())
        ```

    ??? cite "References"

        ```bibtex
        @inproceedings{steinke2023privacy,
            title={Privacy Auditing with One (1) Training Run},
            author={Steinke, Thomas and Nasr, Milad and Jagielski, Matthew},
            booktitle={NeurIPS},
            year={2023},
            url={https://arxiv.org/abs/2305.08846}
        }
        ```
    """

    num_canaries: int = eqx.field(static=True)
    l2_norm: Float[Array, ""]
    included: Bool[Array, " canaries"]
    key: PRNGKeyArray
    marker: str = eqx.field(static=True)
    param_shapes: tuple[tuple[int, ...], ...] = eqx.field(static=True)

    def __init__(
        self,
        num_canaries: int,
        model_or_params: PyTree,
        *,
        l2_norm: float | int,
        key: PRNGKeyArray,
        marker: str = "canary_index",
    ):
        owner = "GradientCanaries"
        self.num_canaries = check_positive_int(num_canaries, "num_canaries", owner)
        leaves = _inexact_leaves(model_or_params)
        if not leaves:
            raise ValueError(
                f"`{owner}` found no inexact arrays (parameters) in `model_or_params`; "
                "pass the model to be trained, e.g. an `eqx.Module` with float arrays."
            )
        if any(jnp.issubdtype(leaf.dtype, jnp.complexfloating) for leaf in leaves):
            raise ValueError(
                f"`{owner}` found a complex parameter in `model_or_params`; gradient "
                "canaries span real parameters only."
            )
        hint = "the canaries' gradient norm, at least the clip norm (e.g. equal to it)"
        l2_norm = _check_real(owner, "l2_norm", l2_norm, positive=True, hint=hint)
        self.l2_norm = jnp.asarray(l2_norm, jnp.float32)
        check_key(key, "key", owner)
        if not isinstance(marker, str) or not marker:
            raise TypeError(
                f"`{owner}` needs `marker` to be a non-empty str (the field name "
                f"`insert` adds), got {marker!r}."
            )
        assignment_key, self.key = jax.random.split(key)
        self.included = jax.random.bernoulli(assignment_key, 0.5, (self.num_canaries,))
        self.marker = marker
        self.param_shapes = tuple(tuple(leaf.shape) for leaf in leaves)

    def _parameters(self, tree: PyTree, owner: str, name: str) -> list[Any]:
        leaves = _inexact_leaves(tree)
        shapes = tuple(tuple(leaf.shape) for leaf in leaves)
        if shapes != self.param_shapes:
            raise ValueError(
                f"`{owner}` got a `{name}` whose inexact arrays have shapes {shapes}, but "
                f"the canaries were made for shapes {self.param_shapes}. Make the "
                "canaries from the model you train."
            )
        return leaves

    def direction(self, index: int | np.integer, model_or_params: PyTree) -> PyTree:
        """Canary `index`'s unit direction, shaped like the model's parameters.

        **Arguments:**

        - `index`: the canary, in `[0, num_canaries)`.
        - `model_or_params`: the model the canaries were made for: the direction
            takes its structure, with None for leaves that are not inexact arrays.

        **Returns:**

        A PyTree like `eqx.filter(model_or_params, eqx.is_inexact_array)`, of L2 norm
        1 (float32 leaves).

        !!! example

            ```python
            import jax
            import jax.numpy as jnp
            import optax
            import eqx_micro.dp as dp

            params = {"a": jnp.zeros(3), "b": jnp.zeros((2, 2))}
            canaries = dp.GradientCanaries(5, params, l2_norm=1.0, key=jax.random.key(0))
            assert jnp.isclose(optax.tree.norm(canaries.direction(4, params)), 1.0)
            ```
        """
        owner = "GradientCanaries.direction"
        if isinstance(index, bool) or not isinstance(index, int | np.integer):
            raise TypeError(f"`{owner}` needs `index` to be an int, got {index!r}.")
        if not 0 <= index < self.num_canaries:
            raise ValueError(
                f"`{owner}` got `index={index}`; it must be in [0, {self.num_canaries})."
            )
        self._parameters(model_or_params, owner, "model_or_params")
        params = eqx.filter(model_or_params, eqx.is_inexact_array)
        parts = iter(_unit_direction(self.key, int(index), self.param_shapes))
        return jtu.tree_map(lambda _: next(parts), params)

    def canary_value(self, model: PyTree, index: Any) -> Float[Array, ""]:
        """Canary `index`'s loss: 0, with gradient `l2_norm` times its direction.

        Written `<params - stop_gradient(params), l2_norm * u_index>`: linear in the
        parameters, so its gradient is the scaled direction wherever the parameters
        are, and its value is exactly 0 (it adds nothing to reported loss values).

        **Arguments:**

        - `model`: the model (or PyTree) the canaries were made for.
        - `index`: the canary, an int or an integer array scalar (traced is fine).

        **Returns:**

        A float32 scalar, 0.

        !!! example

            ```python
            import jax
            import jax.numpy as jnp
            import eqx_micro.dp as dp

            params = jnp.ones(4)
            canaries = dp.GradientCanaries(3, params, l2_norm=2.0, key=jax.random.key(0))
            grad = jax.grad(canaries.canary_value)(params, 1)
            assert jnp.allclose(grad, 2.0 * canaries.direction(1, params))
            assert canaries.canary_value(params, 1) == 0.0
            ```
        """
        leaves = self._parameters(model, "GradientCanaries.canary_value", "model")
        direction = _unit_direction(self.key, index, self.param_shapes)
        value = jnp.float32(0)
        for param, unit in zip(leaves, direction):
            # `param - stop_gradient(param)` is 0 but has the parameter's gradient.
            moving = param - jax.lax.stop_gradient(param)
            scaled = (self.l2_norm * unit).astype(param.dtype)
            # Elementwise, not a dot: the gradient is `scaled` exactly (no TF32).
            value = value + jnp.sum(moving * scaled).astype(jnp.float32)
        return value

    def wrap_loss(self, loss: Callable, *, has_aux: bool = False) -> "CanaryLoss":
        """The per-example loss with canary rows: build the plan's clipped gradient on it.

        **Arguments:**

        - `loss`: `loss(model, batch, key)` for one example (a batch axis of size 1, as
            `DPTrainer` calls it), returning a scalar, or `(scalar, aux)` with
            `has_aux`. It receives the batch without the marker field.
        - `has_aux`: whether `loss` returns `(loss, aux)`; a canary row then returns
            the aux of `loss` on that row's copied fields.

        **Returns:**

        A [`dp.CanaryLoss`][eqx_micro.dp.CanaryLoss], called like `loss`.

        !!! example

            ```python
            import jax
            import jax.numpy as jnp
            import eqx_micro.dp as dp

            loss = lambda w, batch, key: jnp.sum(w * batch["x"][0]) ** 2
            w = jnp.ones(3)
            canaries = dp.GradientCanaries(2, w, l2_norm=5.0, key=jax.random.key(0))
            wrapped = canaries.wrap_loss(loss)
            row = {"x": jnp.ones((1, 3)), "canary_index": jnp.array([1])}
            grad = jax.grad(wrapped)(w, row, None)
            assert jnp.allclose(grad, 5.0 * canaries.direction(1, w))
            real = {"x": jnp.ones((1, 3)), "canary_index": jnp.array([-1])}
            assert jnp.allclose(jax.grad(wrapped)(w, real, None), 6.0)
            ```
        """
        check_callable(loss, "loss", "GradientCanaries.wrap_loss")
        check_bool(has_aux, "has_aux", "GradientCanaries.wrap_loss")
        return CanaryLoss(canaries=self, loss=loss, has_aux=has_aux)

    def insert(self, data: Mapping[str, Any]) -> dict[str, Any]:
        """The data with one row per included canary appended, and the marker field.

        A canary row's other fields are copies of row 0: the wrapped loss ignores them
        (but still evaluates `loss` on them, so they must be valid input).

        **Arguments:**

        - `data`: a dict of arrays (NumPy or JAX) with the examples along axis 0,
            without a field named `marker`.

        **Returns:**

        A new dict: every array with the canary rows appended, and
        `data[marker]`, int32, `-1` for the real rows and the canary's index for the
        others. NumPy arrays stay NumPy.

        !!! example

            ```python
            import jax
            import numpy as np
            import eqx_micro.dp as dp

            params = {"w": np.zeros(8, np.float32)}
            canaries = dp.GradientCanaries(6, params, l2_norm=1.0, key=jax.random.key(0))
            data = canaries.insert({"x": np.arange(3.0)})
            included = np.flatnonzero(canaries.included)
            assert data["canary_index"].tolist() == [-1, -1, -1, *included]
            assert data["x"][3:].tolist() == [0.0] * included.size  # copies of row 0
            ```
        """
        owner = "GradientCanaries.insert"
        data, num_real = _check_data(owner, data)
        if self.marker in data:
            raise ValueError(
                f"`{owner}` got `data` that already has a field `{self.marker!r}` (the "
                "marker it adds): the canaries were inserted already, or the name is "
                "taken. Insert into the original data, or make the canaries with another "
                "`marker=`."
            )
        included = np.flatnonzero(np.asarray(self.included)).astype(np.int32)
        if num_real == 0:
            raise ValueError(
                f"`{owner}` needs at least one real row to copy the canary rows' other "
                "fields from; `data` has none."
            )

        def append(leaf: Any) -> Any:
            if not eqx.is_array(leaf):
                return leaf
            copies = jnp.repeat(jnp.asarray(leaf[:1]), included.size, axis=0)
            return _append_rows(leaf, copies)

        out = jtu.tree_map(append, data)
        out[self.marker] = np.concatenate([np.full(num_real, -1, np.int32), included])
        return out

    def scores(
        self, initial_model: PyTree, final_model: PyTree
    ) -> tuple[Float64[np.ndarray, " num_in"], Float64[np.ndarray, " num_out"]]:
        """The update down each canary's gradient: `<initial - final, u_i>`.

        **Arguments:**

        - `initial_model`: the model before training (the one the canaries were made
            for).
        - `final_model`: the trained model.

        **Returns:**

        `(in_scores, out_scores)`: float64 NumPy arrays, the scores of the included
        and of the held-out canaries, for [`dp.audit`][eqx_micro.dp.audit].

        !!! example

            ```python
            import jax
            import jax.numpy as jnp
            import eqx_micro.dp as dp

            params = jnp.zeros(100)
            canaries = dp.GradientCanaries(4, params, l2_norm=1.0, key=jax.random.key(0))
            # A step down canary 0's direction only.
            trained = params - 0.5 * canaries.direction(0, params)
            in_scores, out_scores = canaries.scores(params, trained)
            scores = jnp.concatenate([in_scores, out_scores])
            assert jnp.isclose(jnp.max(scores), 0.5)
            ```
        """
        owner = "GradientCanaries.scores"
        before = self._parameters(initial_model, owner, "initial_model")
        after = self._parameters(final_model, owner, "final_model")
        update = [jnp.asarray(a) - jnp.asarray(b) for a, b in zip(before, after)]
        projections = np.asarray(
            _projections(self.key, update, self.num_canaries), np.float64
        )
        included = np.asarray(self.included)
        return projections[included], projections[~included]


class CanaryLoss(eqx.Module):
    """A per-example loss with gradient canaries, from `GradientCanaries.wrap_loss`.

    Called as `loss(model, batch, key)` on one example: where `batch[marker]` is a
    canary index (`>= 0`), it returns the canary's linear loss
    (`GradientCanaries.canary_value`), elsewhere the wrapped `loss` on the batch
    without the marker field. The two are selected with `jnp.where`, so each row's
    gradient is exactly one of the two.

    **Fields:**

    - `canaries`: the [`dp.GradientCanaries`][eqx_micro.dp.GradientCanaries].
    - `loss`: the wrapped loss.
    - `has_aux`: whether `loss` returns `(loss, aux)`.

    !!! example

        ```python
        import jax
        import jax.numpy as jnp
        import eqx_micro.dp as dp

        loss = lambda w, batch, key: jnp.sum(w * batch["x"][0])
        w = jnp.zeros(16)
        canaries = dp.GradientCanaries(8, w, l2_norm=3.0, key=jax.random.key(0))
        wrapped = canaries.wrap_loss(loss)
        assert isinstance(wrapped, dp.CanaryLoss)
        # Two rows, a real one and canary 2, clipped to norm 1 and summed.
        batch = {"x": jnp.ones((2, 16)), "canary_index": jnp.array([-1, 2])}
        grads, _ = dp.clipped_grad(wrapped, 1.0, key_argnum=2)(w, batch, jax.random.key(0))
        expected = jnp.ones(16) / 4.0 + canaries.direction(2, w)
        assert jnp.allclose(grads, expected, atol=1e-6)
        ```
    """

    canaries: GradientCanaries
    loss: Callable
    has_aux: bool = eqx.field(static=True)

    def __call__(self, model: PyTree, batch: Mapping[str, Any], key: Any) -> Any:
        marker = self.canaries.marker
        if not isinstance(batch, Mapping) or marker not in batch:
            raise TypeError(
                f"A loss wrapped by `GradientCanaries.wrap_loss` needs a dict batch with "
                f"the field `{marker!r}`; make the training data with "
                "`canaries.insert(data)`."
            )
        index = jnp.asarray(batch[marker])
        if index.size != 1:
            raise ValueError(
                f"A loss wrapped by `GradientCanaries.wrap_loss` sees one example at a "
                f"time, but `batch[{marker!r}]` has shape {index.shape}. Gradient "
                "canaries are example-level: build the clipped gradient with "
                "`keep_batch_dim=True` (the default)."
            )
        index = jnp.reshape(index, ())
        rest = {name: value for name, value in batch.items() if name != marker}
        out = self.loss(model, rest, key)
        real, aux = out if self.has_aux else (out, None)
        real = jnp.asarray(real)
        canary = self.canaries.canary_value(model, jnp.maximum(index, 0))
        value = jnp.where(index >= 0, canary.astype(real.dtype), real)
        return (value, aux) if self.has_aux else value


class InputCanaries(eqx.Module):
    """Black-box canaries: extra training examples, scored by the trained model's loss.

    `examples` holds `m` canary examples (e.g. mislabeled copies of real ones, from
    `InputCanaries.mislabeled`); each is included independently with probability 1/2.
    `insert(data)` appends the included ones; after training, `scores(model, loss)`
    scores every canary by minus its loss under the trained model (an included canary
    was fitted, so its loss tends to be lower). This is what an attacker who sees only
    the final model can do: much weaker than gradient canaries, which see the whole
    update.

    **Arguments:**

    - `examples`: a dict of arrays with the canaries along axis 0, with the fields of
        the training data.
    - `key`: a PRNG key for the in/out draw.

    !!! example

        ```python
        import jax
        import numpy as np
        import eqx_micro.dp as dp

        examples = {"x": np.ones((20, 2), np.float32), "label": np.zeros(20, np.int32)}
        canaries = dp.InputCanaries(examples, key=jax.random.key(0))
        data = {"x": np.zeros((5, 2), np.float32), "label": np.ones(5, np.int32)}
        data = canaries.insert(data)
        assert len(data["label"]) == 5 + int(canaries.included.sum())
        ```
    """

    examples: dict[str, Any]
    included: Bool[Array, " canaries"]
    num_canaries: int = eqx.field(static=True)

    def __init__(self, examples: Mapping[str, Any], *, key: PRNGKeyArray):
        self.examples, self.num_canaries = _check_data("InputCanaries", examples)
        if self.num_canaries == 0:
            raise ValueError("`InputCanaries` needs at least one canary example, got none.")
        check_key(key, "key", "InputCanaries")
        self.included = jax.random.bernoulli(key, 0.5, (self.num_canaries,))

    @classmethod
    def mislabeled(
        cls,
        num_canaries: int,
        data: Mapping[str, Any],
        *,
        num_classes: int,
        key: PRNGKeyArray,
        label_field: str = "label",
    ) -> "InputCanaries":
        """Canaries that are copies of random real examples with a wrong label.

        A wrong label is the one thing a model can learn about such an example only by
        training on it, which makes its loss a membership signal.

        **Arguments:**

        - `num_canaries`: the number of canaries, a positive int.
        - `data`: the real training data (a dict of arrays, examples along axis 0).
        - `num_classes`: the number of classes, at least 2; labels are in
            `[0, num_classes)`.
        - `key`: a PRNG key for the examples, the labels and the in/out draw.
        - `label_field`: the integer field of `data` holding the labels.

        **Returns:**

        An `InputCanaries` whose canary `i` is a copy of a random real example with
        its label replaced by a uniformly random different one.

        !!! example

            ```python
            import jax
            import numpy as np
            import eqx_micro.dp as dp

            data = {"x": np.arange(10.0), "label": np.arange(10) % 3}
            canaries = dp.InputCanaries.mislabeled(
                50, data, num_classes=3, key=jax.random.key(0)
            )
            source = canaries.examples["x"].astype(int)  # which example was copied
            assert (canaries.examples["label"] != data["label"][source]).all()
            ```
        """
        owner = "InputCanaries.mislabeled"
        num_canaries = check_positive_int(num_canaries, "num_canaries", owner)
        data, num_real = _check_data(owner, data)
        if isinstance(num_classes, bool) or not isinstance(num_classes, int):
            raise TypeError(
                f"`{owner}` needs `num_classes` to be an int, got {num_classes!r}."
            )
        if num_classes < 2:
            raise ValueError(
                f"`{owner}` got `num_classes={num_classes}`; a wrong label needs at "
                "least 2 classes."
            )
        if label_field not in data:
            raise ValueError(
                f"`{owner}` found no field `{label_field!r}` in `data` (fields: "
                f"{sorted(data)}); pass the labels' field as `label_field=`."
            )
        labels = data[label_field]
        if not (eqx.is_array(labels) and jnp.issubdtype(labels.dtype, jnp.integer)):
            raise TypeError(
                f"`{owner}` needs `data[{label_field!r}]` to be an integer array of "
                f"class labels, got {labels!r:.80}."
            )
        check_key(key, "key", owner)
        pick_key, label_key, assignment_key = jax.random.split(key, 3)
        if num_real == 0:
            raise ValueError(f"`{owner}` needs at least one real example to copy.")
        source = np.asarray(jax.random.randint(pick_key, (num_canaries,), 0, num_real))
        examples = jtu.tree_map(lambda x: x[source] if eqx.is_array(x) else x, data)
        true = np.asarray(labels)[source]
        shift = np.asarray(jax.random.randint(label_key, true.shape, 1, num_classes))
        wrong = ((true + shift) % num_classes).astype(true.dtype)
        examples[label_field] = (
            wrong if isinstance(labels, np.ndarray) else jnp.asarray(wrong)
        )
        return cls(examples, key=assignment_key)

    def insert(self, data: Mapping[str, Any]) -> dict[str, Any]:
        """The data with the included canaries appended.

        Insert input canaries before gradient canaries: those add a marker field the
        canary examples do not have.

        **Arguments:**

        - `data`: a dict of arrays with the fields of `examples`.

        **Returns:**

        A new dict with the included canaries appended to every array (NumPy stays
        NumPy).

        !!! example

            ```python
            import jax
            import numpy as np
            import eqx_micro.dp as dp

            canaries = dp.InputCanaries({"x": np.arange(4.0)}, key=jax.random.key(1))
            data = canaries.insert({"x": np.full(2, -1.0)})
            expected = [-1.0, -1.0, *np.flatnonzero(canaries.included)]
            assert data["x"].tolist() == expected
            ```
        """
        owner = "InputCanaries.insert"
        data, _ = _check_data(owner, data)
        if jtu.tree_structure(data) != jtu.tree_structure(self.examples):
            raise ValueError(
                f"`{owner}` needs `data` with the fields of the canary examples "
                f"({sorted(self.examples)}), got {sorted(data)}. If gradient canaries "
                "added their marker field already, insert the input canaries first."
            )
        included = np.flatnonzero(np.asarray(self.included))

        def append(leaf: Any, canary: Any) -> Any:
            if not eqx.is_array(leaf):
                return leaf
            if np.shape(leaf)[1:] != np.shape(canary)[1:]:
                raise ValueError(
                    f"`{owner}` got a data array of example shape {np.shape(leaf)[1:]} "
                    f"where the canaries have {np.shape(canary)[1:]}."
                )
            return _append_rows(leaf, canary[included])

        return jtu.tree_map(append, data, self.examples)

    def scores(
        self,
        model: PyTree,
        loss: Callable,
        *,
        key: PRNGKeyArray | None = None,
        has_aux: bool = False,
    ) -> tuple[Float64[np.ndarray, " num_in"], Float64[np.ndarray, " num_out"]]:
        """Minus each canary's loss under the trained model.

        **Arguments:**

        - `model`: the trained model.
        - `loss`: the per-example loss `loss(model, batch, key)` (a batch axis of size
            1), as trained with.
        - `key`: the loss's PRNG key (canary `i` gets `fold_in(key, i)`); by default
            `jax.random.key(0)`.
        - `has_aux`: whether `loss` returns `(loss, aux)`.

        **Returns:**

        `(in_scores, out_scores)`: float64 NumPy arrays for the included and the
        held-out canaries.

        !!! example

            ```python
            import jax
            import jax.numpy as jnp
            import numpy as np
            import eqx_micro.dp as dp

            loss = lambda w, batch, key: jnp.mean((batch["x"] * w - 1.0) ** 2)
            examples = {"x": np.ones(10, np.float32)}
            canaries = dp.InputCanaries(examples, key=jax.random.key(0))
            in_scores, out_scores = canaries.scores(jnp.float32(0.5), loss)
            assert np.allclose(np.concatenate([in_scores, out_scores]), -0.25)
            ```
        """
        owner = "InputCanaries.scores"
        check_callable(loss, "loss", owner)
        check_bool(has_aux, "has_aux", owner)
        if key is None:
            key = jax.random.key(0)
        check_key(key, "key", owner)
        values = _canary_losses(model, loss, self.examples, key, has_aux)
        scores = -np.asarray(values, np.float64)
        included = np.asarray(self.included)
        return scores[included], scores[~included]


@eqx.filter_jit
def _canary_losses(
    model: PyTree, loss: Callable, examples: dict, key: PRNGKeyArray, has_aux: bool
) -> Float[Array, " canaries"]:
    arrays, static = eqx.partition(examples, eqx.is_array)
    num = jtu.tree_leaves(arrays)[0].shape[0]

    def one(index_and_row: tuple[Array, PyTree]) -> Array:
        index, row = index_and_row
        # The batch axis of size 1 the trainer's per-example loss sees.
        batch = eqx.combine(jtu.tree_map(lambda x: x[None], row), static)
        out = loss(model, batch, jax.random.fold_in(key, index))
        value = out[0] if has_aux else out
        return jnp.asarray(value, jnp.float32)

    rows = (jnp.arange(num), jtu.tree_map(jnp.asarray, arrays))
    return jax.lax.map(one, rows, batch_size=min(num, 256))


class AuditMethod(enum.Enum):
    """Which one-run bound `dp.audit` computes from the canaries' scores.

    - `ONE_RUN`: `CanaryScoreAuditor.epsilon_one_run` (Steinke, Nasr and Jagielski,
        2023): assumes nothing about the mechanism.
    - `ONE_RUN_FDP`: `CanaryScoreAuditor.epsilon_one_run_fdp` (Mahloujifar, Melis and
        Chaudhuri, 2024): tests the Gaussian trade-off curve tight at the claim, as for
        DP-SGD; tighter, but it refutes that curve, not every (ε, δ)-DP mechanism.

    !!! example

        ```python
        import numpy as np
        import eqx_micro.dp as dp

        rng = np.random.default_rng(0)
        in_scores, out_scores = rng.normal(3, 1, 500), rng.normal(0, 1, 500)
        kw = dict(epsilon=8.0, delta=1e-5)
        one_run = dp.audit(in_scores, out_scores, **kw)
        fdp = dp.audit(in_scores, out_scores, method=dp.AuditMethod.ONE_RUN_FDP, **kw)
        assert fdp.epsilon_lower_bound > one_run.epsilon_lower_bound
        ```
    """

    ONE_RUN = "one run"
    ONE_RUN_FDP = "one run, f-DP"


class AuditReport(eqx.Module):
    """The outcome of an audit: the claimed epsilon and the lower bound found.

    **Fields:**

    - `claimed_epsilon`: the epsilon the training claims (e.g. its
        `dp.PrivacyReport.epsilon`), at `delta`.
    - `delta`: the delta of the claim, also used by the bound.
    - `epsilon_lower_bound`: the largest epsilon the scores refute: with probability at
        least `1 - significance`, the mechanism as it ran is not (ε', δ)-DP for any
        ε' below it.
    - `significance`: the allowed probability that the bound is wrong.
    - `method`: the [`dp.AuditMethod`][eqx_micro.dp.AuditMethod] used.
    - `num_in`, `num_out`: the numbers of included and held-out canaries.
    - `label`: a name for tables and plots (e.g. "gradient canaries").

    !!! example

        ```python
        import eqx_micro.dp as dp

        report = dp.AuditReport(
            claimed_epsilon=8.0, delta=1e-5, epsilon_lower_bound=1.9,
            significance=0.05, method=dp.AuditMethod.ONE_RUN, num_in=500, num_out=500,
        )
        assert not report.refutes_claim and report.num_canaries == 1000
        ```
    """

    claimed_epsilon: float
    delta: float
    epsilon_lower_bound: float
    significance: float
    method: AuditMethod = eqx.field(static=True)
    num_in: int
    num_out: int
    label: str = eqx.field(static=True, default="")

    @property
    def num_canaries(self) -> int:
        """`num_in + num_out`.

        !!! example

            ```python
            import eqx_micro.dp as dp

            report = dp.audit([2.0, 3.0], [0.0], epsilon=1.0, delta=1e-5)
            assert report.num_canaries == 3
            ```
        """
        return self.num_in + self.num_out

    @property
    def refutes_claim(self) -> bool:
        """Whether the lower bound exceeds the claimed epsilon: evidence of a bug.

        !!! example

            ```python
            import numpy as np
            import eqx_micro.dp as dp

            rng = np.random.default_rng(0)
            in_scores, out_scores = rng.normal(10, 1, 1000), rng.normal(0, 1, 1000)
            assert dp.audit(in_scores, out_scores, epsilon=1.0, delta=1e-5).refutes_claim
            ```
        """
        return self.epsilon_lower_bound > self.claimed_epsilon

    def plot(self, path: str | os.PathLike, others: Sequence["AuditReport"] = ()) -> None:
        """Draws the lower bound against the claimed epsilon, for this and `others`.

        A point above the diagonal refutes its claim. Needs matplotlib (drawn with its
        Agg canvas, without `pyplot`: the global backend is left alone).

        **Arguments:**

        - `path`: where to save the figure (the format from its suffix, e.g. `.png`).
        - `others`: more reports to draw on the same axes (e.g. other epsilons); each
            `label` gets a color.

        !!! example

            ```python
            import pathlib
            import tempfile
            import eqx_micro.dp as dp

            report = dp.audit([2.0, 3.0, 4.0], [0.0, 1.0], epsilon=1.0, delta=1e-5)
            with tempfile.TemporaryDirectory() as tmp:
                path = pathlib.Path(tmp) / "audit.png"
                report.plot(path)
                assert path.stat().st_size > 0
            ```
        """
        try:
            from matplotlib.figure import Figure
        except ImportError as error:
            raise ImportError(
                "`AuditReport.plot` needs matplotlib: `pip install matplotlib` (or "
                "this package's `examples` extra)."
            ) from error
        reports = [self, *others]
        for report in reports:
            if not isinstance(report, AuditReport):
                raise TypeError(
                    "`AuditReport.plot` needs `others` to hold `dp.AuditReport`s, got "
                    f"{type(report).__name__}."
                )
        figure = Figure(figsize=(5, 4))
        ax = figure.subplots()
        top = max(max(r.claimed_epsilon, r.epsilon_lower_bound) for r in reports) * 1.1
        top = top or 1.0
        ax.plot([0, top], [0, top], "--", color="gray", label="lower bound = claim")
        labels = list(dict.fromkeys(r.label for r in reports))
        for color, label in enumerate(labels):
            group = [r for r in reports if r.label == label]
            ax.plot(
                [r.claimed_epsilon for r in group],
                [r.epsilon_lower_bound for r in group],
                "o-",
                color=f"C{color}",
                label=label or "audit",
            )
        ax.set_xlim(0, top)
        ax.set_ylim(0, top)
        ax.set_xlabel(f"claimed epsilon (delta = {self.delta:g})")
        confidence = 1 - self.significance
        ax.set_ylabel(f"empirical lower bound ({confidence:.0%} confidence)")
        ax.set_title(f"Privacy audit ({self.method.value})", fontsize=10)
        ax.legend(loc="upper left", fontsize=8)
        figure.tight_layout()
        figure.savefig(path, dpi=100)


def audit(
    in_scores: Real[ArrayLike, " num_in"] | Sequence[float | int],
    out_scores: Real[ArrayLike, " num_out"] | Sequence[float | int],
    *,
    epsilon: float | int,
    delta: float | int,
    significance: float = 0.05,
    method: AuditMethod = AuditMethod.ONE_RUN,
    label: str = "",
) -> AuditReport:
    """Audits a claim of (epsilon, delta)-DP from one run's canary scores.

    The scores are those of canaries each included in the one training run
    independently with probability 1/2 (as `GradientCanaries` and `InputCanaries`
    draw them); a score is higher for canaries the attack believes were included. The
    lower bound is [`dp.CanaryScoreAuditor`][eqx_micro.dp.CanaryScoreAuditor]'s one-run
    bound at `significance`, thresholds corrected by Bonferroni.

    **Arguments:**

    - `in_scores`, `out_scores`: 1-D arrays of the included and held-out canaries'
        scores.
    - `epsilon`: the claimed epsilon, finite and non-negative (e.g.
        `report.epsilon` of the training run).
    - `delta`: the claim's delta, in `(0, 1]`.
    - `significance`: in `(0, 1)`, the allowed probability that the bound is wrong.
    - `method`: a [`dp.AuditMethod`][eqx_micro.dp.AuditMethod].
    - `label`: a name carried by the report.

    **Returns:**

    A [`dp.AuditReport`][eqx_micro.dp.AuditReport].

    !!! example

        ```python
        import numpy as np
        import eqx_micro.dp as dp

        rng = np.random.default_rng(0)
        report = dp.audit(rng.normal(3, 1, 1000), rng.normal(0, 1, 1000),
                          epsilon=8.0, delta=1e-5)
        assert 3 < report.epsilon_lower_bound < 8 and not report.refutes_claim
        ```
    """
    hint = "the epsilon the training claims, e.g. `report.epsilon` of its run"
    claimed = _check_real("audit", "epsilon", epsilon, positive=False, hint=hint)
    if not isinstance(method, AuditMethod):
        raise TypeError(
            f"`audit` needs `method` to be a `dp.AuditMethod`, got {method!r}; e.g. "
            "`method=dp.AuditMethod.ONE_RUN`."
        )
    if not isinstance(label, str):
        raise TypeError(f"`audit` needs `label` to be a str, got {label!r}.")
    auditor = CanaryScoreAuditor(in_scores, out_scores)
    if method is AuditMethod.ONE_RUN:
        bound = auditor.epsilon_one_run(significance, delta)
    else:
        bound = auditor.epsilon_one_run_fdp(significance, delta)
    return AuditReport(
        claimed_epsilon=claimed,
        delta=float(delta),
        epsilon_lower_bound=float(bound),
        significance=float(significance),
        method=method,
        num_in=int(auditor.in_canary_scores.size),
        num_out=int(auditor.out_canary_scores.size),
        label=label,
    )
