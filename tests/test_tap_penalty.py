"""The fused TAP penalty against its float64 reference (TAP paper Eq. 7-8)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from auditkit import ops
from auditkit.models import capture_activations
from auditkit.ops._reference import (
    downscale_mask_reference,
    tap_penalty_reference,
    weighted_relu_sum_backward_reference,
)

from .conftest import DEVICES

LAYOUTS = ["contiguous", "channels_last", "strided", "permuted"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]

# Relative tolerances of the op against the float64 reference on the same
# (already rounded) input values: accumulation is float32 (float64 for
# float64), and gradients are rounded to the activation's dtype.
FORWARD_RTOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 2e-6, torch.bfloat16: 2e-6}
GRAD_RTOL = {torch.float64: 1e-12, torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def with_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values as ``t`` (N, C, h, w) with other strides."""
    if layout == "contiguous":
        return t.contiguous()
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "strided":  # a non-dense view: every other column of a wider tensor
        wide = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
        wide[..., ::2] = t
        return wide[..., ::2]
    if layout == "permuted":  # dense, but neither contiguous nor channels_last
        return t.transpose(2, 3).contiguous().transpose(2, 3)
    raise ValueError(layout)


def random_mask(n, height, width, device, dtype=torch.float32, soft=False, four_d=True):
    values = torch.rand(n, height, width, device=device)
    mask = values if soft else (values > 0.7).float()
    mask = mask.to(dtype)
    return mask.unsqueeze(1) if four_d else mask


def assert_penalty_matches(activation, mask, kernel_size):
    """Forward and backward of the op against autograd through the reference."""
    activation = activation.detach().requires_grad_(True)
    penalty = ops.tap_penalty(activation, mask, kernel_size)
    acc = torch.float64 if activation.dtype == torch.float64 else torch.float32
    assert penalty.dtype == acc and penalty.shape == (activation.shape[0],)

    exact = activation.detach().double().requires_grad_(True)
    expected = tap_penalty_reference(exact, mask.double(), kernel_size)
    # Bound the accumulation error by the sum of absolute terms.
    scale = tap_penalty_reference(exact.detach().abs(), mask.double(), kernel_size) + 1e-30
    rtol = FORWARD_RTOL[activation.dtype]
    err = (penalty.double() - expected.detach()).abs()
    assert torch.all(err <= rtol * scale + 1e-12), f"forward error {err.max().item():g}"

    weights = torch.randn(activation.shape[0], dtype=torch.float64, device=activation.device)
    (grad,) = torch.autograd.grad((penalty * weights.to(acc)).sum(), activation)
    (expected_grad,) = torch.autograd.grad((expected * weights).sum(), exact)
    assert grad.dtype == activation.dtype and grad.shape == activation.shape
    gtol = GRAD_RTOL[activation.dtype]
    gerr = (grad.double() - expected_grad).abs()
    assert torch.all(gerr <= gtol * expected_grad.abs() + 1e-30), f"gradient error {gerr.max().item():g}"


@st.composite
def tap_cases(draw):
    n = draw(st.integers(0, 3))
    c = draw(st.integers(1, 5))
    h = draw(st.integers(1, 9))
    w = draw(st.integers(1, 9))
    height = draw(st.integers(h, 3 * h + 6))  # often not divisible by h
    width = draw(st.integers(w, 3 * w + 6))
    kernel_size = draw(st.sampled_from([1, 2, 3, 5]))
    layout = draw(st.sampled_from(LAYOUTS))
    dtype = draw(st.sampled_from(DTYPES))
    mask_dtype = draw(st.sampled_from([torch.float32, torch.float64, torch.float16]))
    soft = draw(st.booleans())
    four_d = draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    return n, c, h, w, height, width, kernel_size, layout, dtype, mask_dtype, soft, four_d, seed


@pytest.mark.parametrize("device", DEVICES)
@given(case=tap_cases())
def test_matches_reference_on_random_shapes(device, case):
    n, c, h, w, height, width, kernel_size, layout, dtype, mask_dtype, soft, four_d, seed = case
    generator = torch.Generator().manual_seed(seed)
    activation = torch.randn(n, c, h, w, generator=generator).to(device=device, dtype=dtype)
    mask = random_mask(n, height, width, device, mask_dtype, soft, four_d)
    assert_penalty_matches(with_layout(activation, layout), mask, kernel_size)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_layouts_and_dtypes_at_network_sizes(device, layout, dtype):
    # Sizes like a real first conv layer, large enough for multi-threaded and
    # multi-block reductions.
    activation = torch.randn(4, 32, 28, 28, device=device).to(dtype)
    mask = random_mask(4, 224, 224, device)
    assert_penalty_matches(with_layout(activation, layout), mask, 3)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kernel_size", [1, 2, 3])
def test_gradcheck_float64(device, layout, kernel_size):
    activation = with_layout(torch.randn(2, 3, 5, 6, dtype=torch.float64, device=device), layout)
    # Keep values away from 0, where relu is not differentiable.
    activation = torch.where(activation.abs() < 0.05, activation.sign() * 0.1 + 0.01, activation)
    activation.requires_grad_(True)
    mask = random_mask(2, 13, 17, device, torch.float64, soft=True)
    assert torch.autograd.gradcheck(lambda a: ops.tap_penalty(a, mask, kernel_size), (activation,))


def sample_inputs(device, requires_grad=True):
    def make(shape, dtype=torch.float32, layout="contiguous"):
        t = with_layout(torch.randn(*shape, device=device, dtype=dtype), layout)
        return t.requires_grad_(requires_grad)

    return [
        (make((2, 4, 7, 7)), random_mask(2, 28, 28, device), 3),
        (make((3, 2, 5, 6), torch.float64, "channels_last"), random_mask(3, 11, 13, device, soft=True), 1),
        (make((2, 3, 4, 4), layout="strided"), random_mask(2, 9, 9, device, four_d=False), 2),
        (make((0, 3, 4, 4)), random_mask(0, 8, 8, device), 3),
    ]


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    for activation, mask, kernel_size in sample_inputs(device):
        sizes = [activation.shape[2], activation.shape[3], 3, 2]
        torch.library.opcheck(torch.ops.auditkit.downscale_mask.default, (mask, [kernel_size], sizes))
        torch.library.opcheck(
            torch.ops.auditkit.downscale_mask.default, (mask, [kernel_size], sizes), {"dtype": torch.float64}
        )
        # One kernel size per layer (a dilation that grows with depth).
        torch.library.opcheck(torch.ops.auditkit.downscale_mask.default,
                              (mask, [kernel_size, 2 * kernel_size + 1], sizes))
        weights = ops.downscale_mask(mask, activation.shape[-2:], kernel_size)
        torch.library.opcheck(torch.ops.auditkit.weighted_relu_sum.default, (activation, weights))
        grad = torch.randn(activation.shape[0], device=device)
        torch.library.opcheck(
            torch.ops.auditkit.weighted_relu_sum_backward.default, (grad, activation.detach(), weights)
        )
        for base_layout in ("contiguous", "permuted"):  # same strides as the result, and a copy
            base = with_layout(torch.randn(activation.shape, device=device, dtype=activation.dtype), base_layout)
            torch.library.opcheck(
                torch.ops.auditkit.weighted_relu_sum_backward.default, (grad, activation.detach(), weights, base)
            )


@pytest.mark.parametrize("device", DEVICES)
@given(
    n=st.integers(0, 3),
    h=st.integers(1, 8),
    w=st.integers(1, 8),
    extra_h=st.integers(0, 40),
    extra_w=st.integers(0, 40),
    kernel_size=st.integers(1, 6),
    mask_dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32, torch.float64]),
)
def test_downscale_mask_matches_torch_pooling(device, n, h, w, extra_h, extra_w, kernel_size, mask_dtype):
    mask = torch.rand(n, 1, h + extra_h, w + extra_w, device=device).to(mask_dtype)
    # Several sizes in one call, as tap_loss asks for them.
    sizes = [(h, w), (max(1, h // 2), w), (h + extra_h, w + extra_w)]
    got = ops.downscale_masks(mask, sizes, kernel_size)
    for size, d in zip(sizes, got):
        expected = downscale_mask_reference(mask.double(), size, kernel_size)
        assert d.shape == (n, *size)
        assert d.dtype == (torch.float64 if mask_dtype == torch.float64 else torch.float32)
        torch.testing.assert_close(d.double(), expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("device", DEVICES)
@given(
    n=st.integers(0, 3),
    height=st.integers(4, 40),
    width=st.integers(4, 40),
    layers=st.lists(st.tuples(st.integers(1, 4), st.integers(1, 4), st.integers(1, 23)), min_size=1, max_size=4),
    mask_dtype=st.sampled_from([torch.float16, torch.bfloat16, torch.float32, torch.float64]),
)
def test_one_kernel_size_per_layer_matches_torch_pooling(device, n, height, width, layers, mask_dtype):
    # Each layer has its own size (height // a, width // b) and its own k (up to wider than the mask).
    mask = torch.rand(n, 1, height, width, device=device).to(mask_dtype)
    sizes = [(max(1, height // a), max(1, width // b)) for a, b, _ in layers]
    kernel_sizes = [k for _, _, k in layers]
    got = ops.downscale_masks(mask, sizes, kernel_sizes)
    for size, k, d in zip(sizes, kernel_sizes, got):
        torch.testing.assert_close(d.double(), downscale_mask_reference(mask.double(), size, k), rtol=1e-6, atol=1e-7)


def test_tap_loss_with_one_kernel_size_per_layer_equals_its_reference():
    torch.manual_seed(3)
    mask = random_mask(2, 16, 16, "cpu")
    activations = [torch.randn(2, 3, 16, 16, dtype=torch.float64), torch.randn(2, 4, 8, 8, dtype=torch.float64),
                   torch.randn(2, 4, 8, 8, dtype=torch.float64)]  # two layers of one size, two kernel sizes
    got = ops.tap_loss(activations, mask, [3, 5, 9])
    expected = sum(tap_penalty_reference(a, mask, k).mean() for a, k in zip(activations, [3, 5, 9])) / 3
    torch.testing.assert_close(got, expected)


def test_downscale_widens_the_region_by_half_the_kernel():
    # A single annotated pixel covers a 3x3 block after MaxPool_3 (Eq. 7), so
    # a 1:1 "downscale" with k=3 marks exactly the 8-neighbourhood.
    mask = torch.zeros(1, 1, 8, 8)
    mask[0, 0, 4, 4] = 1
    d = ops.downscale_mask(mask, (8, 8), 3)[0]
    expected = torch.zeros(8, 8)
    expected[3:6, 3:6] = 1
    torch.testing.assert_close(d, expected)
    # Halving the resolution averages 2x2 windows of that block.
    d2 = ops.downscale_mask(mask, (4, 4), 3)[0]
    assert d2[1, 1] == 0.25 and d2[2, 2] == 1.0 and d2[1, 2] == 0.5 and d2[0, 0] == 0


def test_penalty_counts_only_positive_activation_inside_the_mask():
    activation = torch.tensor([[[[1.0, -2.0], [3.0, 4.0]]]])  # N=1, C=1, 2x2
    mask = torch.tensor([[[1.0, 0.0], [1.0, 0.5]]])
    # k=1 and same size: D = M, so P = 1*1 + 0*0 + 1*3 + 0.5*4 = 6
    assert ops.tap_penalty(activation, mask, kernel_size=1).item() == 6.0


def test_tap_loss_is_mean_over_layers_of_batch_means():
    mask = random_mask(4, 32, 32, "cpu")
    layers = [torch.randn(4, 8, 16, 16), torch.randn(4, 16, 8, 8), torch.randn(4, 4, 4, 4)]
    loss = ops.tap_loss(layers, mask)
    expected = sum(tap_penalty_reference(a, mask).mean() for a in layers) / 3
    torch.testing.assert_close(loss, expected.float())


def test_tap_loss_of_an_empty_batch_is_zero_and_empty_layer_list_is_an_error():
    assert ops.tap_loss([torch.randn(0, 2, 4, 4)], torch.zeros(0, 8, 8)).item() == 0.0
    with pytest.raises(ValueError, match="`activations` is empty"):
        ops.tap_loss([], torch.zeros(1, 8, 8))


def test_zero_channels_gives_zero_penalty():
    penalty = ops.tap_penalty(torch.randn(2, 0, 4, 4), torch.ones(2, 8, 8))
    assert penalty.tolist() == [0.0, 0.0]


def test_mask_is_a_constant():
    activation = torch.randn(2, 3, 4, 4, requires_grad=True)
    mask = torch.rand(2, 1, 8, 8, requires_grad=True)
    ops.tap_penalty(activation, mask).sum().backward()
    assert activation.grad is not None and mask.grad is None


def test_double_backward_fails_loudly():
    activation = torch.randn(2, 3, 4, 4, requires_grad=True)
    mask = random_mask(2, 8, 8, "cpu")
    (grad,) = torch.autograd.grad(ops.tap_penalty(activation, mask).sum(), activation, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        grad.sum().backward()


def test_compiles_with_torch_compile():
    mask = random_mask(3, 16, 16, "cpu")

    def loss_fn(a, b):
        return ops.tap_loss([a.relu() * 2, b], mask)

    compiled = torch.compile(loss_fn, backend="aot_eager", fullgraph=True)
    a = torch.randn(3, 4, 8, 8, requires_grad=True)
    b = torch.randn(3, 2, 4, 4, requires_grad=True)
    got = compiled(a, b)
    got.backward()
    grads = (a.grad.clone(), b.grad.clone())
    a.grad = b.grad = None
    expected = loss_fn(a, b)
    expected.backward()
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(grads[0], a.grad)
    torch.testing.assert_close(grads[1], b.grad)


def test_backward_reference_helper_agrees_with_the_op():
    activation = torch.randn(2, 3, 5, 5)
    d = ops.downscale_mask(random_mask(2, 10, 10, "cpu"), (5, 5))
    grad = torch.randn(2)
    torch.testing.assert_close(
        torch.ops.auditkit.weighted_relu_sum_backward(grad, activation, d),
        weighted_relu_sum_backward_reference(grad, activation, d),
    )


def test_weighted_relu_sum_refuses_weights_that_require_grad():
    activation = torch.randn(2, 3, 4, 4, requires_grad=True)
    weights = torch.rand(2, 4, 4, requires_grad=True)
    with pytest.raises(ValueError, match="constants of the penalty"):
        ops.weighted_relu_sum(activation, weights)


def test_weighted_relu_sum_with_unit_weights_is_the_relu_total():
    activation = torch.randn(3, 5, 6, 7, dtype=torch.float64)
    total = ops.weighted_relu_sum(activation, torch.ones(3, 6, 7, dtype=torch.float64))
    torch.testing.assert_close(total, activation.relu().sum(dim=(1, 2, 3)))


@pytest.mark.parametrize("device", DEVICES)
@given(case=tap_cases(), base_layout=st.sampled_from(LAYOUTS))
def test_backward_with_base_adds_it_in_one_pass(device, case, base_layout):
    """weighted_relu_sum_backward(g, A, D, base) = base + g·D·1[A > 0] on random shapes, layouts and dtypes."""
    n, c, h, w, height, width, kernel_size, layout, dtype, mask_dtype, soft, four_d, seed = case
    generator = torch.Generator().manual_seed(seed)
    activation = with_layout(torch.randn(n, c, h, w, generator=generator).to(device=device, dtype=dtype), layout)
    base = with_layout(torch.randn(n, c, h, w, generator=generator).to(device=device, dtype=dtype), base_layout)
    grad = torch.randn(n, generator=generator).to(device)
    weights = ops.downscale_mask(random_mask(n, height, width, device, mask_dtype, soft, four_d), (h, w), kernel_size)
    got = torch.ops.auditkit.weighted_relu_sum_backward(grad, activation, weights, base)
    expected = weighted_relu_sum_backward_reference(grad.double(), activation.double(), weights.double(), base.double())
    assert got.dtype == dtype and got.shape == activation.shape
    # One rounding to the activation's dtype of a float32 (float64) sum.
    tol = GRAD_RTOL[dtype] * (expected.abs() + base.double().abs()) + (1e-12 if dtype == torch.float64 else 1e-6)
    assert torch.all((got.double() - expected).abs() <= tol)


class ResidualNet(torch.nn.Module):
    """conv -> relu(inplace) -> conv + skip -> relu -> head: the targeted outputs feed both a
    residual addition and further layers, as in a ResNet block."""

    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(2, 4, 3, padding=1)
        self.conv2 = torch.nn.Conv2d(4, 4, 3, padding=1)
        self.head = torch.nn.Linear(4, 3)

    def forward(self, x):
        a1 = torch.relu_(self.conv1(x))  # modifies the captured conv1 output in place
        a2 = torch.relu(self.conv2(a1) + a1)
        return self.head(a2.mean(dim=(2, 3)))


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_deferred_gradient_equals_the_standard_one(layout):
    """tap_loss(..., defer_gradient=True) adds dP/dA when backward reaches each layer; the
    parameter gradients equal autograd through the plain penalty, also through a skip connection."""
    torch.manual_seed(0)
    model = ResidualNet().double()
    images = with_layout(torch.randn(3, 2, 9, 9, dtype=torch.float64), layout)
    mask = random_mask(3, 9, 9, "cpu", torch.float64, soft=True)
    labels = torch.tensor([0, 2, 1])

    def step(defer):
        model.zero_grad()
        # conv1's output is overwritten by relu_ later: captured from a copy (what TAP's objective does).
        with capture_activations(model, ["conv1", "conv2"], copy=[0]) as activations:
            logits = model(images)
        loss = torch.nn.functional.cross_entropy(logits, labels) + 0.7 * ops.tap_loss(
            activations, mask, 3, defer_gradient=defer
        )
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    loss_standard, grads_standard = step(False)
    loss_deferred, grads_deferred = step(True)
    torch.testing.assert_close(loss_deferred, loss_standard, rtol=1e-12, atol=0)
    for got, expected in zip(grads_deferred, grads_standard):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)
    assert any(g.abs().sum() > 0 for g in grads_deferred)


def test_deferred_gradient_refuses_a_layer_that_feeds_only_the_penalty():
    """Autograd cannot turn "no incoming gradient" into one, so this says what to do instead."""
    activation = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)
    mask = random_mask(2, 8, 8, "cpu", torch.float64, soft=True)
    with pytest.raises(RuntimeError, match="reaches the loss only through the penalty"):
        ops.tap_loss([activation * 2], mask, defer_gradient=True).backward()
