"""Code paths of the kernels that ordinary tests do not reach (issue 13).

On the CPU: the empty-relevance backward, the GPU-architecture check and its fallback. On a GPU
(marked ``cuda``, run by ``make gpu-check``): second and later grid-stride passes, the 64-bit index
instantiations, grids taller than 65,535 targets, NaN in the mask dilation, non-contiguous masks,
half-precision LRP ratios, z = +-0, non-default streams and other devices, a tensor past 2^31
elements, and TAP's deferred gradient and TEA's LRP backward end to end. Each compares against the
pure-PyTorch reference.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F

from auditkit import ops
from auditkit.ops import _extension
from auditkit.ops._reference import (
    downscale_mask_reference,
    lrp_epsilon_ratio_backward_reference,
    lrp_epsilon_ratio_reference,
    weighted_relu_sum_backward_reference,
    weighted_relu_sum_reference,
)

from .conftest import CUDA_SKIP_REASON
from .test_tap_penalty import assert_penalty_matches, random_mask, with_layout

needs_cuda = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason=CUDA_SKIP_REASON)]


def compiled_cuda() -> bool:
    return ops.extension_status().cuda_kernels


@contextmanager
def launch_limits(max_blocks: int = 0, max_grid_y: int = 0, force_64bit_index: bool = False):
    """Tightens the CUDA kernels' launch limits (csrc/ops/cuda/launch.h) for the block."""
    if not compiled_cuda():
        pytest.skip(f"the compiled CUDA kernels are not live: {ops.extension_status().cuda_reason}")
    torch.ops.auditkit._cuda_set_test_limits(max_blocks, max_grid_y, force_64bit_index)
    try:
        yield
    finally:
        torch.ops.auditkit._cuda_set_test_limits(0, 0, False)


# ---- CPU ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
def test_ratio_backward_of_an_empty_relevance_batch_is_zero(inplace, dtype):
    # K = 0 explanations against an output batch of 3: the sum over no targets is 0, not
    # uninitialised memory (the bug: the CPU kernel never wrote d/dz).
    z = torch.randn(3, 5, 7).to(dtype)
    relevance = torch.empty(0, 5, 7, dtype=dtype)
    grad = torch.empty(0, 5, 7, dtype=dtype)
    for _ in range(3):  # fresh allocations hold leftovers of earlier ones: repeat
        torch.empty(3, 5, 7, dtype=dtype).fill_(123.0)
        if inplace:
            grad_output = torch.ops.auditkit.lrp_epsilon_ratio_backward_(grad, relevance, z, 0.01)
        else:
            grad_relevance, grad_output = torch.ops.auditkit.lrp_epsilon_ratio_backward(grad, relevance, z, 0.01)
            assert grad_relevance.shape == (0, 5, 7)
        assert grad_output.shape == z.shape and torch.equal(grad_output, torch.zeros_like(z))
    want = lrp_epsilon_ratio_backward_reference(grad.double(), relevance.double(), z.double(), 0.01)[1]
    assert torch.equal(want, torch.zeros_like(want))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_inplace_ratio_backward_in_half_precision_matches_reference(dtype):
    g = torch.Generator().manual_seed(7)
    z = torch.randn(2, 3, 9, 9, generator=g)
    z = z + 0.2 * torch.where(z >= 0, 1.0, -1.0)
    relevance = torch.randn(6, 3, 9, 9, generator=g)
    grad = torch.randn(6, 3, 9, 9, generator=g)
    low = [t.to(dtype) for t in (grad, relevance, z)]
    want_relevance, want_output = lrp_epsilon_ratio_backward_reference(*(t.double() for t in low), 0.01)
    overwritten = low[0].clone()
    got_output = torch.ops.auditkit.lrp_epsilon_ratio_backward_(overwritten, low[1], low[2], 0.01)
    # One rounding of a float32 result to dtype against float64 on the same inputs: <= u = 2^-11 (fp16),
    # 2^-8 (bf16) in norm; the tolerance is ~4-5 u (tests/test_lrp_ops.py derives it).
    tolerance = {torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    for got, want in ((overwritten, want_relevance), (got_output, want_output)):
        assert got.dtype == dtype
        assert ((got.double() - want).norm() / want.norm()).item() < tolerance


def test_cuda_arch_entries_say_which_gpus_they_run_on():
    archs = _extension.parse_cuda_archs("7.5_8.0_9.0ptx")
    assert _extension.describe_cuda_archs(archs) == "sm_75, sm_80, sm_90 (+PTX 9.0)"

    def runs(capability, token):
        return not _extension.unsupported_gpus(_extension.parse_cuda_archs(token), {"cuda:0": capability})

    assert runs((7, 5), "7.5_8.0_9.0ptx")  # T4
    assert not runs((7, 5), "8.0_9.0ptx")  # the old default list: the bug
    assert runs((8, 6), "8.0_9.0ptx")  # A10/RTX 30: sm_80 machine code runs on 8.x, x >= 0
    assert runs((8, 9), "8.0_9.0ptx")  # L4/RTX 40
    assert runs((9, 0), "8.0_9.0ptx")
    assert runs((10, 0), "8.0_9.0ptx")  # B200: the driver compiles the 9.0 PTX
    assert runs((12, 0), "8.0_9.0ptx")
    assert not runs((10, 0), "8.0_9.0")  # no PTX, no newer GPU
    assert not runs((8, 0), "8.6")  # machine code never runs on a lower minor
    assert runs((10, 3), "10.0") and not runs((10, 3), "10.0a")  # arch-specific code: its own capability only
    assert runs((9, 0), "9.0a")
    assert runs((9, 0), "unknown") and _extension.parse_cuda_archs("Turing") is None  # trusted


def test_arch_list_token_round_trips_through_the_build():
    import runpy
    from pathlib import Path

    token = runpy.run_path(str(Path(__file__).parent.parent / "tools" / "find_cuda.py"))["arch_list_token"]
    assert token("7.5;8.0;9.0+PTX") == "7.5_8.0_9.0ptx"
    assert token("8.0 9.0a") == "8.0_9.0a"
    assert token("Turing;Ampere") == "unknown" and token("") == "unknown"
    parsed = _extension.parse_cuda_archs(token("7.5;9.0+PTX"))
    assert [(a.major, a.minor, a.ptx) for a in parsed] == [(7, 5, False), (9, 0, True)]


def test_default_build_carries_turing():
    import re
    from pathlib import Path

    root = Path(__file__).parent.parent
    assert re.search(r'DEFAULT_CUDA_ARCH_LIST = "7\.5;', (root / "setup.py").read_text())
    assert "TORCH_CUDA_ARCH_LIST ?= 7.5;" in (root / "Makefile").read_text()
    info = ops.extension_status().build_info
    if info.get("cuda", "none") != "none":  # the build records which architectures it carries
        assert _extension.parse_cuda_archs(info.get("cuda_archs", "unknown")), info


def test_a_gpu_without_kernel_image_falls_back_to_the_reference():
    # In a subprocess: the fallback re-registers the CUDA kernels for the whole process.
    if not ops.extension_status().cuda_kernels:
        pytest.skip(f"no compiled CUDA kernels to fall back from: {ops.extension_status().cuda_reason}")
    code = textwrap.dedent(
        """
        import json, warnings
        import torch
        from auditkit import ops
        from auditkit.ops import _library
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            none = _library.check_cuda_devices({"cuda:0": (9, 0)})
            reason = _library.check_cuda_devices({"cuda:0": (9, 0), "cuda:1": (7, 0)})
        dump = torch._C._dispatch_dump("auditkit::weighted_relu_sum")
        cuda_line = [l for l in dump.splitlines() if l.startswith("CUDA:")][0]
        print(json.dumps({
            "none": none, "reason": reason, "status": ops.extension_status().cuda_reason,
            "live": ops.extension_status().cuda_kernels, "cuda_line": cuda_line,
            "warned": [str(w.message) for w in caught if issubclass(w.category, ops.ReferenceFallbackWarning)],
        }))
        """
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["none"] is None
    assert "cuda:1 (sm_70)" in out["reason"] and "cuda:0" not in out["reason"]
    assert out["status"] == out["reason"] and out["live"] is False
    assert "_library.py" in out["cuda_line"]  # the reference now serves CUDA tensors
    assert len(out["warned"]) == 1 and "TORCH_CUDA_ARCH_LIST" in out["warned"][0]


# ---- GPU ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("force_64bit_index", [False, True])
@pytest.mark.parametrize("max_blocks", [1, 3])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "strided"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("device", [pytest.param("cuda", marks=needs_cuda)])
def test_grid_stride_passes_and_64bit_index_paths(device, dtype, layout, max_blocks, force_64bit_index):
    # One to three blocks for thousands of elements: every kernel takes many grid-stride passes
    # (and, forced, the int64 instantiations that only tensors past 2^31 elements reach otherwise).
    activation = with_layout(torch.randn(5, 7, 13, 11, device=device).to(dtype), layout)
    mask = random_mask(5, 40, 37, device, soft=True)
    with launch_limits(max_blocks=max_blocks, force_64bit_index=force_64bit_index):
        assert_penalty_matches(activation, mask, 3)
        d = ops.downscale_masks(mask, [(13, 11), (4, 3)], 5)
        for got, size in zip(d, [(13, 11), (4, 3)]):
            torch.testing.assert_close(got, downscale_mask_reference(mask, size, 5, torch.float32), rtol=1e-6,
                                       atol=1e-7)
        base = with_layout(torch.randn_like(activation.float()).to(dtype), layout)
        grad = torch.randn(5, device=device)
        weights = torch.rand(5, 13, 11, device=device)
        got = torch.ops.auditkit.weighted_relu_sum_backward(grad, activation, weights, base)
        want = weighted_relu_sum_backward_reference(grad.double(), activation.double(), weights.double(), base.double())
        assert ((got.double() - want).abs() <= 1e-2 * want.abs() + 1e-2).all()


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=needs_cuda)])
def test_occupancy_limited_block_counts(device):
    # Large enough that the grid is capped at 16 blocks per multiprocessor (several passes each).
    activation = torch.randn(8, 64, 112, 112, device=device)
    mask = random_mask(8, 224, 224, device)
    assert_penalty_matches(activation, mask, 3)
    z = torch.randn(8, 64, 112, 112, device=device)
    relevance = torch.randn(16, 64, 112, 112, device=device)
    torch.testing.assert_close(
        torch.ops.auditkit.lrp_epsilon_ratio(relevance, z, 0.01),
        lrp_epsilon_ratio_reference(relevance, z, 0.01),
        rtol=1e-6,
        atol=0,
    )


@pytest.mark.parametrize("max_grid_y", [0, 3])
@pytest.mark.parametrize("device", [pytest.param("cuda", marks=needs_cuda)])
def test_more_targets_than_the_grid_is_tall(device, max_grid_y):
    # 70,000 explanations of one sample exceed the CUDA grid's y limit of 65,535 (the bug: refused
    # on CUDA, accepted on CPU); with max_grid_y = 3 the y loop runs on a small case too.
    targets = 70_000 if max_grid_y == 0 else 10
    z = torch.randn(1, 3, device=device)
    relevance = torch.randn(targets, 3, device=device)
    grad = torch.randn(targets, 3, device=device)
    with launch_limits(max_grid_y=max_grid_y):
        got = torch.ops.auditkit.lrp_epsilon_ratio(relevance, z, 0.01)
        got_backward = torch.ops.auditkit.lrp_epsilon_ratio_backward(grad, relevance, z, 0.01)
    torch.testing.assert_close(got, lrp_epsilon_ratio_reference(relevance, z, 0.01), rtol=1e-6, atol=0)
    want = lrp_epsilon_ratio_backward_reference(grad.double(), relevance.double(), z.double(), 0.01)
    torch.testing.assert_close(got_backward[0].double(), want[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_backward[1].double(), want[1], rtol=1e-4, atol=1e-3)
    cpu = torch.ops.auditkit.lrp_epsilon_ratio(relevance.cpu(), z.cpu(), 0.01)
    torch.testing.assert_close(got.cpu(), cpu, rtol=1e-6, atol=0)


@pytest.mark.parametrize("kernel_size", [1, 3, 5, 9])
@pytest.mark.parametrize("device", [pytest.param("cuda", marks=needs_cuda)])
def test_nan_in_a_mask_window_propagates_like_max_pool(device, kernel_size):
    # The bug: the CUDA dilation kept a NaN only when it was the first pixel of its window.
    # (The CPU kernel refuses NaN masks outright; on CUDA the check costs a sync and is off.)
    was = ops.debug_checks_enabled()
    ops.set_debug_checks(False)
    try:
        _check_nan_propagation(device, kernel_size)
    finally:
        ops.set_debug_checks(was)


def _check_nan_propagation(device, kernel_size):
    mask = torch.zeros(2, 1, 16, 16, device=device)
    mask[0, 0, 5, 7] = float("nan")
    mask[1, 0, 0, 0] = float("nan")
    mask[1, 0, 9, 3] = 1.0
    for size in [(16, 16), (4, 4), (3, 5)]:
        got = ops.downscale_mask(mask, size, kernel_size)
        want = downscale_mask_reference(mask, size, kernel_size, torch.float32)
        assert torch.equal(torch.isnan(got), torch.isnan(want)), size
        torch.testing.assert_close(got.nan_to_num(-1), want.nan_to_num(-1))


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=needs_cuda)])
def test_non_contiguous_masks(device):
    base = (torch.rand(3, 2, 40, 50, device=device) > 0.6).float()
    for mask in (base[:, :1], base[:, 1:].transpose(2, 3).contiguous().transpose(2, 3), base[:, :1, ::2, ::2]):
        assert not mask.is_contiguous() or mask.shape[1] == 1
        for size in [(10, 12), (7, 7)]:
            torch.testing.assert_close(
                ops.downscale_mask(mask, size, 3), downscale_mask_reference(mask, size, 3, torch.float32)
            )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("device", [pytest.param("cuda", marks=needs_cuda)])
def test_half_precision_lrp_ratio_and_signed_zero(device, dtype):
    z = torch.randn(4, 6, 5, 5, device=device).to(dtype)
    z[0, 0, 0, 0], z[0, 0, 0, 1] = 0.0, -0.0  # sign(+-0) is +1: divides by +eps
    relevance = torch.randn(8, 6, 5, 5, device=device).to(dtype)
    got = torch.ops.auditkit.lrp_epsilon_ratio(relevance, z, 0.01)
    want = lrp_epsilon_ratio_reference(relevance.double(), z.double(), 0.01)
    assert got.dtype == dtype
    # One rounding of a float32 result to dtype against float64 on the same inputs: <= u = 2^-11 (fp16),
    # 2^-8 (bf16) in norm; the tolerance is ~4-5 u (tests/test_lrp_ops.py derives it).
    tolerance = {torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    assert ((got.double() - want).norm() / want.norm()).item() < tolerance
    for t in range(2):
        for j in range(2):
            assert got[t * 4, 0, 0, j].item() == pytest.approx(relevance[t * 4, 0, 0, j].item() / 0.01, rel=tolerance)
    grad = torch.randn_like(relevance)
    overwritten = grad.clone()
    got_output = torch.ops.auditkit.lrp_epsilon_ratio_backward_(overwritten, relevance, z, 0.01)
    want_relevance, want_output = lrp_epsilon_ratio_backward_reference(grad.double(), relevance.double(), z.double(),
                                                                       0.01)
    assert ((overwritten.double() - want_relevance).norm() / want_relevance.norm()).item() < tolerance
    assert ((got_output.double() - want_output).norm() / want_output.norm()).item() < 4 * tolerance


def _all_ops_on(device):
    """Every op once on ``device``, compared with the CPU result."""
    g = torch.Generator().manual_seed(3)
    activation = torch.randn(3, 4, 9, 9, generator=g)
    mask = (torch.rand(3, 1, 27, 27, generator=g) > 0.5).float()
    cpu_penalty = ops.tap_penalty(activation, mask, 3)
    torch.testing.assert_close(ops.tap_penalty(activation.to(device), mask.to(device), 3).cpu(), cpu_penalty)
    z = torch.randn(3, 4, 9, 9, generator=g)
    relevance = torch.randn(6, 4, 9, 9, generator=g)
    torch.testing.assert_close(
        torch.ops.auditkit.lrp_epsilon_ratio(relevance.to(device), z.to(device), 0.01).cpu(),
        torch.ops.auditkit.lrp_epsilon_ratio(relevance, z, 0.01),
    )
    weights = torch.rand(3, 9, 9, generator=g)
    grad = torch.randn(3, generator=g)
    got = torch.ops.auditkit.weighted_relu_sum_backward(grad.to(device), activation.to(device), weights.to(device))
    torch.testing.assert_close(got.cpu(), torch.ops.auditkit.weighted_relu_sum_backward(grad, activation, weights))


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=needs_cuda)])
def test_non_default_stream(device):
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        _all_ops_on(device)
    stream.synchronize()


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_second_gpu():
    # The kernels launch on the tensor's device (a device guard), not on the current one.
    assert torch.cuda.current_device() == 0
    _all_ops_on("cuda:1")


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=needs_cuda)])
def test_tap_loss_with_deferred_gradient_end_to_end(device):
    from auditkit.models import build_model, capture_activations

    torch.manual_seed(0)
    model = build_model("resnet18", 3, 3, (64, 64)).to(device).train()
    images = torch.randn(4, 3, 64, 64, device=device)
    labels = torch.tensor([0, 1, 2, 0], device=device)
    mask = random_mask(4, 64, 64, device)
    layers = list(model.meta.target_layers)
    grads = {}
    for defer in (False, True):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)
        with capture_activations(model, layers) as captured:
            logits = model(images)
            loss = F.cross_entropy(logits, labels) + 0.1 * ops.tap_loss(captured, mask, 3, defer_gradient=defer)
            loss.backward()
        grads[defer] = [p.grad.detach().clone() for p in model.parameters()]
    for plain, deferred in zip(grads[False], grads[True]):
        torch.testing.assert_close(deferred, plain, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("device", [pytest.param("cuda", marks=needs_cuda)])
def test_tea_lrp_backward_end_to_end(device):
    # TEA differentiates the LRP heatmap: its CUDA gradient equals the CPU one.
    from auditkit.explain import lrp_epsilon
    from auditkit.models import build_model

    torch.manual_seed(0)
    model = build_model("tap-cnn", 10, 1, (28, 28)).eval()
    images = torch.rand(4, 1, 28, 28)
    results = {}
    for where in ("cpu", device):
        net = model.to(where)
        targets = torch.tensor([[1], [2], [3], [4]], device=where)
        heat = lrp_epsilon(net, images.to(where), targets, create_graph=True)
        loss = heat.square().mean()
        (grad,) = torch.autograd.grad(loss, [next(net.parameters())])
        results[where] = (heat.detach().cpu(), grad.cpu())
    torch.testing.assert_close(results[device][0], results["cpu"][0], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(results[device][1], results["cpu"][1], rtol=1e-3, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("device", [pytest.param("cuda", marks=needs_cuda)])
def test_activation_just_under_two_to_the_31_elements(device):
    # (16, 256, 724, 724) float16: 2,147,024,896 elements, within one grid's width of 2^31 on
    # a 132-multiprocessor GPU, so an int32 loop counter wrapped negative in the backward (the bug).
    # A second tensor past 2^31 takes the 64-bit instantiations without forcing.
    free, _total = torch.cuda.mem_get_info()
    if free < 40 * 2**30:
        pytest.skip("needs 40 GiB of free GPU memory")
    for shape in [(16, 256, 724, 724), (1, 1, 46341, 46341)]:
        activation = torch.randn(shape, device=device, dtype=torch.float16)
        n, _, h, w = shape
        weights = torch.rand(n, h, w, device=device)
        grad = torch.randn(n, device=device)
        out = torch.ops.auditkit.weighted_relu_sum_backward(grad, activation, weights)
        penalty = torch.ops.auditkit.weighted_relu_sum(activation, weights)
        for sample in {0, n - 1}:
            a, wt = activation[sample:sample + 1], weights[sample:sample + 1]
            # Check the last rows of the last sample, where the wrapped counter wrote out of bounds.
            rows = slice(h - 8, h)
            want = weighted_relu_sum_backward_reference(grad[sample:sample + 1], a[..., rows, :], wt[:, rows])
            torch.testing.assert_close(out[sample:sample + 1, ..., rows, :], want.to(out.dtype))
            want_penalty = weighted_relu_sum_reference(a.float(), wt)
            torch.testing.assert_close(penalty[sample:sample + 1], want_penalty, rtol=1e-3, atol=1e-2)
        del activation, out
        torch.cuda.empty_cache()
