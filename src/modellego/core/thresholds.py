"""The numbers a user tunes the method with, in a module that imports no torch (the command line declares its
options with them before torch is imported): the paper's α/β (`Thresholds`, `PAPER`), the flatten rule, the
re-fit's ridge and the α/β search's grid step."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from modellego.core.choice import Choice
from modellego.errors import ModellegoError

RIDGE = 1e-3  # reconstruction's λ relative to the mean diagonal of XᵀX, so that it does not depend on the activations' scale
GRID_STEP = 0.1  # the spacing of `--auto`'s α/β grid


@dataclass(frozen=True)
class Thresholds:
    """α (relative-contribution threshold) and β (vote threshold) for conv and linear layers; the defaults are
    the paper's, written here and nowhere else. Each must lie in [0, 1] (fractions of a normalised range):
    checked when the thresholds are made, so that every function taking them can trust them."""

    alpha_conv: float = 0.3
    beta_conv: float = 0.2
    alpha_fc: float = 0.4
    beta_fc: float = 0.3

    def __post_init__(self) -> None:
        for item in fields(self):
            value = getattr(self, item.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or not 0.0 <= value <= 1.0:
                flag = "--" + item.name.replace("_", "-")
                raise ModellegoError(f"{item.name} must be between 0 and 1 ({flag}), got {value}")

    def as_dict(self) -> dict[str, float]:
        return {"alpha_conv": self.alpha_conv, "beta_conv": self.beta_conv, "alpha_fc": self.alpha_fc,
                "beta_fc": self.beta_fc}

    def pair(self, layer_kind: str) -> tuple[float, float]:
        """(α, β) for a layer of kind "conv" or "linear"."""
        return (self.alpha_conv, self.beta_conv) if layer_kind == "conv" else (self.alpha_fc, self.beta_fc)

    def settings(self, layer_kinds: set[str]) -> dict[str, float]:
        """The thresholds that layers of `layer_kinds` use, as a component records them."""
        record = {}
        if "conv" in layer_kinds:
            record.update(alpha_conv=self.alpha_conv, beta_conv=self.beta_conv)
        if "linear" in layer_kinds:
            record.update(alpha_fc=self.alpha_fc, beta_fc=self.beta_fc)
        return record


PAPER = Thresholds()


class FlattenRule(Choice):
    """What the walk does where a conv's channels are flattened into a Linear layer's features (several
    features per channel): keep a channel if any of its features is kept, or keep every channel there (what
    the paper's official code does in effect)."""

    ANY_FEATURE = "any-feature"
    KEEP_ALL = "keep-all"

    @classmethod
    def label(cls) -> str:
        return "flatten rule (--flatten)"


DEFAULT_FLATTEN = FlattenRule.ANY_FEATURE  # what `disassemble` uses unless told otherwise (docs/results.md)
