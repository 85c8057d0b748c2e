"""Profiles, locating and disassembly: against slow references, on hand-built graphs, on every architecture."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import modellego
from helpers import FASHION, random_classifier, random_masks, reference_contribution, synthetic_profile
from modellego import commands, data
from modellego.core.hashing import weights_hash
from modellego.core.locate import Thresholds, locate
from modellego.core.profile import profile
from modellego.errors import ModellegoError
from modellego.io.manifest import Brick
from modellego.io.profiles import load_profile, save_profile


def test_profile_equals_the_definition(lenet, lenet_profile):
    path, train = lenet
    model, _ = modellego.load(path)
    chosen = data.SampleSubset(train, lenet_profile.samples)
    images = torch.stack([chosen[i][0] for i in range(len(chosen))])
    labels = chosen.targets
    inputs = {}
    hooks = [module.register_forward_pre_hook(lambda m, a, n=name: inputs.__setitem__(n, a[0]))
             for name, module in model.named_modules() if isinstance(module, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        logits = model(images)
    for hook in hooks:
        hook.remove()
    assert lenet_profile.layers == list(inputs)
    for name, x in inputs.items():
        per_sample = reference_contribution(dict(model.named_modules())[name], x)
        expected = torch.stack([per_sample[labels == k].sum(0) for k in range(10)])
        torch.testing.assert_close(lenet_profile.contributions[name], expected, rtol=1e-4, atol=1e-4)
    # The samples: correctly classified, and per class the most confident ones.
    assert (logits.argmax(1) == labels).all()
    all_logits, all_labels = modellego.core.evaluate.predict(model, train)
    confidence = all_logits.softmax(1).gather(1, all_labels[:, None]).squeeze(1)
    correct = all_logits.argmax(1) == all_labels
    for k in range(10):
        picked = lenet_profile.samples[labels == k]
        others = torch.nonzero(correct & (all_labels == k)).flatten()
        others = others[~torch.isin(others, picked)]
        assert len(picked) == 10 and confidence[picked].min() >= confidence[others].max()
    assert lenet_profile.counts.tolist() == [10] * 10


def test_profile_file_round_trip_and_refusals(lenet_profile, tmp_path):
    save_profile(lenet_profile, tmp_path / "p.safetensors")
    again = load_profile(tmp_path / "p.safetensors")
    assert again.layers == lenet_profile.layers and again.digest() == lenet_profile.digest()
    for name in again.layers:
        assert torch.equal(again.contributions[name], lenet_profile.contributions[name])
    (tmp_path / "junk.safetensors").write_bytes(b"\x80\x04K\x01." * 10)
    with pytest.raises(ModellegoError, match="not a readable modellego profile"):
        load_profile(tmp_path / "junk.safetensors")


def test_profiles_over_shards_add_up(lenet):
    path, train = lenet
    model, _ = modellego.load(path)
    whole = profile(model, train, samples_per_class=6)  # 60 samples; each half holds 3 per class
    positions = whole.samples
    first, second = (data.SampleSubset(train, positions[i::2]) for i in (0, 1))
    parts = [profile(model, part, samples_per_class=3) for part in (first, second)]
    for name in whole.layers:
        torch.testing.assert_close(parts[0].contributions[name] + parts[1].contributions[name],
                                   whole.contributions[name], rtol=1e-5, atol=1e-4)


def test_a_class_with_too_few_or_no_correct_samples(lenet):
    path, train = lenet
    model, _ = modellego.load(path)
    with pytest.warns(UserWarning, match="correctly classified samples \\(asked for 399\\)"):
        result = profile(model, train, samples_per_class=399)
    assert result.counts.min() < 399 and result.notes
    with torch.no_grad():
        model.net.classifier[-1].bias[4] = -1e4  # nothing is ever classified as Coat any more
    with pytest.raises(ModellegoError, match="'Coat' has no correctly classified"):
        profile(model, train, samples_per_class=5)


def test_layers_without_conv_or_linear_are_refused(lenet):
    _, train = lenet
    with pytest.raises(ModellegoError, match="no Conv2d or Linear"):
        profile(nn.Sequential(nn.Flatten(), nn.Identity()), train, samples_per_class=1)


# --- locating on hand-built graphs, against a reference that knows each graph by hand -----------------------

def reference_locate(relative: dict, order: list[str], producers: dict, kinds: dict, num_classes: int,
                     alphas: dict) -> dict:
    """DESIGN.md's walk, with the graph given by hand: producers[consumer] = [(producer, input index -> channel)]."""
    masks = {name: None for name in order}
    masks[order[-1]] = torch.eye(num_classes, dtype=torch.bool)
    sizes = {name: relative[name].shape[1] for name in order}
    for name in order:
        if masks[name] is None:
            masks[name] = torch.zeros(num_classes, sizes[name], dtype=torch.bool)
    for name in reversed(order):
        alpha, beta = alphas[kinds[name]]
        r = relative[name]
        kept = torch.zeros(num_classes, r.shape[2], dtype=torch.bool)
        for k in range(num_classes):
            votes = torch.zeros(r.shape[2])
            for o in range(r.shape[1]):
                if masks[name][k, o]:
                    votes += (r[k, o] > alpha).float()
            normalised = (votes - votes.min()) / (votes.max() - votes.min() + 1e-5)
            kept[k] = normalised > beta
        for producer, channel_of in producers.get(name, []):
            for i in range(r.shape[2]):
                channel = channel_of(i)
                if channel is not None:
                    masks[producer][:, channel] |= kept[:, i]
    return masks


class FlattenNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(12, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(torch.relu(self.fc(torch.flatten(self.pool(torch.relu(self.conv(x))), 1))))


class ResidualNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.inner = nn.Conv2d(4, 5, 3, padding=1)
        self.outer = nn.Conv2d(5, 4, 3, padding=1)
        self.side = nn.Conv2d(4, 2, 1)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        x = torch.relu(self.stem(x))
        y = self.outer(torch.relu(self.inner(x))) + x
        z = torch.cat([torch.relu(y).mean((2, 3)), self.side(x).mean((2, 3))], 1)
        return self.head(z)


class ConcatNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.left = nn.Conv2d(1, 2, 3, padding=1)
        self.right = nn.Conv2d(1, 3, 3, padding=1)
        self.merge = nn.Conv2d(5, 4, 1)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        x = torch.cat([torch.relu(self.left(x)), torch.relu(self.right(x))], 1)
        return self.head(torch.relu(self.merge(x)).mean((2, 3)))


GRAPHS = {
    "flatten": (FlattenNet, {"fc": [("conv", lambda i: i // 4)], "head": [("fc", lambda i: i)]}),
    "residual add": (ResidualNet, {
        # y = outer(...) + stem: the head reads y (channels 0-3) and side (4-5); every consumer of the add's
        # operands maps to both operands; side and inner read stem's output.
        "head": [("outer", lambda i: i if i < 4 else None), ("stem", lambda i: i if i < 4 else None),
                 ("side", lambda i: i - 4 if i >= 4 else None)],
        "side": [("stem", lambda i: i)], "outer": [("inner", lambda i: i)], "inner": [("stem", lambda i: i)]}),
    "concat": (ConcatNet, {"head": [("merge", lambda i: i)],
                           "merge": [("left", lambda i: i if i < 2 else None), ("right", lambda i: i - 2 if i >= 2 else None)]}),
}


@pytest.mark.parametrize("graph", list(GRAPHS))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_masks_follow_the_real_graph(graph, seed):
    net_class, producers = GRAPHS[graph]
    torch.manual_seed(seed)
    model = net_class().eval()
    fake = synthetic_profile(model, (1, 6, 6), 3, seed)
    settings = dict(alpha_conv=0.3, beta_conv=0.2, alpha_fc=0.4, beta_fc=0.3)
    located = locate(model, fake, Thresholds(**settings))
    kinds = {name: "conv" if isinstance(dict(model.named_modules())[name], nn.Conv2d) else "fc" for name in fake.layers}
    expected = reference_locate({name: fake.relative(name) for name in fake.layers}, fake.layers, producers, kinds, 3,
                                {"conv": (0.3, 0.2), "fc": (0.4, 0.3)})
    for name in fake.layers:
        assert torch.equal(located.masks[name], expected[name]), name


# --- disassembly --------------------------------------------------------------------------------------------

ARCHITECTURES = [("lenet5", 1.0), ("vgg16", 0.125), ("resnet18", 0.125), ("googlenet", 0.125),
                 ("torchvision:mobilenet_v2", 0.25)]


@pytest.mark.parametrize("builder, width", ARCHITECTURES)
def test_keeping_every_channel_reproduces_the_task_logits(builder, width, tmp_path):
    model, manifest = random_classifier(builder, width, 5)
    component = commands.component(Brick(model, manifest), random_masks(model, 5), "c3,c0")
    images = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        expected = model(images)[:, [3, 0]]
        torch.testing.assert_close(component.model(images), expected, rtol=1e-5, atol=1e-5)
    modellego.save(component.model, tmp_path / "c.safetensors", component.manifest)
    reloaded, again = modellego.load(tmp_path / "c.safetensors")
    assert again.class_names == ["c3", "c0"] and again.kind == "component"
    with torch.no_grad():
        torch.testing.assert_close(reloaded(images), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("builder, width", ARCHITECTURES)
def test_partial_masks_give_smaller_standalone_components(builder, width, tmp_path):
    model, manifest = random_classifier(builder, width, 5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        component = commands.component(Brick(model, manifest), random_masks(model, 5, keep=0.4, seed=1), "c1,c4")
    assert modellego.count_params(component.model) < modellego.count_params(model)
    convs = [m for m in component.model.modules() if isinstance(m, nn.Conv2d)]
    assert convs[0].in_channels == 1 and all(m.out_channels > 0 for m in convs)
    modellego.save(component.model, tmp_path / "c.safetensors", component.manifest)
    reloaded, _ = modellego.load(tmp_path / "c.safetensors")
    images = torch.rand(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(reloaded(images), component.model(images))
        assert reloaded(images).shape == (2, 2)


def test_an_empty_layer_keeps_its_most_relevant_channel():
    model, manifest = random_classifier("lenet5", 1.0, 5)
    masks = random_masks(model, 5)
    masks.masks["net.features.3"][:] = False
    masks.scores["net.features.3"][:] = 0
    masks.scores["net.features.3"][1, 7] = 0.9
    with pytest.warns(UserWarning, match="keeping its most relevant one"):
        component = commands.component(Brick(model, manifest), masks, "c1")
    conv = component.model.net.features[3]
    assert conv.out_channels == 1
    torch.testing.assert_close(conv.weight[0], model.net.features[3].weight[7])


def test_trained_component_keeps_its_task(lenet, lenet_profile):
    path, train = lenet
    model, manifest = modellego.load(path)
    masks = locate(model, lenet_profile)
    component = commands.component(Brick(model, manifest), masks, "Bag,Trouser")
    record = component.manifest.provenance["disassembled"]
    assert record["source_hash"] == weights_hash(model) and record["profile_hash"] == lenet_profile.digest()
    assert record["task"] == ["Bag", "Trouser"] and record["alpha_conv"] == 0.3
    assert [ref.index for ref in component.manifest.classes] == [8, 1]
    test = data.task_data(component.manifest.classes, "test")
    assert modellego.core.evaluate.evaluate(component.model, test).accuracy > 0.9
    assert modellego.count_flops(component.model, FASHION) < modellego.count_flops(model, FASHION)


def test_bad_thresholds_classes_and_profiles(lenet, lenet_profile):
    path, _ = lenet
    model, manifest = modellego.load(path)
    with pytest.raises(ModellegoError, match="alpha_conv must be between 0 and 1"):
        locate(model, lenet_profile, Thresholds(alpha_conv=1.5))
    with pytest.raises(ModellegoError, match="beta_fc must be between 0 and 1"):
        locate(model, lenet_profile, Thresholds(beta_fc=-0.1))
    masks = locate(model, lenet_profile)
    with pytest.raises(ModellegoError, match="'Sofa' is not in"):
        commands.component(Brick(model, manifest), masks, "Sofa")
    with pytest.raises(ModellegoError, match="no classes"):
        commands.component(Brick(model, manifest), masks, "")
    other, _ = random_classifier("lenet5", 1.0, classes=10)
    with pytest.raises(ModellegoError, match="different model"):
        locate(other, lenet_profile)


def test_profile_takes_plain_datasets_and_data_loaders(lenet):
    """Any (input, label) data: a TensorDataset or a DataLoader gives the same samples and sums as the named dataset."""
    path, train = lenet
    model, _ = modellego.load(path)
    named = profile(model, train, samples_per_class=5)
    images = torch.stack([train[i][0] for i in range(len(train))])
    plain = torch.utils.data.TensorDataset(images, train.targets)
    for source in (plain, torch.utils.data.DataLoader(plain, batch_size=100)):
        result = profile(model, source, samples_per_class=5)
        assert result.classes == [str(k) for k in range(10)]
        assert torch.equal(result.samples, named.samples) and torch.equal(result.sample_labels, named.sample_labels)
        for name in named.layers:
            torch.testing.assert_close(result.contributions[name], named.contributions[name], rtol=1e-5, atol=1e-4)
    with pytest.raises(ModellegoError, match="shuffles"):
        profile(model, torch.utils.data.DataLoader(plain, shuffle=True), samples_per_class=5)


def test_auto_search_chooses_the_fewest_flops_meeting_the_target(lenet, lenet_profile):
    from modellego.core.search import search_thresholds, validation_data

    path, train = lenet
    model, _ = modellego.load(path)
    validation = validation_data(train, "Trouser,Bag", lenet_profile.samples, 0.1, seed=0)
    result = search_thresholds(model, lenet_profile, "Trouser,Bag", validation, max_drop=1.0,
                               alphas=(0.0, 0.3, 0.6), betas=(0.0, 0.3))
    meeting = [c for c in result.candidates if c["accuracy"] >= result.target]
    assert meeting and result.met_target
    assert modellego.count_flops(result.component, FASHION) == min(c["flops"] for c in meeting)
    assert result.thresholds.as_dict() == {key: value for key, value in min(meeting, key=lambda c: c["flops"]).items()
                                           if key.startswith(("alpha", "beta"))}
