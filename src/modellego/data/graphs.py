"""Graphs for node classification, nothing downloaded: torch_geometric's bundled KarateClub, a stochastic-block-
model graph generated with a fixed seed, and Planetoid (Cora, CiteSeer, PubMed) read from a local folder in
torch_geometric's layout. Each comes with train/val/test node masks: the dataset's own where it has all three,
a fixed stratified split otherwise. Needs the optional extra `modellego[graph]` (torch_geometric); importing this
module does not import it: the functions that read graphs call `require()` first, so that a missing install is one
readable error."""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TypeVar

import torch
from torch import Tensor

from modellego.data.spec import GraphSpec
from modellego.errors import ModellegoError

GRAPH_DATASETS = ("sbm", "karate", "cora", "citeseer", "pubmed")

Call = TypeVar("Call", bound=Callable)

INSTALL_HINT = "pip install 'modellego[graph]'"


def require() -> None:
    """Raise one readable ModellegoError when torch_geometric is not installed."""
    try:
        import torch_geometric  # noqa: F401
    except ImportError:
        raise ModellegoError("graph models need torch_geometric, which is not installed; install it with "
                             f"{INSTALL_HINT} (or pip install torch_geometric==2.8.1)") from None


def single_threaded(function: Call) -> Call:
    """Run `function` with one intra-op thread. Node classification here is small sparse gathers and scatters:
    on a busy machine, OpenMP threads waiting for each other made a 840-node GCN's forward pass 60× slower with
    2 threads than with 1; on a graph this size a second thread gains nothing anyway."""
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        previous = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return function(*args, **kwargs)
        finally:
            torch.set_num_threads(previous)
    return wrapper  # type: ignore[return-value]


PLANETOID = {"cora": "Cora", "citeseer": "CiteSeer", "pubmed": "PubMed"}
PLANETOID_FILES = ("x", "tx", "allx", "y", "ty", "ally", "graph", "test.index")
SPLITS = ("train", "val", "test")

# The stochastic block model: 7 blocks (as many classes as Cora) of 120 nodes, denser inside blocks than across;
# 32 features per node that carry the class only noisily (a class prototype scaled by SBM_SIGNAL plus unit noise),
# so that a node's own features alone classify it poorly and its neighbourhood is needed.
SBM_BLOCKS = 7
SBM_BLOCK_SIZE = 120
SBM_P_IN = 0.04
SBM_P_OUT = 0.004
SBM_FEATURES = 32
SBM_SIGNAL = 0.35
SBM_SEED = 0
SPLIT_SEED = 0


@dataclass
class Graph:
    """One graph: node features `x` [N, F], `edge_index` [2, E], labels `y` [N], boolean node masks per split,
    class names, the dataset's name and the folder it was read from (None for generated/bundled graphs)."""

    x: Tensor
    edge_index: Tensor
    y: Tensor
    masks: dict[str, Tensor]
    classes: list[str]
    name: str
    root: str | None = None

    @property
    def spec(self) -> GraphSpec:
        return GraphSpec(int(self.x.shape[1]))

    @property
    def num_nodes(self) -> int:
        return int(self.x.shape[0])

    def nodes(self, split: str) -> Tensor:
        """Indices of the nodes in `split` (train, val or test)."""
        return torch.nonzero(self.masks[split]).flatten()


def stratified_masks(labels: Tensor, seed: int = SPLIT_SEED, fractions: tuple[float, float] = (0.6, 0.2)) -> dict[str, Tensor]:
    """A fixed stratified split: per class, `fractions` of its nodes (shuffled with `seed`) for train and val,
    the rest for test; each class with at least 3 nodes gets at least one node in every split."""
    generator = torch.Generator().manual_seed(seed)
    masks = {split: torch.zeros(len(labels), dtype=torch.bool) for split in SPLITS}
    for label in labels.unique().tolist():
        members = torch.nonzero(labels == label).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        count = len(members)
        n_train = max(1, round(fractions[0] * count))
        n_val = max(1 if count >= 3 else 0, round(fractions[1] * count))
        n_train = min(n_train, max(1, count - n_val - (1 if count >= 2 else 0)))
        masks["train"][members[:n_train]] = True
        masks["val"][members[n_train:n_train + n_val]] = True
        masks["test"][members[n_train + n_val:]] = True
    return masks


def karate() -> Graph:
    """Zachary's karate club (34 nodes, 4 communities, one-hot node features), bundled with torch_geometric.
    Its own mask labels one node per class, so the fixed stratified split is used."""
    require()
    from torch_geometric.datasets import KarateClub

    data = KarateClub()[0]
    classes = [str(k) for k in range(int(data.y.max()) + 1)]
    return Graph(data.x.float(), data.edge_index, data.y.long(), stratified_masks(data.y), classes, "karate")


def sbm() -> Graph:
    """The stochastic-block-model graph: torch_geometric's generator under a fixed seed, the same graph on
    every machine and every call; features are noisy class prototypes (see SBM_* above)."""
    require()
    from torch_geometric.utils import stochastic_blockmodel_graph

    sizes = [SBM_BLOCK_SIZE] * SBM_BLOCKS
    probabilities = torch.full((SBM_BLOCKS, SBM_BLOCKS), SBM_P_OUT)
    probabilities.fill_diagonal_(SBM_P_IN)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SBM_SEED)
        edge_index = stochastic_blockmodel_graph(sizes, probabilities, directed=False)
    generator = torch.Generator().manual_seed(SBM_SEED)
    labels = torch.arange(SBM_BLOCKS).repeat_interleave(SBM_BLOCK_SIZE)
    prototypes = torch.randn(SBM_BLOCKS, SBM_FEATURES, generator=generator)
    x = SBM_SIGNAL * prototypes[labels] + torch.randn(len(labels), SBM_FEATURES, generator=generator)
    classes = [str(k) for k in range(SBM_BLOCKS)]
    return Graph(x, edge_index, labels, stratified_masks(labels), classes, "sbm")


def planetoid_folder(name: str, root: str | os.PathLike) -> Path:
    """Where Planetoid `name`'s raw files lie under `root`, in torch_geometric's layout: ROOT/Cora/raw/."""
    return Path(root) / PLANETOID[name] / "raw"


def planetoid(name: str, root: str | os.PathLike) -> Graph:
    """Planetoid `name` (cora, citeseer, pubmed) from the raw files under `root` in torch_geometric's layout
    (ROOT/Cora/raw/ind.cora.x, ...), with its own public split; features row-normalised (as the GCN paper does).
    Nothing is downloaded and nothing is written. The raw files are Python pickles: read only files you trust."""
    require()
    from torch_geometric.io import read_planetoid_data

    folder = planetoid_folder(name, root)
    missing = [f"ind.{name}.{part}" for part in PLANETOID_FILES if not (folder / f"ind.{name}.{part}").is_file()]
    if missing:
        raise ModellegoError(f"{name} is not in {folder}: missing {', '.join(missing[:3])}"
                             f"{' …' if len(missing) > 3 else ''}; put the Planetoid raw files there "
                             f"(torch_geometric's layout: ROOT/{PLANETOID[name]}/raw/ind.{name}.x, …) and pass "
                             "--data-root ROOT")
    try:
        data = read_planetoid_data(str(folder), name)
    except Exception as error:  # damaged pickles raise many types
        text = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ModellegoError(f"cannot read {name} from {folder} ({type(error).__name__}: {text[:200]}); "
                             "the raw files are damaged or not Planetoid's") from None
    x = data.x.to_dense() if data.x.is_sparse else data.x
    x = x.float()
    x = x / x.sum(dim=1, keepdim=True).clamp(min=1e-12)
    y = data.y.long()
    classes = [str(k) for k in range(int(y.max()) + 1)]
    masks = {split: getattr(data, f"{split}_mask").bool() for split in SPLITS}
    return Graph(x, data.edge_index, y, masks, classes, name, str(Path(root)))


def default_root(name: str) -> Path:
    """Where a Planetoid dataset is looked for without --data-root: $MODELLEGO_DATA_ROOT/<name>, else ./data/<name>."""
    env = os.environ.get("MODELLEGO_DATA_ROOT")
    return Path(env) / name if env else Path("data") / name


def load_graph(name: str, root: str | os.PathLike | None = None) -> Graph:
    """The graph called `name`: sbm, karate (generated / bundled; a `root` is refused) or cora, citeseer, pubmed
    (read from `root`, default $MODELLEGO_DATA_ROOT/<name> or ./data/<name>)."""
    if name in ("sbm", "karate") and root is not None:
        raise ModellegoError(f"--data-root does not apply to {name!r}, which is "
                             f"{'generated' if name == 'sbm' else 'bundled with torch_geometric'}; drop it")
    if name == "sbm":
        return sbm()
    if name == "karate":
        return karate()
    if name in PLANETOID:
        return planetoid(name, root if root is not None else default_root(name))
    raise ModellegoError(f"unknown graph dataset {name!r}; choose one of {', '.join(GRAPH_DATASETS)}")
