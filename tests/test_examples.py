"""Every script in `examples/` runs in quick mode (under the type-check hook)."""

import pathlib
import runpy

import pytest


EXAMPLES = pathlib.Path(__file__).parent.parent / "examples"
NAMES = sorted(
    path.stem for path in EXAMPLES.glob("*.py") if not path.stem.startswith("__")
)


def test_examples_found():
    assert "microbatching_basics" in NAMES


@pytest.mark.parametrize("name", NAMES)
def test_example_runs(name, capsys):
    # Not run as `__main__`: that would call `main()` at full size. `run_module` goes
    # through the import system, so the jaxtyping hook from `addopts` checks the
    # example's annotations as well as `eqx_micro`'s.
    namespace = runpy.run_module(f"examples.{name}")
    namespace["main"](quick=True)
    assert capsys.readouterr().out
