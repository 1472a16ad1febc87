// Schemas of the TAP ops and the argument checks every backend shares.
// Kernels register themselves in cpu/ and cuda/; autograd and fake (meta)
// kernels are registered from Python (auditkit/ops/_registrations.py).
#include "tap_penalty.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/empty_strided.h>
#include <torch/library.h>

#include <algorithm>
#include <sstream>

namespace auditkit {

namespace {

bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
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

at::ScalarType downscaled_dtype(const at::Tensor& mask, std::optional<at::ScalarType> dtype) {
  if (dtype.has_value()) {
    return *dtype;
  }
  return mask.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

at::Tensor empty_activation_grad(const at::Tensor& activation) {
  const bool channels_last = !activation.is_contiguous() && activation.is_contiguous(at::MemoryFormat::ChannelsLast);
  return at::empty(
      activation.sizes(),
      activation.options().memory_format(
          channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous));
}

at::Tensor base_in_layout_of(const std::optional<at::Tensor>& base, const at::Tensor& out) {
  if (!base.has_value() || !base->defined()) {
    return at::Tensor();
  }
  if (base->strides() == out.strides()) {
    return *base;
  }
  // Rare (an incoming gradient in another layout): one copy, never aliasing `out`.
  at::Tensor copy = at::empty_strided(out.sizes(), out.strides(), out.options());
  copy.copy_(*base);
  return copy;
}

at::Tensor mask_as_nhw(const at::Tensor& mask) {
  return mask.dim() == 4 ? mask.select(1, 0) : mask;
}

std::vector<std::pair<int64_t, int64_t>> check_downscale_mask_args(
    const at::Tensor& mask,
    c10::IntArrayRef kernel_sizes,
    c10::IntArrayRef sizes,
    std::optional<at::ScalarType> dtype) {
  TORCH_CHECK_VALUE(
      mask.dim() == 3 || (mask.dim() == 4 && mask.size(1) == 1),
      "tap_penalty: `mask` must have shape (N, 1, H, W) or (N, H, W); got ", shape_str(mask));
  TORCH_CHECK_TYPE(
      is_supported_float(mask.scalar_type()),
      "tap_penalty: `mask` must be a floating tensor with values in [0, 1] "
      "(float16, bfloat16, float32 or float64); got ",
      mask.scalar_type(), ". Convert it with mask.float().");
  TORCH_CHECK_VALUE(
      !sizes.empty() && sizes.size() % 2 == 0, "downscale_mask: `sizes` must list (height, width) pairs; got ", sizes);
  TORCH_CHECK_VALUE(
      kernel_sizes.size() == 1 || kernel_sizes.size() == sizes.size() / 2,
      "downscale_mask: `kernel_sizes` must hold one kernel size for all layers or one per layer (", sizes.size() / 2,
      "); got ", kernel_sizes);
  for (const int64_t k : kernel_sizes) {
    TORCH_CHECK_VALUE(k >= 1, "tap_penalty: `kernel_size` must be an integer >= 1; got ", k);
  }
  TORCH_CHECK_TYPE(
      !dtype.has_value() || *dtype == at::kFloat || *dtype == at::kDouble,
      "downscale_mask: `dtype` must be float32 or float64");
  const at::Tensor m = mask_as_nhw(mask);
  std::vector<std::pair<int64_t, int64_t>> pairs;
  for (size_t k = 0; k < sizes.size(); k += 2) {
    const int64_t height = sizes[k], width = sizes[k + 1];
    TORCH_CHECK_VALUE(
        height >= 1 && width >= 1, "tap_penalty: the activation's spatial size must be at least 1x1; got ", height, "x",
        width);
    TORCH_CHECK_VALUE(
        m.size(1) >= height && m.size(2) >= width, "tap_penalty: `mask` (", m.size(1), "x", m.size(2),
        ") is smaller than the activation map (", height, "x", width,
        "); masks are given at input resolution and must be at least as large "
        "as every targeted activation");
    pairs.emplace_back(height, width);
  }
  return pairs;
}

std::vector<std::pair<int64_t, std::vector<size_t>>>
group_by_kernel_size(c10::IntArrayRef kernel_sizes, size_t num_pairs) {
  std::vector<std::pair<int64_t, std::vector<size_t>>> groups;
  for (size_t l = 0; l < num_pairs; ++l) {
    const int64_t k = kernel_sizes.size() == 1 ? kernel_sizes[0] : kernel_sizes[l];
    auto found = std::find_if(groups.begin(), groups.end(), [&](const auto& g) { return g.first == k; });
    if (found == groups.end()) {
      groups.emplace_back(k, std::vector<size_t>{l});
    } else {
      found->second.push_back(l);
    }
  }
  return groups;
}

void check_weighted_relu_sum_args(const at::Tensor& activation, const at::Tensor& weights) {
  TORCH_CHECK_VALUE(
      activation.dim() == 4, "tap_penalty: `activation` must have shape (N, C, h, w); got ", shape_str(activation));
  TORCH_CHECK_TYPE(
      is_supported_float(activation.scalar_type()),
      "tap_penalty: `activation` must be float16, bfloat16, float32 or float64; got ", activation.scalar_type());
  TORCH_CHECK_VALUE(
      weights.dim() == 3 && weights.size(0) == activation.size(0) && weights.size(1) == activation.size(2) &&
          weights.size(2) == activation.size(3),
      "weighted_relu_sum: `weights` must have shape (N, h, w) = (", activation.size(0), ", ", activation.size(2), ", ",
      activation.size(3), ") to match `activation`; got ", shape_str(weights));
  TORCH_CHECK_TYPE(
      is_supported_float(weights.scalar_type()), "weighted_relu_sum: `weights` must be floating; got ",
      weights.scalar_type());
  TORCH_CHECK_VALUE(
      weights.device() == activation.device(), "weighted_relu_sum: `weights` is on ", weights.device(),
      " but `activation` is on ", activation.device());
}

void check_weighted_relu_sum_backward_args(
    const at::Tensor& grad,
    const at::Tensor& activation,
    const at::Tensor& weights,
    const std::optional<at::Tensor>& base) {
  check_weighted_relu_sum_args(activation, weights);
  TORCH_CHECK_VALUE(
      grad.dim() == 1 && grad.size(0) == activation.size(0), "weighted_relu_sum_backward: `grad` must have shape (",
      activation.size(0), ",); got ", shape_str(grad));
  TORCH_CHECK_TYPE(is_supported_float(grad.scalar_type()), "weighted_relu_sum_backward: `grad` must be floating");
  TORCH_CHECK_VALUE(
      grad.device() == activation.device(), "weighted_relu_sum_backward: all tensors must be on one device");
  if (base.has_value() && base->defined()) {
    TORCH_CHECK_VALUE(
        base->sizes() == activation.sizes(), "weighted_relu_sum_backward: `base` must have the activation's shape ",
        shape_str(activation), "; got ", shape_str(*base));
    TORCH_CHECK_TYPE(
        base->scalar_type() == activation.scalar_type(),
        "weighted_relu_sum_backward: `base` must have the activation's dtype ", activation.scalar_type(), "; got ",
        base->scalar_type());
    TORCH_CHECK_VALUE(
        base->device() == activation.device(), "weighted_relu_sum_backward: all tensors must be on one device");
  }
}

TORCH_LIBRARY_FRAGMENT(auditkit, m) {
  // sizes = [h0, w0, h1, w1, ...]: one D(M) per targeted layer; kernel_sizes:
  // one max-pool size for all of them, or one per layer (one pass per distinct size).
  m.def("downscale_mask(Tensor mask, int[] kernel_sizes, int[] sizes, ScalarType? dtype=None) -> Tensor[]");
  m.def("weighted_relu_sum(Tensor activation, Tensor weights) -> Tensor");
  m.def("weighted_relu_sum_backward(Tensor grad, Tensor activation, Tensor weights, Tensor? base=None) -> Tensor");
}

} // namespace auditkit
