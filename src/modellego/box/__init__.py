"""The LEGO box (issue 26): a catalogue of source models, profiles, components and assemblies (`catalogue`), and
"a model for these classes" from what it holds (`plan`, then `build`: reuse registered components, cut what is
missing from registered sources, assemble and calibrate)."""

from __future__ import annotations

import os
from typing import Any, Sequence

from modellego.box.build import Built, build
from modellego.box.catalogue import SCHEMA_VERSION, Catalogue, Entry, default_path, describe
from modellego.box.plan import Plan, Step, parse_classes, plan


class Box(Catalogue):
    """The box: its catalogue (`add`, `find`, `get`, `lineage`, `verify`, `remove`), and a model for asked
    classes from what it holds (`plan`, `build`)."""

    def __enter__(self) -> "Box":
        return self

    def plan(self, classes: str | Sequence[str], max_flops: int | None = None) -> Plan:
        """Which registered files make a model for `classes` (`modellego.box.plan.plan`)."""
        return plan(self, classes, max_flops)

    def build(self, classes: str | Sequence[str] | Plan, out: str | os.PathLike, **options: Any) -> Built:
        """Make, measure and register a model for `classes` at `out` (`modellego.box.build.build`)."""
        return build(self, classes, out, **options)


__all__ = ["SCHEMA_VERSION", "Box", "Built", "Catalogue", "Entry", "Plan", "Step", "build", "default_path",
           "describe", "parse_classes", "plan"]
