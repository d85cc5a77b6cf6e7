"""What jax_privacy 2.0 offers, tested against jax_privacy itself (where installed) and
against hand-derived values: `clip_pytree(nan_safe=, return_zero=)`, `dp.clipped_fun`,
0/1 padding masks, and DP-SGD with batches drawn with replacement."""

import math

import dp_accounting
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.integrate
import scipy.stats
from hypothesis import given, settings

import eqx_micro as em
import eqx_micro.dp as dp

from .helpers import assert_tree_allclose


jp_clipping = pytest.importorskip("jax_privacy.clipping")


def theirs(fn, *args, **kwargs):
    """jax_privacy relies on implicit dtype promotion, which these tests turn off."""
    with jax.numpy_dtype_promotion("standard"):
        return fn(*args, **kwargs)


entries = st.one_of(
    st.floats(-1e3, 1e3, width=32),
    st.sampled_from([math.nan, math.inf, -math.inf]),
)


@settings(max_examples=60, deadline=None)
@given(
    values=st.lists(entries, min_size=1, max_size=6),
    clip=st.one_of(st.floats(0.0, 1e3), st.just(math.inf)),
    rescale=st.booleans(),
    nan_safe=st.booleans(),
    return_zero=st.booleans(),
)
def test_clip_pytree_equals_jax_privacy(values, clip, rescale, nan_safe, return_zero):
    tree = {"a": jnp.asarray(values[:3], jnp.float32), "b": jnp.asarray(values[3:])}
    options = dict(rescale_to_unit_norm=rescale, nan_safe=nan_safe, return_zero=return_zero)
    ours, our_norm = dp.clip_pytree(tree, clip, **options)
    expected, their_norm = theirs(jp_clipping.clip_pytree, tree, clip, **options)
    np.testing.assert_allclose(our_norm, their_norm, rtol=1e-6)
    for key in tree:
        np.testing.assert_allclose(ours[key], expected[key], rtol=1e-5, atol=1e-6)
    if return_zero:
        assert all((leaf == 0).all() for leaf in ours.values())
    if nan_safe:
        assert all(jnp.isfinite(leaf).all() for leaf in ours.values())


def test_clip_pytree_return_zero_traced():
    """`return_zero` as a traced bool (e.g. an example's padding flag) under jit."""
    x = jnp.array([3.0, 4.0])
    f = jax.jit(lambda x, z: dp.clip_pytree(x, 1.0, return_zero=z))
    zeros, norm = f(x, True)
    clipped, same_norm = f(x, False)
    assert (zeros == 0).all() and norm == same_norm == 5.0
    assert_tree_allclose(clipped, jnp.array([0.6, 0.8]))


def test_clip_l2_follows_nan_safe():
    x = jnp.array([3.0, jnp.nan, 4.0])
    assert_tree_allclose(dp.ClipL2(1.0)(x), jnp.array([0.6, 0.0, 0.8]))
    assert jnp.isnan(dp.ClipL2(1.0, nan_safe=False)(x)).any()


def _data(n=10, d=3, seed=0):
    return 3.0 * jax.random.normal(jax.random.key(seed), (n, d))


def _norms(their_aux):
    """jax_privacy 2.0 returns `((), norms)` where its docstring says `norms`."""
    return their_aux[-1] if isinstance(their_aux, tuple) else their_aux


CONFIGS = [
    dict(),
    dict(keep_batch_dim=False),
    dict(microbatch_size=5),
    dict(microbatch_size=2),
    dict(normalize_by=4.0, return_norms=True),
    dict(rescale_to_unit_norm=True, l2_clip_norm=2.5),
    dict(l2_clip_norm=0.0),
    dict(dtype=jnp.float16),
]


def _stats(x):
    """A per-example statistic with a tree output: the row and its squared norm."""
    return {"row": x, "square": jnp.sum(x**2)}


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: str(c) or "default")
def test_clipped_fun_equals_jax_privacy(config):
    x = _data()
    config = {"l2_clip_norm": 2.0, **config}
    ours, aux = dp.clipped_fun(_stats, **config)(x)
    # jax_privacy returns the bare value when there is no aux or norm to return.
    their_out = theirs(jp_clipping.clipped_fun(_stats, **config), x)
    expected, their_aux = their_out if config.get("return_norms") else (their_out, None)
    assert jax.tree.structure(ours) == jax.tree.structure(expected)
    for got, want in zip(jax.tree.leaves(ours), jax.tree.leaves(expected)):
        assert got.dtype == want.dtype
        tol = 2e-3 if config.get("dtype") == jnp.float16 else 1e-5
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol)
    if config.get("return_norms"):
        np.testing.assert_allclose(aux.grad_norms, _norms(their_aux), rtol=1e-6)
    sensitivity = dp.clipped_fun(_stats, **config).sensitivity()
    assert sensitivity == jp_clipping.clipped_fun(_stats, **config).sensitivity()


def test_clipped_fun_refuses_an_unbounded_sensitivity():
    """jax_privacy accepts `l2_clip_norm=inf` (an infinite sensitivity); a DP sum
    cannot be noised to it, so it is refused where it is built."""
    with pytest.raises(ValueError, match="l2_clip_norm=inf.*finite"):
        dp.clipped_fun(_stats, l2_clip_norm=math.inf)


def test_clipped_fun_with_aux_and_unbatched_arguments():
    x = _data()

    def fun(x, scale):
        return x * scale, {"total": jnp.sum(x)}

    options = dict(has_aux=True, batch_argnums=(0,), l2_clip_norm=1.5)
    ours, aux = dp.clipped_fun(fun, **options)(x, 2.0)
    expected, their_aux = theirs(jp_clipping.clipped_fun(fun, **options), x, 2.0)
    np.testing.assert_allclose(ours, expected, rtol=1e-5)
    np.testing.assert_allclose(aux.aux["total"], their_aux["total"], rtol=1e-6)


@pytest.mark.parametrize("microbatch_size", [None, 2, 4])
def test_clipped_fun_padding_equals_jax_privacy_and_the_unpadded_sum(microbatch_size):
    x = _data(8)
    padding = jnp.array([0, 0, 0, 1, 0, 1, 0, 0], bool)
    options = dict(l2_clip_norm=2.0, microbatch_size=microbatch_size, return_norms=True)
    ours, aux = dp.clipped_fun(_stats, **options)(x, is_padding_example=padding)
    expected, their_aux = theirs(
        jp_clipping.clipped_fun(_stats, **options), x, is_padding_example=padding
    )
    unpadded, _ = dp.clipped_fun(_stats, l2_clip_norm=2.0)(x[~padding])
    assert_tree_allclose(ours, expected, rtol=1e-5)
    assert_tree_allclose(ours, unpadded, rtol=1e-5)
    real = np.asarray(~padding)
    np.testing.assert_allclose(aux.grad_norms[real], _norms(their_aux)[real], rtol=1e-6)
    # Padding rows report norm 0 here (jax_privacy reports their norms).
    assert (aux.grad_norms[~real] == 0).all()


@settings(max_examples=12, deadline=None)
@given(
    rows=st.lists(
        st.lists(st.floats(-100, 100, width=32), min_size=2, max_size=2),
        min_size=1,
        max_size=7,
    ),
    clip=st.floats(0.1, 50.0),
)
def test_clipped_fun_is_the_sum_of_clipped_rows(rows, clip):
    """Hand-derived reference: each row scaled by min(1, c / ||row||), then summed."""
    x = np.asarray(rows, np.float32)
    norms = np.linalg.norm(x.astype(np.float64), axis=1)
    scales = np.minimum(1.0, clip / np.where(norms > 0, norms, 1.0))
    expected = (x * scales[:, None]).sum(axis=0)
    total, _ = dp.clipped_fun(lambda r: r[0], keep_batch_dim=True, l2_clip_norm=clip)(
        jnp.asarray(x)
    )
    np.testing.assert_allclose(total, expected, rtol=1e-4, atol=1e-4)
    assert float(jnp.linalg.norm(total)) <= clip * len(rows) * (1 + 1e-5)


def test_clipped_fun_drops_a_non_finite_example_and_counts_it():
    """`nan_safe`: an example whose output is not finite adds nothing (jax_privacy
    instead zeroes its non-finite entries: both keep the sensitivity)."""
    x = _data(6).at[2, 1].set(jnp.nan)
    total, aux = dp.clipped_fun(lambda r: r, keep_batch_dim=False, l2_clip_norm=2.0)(x)
    expected, _ = dp.clipped_fun(lambda r: r, keep_batch_dim=False, l2_clip_norm=2.0)(
        jnp.delete(x, 2, axis=0)
    )
    assert_tree_allclose(total, expected, rtol=1e-5)
    assert int(aux.num_nonfinite) == 1


def test_clipped_fun_dp_mean_through_a_noise_transform():
    """A DP mean: the clipped sum plus Gaussian noise scaled to its sensitivity."""
    x = _data(64)
    clipped_sum = dp.clipped_fun(lambda r: r, keep_batch_dim=False, l2_clip_norm=1.0)
    total, _ = clipped_sum(x)
    noise = dp.GaussianNoise(stddev=0.0 * clipped_sum.sensitivity(), key=jax.random.key(0))
    state = noise.init(total)
    noisy, _ = noise.update(total, state)
    assert_tree_allclose(noisy, total)  # stddev 0: exactly the clipped sum
    noise = dp.GaussianNoise(stddev=clipped_sum.sensitivity(), key=jax.random.key(0))
    noisy, _ = noise.update(total, noise.init(total))
    assert not jnp.allclose(noisy, total)


def test_integer_padding_masks_equal_boolean_ones_in_dp_routes():
    x = _data(8)
    mask = jnp.array([0, 1, 0, 0, 1, 0, 0, 0])
    params = jnp.ones(3)

    def loss(w, x):
        return jnp.sum(jnp.tanh(x @ w))

    calls = {
        "clipped_fun": lambda m: dp.clipped_fun(_stats, microbatch_size=4)(
            x, is_padding_example=m
        ),
        "clipped_grad": lambda m: dp.clipped_grad(loss, 1.0, microbatch_size=4)(
            params, x, is_padding_example=m
        ),
        "ghost_clipped_grad": lambda m: dp.ghost_clipped_grad(loss, 1.0, microbatch_size=4)(
            params, x, is_padding_example=m
        ),
    }
    for name, call in calls.items():
        as_int, _ = call(mask)
        as_bool, _ = call(mask.astype(bool))
        assert_tree_allclose(as_int, as_bool), name
    with pytest.raises(ValueError, match="is_padding_example.*other than 0 and 1"):
        dp.clipped_grad(loss, 1.0)(params, x, is_padding_example=2 * mask)
    f = em.micro_grad(loss, batch_argnums=1, microbatch_size=4)
    assert_tree_allclose(
        f(params, x, is_padding_example=mask)[0],
        f(params, x, is_padding_example=mask.astype(bool))[0],
    )


# --- Batches drawn with replacement -------------------------------------------------


def _hockey_stick(p, q, epsilon, sigma):
    """delta(epsilon) of densities p against q by numerical integration."""

    def integrand(x):
        return max(0.0, p(x) - math.exp(epsilon) * q(x))

    lo, hi = -12 * sigma, 12 * sigma + 12
    value, _ = scipy.integrate.quad(integrand, lo, hi, limit=400, points=[0.0, 1.0])
    return value


@pytest.mark.parametrize("batch_size,num_examples", [(3, 10), (5, 20)])
def test_with_replacement_epsilon_against_numerical_integration(batch_size, num_examples):
    """One step: an example is drawn k ~ Binomial(b, 1/n) times, so its mechanism is the
    mixture sum_k P(k) N(k, s^2) against N(0, s^2) (zero-out). The epsilon reported for
    delta must give at most delta by direct integration (both directions), and a
    clearly smaller epsilon must not."""
    sigma, delta = 1.5, 1e-3
    event = dp.fixed_batch_dpsgd_event(
        sigma, 1, num_examples=num_examples, batch_size=batch_size, replace=True
    )
    epsilon = dp.compute_epsilon(
        event, delta, neighboring_relation=dp.NeighboringRelation.REPLACE_SPECIAL
    )
    ks = np.arange(batch_size + 1)
    weights = scipy.stats.binom.pmf(ks, batch_size, 1 / num_examples)

    def mixture(x):
        return float(np.sum(weights * scipy.stats.norm.pdf(x, ks, sigma)))

    def base(x):
        return float(scipy.stats.norm.pdf(x, 0, sigma))

    def worst_delta(eps):
        return max(
            _hockey_stick(mixture, base, eps, sigma),
            _hockey_stick(base, mixture, eps, sigma),
        )

    assert worst_delta(epsilon) <= delta * 1.01
    assert worst_delta(0.9 * epsilon) > delta


def test_with_replacement_batch_of_one_is_poisson_sampling():
    """b = 1: drawn once with probability 1/n, never otherwise, which is Poisson
    sampling at rate 1/n: dp_accounting's PLD for that event must agree."""
    relation = dp.NeighboringRelation.REPLACE_SPECIAL
    drawn = dp.fixed_batch_dpsgd_event(1.2, 50, num_examples=20, batch_size=1, replace=True)
    ours = dp.compute_epsilon(drawn, 1e-5, neighboring_relation=relation)
    poisson = dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(0.05, dp_accounting.GaussianDpEvent(1.2)), 50
    )
    accountant = dp_accounting.pld.PLDAccountant(
        dp_accounting.NeighboringRelation.REPLACE_SPECIAL,
        value_discretization_interval=1e-3,
    )
    reference = accountant.compose(poisson).get_epsilon(1e-5)
    np.testing.assert_allclose(ours, reference, rtol=2e-2)


def test_with_replacement_grows_with_the_batch_and_shrinks_with_noise():
    relation = dp.NeighboringRelation.REPLACE_SPECIAL

    def epsilon(sigma, batch_size):
        event = dp.fixed_batch_dpsgd_event(
            sigma, 5, num_examples=100, batch_size=batch_size, replace=True
        )
        return dp.compute_epsilon(event, 1e-5, neighboring_relation=relation)

    assert epsilon(2.0, 1) < epsilon(2.0, 3) < epsilon(2.0, 5)
    assert epsilon(3.0, 5) < epsilon(2.0, 5)
    assert epsilon(0.0, 5) == math.inf


@pytest.mark.parametrize(
    "options",
    [
        dict(accountant=dp.Accountant.RDP),
        dict(neighboring_relation=dp.NeighboringRelation.ADD_OR_REMOVE_ONE),
    ],
)
def test_with_replacement_refuses_accounting_it_cannot_do(options):
    event = dp.fixed_batch_dpsgd_event(
        1.0, 10, num_examples=100, batch_size=5, replace=True
    )
    options = {"neighboring_relation": dp.NeighboringRelation.REPLACE_SPECIAL, **options}
    with pytest.raises(ValueError, match="drawn with replacement.*REPLACE_SPECIAL"):
        dp.compute_epsilon(event, 1e-5, **options)
