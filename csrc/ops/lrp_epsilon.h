// Shared declarations for the LRP-epsilon ops (see lrp_epsilon.cpp).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/macros/Macros.h>

#include <cstdint>
#include <tuple>

namespace auditkit {

// Checks that `relevance` is `output`'s shape with a batch K times larger and
// returns K (the number of explanations per sample).
int64_t check_lrp_broadcast(const at::Tensor& relevance, const at::Tensor& output, const char* op);

// Every backend's argument checks of lrp_epsilon_ratio and its backward
// (shapes, dtypes, devices and epsilon, never values); both return K.
int64_t check_lrp_ratio_args(const at::Tensor& relevance, const at::Tensor& output, double epsilon);
int64_t check_lrp_ratio_backward_inplace_args(
    const at::Tensor& grad, const at::Tensor& relevance, const at::Tensor& output, double epsilon);
int64_t check_lrp_ratio_backward_args(
    const at::Tensor& grad, const at::Tensor& relevance, const at::Tensor& output, double epsilon);

// One backend's ratio backward: writes d/dR into `grad_relevance` (which may be
// `grad`, contiguous) and d/dz into `grad_output`, for K explanations per sample.
using RatioBackwardInto = void (*)(
    at::Tensor& grad_relevance,
    at::Tensor& grad_output,
    const at::Tensor& grad,
    const at::Tensor& relevance,
    const at::Tensor& output,
    double epsilon,
    int64_t k);

// lrp_epsilon_ratio_backward and lrp_epsilon_ratio_backward_ around a backend's `into`:
// checks, device guard, allocation (shared by the CPU and CUDA registrations).
std::tuple<at::Tensor, at::Tensor> lrp_ratio_backward_with(
    RatioBackwardInto into,
    const at::Tensor& grad,
    const at::Tensor& relevance,
    const at::Tensor& output,
    double epsilon);
at::Tensor lrp_ratio_backward_inplace_with(
    RatioBackwardInto into, at::Tensor& grad, const at::Tensor& relevance, const at::Tensor& output, double epsilon);

// The epsilon stabiliser: z + eps * sign(z) with sign(0) = +1, so the result
// is never smaller than eps in magnitude.
template <typename T>
C10_HOST_DEVICE inline T lrp_stabilise(T z, T eps) {
  return z >= T(0) ? z + eps : z - eps;
}

} // namespace auditkit
