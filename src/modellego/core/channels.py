"""The model's real channel graph (of a CNN), from torch-pruning's DependencyGraph: which output channels of which layers
feed a layer's input channels, through flatten, concat, residual adds and depthwise convs."""

from __future__ import annotations

import copy
import warnings
from collections import defaultdict
from dataclasses import dataclass

import torch
import torch_pruning as tp
from torch import nn

from modellego.core.layers import CHANNELWISE, example_batch, is_depthwise


@dataclass(frozen=True)
class Feed:
    """Output channels `channels` of layer `producer` feed input channels `inputs` of the consumer (pairwise)."""

    producer: str
    channels: torch.Tensor
    inputs: torch.Tensor


def dependency_graph(model: nn.Module, example_input: torch.Tensor | tuple[int, ...]) -> tp.DependencyGraph:
    """Trace `model` on `example_input` (a batch, or a shape C, H, W for one zero input) into a torch-pruning
    DependencyGraph."""
    example = example_batch(model, example_input)
    with warnings.catch_warnings(), torch.enable_grad():  # the tracer follows autograd's graph
        # Per-channel parameters outside a module (ConvNeXt's layer_scale, C×1×1) are pruned on their channel
        # dimension, which is what torch-pruning does by default; its notice about them is not for the user.
        warnings.filterwarnings("ignore", message="Unwrapped parameters detected")
        return tp.DependencyGraph().build_dependency(model, example_inputs=example)


class ChannelGraph:
    """A model's channel graph: for every Conv2d/Linear layer and every per-channel module (BatchNorm, LayerNorm,
    GroupNorm, PReLU), the producer channels that feed its inputs (a per-channel module's channel is its input).

    Built from torch-pruning's groups rooted at *output* channels: in that direction every index maps to
    exactly one root channel (a flattened feature to its channel, a concat slot to its branch, an add's
    operands to one another), so joining consumers and producers on the root index is exact. A group also
    couples layers that only meet in an add further on; only the layers a consumer's input really comes
    from (reached backwards without crossing another Conv2d/Linear) count as its producers.
    """

    def __init__(self, model: nn.Module, example_input: torch.Tensor | tuple[int, ...]) -> None:
        self.model = model
        self.dependency = dependency_graph(model, example_input)
        self._modules = {name: module for name, module in model.named_modules()
                         if isinstance(module, (nn.Conv2d, nn.Linear))}
        self._names = {module: name for name, module in self._modules.items()}
        self._channelwise = {module: name for name, module in model.named_modules() if isinstance(module, CHANNELWISE)}
        self._source_cache: dict[str, set[str]] = {}
        self._feeds: dict[str, list[Feed]] | None = None
        self._groups: dict[nn.Module, list] = {}

    def __deepcopy__(self, memo: dict) -> "ChannelGraph":
        """A copy for a copy of the model: `copy.deepcopy((model, graph))` gives a graph whose nodes are the copied
        model's modules (one memo). Shared, not copied: the traced autograd nodes and torch-pruning's ops module
        (they cannot be copied, and pruning never reads them) and torch-pruning's pruner objects (it recognises
        its handlers by comparing them with its own, e.g. to couple a depthwise conv's inputs with its outputs)."""
        dependency = self.dependency
        shared = [dependency.ops, *dependency.REGISTERED_PRUNERS.values(), *dependency.CUSTOMIZED_PRUNERS.values()]
        for node in dependency.module2node.values():
            shared.append(node.grad_fn)
            shared.extend(dep.handler.__self__ for dep in node.dependencies if hasattr(dep.handler, "__self__"))
        for item in shared:
            memo.setdefault(id(item), item)
        clone = ChannelGraph.__new__(ChannelGraph)
        memo[id(self)] = clone
        clone.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return clone

    def feeds(self, layer: str) -> list[Feed]:
        """Every (producer output channel → `layer` input channel) pair, for Conv2d/Linear producers; `layer` is
        a Conv2d/Linear layer or a per-channel module."""
        if self._feeds is None:
            self._feeds = self._collect()
        return self._feeds.get(layer, [])

    def output_groups(self, head: nn.Module) -> list:
        """torch-pruning's groups rooted at the output channels of every Conv2d/Linear layer but `head` (the
        classifier, whose rows are chosen by class), computed once per head."""
        if head not in self._groups:
            self._groups[head] = list(self.dependency.get_all_groups(ignored_layers=[head],
                                                                        root_module_types=(nn.Conv2d, nn.Linear)))
        return self._groups[head]

    def _sources(self, consumer: str) -> set[str]:
        """The Conv2d/Linear layers whose outputs reach `consumer`'s input without crossing another one."""
        if consumer not in self._source_cache:
            module = self._modules.get(consumer) or self.model.get_submodule(consumer)
            start = self.dependency.module2node[module]
            found, stack, seen = set(), list(start.inputs), set()
            while stack:
                node = stack.pop()
                if id(node) in seen:
                    continue
                seen.add(id(node))
                if node.module in self._names:
                    found.add(self._names[node.module])
                else:
                    stack.extend(node.inputs)
            self._source_cache[consumer] = found
        return self._source_cache[consumer]

    def _collect(self) -> dict[str, list[Feed]]:
        graph = self.dependency
        names = self._names
        found: dict[str, dict[str, tuple[list[int], list[int]]]] = defaultdict(dict)
        for group in graph.get_all_groups(root_module_types=(nn.Conv2d, nn.Linear)):
            producers: dict[str, dict[int, int]] = defaultdict(dict)  # name -> root -> channel
            consumers: dict[str, list[tuple[int, int]]] = defaultdict(list)  # name -> (input, root)
            for item in group.items:
                module = item.dep.target.module
                pairs = list(zip((int(i) for i in item.idxs), (int(r) for r in item.root_idxs)))
                if module in self._channelwise:
                    consumers[self._channelwise[module]].extend(pairs)
                    continue
                if module not in names:
                    continue
                depthwise = is_depthwise(module)
                if graph.is_out_channel_pruning_fn(item.dep.handler):
                    producers[names[module]].update((root, index) for index, root in pairs)
                    if depthwise:  # torch-pruning handles its inputs and outputs as one coupled op
                        consumers[names[module]].extend(pairs)
                else:
                    consumers[names[module]].extend(pairs)
            for consumer, pairs in consumers.items():
                sources = self._sources(consumer)
                for producer, channel_of_root in producers.items():
                    if producer not in sources:
                        continue
                    channels, inputs = found[consumer].setdefault(producer, ([], []))
                    for index, root in dict.fromkeys(pairs):
                        if root in channel_of_root:
                            channels.append(channel_of_root[root])
                            inputs.append(index)
        return {consumer: [Feed(producer, torch.tensor(channels), torch.tensor(inputs))
                           for producer, (channels, inputs) in feeds.items() if channels]
                for consumer, feeds in found.items()}
