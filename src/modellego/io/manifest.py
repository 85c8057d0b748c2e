"""The manifest: everything a model file says besides its weights (format version, architecture, classes, input,
provenance, metrics), as types, with the checks of every field that is the same for all model kinds; a model
kind checks its input and architecture records (`SchemaKind`)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator, NamedTuple, Protocol

from torch import nn

from modellego.errors import ModellegoError
from modellego.io.fields import Invalid, integer, mapping, parse_json, sequence, string
from modellego.io.safetensors import MAX_TENSORS

FORMAT_NAME = "modellego"
FORMAT_VERSION = 1
METADATA_KEY = "modellego"

# Bounds on what a file may ask for. They sit far above anything modellego writes and far below what would
# exhaust memory or time; a file beyond them is refused before anything is built from it.
MAX_MANIFEST_CHARS = 4 << 20     # the manifest inside a file's safetensors header
MAX_JSON_DEPTH = 32
MAX_CLASSES = 100_000
MAX_CLASS_INDEX = 10**6
MAX_NAME = 1_000
MAX_CHANNELS = 1_024
MAX_SIDE = 4_096
MAX_WIDTH = 16.0
MAX_MEMBERS = 256
MAX_PARALLEL_NESTING = 4
MAX_GROUPS = 100_000


class SchemaKind(Protocol):
    """What a model kind checks of a manifest (modellego.kinds)."""

    def check_input(self, value: Any, field: str) -> Any: ...

    def check_architecture(self, value: Any, field: str, spec: Any) -> dict[str, Any]: ...


@dataclass(frozen=True)
class ClassRef:
    """One output of a model: the class `name`, the `dataset` it comes from and its `index` there."""

    name: str
    dataset: str
    index: int


@dataclass
class Manifest:
    """Everything needed to rebuild, interpret and trace a model file besides its weights."""

    architecture: dict[str, Any]
    classes: list[ClassRef]
    input: Any  # the kind's input spec: data.spec.InputSpec (images) or GraphSpec (graph nodes)
    kind: str = "model"
    provenance: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    @property
    def class_names(self) -> list[str]:
        return [ref.name for ref in self.classes]

    @property
    def datasets(self) -> list[str]:
        """The datasets this model's classes come from, in first-seen order."""
        return list(dict.fromkeys(ref.dataset for ref in self.classes))

    def to_json(self) -> str:
        data = asdict(self)
        data["input"] = self.input.to_dict()
        data["format"] = FORMAT_NAME
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, source: str, kind_of: Callable[[Any], SchemaKind]) -> "Manifest":
        """Parse and validate a manifest (types, ranges, sizes, nesting) before anything is built from it; the
        input and the architecture are checked by the model kind `kind_of(architecture)` names."""
        try:
            data = mapping(parse_json(text, "the manifest", MAX_MANIFEST_CHARS, MAX_JSON_DEPTH), "the manifest")
            if data.get("format") != FORMAT_NAME:
                raise Invalid("wrong format tag")
            version = integer(data.get("format_version"), "format_version", 1, 10**9)
            if version > FORMAT_VERSION:
                raise ModellegoError(f"{source} was written by a newer modellego (format {version}); upgrade modellego")
            classes = [_class_ref(ref, f"classes[{k}]")
                       for k, ref in enumerate(sequence(data.get("classes"), "classes", 1, MAX_CLASSES))]
            kind = kind_of(data.get("architecture"))
            spec = kind.check_input(data.get("input"), "input")
            architecture = kind.check_architecture(data.get("architecture"), "architecture", spec)
            return cls(architecture=architecture, classes=classes, input=spec,
                       kind=string(data.get("kind", "model"), "kind", 100),
                       provenance=mapping(data.get("provenance", {}), "provenance"),
                       metrics=mapping(data.get("metrics", {}), "metrics"),
                       layers=_layers(data.get("layers", {})),
                       format_version=version)
        except Invalid as error:
            raise ModellegoError(f"{source} has a damaged modellego manifest ({error})") from None


def provenance_records(provenance: Any) -> Iterator[dict]:
    """Every record (dict) in a provenance, at any depth, outermost first: components and assemblies carry their
    sources' provenance inside their own."""
    pending: list = [provenance]
    while pending:
        record = pending.pop(0)
        if isinstance(record, dict):
            yield record
            pending.extend(record.values())
        elif isinstance(record, list):
            pending.extend(record)


def _class_ref(value: Any, field: str) -> ClassRef:
    data = mapping(value, field)
    return ClassRef(string(data.get("name"), f"{field}.name", MAX_NAME, empty=True),
                    string(data.get("dataset"), f"{field}.dataset", MAX_NAME),
                    integer(data.get("index"), f"{field}.index", 0, MAX_CLASS_INDEX))


def _layers(value: Any) -> dict[str, dict[str, Any]]:
    data = mapping(value, "layers")
    if len(data) > MAX_TENSORS:
        raise Invalid(f"layers has {len(data):,} entries; at most {MAX_TENSORS:,} are accepted")
    for name, facts in data.items():
        string(name, "a layers key", MAX_NAME)
        integer(mapping(facts, f"layers[{name!r}]").get("groups", 1), f"layers[{name!r}].groups", 1, MAX_GROUPS)
    return data


class Brick(NamedTuple):
    """A model and its manifest: what load, train, disassemble, assemble and finetune return (unpacks as a pair)."""

    model: nn.Module
    manifest: Manifest


