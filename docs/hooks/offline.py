"""MkDocs hook: the built site must work offline.

After the build, every page and stylesheet is scanned for a script, stylesheet, font or
image loaded from another host; one is an error (links a reader clicks are fine).
"""

import pathlib
import re


_EXTERNAL = re.compile(
    r"""<(?:script|img|iframe)\b[^>]*\bsrc=["'](?:https?:)?//"""
    r"""|<link\b[^>]*\bhref=["'](?:https?:)?//"""
    r"""|@import\s+(?:url\()?["']?(?:https?:)?//"""
    r"""|url\(["']?(?:https?:)?//""",
    flags=re.I,
)


def on_post_build(config) -> None:
    site = pathlib.Path(config["site_dir"])
    found = []
    for path in sorted(site.rglob("*")):
        if path.suffix not in {".html", ".css"}:
            continue
        for match in _EXTERNAL.finditer(path.read_text(errors="replace")):
            found.append(f"{path.relative_to(site)}: {match.group(0)}")
    if found:
        raise ValueError(
            "The site loads resources from the internet, so it breaks offline:\n"
            + "\n".join(found[:20])
        )
