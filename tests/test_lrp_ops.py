"""The LRP-epsilon ops (ratio, conv2d step, linear step) against their references."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import auditkit.ops  # noqa: F401  (registers the ops)
from auditkit.ops._reference import (
    lrp_epsilon_conv2d_reference,
    lrp_epsilon_linear_reference,
    lrp_epsilon_ratio_backward_reference,
    lrp_epsilon_ratio_reference,
)

from .conftest import DEVICES


def relative_error(got, expected):
    return ((got.double() - expected.double()).norm() / expected.double().norm().clamp_min(1e-30)).item()


@st.composite
def conv_cases(draw):
    groups = draw(st.sampled_from([1, 2]))
    in_channels = groups * draw(st.integers(1, 3))
    out_channels = groups * draw(st.integers(1, 3))
    kernel = draw(st.integers(1, 4))
    stride = draw(st.integers(1, 3))
    dilation = draw(st.integers(1, 2))
    padding = draw(st.integers(0, kernel // 2 + 1))
    span = dilation * (kernel - 1) + 1
    height = draw(st.integers(max(span - 2 * padding, 1), 11))
    width = draw(st.integers(max(span - 2 * padding, 1), 11))
    n = draw(st.integers(1, 3))
    k = draw(st.integers(1, 3))
    epsilon = draw(st.sampled_from([1e-6, 1e-2, 0.5]))
    seed = draw(st.integers(0, 2**31 - 1))
    return n, k, in_channels, out_channels, kernel, stride, padding, dilation, groups, height, width, epsilon, seed


@pytest.mark.parametrize("device", DEVICES)
@given(case=conv_cases())
def test_conv2d_step_matches_reference_on_random_geometries(device, case):
    n, k, cin, cout, kernel, stride, padding, dilation, groups, h, w, epsilon, seed = case
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, cin, h, w, generator=g, dtype=torch.float64).relu().to(device)
    weight = torch.randn(cout, cin // groups, kernel, kernel, generator=g, dtype=torch.float64).to(device)
    z = F.conv2d(a, weight, None, stride, padding, dilation, groups)
    relevance = torch.randn(k * n, *z.shape[1:], generator=g, dtype=torch.float64).to(device)
    args = ([stride] * 2, [padding] * 2, [dilation] * 2, groups, epsilon)
    got = torch.ops.auditkit.lrp_epsilon_conv2d(a, z, relevance, weight, *args)
    expected = lrp_epsilon_conv2d_reference(a, z, relevance, weight, *args)
    assert got.shape == (k * n, cin, h, w)
    assert relative_error(got, expected) < 1e-12
    # float32 against the float64 result
    got32 = torch.ops.auditkit.lrp_epsilon_conv2d(a.float(), z.float(), relevance.float(), weight.float(), *args)
    assert relative_error(got32, expected) < 1e-4


@pytest.mark.parametrize("device", DEVICES)
@given(n=st.integers(0, 4), k=st.integers(1, 3), fan_in=st.integers(1, 9), fan_out=st.integers(1, 9),
       seed=st.integers(0, 10**6))
def test_linear_step_and_ratio_match_reference(device, n, k, fan_in, fan_out, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, fan_in, generator=g, dtype=torch.float64).to(device)
    weight = torch.randn(fan_out, fan_in, generator=g, dtype=torch.float64).to(device)
    z = a @ weight.t()
    relevance = torch.randn(k * n, fan_out, generator=g, dtype=torch.float64).to(device)
    got = torch.ops.auditkit.lrp_epsilon_linear(a, z, relevance, weight, 0.01)
    torch.testing.assert_close(got, lrp_epsilon_linear_reference(a, z, relevance, weight, 0.01), rtol=1e-12, atol=1e-12)
    ratio = torch.ops.auditkit.lrp_epsilon_ratio(relevance, z, 0.01)
    torch.testing.assert_close(ratio, lrp_epsilon_ratio_reference(relevance, z, 0.01), rtol=1e-12, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@given(
    shape=st.lists(st.integers(0, 7), min_size=1, max_size=4),
    k=st.integers(1, 3),
    epsilon=st.sampled_from([0.0, 1e-6, 1e-2, 0.5]),
    seed=st.integers(0, 10**6),
)
def test_ratio_backward_matches_reference(device, shape, k, epsilon, seed):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(*shape, generator=g, dtype=torch.float64)
    z = (z + 0.1 * torch.where(z >= 0, 1.0, -1.0).double()).to(device)  # epsilon 0 must not divide by 0
    relevance = torch.randn(k * shape[0], *shape[1:], generator=g, dtype=torch.float64).to(device)
    grad = torch.randn(relevance.shape, generator=g, dtype=torch.float64).to(device)
    got_relevance, got_output = torch.ops.auditkit.lrp_epsilon_ratio_backward(grad, relevance, z, epsilon)
    want_relevance, want_output = lrp_epsilon_ratio_backward_reference(grad, relevance, z, epsilon)
    torch.testing.assert_close(got_relevance, want_relevance, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_output, want_output, rtol=1e-12, atol=1e-12)
    # The in-place form: d/dR written over `grad`, d/dz returned.
    overwritten = grad.clone()
    got_output = torch.ops.auditkit.lrp_epsilon_ratio_backward_(overwritten, relevance, z, epsilon)
    torch.testing.assert_close(overwritten, want_relevance, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_output, want_output, rtol=1e-12, atol=1e-12)
    # The op computes in float32 and rounds each output once to its dtype; the reference runs in float64
    # on the same rounded inputs. So the norm-wise error is one rounding, <= u = 2^-24 (float32), 2^-8
    # (bf16, 3.9e-3), 2^-11 (fp16, 4.9e-4), plus float32 arithmetic (~1e-7): tolerances are ~4-5 u
    # for the half types, and float32's 1e-5 bounds the float32 division and K-term sum.
    for dtype, tolerance in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2), (torch.float16, 2e-3)):
        low = [t.to(dtype) for t in (grad, relevance, z)]
        got_relevance, got_output = torch.ops.auditkit.lrp_epsilon_ratio_backward(*low, epsilon)
        want_relevance, want_output = lrp_epsilon_ratio_backward_reference(*(t.double() for t in low), epsilon)
        assert got_relevance.dtype == dtype and got_output.dtype == dtype
        if want_output.numel() and want_output.abs().max() < 1e4:  # float16's range
            assert relative_error(got_relevance, want_relevance) < tolerance
            assert relative_error(got_output, want_output) < tolerance


def test_ratio_backward_is_not_differentiable_again():
    z = torch.randn(2, 3, dtype=torch.float64) + 2.0
    relevance = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    (s,) = [torch.ops.auditkit.lrp_epsilon_ratio(relevance, z, 0.1)]
    (grad,) = torch.autograd.grad(s.sum(), relevance, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiable once"):
        torch.autograd.grad(grad.sum(), relevance)


def test_stabiliser_treats_zero_as_positive_and_never_divides_by_zero():
    z = torch.tensor([[0.0, -0.0, 1e-9, -1e-9]])
    ratio = torch.ops.auditkit.lrp_epsilon_ratio(torch.ones_like(z), z, 0.5)
    assert torch.isfinite(ratio).all()
    torch.testing.assert_close(ratio[0, 0], torch.tensor(2.0))  # 1 / (0 + 0.5)
    torch.testing.assert_close(ratio[0, 3], torch.tensor(1 / (-1e-9 - 0.5)))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    g = torch.Generator().manual_seed(0)
    a = torch.randn(2, 4, 7, 6, generator=g).relu().to(device)
    weight = torch.randn(6, 2, 3, 3, generator=g).to(device)
    z = F.conv2d(a, weight, None, 2, 1, 1, 2)
    relevance = torch.randn(4, *z.shape[1:], generator=g).to(device)
    for requires_grad in (False, True):
        tensors = [t.clone().requires_grad_(requires_grad) for t in (a, z, relevance, weight)]
        torch.library.opcheck(torch.ops.auditkit.lrp_epsilon_conv2d.default,
                              (*tensors, [2, 2], [1, 1], [1, 1], 2, 0.01))
        torch.library.opcheck(torch.ops.auditkit.lrp_epsilon_ratio.default, (tensors[2], tensors[1], 0.01))
    torch.library.opcheck(torch.ops.auditkit.lrp_epsilon_ratio_backward.default,
                          (relevance.clone(), relevance, z, 0.01))
    torch.library.opcheck(torch.ops.auditkit.lrp_epsilon_ratio_backward_.default,
                          (relevance.clone(), relevance, z, 0.01))
    with pytest.raises(ValueError, match="must be contiguous"):  # it is overwritten position by position
        torch.ops.auditkit.lrp_epsilon_ratio_backward_(relevance.clone().transpose(2, 3), relevance.transpose(2, 3),
                                                       z.transpose(2, 3), 0.01)
    x = torch.randn(3, 5, generator=g).to(device)
    w = torch.randn(4, 5, generator=g).to(device)
    torch.library.opcheck(
        torch.ops.auditkit.lrp_epsilon_linear.default,
        (x.requires_grad_(), (x @ w.t()).detach().requires_grad_(), torch.randn(6, 4).to(device).requires_grad_(),
         w.requires_grad_(), 0.1),
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("stride, padding, dilation, groups", [(1, 1, 1, 1), (2, 0, 1, 1), (2, 1, 2, 2)])
def test_gradcheck_conv2d_step_float64(device, stride, padding, dilation, groups):
    g = torch.Generator().manual_seed(1)
    a = torch.randn(2, 4, 7, 7, generator=g, dtype=torch.float64)
    weight = torch.randn(4, 4 // groups, 3, 3, generator=g, dtype=torch.float64)
    z = F.conv2d(a, weight, None, stride, padding, dilation, groups)
    z = z + 0.2 * torch.where(z >= 0, 1.0, -1.0).double()  # away from the sign switch at 0
    relevance = torch.randn(4, *z.shape[1:], generator=g, dtype=torch.float64)
    inputs = [t.clone().to(device).requires_grad_() for t in (a, z, relevance, weight)]

    def step(*tensors):
        return torch.ops.auditkit.lrp_epsilon_conv2d(*tensors, [stride] * 2, [padding] * 2, [dilation] * 2, groups, 0.3)

    assert torch.autograd.gradcheck(step, inputs)


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_linear_step_and_ratio_float64(device):
    g = torch.Generator().manual_seed(2)
    a = torch.randn(3, 5, generator=g, dtype=torch.float64)
    weight = torch.randn(4, 5, generator=g, dtype=torch.float64)
    z = a @ weight.t()
    z = z + 0.2 * torch.where(z >= 0, 1.0, -1.0).double()
    relevance = torch.randn(6, 4, generator=g, dtype=torch.float64)
    inputs = [t.clone().to(device).requires_grad_() for t in (a, z, relevance, weight)]
    assert torch.autograd.gradcheck(lambda *t: torch.ops.auditkit.lrp_epsilon_linear(*t, 0.3), inputs)
    assert torch.autograd.gradcheck(lambda r, zz: torch.ops.auditkit.lrp_epsilon_ratio(r, zz, 0.3), inputs[2:0:-1])


def test_bad_arguments_name_what_is_wrong():
    z = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="multiple of the batch of `output`"):
        torch.ops.auditkit.lrp_epsilon_ratio(torch.zeros(3, 3), z, 0.1)
    with pytest.raises(ValueError, match="shape of `output` except for its batch"):
        torch.ops.auditkit.lrp_epsilon_ratio(torch.zeros(2, 4), z, 0.1)
    with pytest.raises(TypeError, match="share one floating dtype"):
        torch.ops.auditkit.lrp_epsilon_ratio(torch.zeros(2, 3, dtype=torch.float64), z, 0.1)
    with pytest.raises(ValueError, match="`epsilon` must be >= 0"):
        torch.ops.auditkit.lrp_epsilon_ratio(torch.zeros(2, 3), z, -1.0)
    with pytest.raises(ValueError, match="expected input \\(N, in\\)"):
        torch.ops.auditkit.lrp_epsilon_linear(torch.zeros(2, 5), z, z, torch.zeros(3, 4), 0.1)
