"""Every public name has a docstring example, and every docstring example runs."""

import ast
import importlib
import inspect
import pathlib
import re
import textwrap

import pytest

import eqx_micro
import eqx_micro.dp


PACKAGES = (eqx_micro, eqx_micro.dp)
_FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>[\w+-]*)[ \t]*$")


def _public_names(package=eqx_micro) -> list[str]:
    """The names a package's `__init__.py` re-exports (`from ._x import y as y`)."""
    tree = ast.parse(pathlib.Path(package.__file__).read_text())
    return [
        alias.name
        for node in tree.body
        if isinstance(node, ast.ImportFrom)
        for alias in node.names
        if alias.asname == alias.name and alias.name != "__version__"
    ]


def _qualified_public_names() -> list[str]:
    """`eqx_micro.name` and `eqx_micro.dp.name` for every public name defined here.

    Re-exports of other libraries' objects (`dp.NeighboringRelation` is
    `dp_accounting.NeighboringRelation`) are documented by those libraries.
    """
    return [
        f"{package.__name__}.{name}"
        for package in PACKAGES
        for name in _public_names(package)
        if getattr(getattr(package, name), "__module__", "").startswith("eqx_micro")
    ]


def _abstract_accumulator_methods() -> frozenset[str]:
    return frozenset(eqx_micro.AbstractAccumulator.__abstractmethods__)


def _public_methods(cls: type) -> list[tuple[str, object]]:
    """Public methods and properties defined in `cls` itself (not inherited)."""
    methods = []
    for name, attribute in vars(cls).items():
        if name.startswith("_"):
            continue
        if isinstance(attribute, property):
            methods.append((name, attribute))
            continue
        value = getattr(cls, name)
        if inspect.isfunction(value) or inspect.ismethod(value):
            methods.append((name, value))
    return methods


def _targets() -> list[tuple[str, object, bool]]:
    """`(qualified name, object, must have an example)` for every documented object."""
    exempt = _abstract_accumulator_methods()
    targets = []
    for qualified in _qualified_public_names():
        module_name, name = qualified.rsplit(".", 1)
        obj = getattr(next(p for p in PACKAGES if p.__name__ == module_name), name)
        targets.append((qualified, obj, True))
        if inspect.isclass(obj):
            is_accumulator = issubclass(obj, eqx_micro.AbstractAccumulator)
            for method_name, method in _public_methods(obj):
                # An abstract method's contract is in its class's docstring.
                abstract = getattr(method, "__isabstractmethod__", False)
                required = not (abstract or (is_accumulator and method_name in exempt))
                if required or method.__doc__:
                    targets.append((f"{qualified}.{method_name}", method, required))
    return targets


def python_blocks(docstring: str) -> list[str]:
    """The contents of the ```python fenced blocks of a (Markdown) docstring."""
    blocks = []
    lines = inspect.cleandoc(docstring).splitlines()
    index = 0
    while index < len(lines):
        opening = _FENCE.match(lines[index])
        index += 1
        if opening is None or opening["lang"] != "python":
            continue
        body = []
        while index < len(lines):
            closing = _FENCE.match(lines[index])
            if closing is not None and closing["lang"] == "":
                break
            body.append(lines[index])
            index += 1
        else:
            raise ValueError(f"Unclosed ```python block in:\n{docstring}")
        index += 1
        blocks.append(textwrap.dedent("\n".join(body)))
    return blocks


TARGETS = _targets()


def test_public_names_found():
    names = _public_names()
    assert "microbatch" in names and "AbstractAccumulator" in names
    assert set(names) <= set(dir(eqx_micro))


@pytest.mark.parametrize(
    "qualname, obj, required", TARGETS, ids=[target[0] for target in TARGETS]
)
def test_docstring_examples_run(qualname, obj, required):
    docstring = obj.__doc__
    if required:
        assert docstring, f"`{qualname}` has no docstring."
    blocks = python_blocks(docstring or "")
    if required:
        assert blocks, f"The docstring of `{qualname}` has no ```python example."
    for number, block in enumerate(blocks):
        code = compile(block, f"<docstring of {qualname}, example {number}>", "exec")
        exec(code, {"__name__": f"docstring_example_{qualname}"})


@pytest.mark.parametrize("qualified", _qualified_public_names())
def test_public_name_in_api_reference(qualified):
    api = pathlib.Path(__file__).parent.parent / "docs" / "api"
    entries = {
        line.strip().removeprefix(":::").strip()
        for page in api.glob("*.md")
        for line in page.read_text().splitlines()
        if line.startswith(":::")
    }
    if qualified not in entries:
        # An alias (a second public name of a documented object, kept for users of
        # another library) is documented where its page names it.
        module, _, name = qualified.rpartition(".")
        target = getattr(importlib.import_module(module), name)
        documented = {
            entry
            for entry in entries
            if entry.rpartition(".")[0] == module
            and getattr(importlib.import_module(module), entry.rpartition(".")[2], None)
            is target
        }
        short = f"{module.rpartition('.')[2]}.{name}"
        named = any(f"`{short}`" in page.read_text() for page in api.glob("*.md"))
        assert documented and named, (
            f"`{qualified}` is public but has no `::: {qualified}` entry in docs/api/."
        )


def test_python_blocks_parser():
    docstring = """Summary.

    !!! example

        ```python
        x = 1

        assert x == 1
        ```

    ```bash
    echo no
    ```
    """
    assert python_blocks(docstring) == ["x = 1\n\nassert x == 1"]


def test_readme_code_runs():
    """The README's ```python blocks run in order, as one script (the tour, then DP)."""
    readme = pathlib.Path(__file__).parent.parent / "README.md"
    blocks = python_blocks(readme.read_text())
    assert len(blocks) >= 2, "README.md lost its code blocks."
    exec(compile("\n".join(blocks), "<README.md>", "exec"), {"__name__": "readme"})
