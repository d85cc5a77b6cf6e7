"""Every DP clipping route through every way of training, on 1 and 8 devices: the same
trained parameters and epsilon for the same seeds (see `dp_crossings.py`)."""

import functools

import pytest

from . import dp_crossings
from .helpers import run_on_host_devices


@functools.cache
def _reference(clipping: str):
    return dp_crossings.train(dp_crossings.REFERENCES[clipping])


@pytest.mark.parametrize("variant", dp_crossings.VARIANTS, ids=str)
def test_same_training_on_one_device(variant):
    reference = _reference(variant.clipping)
    dp_crossings.assert_same_training(dp_crossings.train(variant), reference, variant)


@pytest.mark.multidevice
@pytest.mark.parametrize("route", ["vmap", "BOOK_KEEPING", "GHOST"])
def test_same_training_on_eight_host_devices(route):
    result = run_on_host_devices(["-m", "tests.dp_crossings", route], 8, timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "dp crossings passed on 8 devices" in result.stdout
