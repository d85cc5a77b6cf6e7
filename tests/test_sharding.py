import pytest

from .helpers import run_on_host_devices


@pytest.mark.multidevice
def test_sharded_batches_on_eight_host_devices():
    result = run_on_host_devices(["-m", "tests.multidevice_checks"], 8, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "multidevice checks passed" in result.stdout
