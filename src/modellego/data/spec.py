"""What a model expects as input: images (channels, size and the dataset's normalisation) or graph nodes (their
number of features)."""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class InputSpec:
    """Images of `channels`×`size` with pixels in [0, 1]; `mean`/`std` are the dataset's normalisation,
    which the model applies itself as its first module."""

    channels: int
    size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def to_dict(self) -> dict:
        data = asdict(self)
        data["size"] = list(self.size)
        data["mean"] = list(self.mean)
        data["std"] = list(self.std)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "InputSpec":
        return cls(
            channels=int(data["channels"]),
            size=(int(data["size"][0]), int(data["size"][1])),
            mean=tuple(float(v) for v in data["mean"]),
            std=tuple(float(v) for v in data["std"]),
        )

    def describe(self) -> str:
        return f"{self.channels}×{self.size[0]}×{self.size[1]}"


@dataclass(frozen=True)
class GraphSpec:
    """Node features of a graph: `features` per node (any number of nodes and edges)."""

    features: int

    def to_dict(self) -> dict:
        return {"kind": "graph", "features": self.features}

    @classmethod
    def from_dict(cls, data: dict) -> "GraphSpec":
        return cls(int(data["features"]))

    def describe(self) -> str:
        return f"graph nodes with {self.features} features"
