"""Contributions C⁺[b,o,i] of Conv2d/Linear layers, checked against the definition followed literally."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from helpers import reference_contribution as reference
from helpers import reference_padding, reference_signed
from modellego.core.contributions import _contributions, contributions, window_sums
from modellego.errors import ModellegoError

# torch warns that 'same' with even kernels pads a copy of the input; that is what it is meant to do.
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same'")

SETTINGS = settings(max_examples=50, deadline=None)


@st.composite
def conv_cases(draw: st.DrawFn) -> tuple[nn.Conv2d, torch.Tensor]:
    """A random Conv2d (float64) and a batch that gives it at least one output position."""
    g = draw(st.integers(1, 3))
    ig, og = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    kernel = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    mode = draw(st.sampled_from(["int", "tuple", "same", "valid"]))
    if mode == "same":
        stride = (1, 1)  # torch allows 'same' only with stride 1
        padding: int | tuple[int, int] | str = "same"
    else:
        stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
        padding = {"int": draw(st.integers(0, 2)), "tuple": (draw(st.integers(0, 2)), draw(st.integers(0, 2))),
                   "valid": "valid"}[mode]
    conv = nn.Conv2d(g * ig, g * og, kernel, stride=stride, padding=padding, dilation=dilation, groups=g,
                     bias=draw(st.booleans())).double()
    left, right, top, bottom = reference_padding(conv)
    size = []
    for k, d, lo, hi in zip(kernel, dilation, (top, left), (bottom, right)):
        smallest = max(1, d * (k - 1) + 1 - lo - hi)
        size.append(draw(st.integers(smallest, smallest + 6)))
    batch = draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**31 - 1))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator, dtype=torch.float64))
    x = torch.randn(batch, g * ig, *size, generator=generator, dtype=torch.float64)
    return conv, x


@SETTINGS
@given(conv_cases())
def test_conv_matches_definition(case):
    conv, x = case
    got = contributions(conv, x)
    assert got.shape == (x.shape[0], conv.out_channels, conv.in_channels)
    torch.testing.assert_close(got, reference(conv, x))


@SETTINGS
@given(conv_cases())
def test_signed_contributions_add_up_to_the_conv_output(case):
    """Σ_i C[b,o,i] = Σ_p (conv(x) − bias)[b,o,p]: this also ties our padding to torch's own."""
    conv, x = case
    signed = _contributions(conv, x, positive=False)
    torch.testing.assert_close(signed, reference_signed(conv, x))
    with torch.no_grad():
        y = conv(x)
    if conv.bias is not None:
        y = y - conv.bias[:, None, None]
    torch.testing.assert_close(signed.sum(dim=2), y.sum(dim=(2, 3)))


def test_positive_weights_and_inputs_need_no_clamping():
    conv = nn.Conv2d(5, 7, 3)
    with torch.no_grad():
        conv.weight.uniform_(0.0, 1.0)
    x = torch.rand(4, 5, 9, 8)
    got = contributions(conv, x)
    assert (got >= 0).all()
    with torch.no_grad():
        expected = (conv(x) - conv.bias[:, None, None]).sum(dim=(2, 3))
    torch.testing.assert_close(got.sum(dim=2), expected, rtol=1e-5, atol=1e-3)


def test_clamps_negative_contributions_to_zero():
    conv = nn.Conv2d(2, 1, 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([1.0, -1.0]).view(1, 2, 1, 1))
    x = torch.ones(1, 2, 3, 3)
    assert contributions(conv, x).tolist() == [[[9.0, 0.0]]]


@pytest.mark.parametrize("multiplier", [1, 3])
def test_depthwise_with_channel_multiplier(multiplier):
    conv = nn.Conv2d(4, 4 * multiplier, 3, padding=1, groups=4).double()
    x = torch.randn(3, 4, 6, 5, dtype=torch.float64)
    got = contributions(conv, x)
    torch.testing.assert_close(got, reference(conv, x))
    outside = torch.ones(4 * multiplier, 4, dtype=torch.bool)
    for o in range(4 * multiplier):
        outside[o, o // multiplier] = False
    assert (got[:, outside] == 0).all()


@pytest.mark.parametrize(
    "kernel, dilation", [((2, 4), (1, 1)), ((4, 2), (3, 2)), ((3, 3), (2, 1)), ((1, 2), (1, 1))]
)
def test_same_padding_with_even_kernels(kernel, dilation):
    conv = nn.Conv2d(3, 4, kernel, padding="same", dilation=dilation).double()
    x = torch.randn(2, 3, 7, 6, dtype=torch.float64)
    torch.testing.assert_close(contributions(conv, x), reference(conv, x))
    with torch.no_grad():
        y = conv(x) - conv.bias[:, None, None]
    torch.testing.assert_close(_contributions(conv, x, positive=False).sum(dim=2), y.sum(dim=(2, 3)))


def test_vgg_sized_layer_in_float32():
    conv = nn.Conv2d(32, 48, 3, padding=1)
    x = torch.relu(torch.randn(8, 32, 16, 16))
    got = contributions(conv, x)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, reference(conv, x), rtol=1e-4, atol=1e-4)


def test_window_sums_are_the_sums_of_the_unfolded_windows():
    conv = nn.Conv2d(3, 2, (3, 2), stride=(2, 3), padding=(1, 2), dilation=(2, 1))
    x = torch.randn(2, 3, 11, 10, dtype=torch.float64)
    cols = F.unfold(F.pad(x, (2, 2, 1, 1)), (3, 2), dilation=(2, 1), stride=(2, 3))
    expected = cols.view(2, 3, 3, 2, -1).sum(dim=-1)
    torch.testing.assert_close(window_sums(x, conv), expected)


def test_follows_the_input_dtype_and_needs_no_grad():
    conv = nn.Conv2d(3, 4, 3)
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64, requires_grad=True)
    got = contributions(conv, x)
    assert got.dtype == torch.float64
    assert not got.requires_grad
    torch.testing.assert_close(got, reference(conv.double(), x.detach()))


def test_linear_two_dimensional_input():
    linear = nn.Linear(5, 3).double()
    x = torch.randn(4, 5, dtype=torch.float64)
    expected = (linear.weight.detach()[None] * x[:, None, :]).clamp(min=0)
    got = contributions(linear, x)
    assert got.shape == (4, 3, 5)
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("middle", [(6,), (2, 3)])
def test_linear_sums_extra_middle_dimensions(middle):
    linear = nn.Linear(5, 3, bias=False).double()
    x = torch.randn(4, *middle, 5, dtype=torch.float64)
    got = contributions(linear, x)
    with torch.no_grad():
        signed_sum = linear(x).reshape(4, -1, 3).sum(dim=1)  # Σ over middle dims of W·x
    torch.testing.assert_close(_contributions(linear, x, positive=False).sum(dim=2), signed_sum)
    summed = x.reshape(4, -1, 5).sum(dim=1)
    torch.testing.assert_close(got, (linear.weight.detach()[None] * summed[:, None, :]).clamp(min=0))


@pytest.mark.parametrize("layer, name", [(nn.Conv1d(3, 4, 3), "nn.Conv1d"), (nn.ReLU(), "nn.ReLU")])
def test_refuses_other_layer_types(layer, name):
    with pytest.raises(ModellegoError, match=f"nn.Conv2d and nn.Linear, not {name}$"):
        contributions(layer, torch.randn(2, 3, 8))


def test_refuses_non_zero_padding_modes():
    conv = nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect")
    with pytest.raises(ModellegoError, match="padding_mode='reflect'") as err:
        contributions(conv, torch.randn(2, 3, 8, 8))
    assert "Conv2d(3, 4" in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("shape", [(3, 8, 8), (1, 2, 3, 8, 8), (2, 5, 8, 8)])
def test_refuses_conv_inputs_of_the_wrong_shape(shape):
    with pytest.raises(ModellegoError, match="input of Conv2d"):
        contributions(nn.Conv2d(3, 4, 3), torch.randn(*shape))


def test_refuses_conv_inputs_too_small_for_the_kernel():
    with pytest.raises(ModellegoError, match="too small"):
        contributions(nn.Conv2d(3, 4, 5), torch.randn(1, 3, 4, 8))


@pytest.mark.parametrize("shape", [(5,), (4, 6)])
def test_refuses_linear_inputs_of_the_wrong_shape(shape):
    with pytest.raises(ModellegoError, match="input of Linear"):
        contributions(nn.Linear(5, 3), torch.randn(*shape))


@settings(max_examples=30, deadline=None)
@given(batch=st.integers(1, 6), inputs=st.integers(1, 9), outputs=st.integers(1, 7), middle=st.integers(0, 3),
       classes=st.integers(1, 4), seed=st.integers(0, 10_000))
def test_linear_class_sums_equal_the_per_sample_definition(batch, inputs, outputs, middle, classes, seed):
    """The Linear shortcut (W⁺·Σs⁺ + W⁻·Σs⁻, no [B, O, I] tensor) equals Σ_b max(W·s_b, 0) summed per class."""
    from modellego.core.contributions import class_sums

    generator = torch.Generator().manual_seed(seed)
    layer = nn.Linear(inputs, outputs)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(outputs, inputs, generator=generator))
    shape = (batch, *([middle] if middle else []), inputs)
    x = torch.randn(*shape, generator=generator)
    labels = torch.randint(0, classes, (batch,), generator=generator)
    summed = x.reshape(batch, -1, inputs).sum(1).double() if middle else x.double()
    expected = torch.zeros(classes, outputs, inputs, dtype=torch.float64)
    for b in range(batch):
        expected[labels[b]] += (layer.weight.double() * summed[b]).clamp(min=0)
    # float32 sums over the middle tokens: agreement to float32 precision, not float64's default 1e-7
    torch.testing.assert_close(class_sums(layer, x, labels, classes), expected, rtol=1e-5, atol=1e-6)
