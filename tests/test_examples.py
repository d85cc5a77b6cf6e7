"""Every script in `examples/` runs in quick mode (under the type-check hook)."""

import pathlib
import re
import runpy

import pytest


EXAMPLES = pathlib.Path(__file__).parent.parent / "examples"
NAMES = sorted(path.stem for path in EXAMPLES.glob("*.py") if not path.stem.startswith("_"))


def test_examples_found():
    assert "microbatching_basics" in NAMES


@pytest.mark.parametrize("name", NAMES)
def test_example_runs(name, capsys):
    # Not run as `__main__`: that would call `main()` at full size. `run_module` goes
    # through the import system, so the jaxtyping hook from `addopts` checks the
    # example's annotations as well as `eqx_micro`'s.
    namespace = runpy.run_module(f"examples.{name}")
    namespace["main"](quick=True)
    out = capsys.readouterr().out
    assert out
    # No placeholder statistics: a spread over one seed, or an undefined error.
    assert not re.search(r"\bnan\b", out, flags=re.I), out
    assert "± 0.0" not in out, out


def test_accuracy_format_shows_a_spread_only_over_several_seeds():
    from examples._format import accuracy_text

    assert accuracy_text([0.9]) == "90.0% (one seed)"
    assert accuracy_text([0.9, 0.8]) == "85.0% ± 5.0"
