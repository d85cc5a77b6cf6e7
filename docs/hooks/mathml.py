"""MkDocs hook: the docs' LaTeX becomes MathML when the site is built.

`pymdownx.arithmatex` (generic mode) leaves `\\(...\\)` and `\\[...\\]` in
`class="arithmatex"` elements for a script to typeset in the browser; loading that
script from a CDN breaks the site offline. Browsers render MathML themselves, so the
built pages need no script at all. A formula that `latex2mathml` cannot convert fully
(a command left as text) fails the build.
"""

import html
import re

from latex2mathml.converter import convert


_MATH = re.compile(
    r'<(?P<tag>div|span) class="arithmatex">\s*'
    r"(?:\\\[(?P<block>.*?)\\\]|\\\((?P<inline>.*?)\\\))\s*</(?P=tag)>",
    flags=re.S,
)
_LEFTOVER = re.compile(r">[^<]*\\[A-Za-z|]")  # e.g. `<mo>\|</mo>`: not converted


def _to_mathml(match: re.Match, page: str) -> str:
    block = match.group("block")
    latex = html.unescape(block if block is not None else match.group("inline"))
    mathml = convert(latex, display="block" if block is not None else "inline")
    if _LEFTOVER.search(mathml):
        raise ValueError(
            f"{page}: latex2mathml left a command unconverted in `{latex.strip()}`; "
            "rewrite it (e.g. `\\left\\| ... \\right\\|` for a sized norm)."
        )
    return mathml


def on_page_content(html_text: str, page, config, files) -> str:
    return _MATH.sub(lambda m: _to_mathml(m, page.file.src_path), html_text)
