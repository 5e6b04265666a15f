"""A griffe extension: Google-style "Args:" entries that name several parameters at once.

keras-ee's docstrings document parameters that go together in one entry
(`x_train, y_train: the training images and labels.`), which griffe's Google parser reads as
one parameter called "x_train, y_train". This rewrites such an entry into one entry per name
(each with the entry's first line, the last one with the whole description) before griffe
parses the docstring, so the reference lists every parameter and still warns about any name
that is not in the signature.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

SECTIONS = re.compile(r"^(\s*)(Args|Arguments|Parameters|Keyword Args|Other Parameters):\s*$")
MULTI = re.compile(r"^(\s+)(\*{0,2}\w+(?:,\s*\*{0,2}\w+)+):(.*)$")


def expand_names(text: str) -> str:
    lines = text.split("\n")
    out: list[str] = []
    section_indent: int | None = None
    for line in lines:
        header = SECTIONS.match(line)
        if header:
            section_indent = len(header.group(1))
            out.append(line)
            continue
        if section_indent is not None and line.strip() and len(line) - len(line.lstrip()) <= section_indent:
            section_indent = None  # a line back at the header's indentation ends the section
        entry = MULTI.match(line) if section_indent is not None else None
        if entry:
            indent, names, description = entry.groups()
            out.extend(f"{indent}{name.strip()}:{description}" for name in names.split(","))
        else:
            out.append(line)
    return "\n".join(out)


class ExpandNames(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = expand_names(obj.docstring.value)
