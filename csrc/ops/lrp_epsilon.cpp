// LRP-epsilon steps (seed 004 Eq. A1-A3; Bassi et al., TEA) for a layer z = W a + b:
//
//   s     = R_out / (z + eps * sign(z))      sign(0) taken as +1 (the "ratio")
//   c     = W^T s                             conv_transpose2d / GEMM (vendor libraries)
//   R_in  = a (.) c
//
// Batched over targets: `relevance` may hold K explanations per sample, laid out
// target-major as (K*N, ...), while `input`/`output` keep the forward's batch N;
// the kernels broadcast them over K instead of copying.
//
// lrp_epsilon_ratio and its backward have CPU and CUDA kernels (cpu/, cuda/); the conv2d and
// linear steps are device-generic compositions of it with ATen's matrix ops.
// Autograd (TEA differentiates the heatmap) and fake kernels are registered
// from Python (auditkit/ops/_registrations.py).
#include "lrp_epsilon.h"

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <sstream>

namespace auditkit {

namespace {

std::string shape_str(const at::Tensor& t) {
  std::ostringstream s;
  s << t.sizes();
  return s.str();
}

bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

} // namespace

int64_t check_lrp_broadcast(const at::Tensor& relevance, const at::Tensor& output, const char* op) {
  TORCH_CHECK_TYPE(
      is_supported_float(relevance.scalar_type()) && relevance.scalar_type() == output.scalar_type(), op,
      ": `relevance` and `output` must share one floating dtype; got ", relevance.scalar_type(), " and ",
      output.scalar_type());
  TORCH_CHECK_VALUE(
      relevance.device() == output.device(), op, ": `relevance` is on ", relevance.device(), " but `output` is on ",
      output.device());
  TORCH_CHECK_VALUE(
      output.dim() >= 1 && relevance.dim() == output.dim() && relevance.sizes().slice(1) == output.sizes().slice(1), op,
      ": `relevance` must have the shape of `output` except for its batch; got ", shape_str(relevance), " and ",
      shape_str(output));
  const int64_t n = output.size(0);
  TORCH_CHECK_VALUE(
      (n == 0 && relevance.size(0) == 0) || (n > 0 && relevance.size(0) % n == 0), op, ": the batch of `relevance` (",
      relevance.size(0), ") must be a multiple of the batch of `output` (", n, "): K explanations per sample");
  return n == 0 ? 1 : relevance.size(0) / n;
}

int64_t check_lrp_ratio_args(const at::Tensor& relevance, const at::Tensor& output, double epsilon) {
  const int64_t k = check_lrp_broadcast(relevance, output, "lrp_epsilon_ratio");
  TORCH_CHECK_VALUE(epsilon >= 0, "lrp_epsilon_ratio: `epsilon` must be >= 0; got ", epsilon);
  return k;
}

int64_t check_lrp_ratio_backward_args(
    const at::Tensor& grad, const at::Tensor& relevance, const at::Tensor& output, double epsilon) {
  const int64_t k = check_lrp_broadcast(relevance, output, "lrp_epsilon_ratio_backward");
  TORCH_CHECK_VALUE(
      grad.sizes() == relevance.sizes() && grad.scalar_type() == relevance.scalar_type() &&
          grad.device() == relevance.device(),
      "lrp_epsilon_ratio_backward: `grad` must have the shape, dtype and device of `relevance`");
  TORCH_CHECK_VALUE(epsilon >= 0, "lrp_epsilon_ratio_backward: `epsilon` must be >= 0; got ", epsilon);
  return k;
}

int64_t check_lrp_ratio_backward_inplace_args(
    const at::Tensor& grad, const at::Tensor& relevance, const at::Tensor& output, double epsilon) {
  const int64_t k = check_lrp_ratio_backward_args(grad, relevance, output, epsilon);
  TORCH_CHECK_VALUE(grad.is_contiguous(), "lrp_epsilon_ratio_backward_: `grad` must be contiguous (it is overwritten)");
  return k;
}

// d/dz sums over the K targets: with K = 0 (an empty relevance batch against
// a non-empty output) no backend writes it, and the sum of nothing is 0.
static at::Tensor empty_ratio_grad_output(const at::Tensor& output, int64_t k) {
  return k == 0 ? at::zeros(output.sizes(), output.options()) : at::empty(output.sizes(), output.options());
}

std::tuple<at::Tensor, at::Tensor> lrp_ratio_backward_with(
    RatioBackwardInto into,
    const at::Tensor& grad_in,
    const at::Tensor& relevance,
    const at::Tensor& output,
    double epsilon) {
  const int64_t k = check_lrp_ratio_backward_args(grad_in, relevance, output, epsilon);
  const c10::DeviceGuard guard(relevance.device());
  const at::Tensor grad = grad_in.contiguous();
  at::Tensor grad_relevance = at::empty(relevance.sizes(), relevance.options());
  at::Tensor grad_output = empty_ratio_grad_output(output, k);
  into(grad_relevance, grad_output, grad, relevance, output, epsilon, k);
  return {grad_relevance, grad_output};
}

at::Tensor lrp_ratio_backward_inplace_with(
    RatioBackwardInto into, at::Tensor& grad, const at::Tensor& relevance, const at::Tensor& output, double epsilon) {
  const int64_t k = check_lrp_ratio_backward_inplace_args(grad, relevance, output, epsilon);
  const c10::DeviceGuard guard(relevance.device());
  at::Tensor grad_output = empty_ratio_grad_output(output, k);
  into(grad, grad_output, grad, relevance, output, epsilon, k);
  return grad_output;
}

static void check_step_args(
    const at::Tensor& input,
    const at::Tensor& output,
    const at::Tensor& relevance,
    const at::Tensor& weight,
    const char* op) {
  check_lrp_broadcast(relevance, output, op);
  TORCH_CHECK_VALUE(
      input.size(0) == output.size(0), op, ": `input` and `output` must have the same batch; got ", shape_str(input),
      " and ", shape_str(output));
  TORCH_CHECK_TYPE(
      input.scalar_type() == output.scalar_type() && weight.scalar_type() == output.scalar_type(), op,
      ": `input`, `output`, `relevance` and `weight` must share one dtype");
  TORCH_CHECK_VALUE(
      input.device() == output.device() && weight.device() == output.device(), op,
      ": all tensors must be on one device");
}

// (K*N, ...) relevance-like tensor times (N, ...) activation, in place.
static at::Tensor multiply_by_activation_(at::Tensor contribution, const at::Tensor& activation, int64_t k) {
  std::vector<int64_t> shape{k};
  for (const auto size : activation.sizes()) {
    shape.push_back(size);
  }
  contribution.view(shape).mul_(activation.unsqueeze(0));
  return contribution;
}

static at::Tensor call_ratio(const at::Tensor& relevance, const at::Tensor& output, double epsilon) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("auditkit::lrp_epsilon_ratio", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, double)>();
  return op.call(relevance, output, epsilon);
}

at::Tensor lrp_epsilon_conv2d_composite(
    const at::Tensor& input,
    const at::Tensor& output,
    const at::Tensor& relevance,
    const at::Tensor& weight,
    c10::IntArrayRef stride,
    c10::IntArrayRef padding,
    c10::IntArrayRef dilation,
    int64_t groups,
    double epsilon) {
  check_step_args(input, output, relevance, weight, "lrp_epsilon_conv2d");
  TORCH_CHECK_VALUE(
      input.dim() == 4 && output.dim() == 4 && weight.dim() == 4,
      "lrp_epsilon_conv2d: `input`, `output` and `weight` must be 4-D; got ", shape_str(input), ", ", shape_str(output),
      ", ", shape_str(weight));
  TORCH_CHECK_VALUE(
      stride.size() == 2 && padding.size() == 2 && dilation.size() == 2 && groups >= 1,
      "lrp_epsilon_conv2d: stride, padding and dilation must have 2 entries and groups >= 1");
  const int64_t k = check_lrp_broadcast(relevance, output, "lrp_epsilon_conv2d");
  for (int d = 0; d < 2; ++d) {
    const int64_t produced =
        (input.size(2 + d) + 2 * padding[d] - dilation[d] * (weight.size(2 + d) - 1) - 1) / stride[d] + 1;
    TORCH_CHECK_VALUE(
        produced == output.size(2 + d) && input.size(1) == weight.size(1) * groups && output.size(1) == weight.size(0),
        "lrp_epsilon_conv2d: `input` (", shape_str(input), ") does not match `output` (", shape_str(output),
        ") for this convolution with weight ", shape_str(weight));
  }
  const at::Tensor s = call_ratio(relevance, output, epsilon);
  // W^T s is the convolution's input gradient for output gradient s: the same
  // vendor kernel autograd uses (faster on CPU than conv_transpose2d). Only the
  // input's shape and layout matter to it: the input itself for one target,
  // a broadcast placeholder of batch K*N otherwise (the real tensor is about 8 %
  // faster with oneDNN on CPU).
  at::Tensor shape_source = input;
  if (k != 1) {
    std::vector<int64_t> input_shape(input.sizes().begin(), input.sizes().end());
    input_shape[0] = relevance.size(0);
    shape_source = s.new_empty({1}).expand(input_shape);
  }
  const std::vector<int64_t> no_output_padding{0, 0};
  at::Tensor contribution = std::get<0>(at::convolution_backward(
      s, shape_source, weight, /*bias_sizes=*/std::nullopt, stride, padding, dilation, /*transposed=*/false,
      no_output_padding, groups, {true, false, false}));
  return multiply_by_activation_(contribution, input, k);
}

at::Tensor lrp_epsilon_linear_composite(
    const at::Tensor& input,
    const at::Tensor& output,
    const at::Tensor& relevance,
    const at::Tensor& weight,
    double epsilon) {
  check_step_args(input, output, relevance, weight, "lrp_epsilon_linear");
  TORCH_CHECK_VALUE(
      input.dim() == 2 && output.dim() == 2 && weight.dim() == 2 && weight.size(0) == output.size(1) &&
          weight.size(1) == input.size(1),
      "lrp_epsilon_linear: expected input (N, in), output (N, out), weight (out, in); got ", shape_str(input), ", ",
      shape_str(output), ", ", shape_str(weight));
  const int64_t k = check_lrp_broadcast(relevance, output, "lrp_epsilon_linear");
  const at::Tensor s = call_ratio(relevance, output, epsilon);
  at::Tensor contribution = at::mm(s, weight); // (K*N, in)
  return multiply_by_activation_(contribution, input, k);
}

TORCH_LIBRARY_FRAGMENT(auditkit, m) {
  m.def("lrp_epsilon_ratio(Tensor relevance, Tensor output, float epsilon) -> Tensor");
  // Its backward in one pass (TEA's double backward runs it once per layer):
  //   grad_relevance = grad / stab(z)                      (K*N, ...)
  //   grad_output    = -sum_K grad * relevance / stab(z)^2  (N, ...)
  m.def("lrp_epsilon_ratio_backward(Tensor grad, Tensor relevance, Tensor output, float epsilon) -> (Tensor, Tensor)");
  // The same, writing grad_relevance over `grad` (contiguous) and returning grad_output: TEA's
  // double backward then never holds `grad` and grad_relevance at once (one output-sized tensor).
  m.def("lrp_epsilon_ratio_backward_(Tensor(a!) grad, Tensor relevance, Tensor output, float epsilon) -> Tensor");
  m.def(
      "lrp_epsilon_conv2d(Tensor input, Tensor output, Tensor relevance, Tensor weight, int[2] stride, "
      "int[2] padding, int[2] dilation, int groups, float epsilon) -> Tensor");
  m.def("lrp_epsilon_linear(Tensor input, Tensor output, Tensor relevance, Tensor weight, float epsilon) -> Tensor");
}

TORCH_LIBRARY_IMPL(auditkit, CompositeExplicitAutograd, m) {
  m.impl("lrp_epsilon_conv2d", &lrp_epsilon_conv2d_composite);
  m.impl("lrp_epsilon_linear", &lrp_epsilon_linear_composite);
}

} // namespace auditkit
