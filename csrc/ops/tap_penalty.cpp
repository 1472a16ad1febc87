// Schemas of the auditkit ops and the argument checks every backend shares.
// Kernels register themselves in cpu/ and cuda/; autograd and fake (meta)
// kernels are registered from Python (auditkit/ops/_registrations.py).
#include "tap_penalty.h"

#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <sstream>

namespace auditkit {

namespace {

bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 ||
      t == at::kDouble;
}

std::string shape_str(const at::Tensor& t) {
  std::ostringstream s;
  s << t.sizes();
  return s.str();
}

} // namespace

at::ScalarType accumulate_dtype(at::ScalarType activation_dtype) {
  return activation_dtype == at::kDouble ? at::kDouble : at::kFloat;
}

at::Tensor empty_activation_grad(const at::Tensor& activation) {
  const bool channels_last = !activation.is_contiguous() &&
      activation.is_contiguous(at::MemoryFormat::ChannelsLast);
  return at::empty(
      activation.sizes(),
      activation.options().memory_format(
          channels_last ? at::MemoryFormat::ChannelsLast
                        : at::MemoryFormat::Contiguous));
}

at::Tensor mask_as_nhw(const at::Tensor& mask) {
  return mask.dim() == 4 ? mask.select(1, 0) : mask;
}

static void check_mask_tensor(const at::Tensor& mask) {
  TORCH_CHECK_VALUE(
      mask.dim() == 3 || (mask.dim() == 4 && mask.size(1) == 1),
      "tap_penalty: `mask` must have shape (N, 1, H, W) or (N, H, W); got ",
      shape_str(mask));
  TORCH_CHECK_TYPE(
      is_supported_float(mask.scalar_type()),
      "tap_penalty: `mask` must be a floating tensor with values in [0, 1] "
      "(float16, bfloat16, float32 or float64); got ",
      mask.scalar_type(),
      ". Convert it with mask.float().");
}

static void check_kernel_size(int64_t kernel_size) {
  TORCH_CHECK_VALUE(
      kernel_size >= 1,
      "tap_penalty: `kernel_size` must be >= 1; got ",
      kernel_size);
}

static void check_mask_covers(
    const at::Tensor& mask_nhw,
    int64_t height,
    int64_t width) {
  TORCH_CHECK_VALUE(
      height >= 1 && width >= 1,
      "tap_penalty: the activation's spatial size must be at least 1x1; got ",
      height,
      "x",
      width);
  TORCH_CHECK_VALUE(
      mask_nhw.size(1) >= height && mask_nhw.size(2) >= width,
      "tap_penalty: `mask` (",
      mask_nhw.size(1),
      "x",
      mask_nhw.size(2),
      ") is smaller than the activation map (",
      height,
      "x",
      width,
      "); masks are given at input resolution and must be at least as large "
      "as every targeted activation");
}

void check_tap_penalty_args(
    const at::Tensor& activation,
    const at::Tensor& mask,
    int64_t kernel_size) {
  TORCH_CHECK_VALUE(
      activation.dim() == 4,
      "tap_penalty: `activation` must have shape (N, C, h, w); got ",
      shape_str(activation));
  TORCH_CHECK_TYPE(
      is_supported_float(activation.scalar_type()),
      "tap_penalty: `activation` must be float16, bfloat16, float32 or "
      "float64; got ",
      activation.scalar_type());
  check_mask_tensor(mask);
  TORCH_CHECK_VALUE(
      mask.size(0) == activation.size(0),
      "tap_penalty: `mask` has batch size ",
      mask.size(0),
      " but `activation` has ",
      activation.size(0));
  TORCH_CHECK_VALUE(
      mask.device() == activation.device(),
      "tap_penalty: `mask` is on ",
      mask.device(),
      " but `activation` is on ",
      activation.device());
  check_kernel_size(kernel_size);
  check_mask_covers(
      mask_as_nhw(mask), activation.size(2), activation.size(3));
}

void check_downscale_mask_args(
    const at::Tensor& mask,
    int64_t height,
    int64_t width,
    int64_t kernel_size) {
  check_mask_tensor(mask);
  check_kernel_size(kernel_size);
  check_mask_covers(mask_as_nhw(mask), height, width);
}

void check_tap_penalty_backward_args(
    const at::Tensor& grad,
    const at::Tensor& activation,
    const at::Tensor& downscaled_mask) {
  TORCH_CHECK_VALUE(
      activation.dim() == 4,
      "tap_penalty_backward: `activation` must have shape (N, C, h, w); got ",
      shape_str(activation));
  TORCH_CHECK_TYPE(
      is_supported_float(activation.scalar_type()),
      "tap_penalty_backward: `activation` must be floating; got ",
      activation.scalar_type());
  const auto n = activation.size(0);
  TORCH_CHECK_VALUE(
      grad.dim() == 1 && grad.size(0) == n,
      "tap_penalty_backward: `grad` must have shape (",
      n,
      ",); got ",
      shape_str(grad));
  TORCH_CHECK_VALUE(
      downscaled_mask.dim() == 3 && downscaled_mask.size(0) == n &&
          downscaled_mask.size(1) == activation.size(2) &&
          downscaled_mask.size(2) == activation.size(3),
      "tap_penalty_backward: `downscaled_mask` must have shape (",
      n,
      ", ",
      activation.size(2),
      ", ",
      activation.size(3),
      "); got ",
      shape_str(downscaled_mask));
  TORCH_CHECK_TYPE(
      is_supported_float(grad.scalar_type()) &&
          is_supported_float(downscaled_mask.scalar_type()),
      "tap_penalty_backward: `grad` and `downscaled_mask` must be floating");
  TORCH_CHECK_VALUE(
      grad.device() == activation.device() &&
          downscaled_mask.device() == activation.device(),
      "tap_penalty_backward: all tensors must be on one device");
}

TORCH_LIBRARY_FRAGMENT(auditkit, m) {
  // Returns (penalty[N], downscaled_mask[N,h,w]); the second output is saved
  // for the backward so D(M) is computed once per call.
  m.def(
      "tap_penalty(Tensor activation, Tensor mask, int kernel_size=3) -> (Tensor, Tensor)");
  m.def(
      "tap_penalty_backward(Tensor grad, Tensor activation, Tensor downscaled_mask) -> Tensor");
  m.def(
      "downscale_mask(Tensor mask, int height, int width, int kernel_size=3) -> Tensor");
}

} // namespace auditkit
