"""Graph convolutional networks for node classification (torch_geometric's GCNConv), disassembled and assembled
with the same method as CNNs: the sample unit is a node, a component is a smaller GCN.

Needs the optional extra `modellego[graph]` (torch_geometric). Importing this package does not import
torch_geometric; the modules that build or run GCNs call `require()` first, so that a missing install is one
readable error.
"""

from __future__ import annotations

import functools
from typing import Callable, TypeVar

import torch

from modellego.errors import ModellegoError

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
