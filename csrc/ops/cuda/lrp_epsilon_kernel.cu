// CUDA kernels of lrp_epsilon_ratio, s = R / (z + eps * sign(z)), and of its
// backward. The ratio is one fused pass,
// z broadcast over the K explanations per sample held in R (grid-stride loops
// in x over positions and in y over targets, so no division per element and
// no limit on K: the grid's y dimension stops at 65,535).
#include "../lrp_epsilon.h"
#include "launch.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

namespace auditkit {

namespace {

constexpr int kThreads = 256;

template <typename scalar_t>
__global__ void ratio_kernel(
    scalar_t* __restrict__ out,
    const scalar_t* __restrict__ relevance,
    const scalar_t* __restrict__ z,
    int64_t per_target,
    int64_t targets,
    double epsilon) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t eps = static_cast<acc_t>(epsilon);
  for (int64_t t = blockIdx.y; t < targets; t += gridDim.y) {
    const int64_t offset = t * per_target;
    for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < per_target;
         i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
      const acc_t zi = static_cast<acc_t>(z[i]);
      out[offset + i] = static_cast<scalar_t>(static_cast<acc_t>(relevance[offset + i]) / lrp_stabilise(zi, eps));
    }
  }
}

at::Tensor lrp_epsilon_ratio_cuda(const at::Tensor& relevance_in, const at::Tensor& output_in, double epsilon) {
  check_lrp_ratio_args(relevance_in, output_in, epsilon);
  const c10::cuda::CUDAGuard guard(relevance_in.device());
  const at::Tensor relevance = relevance_in.contiguous();
  const at::Tensor output = output_in.contiguous();
  at::Tensor out = at::empty(relevance.sizes(), relevance.options());
  const int64_t per_target = output.numel();
  if (relevance.numel() == 0) {
    return out;
  }
  const int64_t targets = relevance.numel() / per_target;
  const int64_t blocks_y = limit_blocks_y(targets);
  // About 16 blocks per multiprocessor in all, split between positions and targets.
  const int64_t blocks_x = limit_blocks_x(
      std::min<int64_t>(
          (per_target + kThreads - 1) / kThreads, std::max<int64_t>(1, multiprocessor_count() * 16 / blocks_y)));
  const dim3 grid(static_cast<unsigned>(blocks_x), static_cast<unsigned>(blocks_y));
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, relevance.scalar_type(), "lrp_epsilon_ratio_cuda", [&] {
    ratio_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
        out.mutable_data_ptr<scalar_t>(), relevance.const_data_ptr<scalar_t>(), output.const_data_ptr<scalar_t>(),
        per_target, targets, epsilon);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

// One thread per position of z; it loops over the K targets, so grad_output
// needs no atomics. grad_relevance may be `grad` (the in-place op): each
// element is read before it is written, by the same thread.
template <typename scalar_t>
__global__ void ratio_backward_kernel(
    scalar_t* grad_relevance,
    scalar_t* __restrict__ grad_output,
    const scalar_t* grad,
    const scalar_t* __restrict__ relevance,
    const scalar_t* __restrict__ z,
    int64_t per_target,
    int64_t targets,
    double epsilon) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t eps = static_cast<acc_t>(epsilon);
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < per_target;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const acc_t inverse = acc_t(1) / lrp_stabilise(static_cast<acc_t>(z[i]), eps);
    acc_t dz = 0;
    for (int64_t t = 0; t < targets; ++t) {
      const int64_t index = t * per_target + i;
      const acc_t g = static_cast<acc_t>(grad[index]) * inverse;
      grad_relevance[index] = static_cast<scalar_t>(g);
      dz -= g * static_cast<acc_t>(relevance[index]) * inverse;
    }
    grad_output[i] = static_cast<scalar_t>(dz);
  }
}

// Writes both gradients; `grad_relevance` may be `grad` (contiguous).
void ratio_backward_into(
    at::Tensor& grad_relevance,
    at::Tensor& grad_output,
    const at::Tensor& grad,
    const at::Tensor& relevance_in,
    const at::Tensor& output_in,
    double epsilon,
    int64_t k) {
  const c10::cuda::CUDAGuard guard(relevance_in.device());
  const at::Tensor relevance = relevance_in.contiguous();
  const at::Tensor output = output_in.contiguous();
  const int64_t per_target = output.numel();
  if (per_target == 0) {
    return;
  }
  const int64_t blocks = grid_stride_blocks(per_target, kThreads);
  const auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, relevance.scalar_type(), "lrp_epsilon_ratio_backward_cuda", [&] {
        ratio_backward_kernel<scalar_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
            grad_relevance.mutable_data_ptr<scalar_t>(), grad_output.mutable_data_ptr<scalar_t>(),
            grad.const_data_ptr<scalar_t>(), relevance.const_data_ptr<scalar_t>(), output.const_data_ptr<scalar_t>(),
            per_target, k, epsilon);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
}

std::tuple<at::Tensor, at::Tensor> lrp_epsilon_ratio_backward_cuda(
    const at::Tensor& grad, const at::Tensor& relevance, const at::Tensor& output, double epsilon) {
  return lrp_ratio_backward_with(&ratio_backward_into, grad, relevance, output, epsilon);
}

at::Tensor lrp_epsilon_ratio_backward_inplace_cuda(
    at::Tensor& grad, const at::Tensor& relevance, const at::Tensor& output, double epsilon) {
  return lrp_ratio_backward_inplace_with(&ratio_backward_into, grad, relevance, output, epsilon);
}

} // namespace

TORCH_LIBRARY_IMPL(auditkit, CUDA, m) {
  m.impl("lrp_epsilon_ratio", &lrp_epsilon_ratio_cuda);
  m.impl("lrp_epsilon_ratio_backward", &lrp_epsilon_ratio_backward_cuda);
  m.impl("lrp_epsilon_ratio_backward_", &lrp_epsilon_ratio_backward_inplace_cuda);
}

} // namespace auditkit
