// Shared declarations for the TAP ops (TAP paper, Eq. 7-8).
//
//   D(M)  = AdaptiveAvgPool_(h,w)( MaxPool_{k, stride 1, pad k/2}(M) )            (Eq. 7)
//   (k may differ per targeted layer: a dilation that grows with depth, see
//   auditkit/ops/dilation.py)
//   P[n]  = sum_{i,j} D(M)[n,i,j] * sum_c relu(A[n,c,i,j])                          (Eq. 8, per sample)
//
// Two ops implement it:
//   downscale_mask(mask, ks, sizes, dtype) -> [D_l]  D(M) for every targeted layer
//       size, one pass over the mask per distinct kernel size in ks (one k for
//       all sizes, or one per size; a training step calls it once per batch);
//   weighted_relu_sum(A, W) -> P  one streaming pass over the activation,
//       P[n] = sum_{c,i,j} W[n,i,j] * relu(A[n,c,i,j]); the (N,h,w) channel sum
//       is never materialised. Its backward is g[n] * W[n,i,j] * 1[A > 0];
//       weighted_relu_sum_backward(..., base) returns base + that in one pass, so
//       a training step can add the penalty's gradient to the activation's
//       incoming gradient without materialising it (auditkit.ops.tap_loss_injected).
//
// Backend kernels live in cpu/ and cuda/; this header holds what every backend
// shares: argument checks and the window arithmetic of the two poolings.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <c10/macros/Macros.h>

#include <cstdint>
#include <optional>
#include <utility>
#include <vector>

namespace auditkit {

// Checks shapes, dtypes and devices (never tensor values); errors name the
// offending argument. Returns the (height, width) pairs of `sizes`.
std::vector<std::pair<int64_t, int64_t>> check_downscale_mask_args(
    const at::Tensor& mask, c10::IntArrayRef kernel_sizes, c10::IntArrayRef sizes, std::optional<at::ScalarType> dtype);

// The pairs' indices grouped by kernel size, in order of first appearance:
// [(k, [pair indices])]. `kernel_sizes` holds one k for all pairs or one per pair.
std::vector<std::pair<int64_t, std::vector<size_t>>>
group_by_kernel_size(c10::IntArrayRef kernel_sizes, size_t num_pairs);

void check_weighted_relu_sum_args(const at::Tensor& activation, const at::Tensor& weights);

void check_weighted_relu_sum_backward_args(
    const at::Tensor& grad,
    const at::Tensor& activation,
    const at::Tensor& weights,
    const std::optional<at::Tensor>& base);

// float for float32/float16/bfloat16 activations, double for float64: the
// dtype of the penalty and of all accumulation.
at::ScalarType accumulate_dtype(at::ScalarType activation_dtype);

// D's dtype: the requested one, else float64 for a float64 mask, else float32.
at::ScalarType downscaled_dtype(const at::Tensor& mask, std::optional<at::ScalarType> dtype);

// The gradient's layout: channels_last when the activation is (and is not
// also plain contiguous), contiguous otherwise. The fake kernel mirrors this.
at::Tensor empty_activation_grad(const at::Tensor& activation);

// The optional gradient that weighted_relu_sum_backward adds its result to,
// with `out`'s strides (itself when they match, else a copy; never `out`).
// Undefined when there is none.
at::Tensor base_in_layout_of(const std::optional<at::Tensor>& base, const at::Tensor& out);

// (N,1,H,W) or (N,H,W) -> (N,H,W) view.
at::Tensor mask_as_nhw(const at::Tensor& mask);

// Size of the stride-1 max-pooled mask: H + 2*(k/2) - k + 1 (H for odd k).
C10_HOST_DEVICE inline int64_t dilated_size(int64_t size, int64_t kernel_size) {
  return size + 2 * (kernel_size / 2) - kernel_size + 1;
}

// Adaptive pooling windows, exactly as ATen's adaptive_avg_pool2d:
// [floor(i*in/out), ceil((i+1)*in/out)).
C10_HOST_DEVICE inline int64_t adaptive_start(int64_t i, int64_t in, int64_t out) {
  return (i * in) / out;
}
C10_HOST_DEVICE inline int64_t adaptive_end(int64_t i, int64_t in, int64_t out) {
  return ((i + 1) * in + out - 1) / out;
}

} // namespace auditkit
