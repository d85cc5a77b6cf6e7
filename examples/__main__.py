"""Runs an example: `python -m examples NAME [--quick]`.

The example runs under jaxtyping's import hook with beartype over `eqx_micro` and
`examples`, so every annotated signature is checked at run time, as in the tests.
"""

import argparse
import importlib
import pathlib
import sys

import jaxtyping


def _available() -> list[str]:
    here = pathlib.Path(__file__).parent
    return sorted(p.stem for p in here.glob("*.py") if not p.stem.startswith("_"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m examples", description="Run an eqx_micro example."
    )
    parser.add_argument("name", choices=_available(), help="the example to run")
    parser.add_argument(
        "--quick", action="store_true", help="use smaller sizes (as in the tests)"
    )
    args = parser.parse_args(argv)
    # Install the hook before `eqx_micro` or the example is imported, so both are
    # instrumented.
    for name in ("eqx_micro", f"examples.{args.name}"):
        if name in sys.modules:
            raise RuntimeError(f"`{name}` was imported before the type-check hook.")
    jaxtyping.install_import_hook(["eqx_micro", "examples"], "beartype.beartype")
    module = importlib.import_module(f"examples.{args.name}")
    module.main(quick=args.quick)


if __name__ == "__main__":
    main()
