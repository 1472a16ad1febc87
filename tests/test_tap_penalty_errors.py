"""Bad input to the TAP ops gets a clear error that names the argument."""

from __future__ import annotations

import pytest
import torch

from auditkit import ops

GOOD_ACTIVATION = (2, 3, 4, 4)
GOOD_MASK = (2, 1, 8, 8)

BAD_CALLS = [
    # (description, activation, mask, kernel_size, exception, message fragment)
    ("3-D activation", torch.randn(2, 3, 4), torch.ones(*GOOD_MASK), 3, ValueError, "`activation` must have shape"),
    ("5-D mask", torch.randn(*GOOD_ACTIVATION), torch.ones(2, 1, 1, 8, 8), 3, ValueError, "`mask` must have shape"),
    ("2-channel mask", torch.randn(*GOOD_ACTIVATION), torch.ones(2, 2, 8, 8), 3, ValueError, "`mask` must have shape"),
    ("batch mismatch", torch.randn(*GOOD_ACTIVATION), torch.ones(3, 1, 8, 8), 3, ValueError, "batch size 3"),
    ("integer activation", torch.ones(*GOOD_ACTIVATION, dtype=torch.int64), torch.ones(*GOOD_MASK), 3, TypeError,
     "`activation` must be float"),
    ("bool mask", torch.randn(*GOOD_ACTIVATION), torch.ones(*GOOD_MASK, dtype=torch.bool), 3, TypeError,
     "`mask` must be a floating"),
    ("uint8 mask", torch.randn(*GOOD_ACTIVATION), torch.ones(*GOOD_MASK, dtype=torch.uint8), 3, TypeError,
     "mask.float()"),
    ("mask smaller than activation", torch.randn(*GOOD_ACTIVATION), torch.ones(2, 1, 3, 8), 3, ValueError,
     "smaller than the activation map"),
    ("zero kernel", torch.randn(*GOOD_ACTIVATION), torch.ones(*GOOD_MASK), 0, ValueError, "`kernel_size` must be"),
    ("empty spatial size", torch.randn(2, 3, 0, 4), torch.ones(*GOOD_MASK), 3, ValueError, "spatial size"),
]


@pytest.mark.parametrize("case", BAD_CALLS, ids=[c[0] for c in BAD_CALLS])
def test_public_function_rejects(case):
    _, activation, mask, kernel_size, error, fragment = case
    with pytest.raises(error, match=fragment):
        ops.tap_penalty(activation, mask, kernel_size)


MASK_ONLY = {"5-D mask", "2-channel mask", "bool mask", "uint8 mask", "mask smaller than activation", "zero kernel",
             "empty spatial size"}


@pytest.mark.parametrize("case", [c for c in BAD_CALLS if c[0] in MASK_ONLY], ids=lambda c: c[0])
def test_registered_downscale_op_rejects(case):
    # Straight to the dispatcher: the compiled (or reference) kernel's own checks.
    _, activation, mask, kernel_size, error, fragment = case
    with pytest.raises(error, match=fragment):
        torch.ops.auditkit.downscale_mask(mask, [kernel_size], [activation.shape[2], activation.shape[3]])


@pytest.mark.parametrize(
    "activation, weights, error, fragment",
    [
        (torch.randn(2, 3, 4), torch.ones(2, 4, 4), ValueError, "`activation` must have shape"),
        (torch.ones(2, 3, 4, 4, dtype=torch.int32), torch.ones(2, 4, 4), TypeError, "`activation` must be float"),
        (torch.randn(2, 3, 4, 4), torch.ones(2, 4, 5), ValueError, "`weights` must have shape"),
        (torch.randn(2, 3, 4, 4), torch.ones(3, 4, 4), ValueError, "`weights` must have shape"),
        (torch.randn(2, 3, 4, 4), torch.ones(2, 4, 4, dtype=torch.int64), TypeError, "`weights` must be floating"),
    ],
)
def test_registered_weighted_sum_op_rejects(activation, weights, error, fragment):
    with pytest.raises(error, match=fragment):
        torch.ops.auditkit.weighted_relu_sum(activation, weights)


@pytest.mark.parametrize("bad_value", [1.5, -0.1, float("nan")])
def test_mask_values_outside_unit_interval_are_rejected_on_cpu(bad_value):
    mask = torch.zeros(*GOOD_MASK)
    mask[1, 0, 5, 2] = bad_value
    with pytest.raises(ValueError, match=r"`mask` values must lie in \[0, 1\]"):
        ops.tap_penalty(torch.randn(*GOOD_ACTIVATION), mask)
    with pytest.raises(ValueError, match=r"`mask` values must lie in \[0, 1\]"):
        ops.downscale_mask(mask, (4, 4))


def test_debug_checks_run_before_the_kernel():
    mask = torch.full(GOOD_MASK, 2.0)
    ops.set_debug_checks(True)
    try:
        with pytest.raises(ValueError, match="found 128 outside"):
            ops.tap_penalty(torch.randn(*GOOD_ACTIVATION), mask)
    finally:
        ops.set_debug_checks(False)


def test_device_mismatch_is_named():
    meta_mask = torch.ones(*GOOD_MASK, device="meta")
    with pytest.raises(ValueError, match="`mask` is on meta"):
        ops.tap_penalty(torch.randn(*GOOD_ACTIVATION), meta_mask)


def test_backward_op_checks_shapes():
    activation = torch.randn(*GOOD_ACTIVATION)
    with pytest.raises(ValueError, match="`weights` must have shape"):
        torch.ops.auditkit.weighted_relu_sum_backward(torch.ones(2), activation, torch.ones(2, 5, 5))
    with pytest.raises(ValueError, match="`grad` must have shape"):
        torch.ops.auditkit.weighted_relu_sum_backward(torch.ones(3), activation, torch.ones(2, 4, 4))


def test_odd_size_list_is_rejected():
    with pytest.raises(ValueError, match="pairs"):
        torch.ops.auditkit.downscale_mask(torch.ones(*GOOD_MASK), [3], [4, 4, 2])


def test_kernel_sizes_must_be_one_or_one_per_layer():
    mask = torch.ones(*GOOD_MASK)
    with pytest.raises(ValueError, match="one kernel size for all layers or one per layer"):
        torch.ops.auditkit.downscale_mask(mask, [3, 5], [4, 4, 2, 2, 1, 1])
    with pytest.raises(ValueError, match="`kernel_size` must be an integer >= 1"):
        torch.ops.auditkit.downscale_mask(mask, [3, 0], [4, 4, 2, 2])
    with pytest.raises(ValueError, match="one integer or one per activation"):
        ops.tap_loss([torch.ones(2, 1, 4, 4)] * 3, torch.zeros(2, 1, 8, 8), [3, 5])


def test_backward_op_checks_the_base():
    activation = torch.randn(*GOOD_ACTIVATION)
    grad, weights = torch.ones(2), torch.ones(2, 4, 4)
    with pytest.raises(ValueError, match="`base` must have the activation's shape"):
        torch.ops.auditkit.weighted_relu_sum_backward(grad, activation, weights, torch.ones(2, 3, 4, 5))
    with pytest.raises(TypeError, match="`base` must have the activation's dtype"):
        torch.ops.auditkit.weighted_relu_sum_backward(grad, activation, weights, activation.double())
