import itertools

import jax
import pytest


# Our code must not rely on implicit dtype promotion.
jax.config.update("jax_numpy_dtype_promotion", "strict")


@pytest.fixture
def getkey():
    """`getkey()` returns a fresh PRNG key each call, deterministic per test."""
    counter = itertools.count()
    base = jax.random.key(0)
    return lambda: jax.random.fold_in(base, next(counter))


# Tests that run a subprocess take a minute or more each. xdist hands tests to its
# workers in collection order, so started first they run beside the many short tests
# instead of stretching the end of the run.
_SUBPROCESS_MODULES = {"test_docs_code", "test_examples"}


def _runs_a_subprocess(item: pytest.Item) -> bool:
    module = item.module.__name__.rsplit(".", 1)[-1] if item.module else ""
    return item.get_closest_marker("multidevice") is not None or (
        module in _SUBPROCESS_MODULES
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    items.sort(key=lambda item: not _runs_a_subprocess(item))
