"""The GCN kind (modellego.kinds.gcn): contributions against a slow per-node reference, full-keep components,
reconstruction, files, graph data (a fake Planetoid layout), the command line on KarateClub, every option either
honoured or refused in one line, and the message without torch_geometric."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from helpers import assert_user_error, invoke

# torch_geometric is the `graph` extra, which `make test` installs: these tests fail (not skip) without it.
from modellego import load, save
from modellego.core.contributions import class_sums
from modellego.core.locate import PAPER, ComponentMasks, FlattenRule
from modellego.data import graphs as graph_data
from modellego.data.spec import GraphSpec
from modellego.io.manifest import ClassRef, Manifest
from modellego.kinds import gcn as method
from modellego.kinds.gcn import GCN as GraphKind
from modellego.kinds.gcn import Nodes, TaskGraph, fit
from modellego.models.gcn import GCN

KIND = GraphKind()

SRC = Path(__file__).resolve().parents[2] / "src"


def random_graph(nodes: int, edges: int, features: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(nodes, features, generator=generator)
    pairs = torch.randint(0, nodes, (2, edges), generator=generator)
    pairs = pairs[:, pairs[0] != pairs[1]]
    return x, torch.cat([pairs, pairs.flip(0)], dim=1)  # undirected, as the datasets are


def dense_normalised_adjacency(edge_index: torch.Tensor, nodes: int) -> torch.Tensor:
    """Â = D^-1/2 (A + I) D^-1/2 built densely, with A counting repeated edges (as GCNConv's sums do)."""
    adjacency = torch.zeros(nodes, nodes, dtype=torch.float64)
    for source, target in edge_index.t().tolist():
        adjacency[target, source] += 1.0
    adjacency += torch.eye(nodes, dtype=torch.float64)
    degree = adjacency.sum(dim=1)
    return adjacency / degree.sqrt()[:, None] / degree.sqrt()[None, :]


def slow_contributions(conv, x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
    """C⁺[n,o,i] = max((ÂX)[n,i]·W[o,i], 0), one node, one output, one input at a time."""
    mixed = dense_normalised_adjacency(edge_index, x.shape[0]) @ x.double()
    weight = conv.lin.weight.detach().double()
    out = torch.zeros(x.shape[0], weight.shape[0], weight.shape[1], dtype=torch.float64)
    for n in range(x.shape[0]):
        for o in range(weight.shape[0]):
            for i in range(weight.shape[1]):
                out[n, o, i] = max(mixed[n, i].item() * weight[o, i].item(), 0.0)
    return out


@settings(max_examples=12, deadline=None)
@given(nodes=st.integers(2, 9), edges=st.integers(0, 20), features=st.integers(1, 5), outputs=st.integers(1, 4),
       seed=st.integers(0, 10_000))
def test_gcn_contributions_match_a_slow_per_node_reference(nodes, edges, features, outputs, seed):
    x, edge_index = random_graph(nodes, edges, features, seed)
    torch.manual_seed(seed)
    conv = GCN(features, [], outputs, dropout=0.0).convs[0]
    expected = slow_contributions(conv, x, edge_index)
    got = method.gcn_contributions(conv, x, edge_index).double()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    # what the method rests on: the layer is its linear map applied to ÂX
    with torch.no_grad():
        layer_output = conv(x, edge_index).double()
    mixed = method.propagated(conv, x, edge_index).double()
    torch.testing.assert_close(layer_output, mixed @ conv.lin.weight.double().t() + conv.bias.double(),
                               rtol=1e-5, atol=1e-5)
    # class sums over chosen nodes are the per-node contributions summed per class
    labels = torch.arange(nodes) % 2
    sums = class_sums(method._as_linear(conv), method.propagated(conv, x, edge_index), labels, 2)
    for k in range(2):
        torch.testing.assert_close(sums[k], expected[labels == k].sum(0), rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def karate_source():
    """A GCN trained on KarateClub (fast: 34 nodes) and its profile."""
    graph = graph_data.karate()
    torch.manual_seed(0)
    model = GCN(graph.spec.features, [16, 12], len(graph.classes), dropout=0.0)
    task = TaskGraph(graph, graph.y, graph.classes)
    nodes = graph.nodes("train")
    fit(model, task, nodes, epochs=100, lr=0.02, seed=0)
    profile = KIND.profile(model, Nodes(task, nodes, graph.y[nodes]), samples_per_class=5)
    return graph, model, profile


def test_profile_selects_confident_correct_training_nodes_and_sums_per_class(karate_source):
    graph, model, profile = karate_source
    logits = method.logits_of(model, graph.x, graph.edge_index)
    assert profile.layers == ["convs.0", "convs.1", "convs.2"]
    assert bool(graph.masks["train"][profile.samples].all())
    assert bool((logits[profile.samples].argmax(1) == profile.sample_labels).all())
    assert int(profile.counts.sum()) == len(profile.samples) and int(profile.counts.max()) <= 5
    # the sums are exactly the per-node contributions of the chosen nodes, class by class
    hidden = torch.relu(model.convs[0](graph.x, graph.edge_index))
    per_node = method.gcn_contributions(model.convs[1], hidden, graph.edge_index)[profile.samples]
    for k in range(len(graph.classes)):
        torch.testing.assert_close(profile.contributions["convs.1"][k].double(),
                                   per_node[profile.sample_labels == k].sum(0).double(), rtol=1e-4, atol=1e-5)


def full_masks(model: GCN, classes: list[str]) -> ComponentMasks:
    masks = {name: torch.ones(len(classes), conv.lin.weight.shape[0], dtype=torch.bool)
             for name, conv in method.gcn_layers(model).items()}
    return ComponentMasks(masks=masks, scores={name: mask.float() for name, mask in masks.items()},
                          classes=classes, classifier="convs.2")


@pytest.mark.parametrize("task", [[1, 2], [3, 0], [2]])
def test_a_component_keeping_everything_reproduces_the_source_task_logits(karate_source, task):
    graph, model, _ = karate_source
    component = method.disassemble(model, full_masks(model, graph.classes), task)
    torch.testing.assert_close(method.logits_of(component, graph.x, graph.edge_index),
                               method.logits_of(model, graph.x, graph.edge_index)[:, task])
    assert sum(p.numel() for p in component.parameters()) < sum(p.numel() for p in model.parameters()) \
        or len(task) == len(graph.classes)


def test_located_components_are_smaller_gcns_that_save_and_load_exactly(karate_source, tmp_path):
    graph, model, profile = karate_source
    masks = KIND.locate(model, profile, PAPER, KIND.channels(model, graph.spec), FlattenRule.ANY_FEATURE)
    assert masks.settings == {"alpha_conv": 0.3, "beta_conv": 0.2}  # a GCNConv uses the conv pair only
    component = method.disassemble(model, masks, [1, 2])
    kept = [conv.lin.weight.shape[0] for conv in component.convs]
    assert kept[-1] == 2 and all(0 < size for size in kept)
    assert kept[:-1] == [int(masks.task_channels(name, [1, 2]).sum()) for name in ("convs.0", "convs.1")]
    manifest = Manifest(architecture=component.architecture(), classes=[ClassRef(c, "karate", int(c)) for c in "12"],
                        input=graph.spec, kind="component")
    save(component, tmp_path / "c.safetensors", manifest)
    loaded, loaded_manifest = load(tmp_path / "c.safetensors")
    assert loaded_manifest.kind == "component" and loaded_manifest.input == GraphSpec(34)
    torch.testing.assert_close(method.logits_of(loaded, graph.x, graph.edge_index),
                               method.logits_of(component, graph.x, graph.edge_index))
    # a parallel assembly is exactly its members side by side
    other = method.disassemble(model, masks, [0])
    both = KIND.assemble([component, other], graph.spec, KIND.default_mode, [0, 1, 2], None, None, 1.0)
    expected = torch.cat([method.logits_of(m, graph.x, graph.edge_index) for m in (component, other)], dim=1)
    torch.testing.assert_close(method.logits_of(both, graph.x, graph.edge_index), expected)


def test_generated_and_bundled_graphs_are_fixed_and_split_stratified():
    first, second = graph_data.sbm(), graph_data.sbm()
    assert torch.equal(first.edge_index, second.edge_index) and torch.equal(first.x, second.x)
    assert len(first.classes) == graph_data.SBM_BLOCKS
    for graph in (first, graph_data.karate()):
        masks = torch.stack([graph.masks[split] for split in graph_data.SPLITS])
        assert bool((masks.sum(0) == 1).all())  # every node in exactly one split
        for k in range(len(graph.classes)):
            assert all(bool((graph.y[graph.masks[split]] == k).any()) for split in graph_data.SPLITS)


def write_fake_planetoid(root: Path, name: str = "cora", classes: int = 3, features: int = 6) -> None:
    """The eight raw files of a tiny Planetoid dataset in torch_geometric's layout (ROOT/Cora/raw/ind.cora.*):
    x/tx/allx as scipy sparse matrices and y/ty/ally as one-hot arrays, pickled, as the real ones are."""
    import scipy.sparse as sparse

    folder = root / graph_data.PLANETOID[name] / "raw"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    # x ⊂ allx; torch_geometric takes the 500 nodes after x as validation nodes; test nodes come after allx
    train, allx_count, test = classes * 2, classes * 2 + 500 + classes, classes * 2
    total = allx_count + test
    labels = np.arange(total) % classes
    features_all = rng.random((total, features)).astype(np.float32)
    one_hot = np.eye(classes, dtype=np.int64)[labels]
    graph = {n: [(n + 1) % total, (n + 2) % total] for n in range(total)}
    items = {"x": sparse.csr_matrix(features_all[:train]), "allx": sparse.csr_matrix(features_all[:allx_count]),
             "tx": sparse.csr_matrix(features_all[allx_count:]), "y": one_hot[:train],
             "ally": one_hot[:allx_count], "ty": one_hot[allx_count:], "graph": graph}
    for part, value in items.items():
        with open(folder / f"ind.{name}.{part}", "wb") as handle:
            pickle.dump(value, handle)
    (folder / f"ind.{name}.test.index").write_text("\n".join(str(n) for n in range(allx_count, total)) + "\n")


def test_a_fake_planetoid_layout_loads_and_trains(tmp_path):
    write_fake_planetoid(tmp_path)
    graph = graph_data.load_graph("cora", tmp_path)
    assert graph.x.shape == (515, 6) and graph.classes == ["0", "1", "2"]
    assert torch.allclose(graph.x.sum(1), torch.ones(515))  # rows normalised
    assert [int(graph.masks[split].sum()) for split in ("train", "val", "test")] == [6, 500, 6]
    assert torch.equal(graph.y, torch.arange(515) % 3)
    out = tmp_path / "gcn.safetensors"
    result = invoke("train", "--model", "gcn", "--data", "cora", "--data-root", str(tmp_path), "--epochs", "5",
                    "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert load(out).manifest.provenance["trained"]["data_root"] == str(tmp_path)
    # later commands find the graph where it was trained from
    evaluated = invoke("eval", str(out), "--json")
    assert evaluated.returncode == 0, evaluated.stderr
    assert json.loads(evaluated.stdout)["samples"] == 6


def test_a_missing_planetoid_folder_is_one_line(tmp_path):
    assert_user_error(invoke("train", "--model", "gcn", "--data", "cora", "--data-root", str(tmp_path),
                             "--out", str(tmp_path / "m.safetensors")), "ind.cora.x", "--data-root")
    assert not (tmp_path / "m.safetensors").exists()


@pytest.fixture(scope="module")
def karate_files(tmp_path_factory):
    """train -> profile -> disassemble on KarateClub from the command line."""
    folder = tmp_path_factory.mktemp("karate")
    source, profile = folder / "gcn.safetensors", folder / "gcn.profile.safetensors"
    for args in (("train", "--model", "gcn", "--data", "karate", "--out", str(source)),
                 ("profile", str(source), "--samples-per-class", "5", "--out", str(profile)),
                 ("disassemble", str(source), "--profile", str(profile), "--classes", "1,2", "--evaluate",
                  "--out", str(folder / "c12.safetensors")),
                 ("disassemble", str(source), "--profile", str(profile), "--classes", "0", "--evaluate",
                  "--out", str(folder / "c0.safetensors"))):
        result = invoke(*args)
        assert result.returncode == 0, (args, result.stderr)
    return folder, source, profile


def test_the_command_line_chain_on_karate(karate_files):
    folder, source, profile = karate_files
    compared = invoke("eval", str(folder / "c12.safetensors"), "--against", str(source), "--json")
    assert compared.returncode == 0, compared.stderr
    report = json.loads(compared.stdout)
    assert report["unit"] == "node" and report["classes"] == ["1", "2"]
    assert report["params"] < report["source_params"] and report["flops"] < report["source_flops"]
    assert report["samples"] == int(sum(report["test_samples_per_class"].values()))
    table = invoke("eval", str(folder / "c12.safetensors"), "--against", str(source))
    assert "Restricted base" in table.stdout and "nodes" in table.stdout
    assembled = invoke("assemble", str(folder / "c0.safetensors"), str(folder / "c12.safetensors"),
                       "--mode", "parallel", "--out", str(folder / "a.safetensors"))
    assert assembled.returncode == 0, assembled.stderr
    model, manifest = load(folder / "a.safetensors")
    assert manifest.kind == "assembly" and manifest.class_names == ["0", "1", "2"]
    evaluated = invoke("eval", str(folder / "a.safetensors"), "--json")
    assert evaluated.returncode == 0 and json.loads(evaluated.stdout)["base"] is not None
    # --auto judges α/β on the task's validation nodes, never the test nodes
    auto = invoke("disassemble", str(source), "--profile", str(profile), "--classes", "1,2", "--auto",
                  "--out", str(folder / "auto.safetensors"))
    assert auto.returncode == 0, auto.stderr
    assert "validation nodes" in auto.stdout
    record = load(folder / "auto.safetensors").manifest.provenance["disassembled"]["auto"]
    assert record["validation_samples"] == 3  # karate's validation nodes of classes 1 and 2


@pytest.mark.parametrize("classes, fragment", [("7", "out of range"), ("nope", "not in")])
def test_a_task_with_an_unknown_class_is_one_line(karate_files, classes, fragment):
    folder, source, profile = karate_files
    out = folder / "bad.safetensors"
    assert_user_error(invoke("disassemble", str(source), "--profile", str(profile), "--classes", classes,
                             "--out", str(out)), fragment)
    assert not out.exists()


def test_graph_components_assemble_in_parallel_by_default_and_refuse_padded(karate_files):
    folder, _, _ = karate_files
    parts = [str(folder / "c0.safetensors"), str(folder / "c12.safetensors")]
    assert invoke("assemble", *parts, "--out", str(folder / "p.safetensors")).returncode == 0
    assert load(folder / "p.safetensors").manifest.provenance["assembled"]["mode"] == "parallel"
    assert_user_error(invoke("assemble", *parts, "--mode", "padded", "--out", str(folder / "q.safetensors")),
                      "--mode parallel")


def test_a_graph_file_that_is_not_ours_is_one_line(karate_files, tmp_path):
    _, source, profile = karate_files
    foreign = tmp_path / "foreign.safetensors"
    save_file({"convs.0.lin.weight": torch.zeros(2, 2)}, str(foreign), metadata={"format": "pt"})
    assert_user_error(invoke("profile", str(foreign), "--out", str(tmp_path / "p.safetensors")), "not a modellego")
    assert_user_error(invoke("disassemble", str(source), "--profile", str(foreign), "--classes", "0",
                             "--out", str(tmp_path / "c.safetensors")), str(foreign))
    # a GCN manifest whose input does not match its architecture
    model, manifest = load(source)
    manifest.architecture["in_features"] = 99
    tensors = {key: value.contiguous() for key, value in model.state_dict().items()}
    damaged = tmp_path / "damaged.safetensors"
    save_file(tensors, str(damaged), metadata={"modellego": manifest.to_json()})
    assert_user_error(invoke("eval", str(damaged)), "in_features")
    # tensors that do not fit the manifest's GCN
    model, manifest = load(source)
    tensors = {key: value.contiguous() for key, value in model.state_dict().items()}
    tensors["convs.0.lin.weight"] = torch.zeros(tensors["convs.0.lin.weight"].shape[0], 10)
    save_file(tensors, str(damaged), metadata={"modellego": manifest.to_json()})
    assert_user_error(invoke("eval", str(damaged)), "inconsistent", "convs.0 takes 10 features")
    # a profile of another model
    other = tmp_path / "other.safetensors"
    invoke("train", "--model", "gcn", "--data", "karate", "--epochs", "3", "--seed", "1", "--out", str(other))
    assert_user_error(invoke("disassemble", str(other), "--profile", str(profile), "--classes", "0",
                             "--out", str(tmp_path / "c.safetensors")), "different model")


def test_without_torch_geometric_graph_commands_say_how_to_install(tmp_path, karate_files):
    """A torch_geometric that fails to import (as when it is not installed): one line, exit 2; images unaffected."""
    blocker = tmp_path / "blocker" / "torch_geometric"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('No module named torch_geometric')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(blocker.parent), str(SRC)]), PYTHONWARNINGS="ignore",
               COLUMNS="200")
    _, source, _ = karate_files

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "modellego", *args], capture_output=True, text=True, env=env,
                              timeout=300)

    for args in (("train", "--model", "gcn", "--data", "sbm", "--out", str(tmp_path / "m.safetensors")),
                 ("eval", str(source))):  # building a GCN from a file imports torch_geometric lazily
        assert_user_error(run(*args), "torch_geometric", "pip install 'modellego[graph]'")


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return dict(load(path).model.state_dict())


def _differ(first: Path, second: Path) -> bool:
    a, b = _weights(first), _weights(second)
    return a.keys() != b.keys() or any(a[key].shape != b[key].shape or not torch.equal(a[key], b[key]) for key in a)


def test_every_disassemble_option_on_a_graph_changes_the_result_or_is_refused(karate_files, tmp_path):
    """No option is dropped silently on a graph model: each changes what is written, or is refused in one line."""
    _, source, profile = karate_files
    base = ["disassemble", str(source), "--profile", str(profile), "--classes", "1,2"]

    def run(name: str, *extra: str) -> Path:
        out = tmp_path / f"{name}.safetensors"
        result = invoke(*base, *extra, "--out", str(out))
        assert result.returncode == 0, (extra, result.stderr)
        return out

    default = run("default")
    assert _differ(default, run("pure", "--no-reconstruct"))          # the paper's pure method: not re-fitted
    assert _differ(default, run("ridge", "--ridge", "10"))             # the re-fit's pull towards the source
    assert _differ(default, run("samples", "--reconstruct-samples", "3"))
    assert _differ(run("seed0", "--reconstruct-samples", "2"), run("seed1", "--reconstruct-samples", "2", "--seed", "1"))
    assert _differ(default, run("alpha", "--alpha-conv", "0.9", "--beta-conv", "0.9"))
    evaluated = load(run("evaluated", "--evaluate")).manifest.metrics
    assert "restricted_base" in evaluated and "restricted_base" not in load(default).manifest.metrics
    auto = load(run("auto", "--auto")).manifest.provenance["disassembled"]["auto"]
    fine = load(run("fine", "--auto", "--grid-step", "0.05")).manifest.provenance["disassembled"]["auto"]
    assert (auto["grid"], fine["grid"]) == (42, 143) and fine["grid_step"] == 0.05
    loose = load(run("loose", "--auto", "--max-drop", "100")).manifest.provenance["disassembled"]["auto"]
    assert loose["max_drop"] == 100 and loose["pareto"][0]["flops"] <= auto["pareto"][0]["flops"]
    refused = {("--flatten", "keep-all"): "--flatten does not apply to GCN models",
               ("--alpha-fc", "0.5"): "--alpha-fc does not apply", ("--beta-fc", "0.5"): "--beta-fc does not apply",
               ("--image-size", "32"): "--image-size does not apply", ("--no-verify",): "--no-verify does not apply",
               ("--max-drop", "5"): "--max-drop only applies with --auto",
               ("--grid-step", "0.05"): "--grid-step only applies with --auto",
               ("--no-reconstruct", "--ridge", "1"): "--ridge has no effect with --no-reconstruct",
               ("--no-reconstruct", "--reconstruct-samples", "3"): "--reconstruct-samples has no effect",
               ("--data-root", str(tmp_path)): "--data-root does not apply"}
    for extra, fragment in refused.items():
        out = tmp_path / "refused.safetensors"
        assert_user_error(invoke(*base, *extra, "--out", str(out)), fragment)
        assert not out.exists()


def test_every_assemble_option_on_a_graph_changes_the_result_or_is_refused(karate_files, tmp_path):
    folder, _, _ = karate_files
    parts = [str(folder / "c0.safetensors"), str(folder / "c12.safetensors")]

    def run(name: str, *extra: str):
        out = tmp_path / f"{name}.safetensors"
        result = invoke("assemble", *parts, *extra, "--out", str(out))
        assert result.returncode == 0, (extra, result.stderr)
        return load(out).manifest.provenance["assembled"], out

    default, default_file = run("default")
    assert default["mode"] == "parallel" and default["calibration"] == "scale"  # auto: the one graphs have
    assert run("parallel", "--mode", "parallel")[0]["mode"] == "parallel"
    unscaled, unscaled_file = run("none", "--no-scale")
    assert unscaled["calibration"] == "none" and _differ(default_file, unscaled_file)
    assert run("none2", "--calibration", "none")[0]["calibration"] == "none"
    assert run("scale", "--calibration", "scale")[0]["calibration"] == "scale"
    refused = {("--mode", "padded"): "--mode parallel", ("--calibration", "knn"): "not 'knn'",
               ("--image-size", "32"): "--image-size does not apply", ("--no-verify",): "--no-verify does not apply",
               ("--data-root", str(tmp_path)): "--data-root does not apply"}
    for extra, fragment in refused.items():
        assert_user_error(invoke("assemble", *parts, *extra, "--out", str(tmp_path / "r.safetensors")), fragment)


def test_reconstruction_keeping_every_feature_returns_the_source_and_refits_a_cut(karate_source):
    graph, model, profile = karate_source
    task = TaskGraph(graph, graph.y, graph.classes)
    nodes = Nodes(task, profile.samples, profile.sample_labels)
    whole, cut = KIND.cut(model, full_masks(model, graph.classes), [0, 1, 2, 3], None, graph.spec)
    record = KIND.reconstruct(whole, model, cut, nodes, 1e-3)
    assert record.layers == 1  # only the classifier's rows change (here: all kept, in order) ...
    torch.testing.assert_close(method.logits_of(whole, graph.x, graph.edge_index),
                               method.logits_of(model, graph.x, graph.edge_index), rtol=1e-4, atol=1e-4)
    masks = KIND.locate(model, profile, PAPER, KIND.channels(model, graph.spec), FlattenRule.ANY_FEATURE)
    part, cut = KIND.cut(model, masks, [1, 2], None, graph.spec)
    before = method.logits_of(part, graph.x, graph.edge_index)
    KIND.reconstruct(part, model, cut, nodes, 1e-3)
    after = method.logits_of(part, graph.x, graph.edge_index)
    target = method.logits_of(model, graph.x, graph.edge_index)[:, [1, 2]]
    chosen = profile.samples[torch.isin(profile.sample_labels, torch.tensor([1, 2]))]
    # the re-fit brings the component's logits on the nodes it was fitted on closer to its source's
    assert (after[chosen] - target[chosen]).norm() <= (before[chosen] - target[chosen]).norm() + 1e-6


def test_gcn_flops_of_a_cut_are_what_the_counter_counts(karate_source):
    graph, model, profile = karate_source
    masks = KIND.locate(model, profile, PAPER, KIND.channels(model, graph.spec), FlattenRule.ANY_FEATURE)
    part, cut = KIND.cut(model, masks, [1, 2], None, graph.spec)
    candidates = method.GraphCandidates(model, profile, [1, 2], None, KIND.channels(model, graph.spec), None, 1e-3)
    assert candidates.flops(cut) == KIND.count_flops(part, graph.spec)
