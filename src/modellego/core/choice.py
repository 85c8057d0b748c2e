"""A closed set of option values (an assembly mode, a calibration, a flatten rule), parsed once, where the value
is owned, with a one-line error naming the choices."""

from __future__ import annotations

from enum import StrEnum
from typing import Self

from modellego.errors import ModellegoError


class Choice(StrEnum):
    """A StrEnum whose `parse` refuses an unknown value in one line: "unknown <label> 'x'; choose a or b"."""

    @classmethod
    def label(cls) -> str:
        return cls.__name__.lower()

    @classmethod
    def parse(cls, value: str) -> Self:
        try:
            return cls(value)
        except ValueError:
            names = [item.value for item in cls]
            options = " or ".join(names) if len(names) == 2 else "one of " + ", ".join(names)
            raise ModellegoError(f"unknown {cls.label()} {value!r}; choose {options}") from None
