"""Text drawn into figures: names come from files and users, and a control character (an ESC byte in a class
name) makes an SVG that is not well-formed XML, so each is shown as its escape instead."""

from __future__ import annotations

import unicodedata


def drawable(text: str) -> str:
    """`text` with every control or unassigned character written as its Python escape (`\\x1b`), so any figure
    format can hold it."""
    return "".join(character if unicodedata.category(character) not in ("Cc", "Cs", "Cn")
                   else character.encode("unicode_escape").decode("ascii") for character in str(text))
