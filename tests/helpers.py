"""Shared test helpers: tolerant tree comparison, a zoo of functions and batches, and
programs run on several host devices."""

import os
import pathlib
import subprocess
import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np


def tolerance(dtype) -> float:
    dtype = jnp.dtype(dtype)
    if dtype == jnp.bfloat16:
        return 3e-2
    if dtype == jnp.float16:
        return 3e-3
    if jnp.issubdtype(dtype, jnp.inexact):
        return 1e-5
    return 0.0


def tree_allclose(actual, expected, *, rtol=None, atol=None) -> bool:
    """Same structure and non-array leaves; array leaves equal up to dtype tolerance."""
    actual_arrays, actual_static = eqx.partition(actual, eqx.is_array)
    expected_arrays, expected_static = eqx.partition(expected, eqx.is_array)
    if jtu.tree_structure(actual) != jtu.tree_structure(expected):
        return False
    if not eqx.tree_equal(actual_static, expected_static):
        return False
    for a, e in zip(jtu.tree_leaves(actual_arrays), jtu.tree_leaves(expected_arrays)):
        a, e = np.asarray(a), np.asarray(e)
        if a.shape != e.shape or a.dtype != e.dtype:
            return False
        tol = tolerance(a.dtype)
        r = tol if rtol is None else rtol
        t = tol if atol is None else atol
        if not np.allclose(
            a.astype(np.float64), e.astype(np.float64), rtol=r, atol=t, equal_nan=True
        ):
            return False
    return True


def assert_tree_allclose(actual, expected, **kwargs) -> None:
    assert tree_allclose(actual, expected, **kwargs), (
        f"\nactual:   {actual}\nexpected: {expected}"
    )


class Affine(eqx.Module):
    """A module with an array, a static field and a callable field."""

    weight: jax.Array
    activation: object = jnp.tanh
    name: str = eqx.field(static=True, default="affine")

    def __call__(self, x):
        return self.activation(x @ self.weight)


def mixed_batch(key, batch_size: int, dtype=jnp.float32):
    """A batch PyTree holding arrays, a string, a callable, None and a Python scalar."""
    k1, k2 = jax.random.split(key)
    return {
        "x": jax.random.normal(k1, (batch_size, 3), dtype),
        "y": jax.random.normal(k2, (batch_size,), dtype),
        "tag": "train",
        "transform": jnp.square,
        "nothing": None,
        "scale": 2.0,
    }


def mixed_fun(batch):
    """Per-example, sum and mean outputs of a mixed batch, plus non-array outputs."""
    per_example = batch["transform"](batch["x"]) * batch["scale"]
    return {
        "per_example": per_example,
        "sum": jnp.sum(batch["x"] * batch["y"][:, None], axis=0),
        "mean": jnp.mean(batch["y"]),
        "tag": batch["tag"] + "!",
        "nothing": None,
    }


ROOT = pathlib.Path(__file__).resolve().parents[1]


def run_on_host_devices(
    args: list[str], devices: int, timeout: int
) -> subprocess.CompletedProcess:
    """`python *args` from the repository root in a fresh process with `devices` host
    CPU devices (JAX fixes its device count when it starts)."""
    flags = f"--xla_force_host_platform_device_count={devices}"
    return subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        env=dict(os.environ, XLA_FLAGS=flags),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
