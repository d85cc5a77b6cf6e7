"""`dp.ghost_clipped_grad`: exact agreement with `dp.clipped_grad` (the `vmap(grad)`
path) on per-example norms, clipped sums, values and sensitivity, for every supported
layer, and the fallback path."""

import math

import equinox as eqx
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import optax
import pytest
from hypothesis import given, settings

import eqx_micro.dp as dp


RTOL, ATOL = 2e-5, 1e-6


def assert_close(actual, expected, rtol=RTOL, atol=ATOL):
    actual_arrays = eqx.filter(actual, eqx.is_array)
    expected_arrays = eqx.filter(expected, eqx.is_array)
    assert jtu.tree_structure(actual_arrays) == jtu.tree_structure(expected_arrays)
    for a, e in zip(jtu.tree_leaves(actual_arrays), jtu.tree_leaves(expected_arrays)):
        assert a.shape == e.shape and a.dtype == e.dtype, (a.shape, e.shape)
        np.testing.assert_allclose(
            np.asarray(a, np.float32), np.asarray(e, np.float32), rtol=rtol, atol=atol
        )


def compare(
    loss, args, clip=0.7, *, fallback_ok=False, method=dp.GhostMethod.BOOK_KEEPING, **kwargs
):
    """Ghost vs `clipped_grad` with the same arguments; returns the ghost callable."""
    kwargs.setdefault("return_values", True)
    kwargs.setdefault("return_grad_norms", True)
    call_kwargs = {}
    if "is_padding_example" in kwargs:
        call_kwargs["is_padding_example"] = kwargs.pop("is_padding_example")
    tol = {k: kwargs.pop(k) for k in ("rtol", "atol") if k in kwargs}
    ghost = dp.ghost_clipped_grad(loss, clip, method=method, **kwargs)
    exact = dp.clipped_grad(loss, clip, **kwargs)
    if not fallback_ok:
        described = ghost.describe(*args)
        assert not any(v.startswith("fallback") for v in described.values()), described
    got, got_aux = eqx.filter_jit(ghost)(*args, **call_kwargs)
    want, want_aux = eqx.filter_jit(exact)(*args, **call_kwargs)
    assert_close(got, want, **tol)
    assert_close(got_aux.grad_norms, want_aux.grad_norms, **tol)
    assert_close(got_aux.values, want_aux.values, **tol)
    assert int(got_aux.num_nonfinite) == int(want_aux.num_nonfinite)
    assert ghost.sensitivity() == exact.sensitivity()
    return ghost


def cross_entropy(model, x, y):
    logits = jax.vmap(model)(x)
    return jnp.mean(-jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1))


def mlp_batch(batch=12, d=6, key=1):
    x = jax.random.normal(jax.random.key(key), (batch, d))
    return x, jnp.arange(batch) % 3


MLP = eqx.nn.MLP(6, 3, 8, 2, activation=jax.nn.relu, key=jax.random.key(0))


# --------------------------------------------------------------------------------------
# Models.


class ConvZoo(eqx.Module):
    """Conv1d, Conv2d (grouped, strided, dilated, padded) and Conv3d, a GroupNorm."""

    c1: eqx.nn.Conv1d
    c2a: eqx.nn.Conv2d
    c2b: eqx.nn.Conv2d
    c3: eqx.nn.Conv3d
    norm: eqx.nn.GroupNorm
    head: eqx.nn.Linear

    def __init__(self, key):
        k = jax.random.split(key, 5)
        self.c1 = eqx.nn.Conv1d(2, 4, 3, stride=2, padding=1, key=k[0])
        self.c2a = eqx.nn.Conv2d(3, 6, 3, stride=2, padding=1, groups=3, key=k[1])
        self.c2b = eqx.nn.Conv2d(
            6, 4, (2, 3), padding=((0, 1), (1, 1)), dilation=(2, 1), key=k[2]
        )
        self.c3 = eqx.nn.Conv3d(2, 3, 2, stride=(1, 2, 1), use_bias=False, key=k[3])
        self.norm = eqx.nn.GroupNorm(2, 4)
        self.head = eqx.nn.Linear(4 + 4 + 3, 3, key=k[4])

    def __call__(self, x1, x2, x3):
        h1 = jnp.mean(jnp.tanh(self.c1(x1)), axis=1)
        h2 = self.norm(jax.nn.relu(self.c2b(jnp.tanh(self.c2a(x2)))))
        h3 = jnp.mean(jnp.tanh(self.c3(x3)), axis=(1, 2, 3))
        return self.head(jnp.concatenate([h1, jnp.mean(h2, axis=(1, 2)), h3]))


def conv_loss(model, batch, y):
    logits = jax.vmap(model)(batch["x1"], batch["x2"], batch["x3"])
    return jnp.mean(-jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1))


def conv_batch(batch=6):
    k = jax.random.split(jax.random.key(3), 3)
    return {
        "x1": jax.random.normal(k[0], (batch, 2, 9)),
        "x2": jax.random.normal(k[1], (batch, 3, 8, 7)),
        "x3": jax.random.normal(k[2], (batch, 2, 3, 5, 4)),
    }, jnp.arange(batch) % 3


class SequenceModel(eqx.Module):
    """Embedding, a Linear over the sequence, RMSNorm, mean pooling, a head."""

    embed: eqx.nn.Embedding
    mix: eqx.nn.Linear
    norm: eqx.nn.RMSNorm
    head: eqx.nn.Linear

    def __init__(self, key, vocab=11, width=8):
        k = jax.random.split(key, 3)
        self.embed = eqx.nn.Embedding(vocab, width, key=k[0])
        self.mix = eqx.nn.Linear(width, width, key=k[1])
        self.norm = eqx.nn.RMSNorm(width)
        self.head = eqx.nn.Linear(width, 1, key=k[2])

    def __call__(self, tokens):
        h = jax.vmap(self.embed)(tokens)
        h = jax.vmap(self.norm)(jnp.tanh(jax.vmap(self.mix)(h)))
        return self.head(jnp.mean(h, axis=0))[0]


def regression(model, tokens, y):
    return jnp.mean((jax.vmap(model)(tokens) - y) ** 2)


def token_batch(batch=8, length=7, vocab=11):
    # Few distinct tokens, so lookups collide within a sequence.
    tokens = jax.random.randint(jax.random.key(4), (batch, length), 0, vocab // 2)
    return tokens, jax.random.normal(jax.random.key(5), (batch,))


class Block(eqx.Module):
    """A pre-norm transformer block: attention, MLP, learned positions."""

    pos: jax.Array
    norm1: eqx.nn.LayerNorm
    attn: eqx.nn.MultiheadAttention
    norm2: eqx.nn.LayerNorm
    up: eqx.nn.Linear
    down: eqx.nn.Linear
    head: eqx.nn.Linear

    def __init__(self, key, length=5, width=8):
        k = jax.random.split(key, 5)
        self.pos = 0.1 * jax.random.normal(k[0], (length, width))
        self.norm1 = eqx.nn.LayerNorm(width)
        self.attn = eqx.nn.MultiheadAttention(2, width, use_output_bias=True, key=k[1])
        self.norm2 = eqx.nn.LayerNorm(width)
        self.up = eqx.nn.Linear(width, 2 * width, key=k[2])
        self.down = eqx.nn.Linear(2 * width, width, key=k[3])
        self.head = eqx.nn.Linear(width, 2, key=k[4])

    def __call__(self, x):
        x = x + self.pos
        h = jax.vmap(self.norm1)(x)
        x = x + self.attn(h, h, h)
        h = jax.vmap(self.norm2)(x)
        x = x + jax.vmap(self.down)(jax.nn.gelu(jax.vmap(self.up)(h)))
        return self.head(jnp.mean(x, axis=0))


def block_batch(batch=6, length=5, width=8):
    x = jax.random.normal(jax.random.key(6), (batch, length, width))
    return x, jnp.arange(batch) % 2


# --------------------------------------------------------------------------------------
# Exact agreement, layer by layer.


def test_mlp_matches_clipped_grad():
    x, y = mlp_batch()
    ghost = compare(cross_entropy, (MLP, x, y), batch_argnums=(1, 2))
    assert set(ghost.describe(MLP, x, y).values()) == {"dot (gram)", "elementwise"}


@pytest.mark.parametrize("method", list(dp.GhostMethod))
def test_cnn_matches_clipped_grad(method):
    model = ConvZoo(jax.random.key(2))
    batch, y = conv_batch()
    ghost = compare(conv_loss, (model, batch, y), 0.5, batch_argnums=(1, 2), method=method)
    described = ghost.describe(model, batch, y)
    assert {described[f"model.{c}.weight"].split()[0] for c in ("c1", "c2a", "c3")} == {
        "conv"
    }
    assert described["model.norm.weight"] == "elementwise"


def test_embedding_sequence_model_matches_clipped_grad():
    model = SequenceModel(jax.random.key(7))
    tokens, y = token_batch()
    ghost = compare(regression, (model, tokens, y), 0.3, batch_argnums=(1, 2))
    described = ghost.describe(model, tokens, y)
    assert described["model.embed.weight"] == "gather"
    assert described["model.mix.weight"].startswith("dot")
    assert described["model.norm.weight"] == "elementwise"


@pytest.mark.parametrize("method", list(dp.GhostMethod))
def test_transformer_block_matches_clipped_grad(method):
    model = Block(jax.random.key(8))
    x, y = block_batch()
    ghost = compare(cross_entropy, (model, x, y), 0.4, batch_argnums=(1, 2), method=method)
    described = ghost.describe(model, x, y)
    assert described["model.attn.query_proj.weight"].startswith("dot")
    assert described["model.pos"] == "elementwise"


def test_wide_transformer_block_under_jit():
    """Regression: at these widths XLA:CPU once fused the norms into the backward
    pass wrongly under `jit` (the MLP's `down` weight norms were 90% off)."""
    model = Block(jax.random.key(0), length=32, width=64)
    x = jax.random.normal(jax.random.key(1), (4, 32, 64))
    y = jnp.arange(4) % 2
    clip = jtu.tree_map(lambda _: 1e6, eqx.filter(model, eqx.is_inexact_array))
    compare(cross_entropy, (model, x, y), clip, batch_argnums=(1, 2))


def test_per_layer_clip_norms():
    params = {
        "a": eqx.nn.Linear(6, 5, key=jax.random.key(0)),
        "b": eqx.nn.Linear(5, 3, key=jax.random.key(1)),
    }

    def loss(p, x, y):
        return cross_entropy(lambda v: p["b"](jnp.tanh(p["a"](v))), x, y)

    x, y = mlp_batch()
    clip = {"a": 0.2, "b": 0.5}
    ghost = compare(loss, (params, x, y), clip, batch_argnums=(1, 2))
    assert ghost.l2_norm_bound == pytest.approx(math.sqrt(0.2**2 + 0.5**2))
    # Per-weight-matrix groups: a deeper prefix.
    leaf_clip = {"a": eqx.nn.Linear(6, 5, key=jax.random.key(0)), "b": 0.4}
    leaf_clip["a"] = jtu.tree_map(lambda _: 0.3, eqx.filter(params["a"], eqx.is_array))
    compare(loss, (params, x, y), leaf_clip, batch_argnums=(1, 2))


# --------------------------------------------------------------------------------------
# Padding, empty batches, non-finite examples, normalization, precision.


def test_padding_contributes_nothing_even_when_nan():
    x, y = mlp_batch()
    pad = jnp.arange(12) >= 9
    x = jnp.where(pad[:, None], jnp.nan, x)
    for method in dp.GhostMethod:
        compare(
            cross_entropy,
            (MLP, x, y),
            batch_argnums=(1, 2),
            is_padding_example=pad,
            method=method,
            normalize_by=7,
        )


def test_empty_batch_gives_zeros():
    x, y = mlp_batch(batch=0)
    ghost = dp.ghost_clipped_grad(cross_entropy, 1.0, batch_argnums=(1, 2))
    total, aux = ghost(MLP, x, y)
    assert all(float(jnp.abs(g).max()) == 0 for g in jtu.tree_leaves(total))
    assert int(aux.num_nonfinite) == 0
    compare(cross_entropy, (MLP, x, y), batch_argnums=(1, 2))


@pytest.mark.parametrize("method", list(dp.GhostMethod))
def test_nan_example_is_dropped_and_counted(method):
    x, y = mlp_batch()
    x = x.at[4, 2].set(jnp.nan)
    ghost = compare(cross_entropy, (MLP, x, y), batch_argnums=(1, 2), method=method)
    total, aux = ghost(MLP, x, y)
    assert int(aux.num_nonfinite) == 1
    assert all(bool(jnp.isfinite(g).all()) for g in jtu.tree_leaves(total))


def test_rescale_and_normalize_by():
    x, y = mlp_batch()
    compare(
        cross_entropy,
        (MLP, x, y),
        0.05,
        batch_argnums=(1, 2),
        normalize_by=12,
        rescale_to_unit_norm=True,
    )


def test_mixed_precision_bfloat16_parameters():
    model = jtu.tree_map(
        lambda p: p.astype(jnp.bfloat16) if eqx.is_inexact_array(p) else p, MLP
    )
    x, y = mlp_batch()
    x = x.astype(jnp.bfloat16)

    def loss(m, x, y):
        return cross_entropy(m, x, y).astype(jnp.float32)

    compare(
        loss,
        (model, x, y),
        0.5,
        batch_argnums=(1, 2),
        dtype=jnp.float32,
        rtol=3e-2,
        atol=3e-3,
    )


def test_has_aux_and_user_level():
    x, y = mlp_batch()

    def loss(model, x, y):
        logits = jax.vmap(model)(x)
        value = jnp.mean(-jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], 1))
        return value, {"logits": logits, "name": "aux"}

    ghost = compare(loss, (MLP, x, y), batch_argnums=(1, 2), has_aux=True)
    _, aux = ghost(MLP, x, y)
    assert aux.aux["logits"].shape == (12, 3) and aux.aux["name"] == "aux"
    # keep_batch_dim=False: a row is a user's 3 examples, clipped together.
    grouped = (x.reshape(4, 3, 6), y.reshape(4, 3))
    ghost = compare(
        cross_entropy, (MLP, *grouped), batch_argnums=(1, 2), keep_batch_dim=False
    )
    assert ghost.privacy_unit == "user"


# --------------------------------------------------------------------------------------
# The fallback path.


class Nonlinear(eqx.Module):
    scale: jax.Array
    linear: eqx.nn.Linear

    def __call__(self, x):
        return self.linear(x) * jnp.exp(self.scale)


class Tied(eqx.Module):
    embed: eqx.nn.Embedding

    def __call__(self, tokens):
        h = jax.vmap(self.embed)(tokens)
        logits = h @ self.embed.weight.T  # the same table as the output projection
        return jnp.mean(logits, axis=0)


def test_fallback_nonlinear_parameter_is_exact():
    model = Nonlinear(
        jnp.array([0.1, -0.2, 0.3]), eqx.nn.Linear(6, 3, key=jax.random.key(0))
    )
    x, y = mlp_batch()
    ghost = compare(cross_entropy, (model, x, y), batch_argnums=(1, 2), fallback_ok=True)
    described = ghost.describe(model, x, y)
    assert described["model.scale"].startswith("fallback")
    assert described["model.linear.weight"] == "dot (gram)"
    strict = dp.ghost_clipped_grad(
        cross_entropy, 1.0, batch_argnums=(1, 2), fallback=dp.GhostFallback.RAISE
    )
    with pytest.raises(ValueError, match=r"`model\.scale`: its use by `exp`"):
        strict(model, x, y)


def test_fallback_tied_weight_is_exact():
    model = Tied(eqx.nn.Embedding(5, 5, key=jax.random.key(0)))
    tokens = jax.random.randint(jax.random.key(1), (6, 4), 0, 5)
    y = jnp.arange(6) % 5
    ghost = compare(
        cross_entropy, (model, tokens, y), batch_argnums=(1, 2), fallback_ok=True
    )
    assert ghost.describe(model, tokens, y)["model.embed.weight"].startswith(
        "fallback: it is used more than once"
    )
    strict = dp.ghost_clipped_grad(
        cross_entropy, 1.0, batch_argnums=(1, 2), fallback=dp.GhostFallback.RAISE
    )
    with pytest.raises(ValueError, match=r"`model\.embed\.weight`: it is used more"):
        strict(model, tokens, y)


def test_bad_arguments():
    # Options are enums: a string names the member to use instead.
    with pytest.raises(TypeError, match="method"):
        dp.ghost_clipped_grad(cross_entropy, 1.0, method="ghost")
    with pytest.raises(TypeError, match="fallback"):
        dp.ghost_clipped_grad(cross_entropy, 1.0, fallback="raise")
    with pytest.raises(ValueError, match="normalize_by"):
        dp.ghost_clipped_grad(cross_entropy, 1.0, normalize_by=0)
    # The ghost method weights each example by one clip factor: refused when built.
    with pytest.raises(ValueError, match="one clip norm"):
        dp.ghost_clipped_grad(
            lambda p, x: jnp.sum(p["a"] * x + p["b"] * x),
            {"a": 1.0, "b": 1.0},
            method=dp.GhostMethod.GHOST,
        )


# --------------------------------------------------------------------------------------
# Shapes, microbatching, plans and the trainer.


@settings(max_examples=4, deadline=None)
@given(
    batch=st.integers(1, 5),
    length=st.integers(1, 4),
    d_in=st.integers(1, 5),
    d_out=st.integers(1, 5),
    clip=st.sampled_from([0.01, 0.5, 100.0]),
)
def test_linear_over_sequences_any_shape(batch, length, d_in, d_out, clip):
    linear = eqx.nn.Linear(d_in, d_out, key=jax.random.key(d_in * 7 + d_out))
    x = jax.random.normal(jax.random.key(batch + length), (batch, length, d_in))

    def loss(model, x):
        return jnp.mean(jnp.sin(jax.vmap(jax.vmap(model))(x)))

    compare(loss, (linear, x), clip)


def test_microbatching_gives_the_same_result():
    model = Block(jax.random.key(8))
    x, y = block_batch(batch=8)
    pad = jnp.arange(8) >= 6
    whole = dp.ghost_clipped_grad(
        cross_entropy, 0.4, batch_argnums=(1, 2), return_values=True
    )
    micro = dp.ghost_clipped_grad(
        cross_entropy, 0.4, batch_argnums=(1, 2), return_values=True, microbatch_size=2
    )
    a, a_aux = eqx.filter_jit(whole)(model, x, y, is_padding_example=pad)
    b, b_aux = eqx.filter_jit(micro)(model, x, y, is_padding_example=pad)
    assert_close(b, a)
    assert_close(b_aux.values, a_aux.values)


def test_plan_and_trainer_accept_it():
    """One `DPTrainer` step (through the plan's `noisy_grad`) at noise 0 equals the
    step with `clipped_grad`."""
    x, y = mlp_batch()
    batch = {"x": x[:, None], "y": y[:, None]}
    pad = jnp.arange(12) >= 10

    def loss(model, batch, key):
        jitter = 1e-3 * jax.random.normal(key, batch["x"].shape)  # per-example keys
        return cross_entropy(model, (batch["x"] + jitter)[:, 0], batch["y"][:, 0])

    config = dp.DPSGDExecutionPlanConfig(
        iterations=3, sampling_prob=0.1, noise_multiplier=0.0, noise_seed=0
    )
    results = []
    for make in (dp.ghost_clipped_grad, dp.clipped_grad):
        grad_fn = make(loss, 0.5, key_argnum=2, return_values=True)
        trainer = dp.DPTrainer(config.make(grad_fn), optax.sgd(0.1), normalize_by=10)
        state, metrics = trainer.step(trainer.init(MLP), batch, pad, jax.random.key(0))
        results.append((state.model, metrics["loss"]))
    assert_close(results[0], results[1])


def test_temp_memory_within_twice_the_plain_step():
    """Book-keeping holds the output-gradients until every norm is known, and nothing
    else: XLA's temp memory stays within 2x the non-private step's (the issue's target),
    here 1.5x for the MLP 784-512-512-10 at batch 256."""
    model = eqx.nn.MLP(784, 10, 512, 2, activation=jax.nn.relu, key=jax.random.key(0))
    params, static = eqx.partition(model, eqx.is_inexact_array)
    x = jax.random.normal(jax.random.key(1), (256, 784))
    y = jnp.arange(256) % 10

    def mean_loss(m, x, y):
        def one(xi, yi):
            return -jax.nn.log_softmax(m(xi))[yi]

        return jnp.mean(jax.vmap(one)(x, y))

    ghost = dp.ghost_clipped_grad(mean_loss, 1.0, batch_argnums=(1, 2))

    def temp_bytes(fn):
        compiled = jax.jit(lambda p: fn(eqx.combine(p, static))).lower(params).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    plain = temp_bytes(lambda m: eqx.filter_grad(mean_loss)(m, x, y))
    ours = temp_bytes(lambda m: ghost(m, x, y)[0])
    assert ours <= 2 * plain, (ours / 2**20, plain / 2**20)
