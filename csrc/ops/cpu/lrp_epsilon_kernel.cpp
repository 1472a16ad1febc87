// CPU kernels of lrp_epsilon_ratio, s = R / (z + eps * sign(z)), and of its
// backward, each one fused pass, z broadcast over the K explanations per sample held in R.
#include "../lrp_epsilon.h"
#include "multiversion.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

namespace auditkit {

namespace {

template <typename scalar_t>
AUDITKIT_MULTIVERSION void ratio_run(
    scalar_t* __restrict__ out,
    const scalar_t* __restrict__ relevance,
    const scalar_t* __restrict__ z,
    int64_t len,
    double epsilon) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t eps = static_cast<acc_t>(epsilon);
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) {
    const acc_t zi = static_cast<acc_t>(z[i]);
    out[i] = static_cast<scalar_t>(static_cast<acc_t>(relevance[i]) / lrp_stabilise(zi, eps));
  }
}

at::Tensor lrp_epsilon_ratio_cpu(const at::Tensor& relevance_in, const at::Tensor& output_in, double epsilon) {
  check_lrp_ratio_args(relevance_in, output_in, epsilon);
  const at::Tensor relevance = relevance_in.contiguous();
  const at::Tensor output = output_in.contiguous();
  at::Tensor out = at::empty(relevance.sizes(), relevance.options());
  const int64_t per_target = output.numel();
  if (relevance.numel() == 0) {
    return out;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, relevance.scalar_type(), "lrp_epsilon_ratio_cpu", [&] {
    const scalar_t* r = relevance.const_data_ptr<scalar_t>();
    const scalar_t* z = output.const_data_ptr<scalar_t>();
    scalar_t* o = out.mutable_data_ptr<scalar_t>();
    // Chunks never straddle two targets, so z is read contiguously.
    constexpr int64_t kChunk = 16384;
    const int64_t chunks_per_target = (per_target + kChunk - 1) / kChunk;
    const int64_t targets = relevance.numel() / per_target;
    at::parallel_for(0, targets * chunks_per_target, 1, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        const int64_t target = c / chunks_per_target;
        const int64_t start = (c % chunks_per_target) * kChunk;
        const int64_t len = std::min(kChunk, per_target - start);
        const int64_t offset = target * per_target + start;
        ratio_run<scalar_t>(o + offset, r + offset, z + start, len, epsilon);
      }
    });
  });
  return out;
}

// One target's contribution to both gradients over a run of positions; the
// first target writes grad_output, the others add to it. grad_relevance may be
// `grad` itself (the in-place op): each position reads grad[i] before writing it.
template <typename scalar_t>
AUDITKIT_MULTIVERSION void ratio_backward_run(
    scalar_t* grad_relevance,
    scalar_t* __restrict__ grad_output,
    const scalar_t* grad,
    const scalar_t* __restrict__ relevance,
    const scalar_t* __restrict__ z,
    int64_t len,
    double epsilon,
    bool first) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t eps = static_cast<acc_t>(epsilon);
#pragma omp simd
  for (int64_t i = 0; i < len; ++i) {
    const acc_t inverse = acc_t(1) / lrp_stabilise(static_cast<acc_t>(z[i]), eps);
    const acc_t g = static_cast<acc_t>(grad[i]) * inverse;
    grad_relevance[i] = static_cast<scalar_t>(g);
    const acc_t dz = -g * static_cast<acc_t>(relevance[i]) * inverse;
    grad_output[i] = static_cast<scalar_t>(first ? dz : static_cast<acc_t>(grad_output[i]) + dz);
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
  const at::Tensor relevance = relevance_in.contiguous();
  const at::Tensor output = output_in.contiguous();
  const int64_t per_target = output.numel();
  if (per_target == 0) {
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, relevance.scalar_type(), "lrp_epsilon_ratio_backward_cpu", [&] {
        const scalar_t* g = grad.const_data_ptr<scalar_t>(); // may alias gr
        const scalar_t* r = relevance.const_data_ptr<scalar_t>();
        const scalar_t* z = output.const_data_ptr<scalar_t>();
        scalar_t* gr = grad_relevance.mutable_data_ptr<scalar_t>();
        scalar_t* gz = grad_output.mutable_data_ptr<scalar_t>();
        // Parallel over positions (each chunk owns its grad_output entries), targets inside.
        constexpr int64_t kChunk = 16384;
        at::parallel_for(0, (per_target + kChunk - 1) / kChunk, 1, [&](int64_t begin, int64_t end) {
          for (int64_t c = begin; c < end; ++c) {
            const int64_t start = c * kChunk;
            const int64_t len = std::min(kChunk, per_target - start);
            for (int64_t t = 0; t < k; ++t) {
              const int64_t offset = t * per_target + start;
              ratio_backward_run<scalar_t>(
                  gr + offset, gz + start, g + offset, r + offset, z + start, len, epsilon, t == 0);
            }
          }
        });
      });
}

std::tuple<at::Tensor, at::Tensor> lrp_epsilon_ratio_backward_cpu(
    const at::Tensor& grad, const at::Tensor& relevance, const at::Tensor& output, double epsilon) {
  return lrp_ratio_backward_with(&ratio_backward_into, grad, relevance, output, epsilon);
}

at::Tensor lrp_epsilon_ratio_backward_inplace_cpu(
    at::Tensor& grad, const at::Tensor& relevance, const at::Tensor& output, double epsilon) {
  return lrp_ratio_backward_inplace_with(&ratio_backward_into, grad, relevance, output, epsilon);
}

} // namespace

TORCH_LIBRARY_IMPL(auditkit, CPU, m) {
  m.impl("lrp_epsilon_ratio", &lrp_epsilon_ratio_cpu);
  m.impl("lrp_epsilon_ratio_backward", &lrp_epsilon_ratio_backward_cpu);
  m.impl("lrp_epsilon_ratio_backward_", &lrp_epsilon_ratio_backward_inplace_cpu);
}

} // namespace auditkit
