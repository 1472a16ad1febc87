// CUDA kernels of the TAP ops (TAP paper Eq. 7-8).
//
// downscale_mask: dilate_kernel writes MaxPool_k(M) once per distinct k (one
//   thread per dilated pixel; separable row and column passes for k > 3);
//   window_mean_kernel then gives each D_l[n,i,j] one warp that
//   averages its adaptive window (windows reach 32x32 pixels for ResNet's last
//   block at 224x224, so one thread per output would be slow).
// weighted_relu_sum: each sample is split over `blocks_per_sample` blocks that
//   stream its activation once, in memory order, and reduce W * relu(A) into
//   one partial per block; partials are summed per sample (deterministic, no
//   atomics).
// weighted_relu_sum_backward: base + g[n] * W[n,i,j] * 1[A > 0], elementwise.
//
// Mask values are not range-checked here: that would need a device sync on
#include "../tap_penalty.h"
#include "launch.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <ATen/native/CanUse32BitIndexMath.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>

namespace auditkit {

namespace {

constexpr int kThreads = 256;
constexpr int kUnroll = 4;

enum Layout : int { kContiguous = 0, kChannelsLast = 1, kStrided = 2 };

int layout_of(const at::Tensor& t) {
  if (t.is_contiguous()) {
    return kContiguous;
  }
  if (t.is_contiguous(at::MemoryFormat::ChannelsLast)) {
    return kChannelsLast;
  }
  return kStrided;
}

int64_t num_blocks_for(int64_t elements) {
  return grid_stride_blocks(elements, kThreads);
}

template <typename mask_t, typename work_t>
__global__ void dilate_kernel(
    const mask_t* __restrict__ mask,
    int64_t sN,
    int64_t sH,
    int64_t sW,
    int64_t N,
    int64_t H,
    int64_t W,
    int64_t k,
    work_t* __restrict__ dilated) {
  const int64_t pad = k / 2;
  const int64_t Hd = dilated_size(H, k), Wd = dilated_size(W, k);
  const int64_t total = N * Hd * Wd;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t c = idx % Wd;
    const int64_t r = (idx / Wd) % Hd;
    const int64_t n = idx / (Hd * Wd);
    const mask_t* m = mask + n * sN;
    // Windows are clipped to the image (padding is -inf); each holds at least
    // one pixel because pad = k/2 < k.
    const int64_t ylo = r - pad > 0 ? r - pad : 0;
    const int64_t yhi = r - pad + k < H ? r - pad + k : H;
    const int64_t xlo = c - pad > 0 ? c - pad : 0;
    const int64_t xhi = c - pad + k < W ? c - pad + k : W;
    work_t best = static_cast<work_t>(m[ylo * sH + xlo * sW]);
    for (int64_t y = ylo; y < yhi; ++y) {
      for (int64_t x = xlo; x < xhi; ++x) {
        const work_t v = static_cast<work_t>(m[y * sH + x * sW]);
        // A NaN anywhere in the window wins, as in max_pool2d (v != v: NaN).
        best = (v > best || v != v) ? v : best;
      }
    }
    dilated[idx] = best;
  }
}

// The separable form of dilate_kernel for wide windows (k > 3: the dilation
// that grows with depth reaches k = 61 at 224^2), O(k) instead of O(k^2) reads
// per pixel. Pass 1: rows[n, y, c] = max over the row window of column c, for
// every mask row y; pass 2: dilated[n, r, c] = max over the column window of row r.
template <typename mask_t, typename work_t>
__global__ void dilate_rows_kernel(
    const mask_t* __restrict__ mask,
    int64_t sN,
    int64_t sH,
    int64_t sW,
    int64_t N,
    int64_t H,
    int64_t W,
    int64_t k,
    work_t* __restrict__ rows) {
  const int64_t pad = k / 2;
  const int64_t Wd = dilated_size(W, k);
  const int64_t total = N * H * Wd;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t c = idx % Wd;
    const int64_t y = (idx / Wd) % H;
    const int64_t n = idx / (H * Wd);
    const mask_t* m = mask + n * sN + y * sH;
    const int64_t xlo = c - pad > 0 ? c - pad : 0;
    const int64_t xhi = c - pad + k < W ? c - pad + k : W;
    work_t best = static_cast<work_t>(m[xlo * sW]);
    for (int64_t x = xlo + 1; x < xhi; ++x) {
      const work_t v = static_cast<work_t>(m[x * sW]);
      best = (v > best || v != v) ? v : best; // NaN wins, as in max_pool2d
    }
    rows[idx] = best;
  }
}

template <typename work_t>
__global__ void dilate_cols_kernel(
    const work_t* __restrict__ rows, int64_t N, int64_t H, int64_t Wd, int64_t k, work_t* __restrict__ dilated) {
  const int64_t pad = k / 2;
  const int64_t Hd = dilated_size(H, k);
  const int64_t total = N * Hd * Wd;
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t c = idx % Wd;
    const int64_t r = (idx / Wd) % Hd;
    const int64_t n = idx / (Hd * Wd);
    const work_t* column = rows + n * H * Wd + c;
    const int64_t ylo = r - pad > 0 ? r - pad : 0;
    const int64_t yhi = r - pad + k < H ? r - pad + k : H;
    work_t best = column[ylo * Wd];
    for (int64_t y = ylo + 1; y < yhi; ++y) {
      const work_t v = column[y * Wd];
      best = (v > best || v != v) ? v : best;
    }
    dilated[idx] = best;
  }
}

// One warp per output element D[n,i,j].
template <typename work_t, typename out_t>
__global__ void window_mean_kernel(
    const work_t* __restrict__ dilated,
    int64_t N,
    int64_t Hd,
    int64_t Wd,
    int64_t h,
    int64_t w,
    out_t* __restrict__ out) {
  const int64_t warps_per_block = blockDim.x / 32;
  const int lane = threadIdx.x % 32;
  const int64_t total = N * h * w;
  for (int64_t idx = blockIdx.x * warps_per_block + threadIdx.x / 32; idx < total;
       idx += static_cast<int64_t>(gridDim.x) * warps_per_block) {
    const int64_t j = idx % w;
    const int64_t i = (idx / w) % h;
    const int64_t n = idx / (h * w);
    const int64_t r0 = adaptive_start(i, Hd, h), r1 = adaptive_end(i, Hd, h);
    const int64_t c0 = adaptive_start(j, Wd, w), c1 = adaptive_end(j, Wd, w);
    const int64_t cols = c1 - c0;
    const int64_t count = (r1 - r0) * cols;
    const work_t* base = dilated + n * Hd * Wd;
    double sum = 0.0;
    for (int64_t e = lane; e < count; e += 32) {
      const int64_t r = r0 + e / cols, c = c0 + e % cols;
      sum += static_cast<double>(base[r * Wd + c]);
    }
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
      sum += __shfl_down_sync(0xffffffffu, sum, offset);
    }
    if (lane == 0) {
      out[idx] = static_cast<out_t>(sum / static_cast<double>(count));
    }
  }
}

template <typename T>
__device__ T block_reduce_sum(T val) {
  __shared__ T warp_sums[kThreads / 32];
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) {
    val += __shfl_down_sync(0xffffffffu, val, offset);
  }
  if (lane == 0) {
    warp_sums[warp] = val;
  }
  __syncthreads();
  val = threadIdx.x < kThreads / 32 ? warp_sums[lane] : T(0);
  if (warp == 0) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
      val += __shfl_down_sync(0xffffffffu, val, offset);
    }
  }
  return val; // meaningful in thread 0
}

// Memory offset of element `e` of one sample (e counts in memory order for
// the dense layouts, in (c, i, j) order for kStrided) and its spatial index.
template <int LAYOUT, typename index_t>
__device__ __forceinline__ void locate(
    index_t e,
    index_t C,
    index_t hw,
    index_t w,
    index_t sC,
    index_t sH,
    index_t sW,
    index_t& offset,
    index_t& spatial) {
  if (LAYOUT == kContiguous) {
    offset = e;
    spatial = e % hw;
  } else if (LAYOUT == kChannelsLast) {
    offset = e;
    spatial = e / C;
  } else {
    const index_t c = e / hw;
    spatial = e - c * hw;
    const index_t i = spatial / w;
    const index_t j = spatial - i * w;
    offset = c * sC + i * sH + j * sW;
  }
}

template <typename scalar_t, typename acc_t, int LAYOUT, typename index_t>
__global__ void __launch_bounds__(kThreads) weighted_sum_partial_kernel(
    const scalar_t* __restrict__ activation,
    const acc_t* __restrict__ weights,
    acc_t* __restrict__ partial,
    index_t C,
    index_t h,
    index_t w,
    int64_t sN,
    index_t sC,
    index_t sH,
    index_t sW,
    int blocks_per_sample) {
  const int64_t n = blockIdx.x / blocks_per_sample;
  const index_t b = blockIdx.x % blocks_per_sample;
  const index_t hw = h * w;
  const index_t per_sample = C * hw;
  const scalar_t* a = activation + n * sN;
  const acc_t* d = weights + n * hw;
  // The loop counter is 64-bit whatever index_t is: e + step may pass 2^31
  // even when every valid index fits int32 (ATen's CUDA_KERNEL_LOOP does the same).
  const int64_t step = static_cast<int64_t>(blocks_per_sample) * kThreads;
  const int64_t end = per_sample;
  acc_t acc = 0;
  int64_t e = static_cast<int64_t>(b) * kThreads + threadIdx.x;
  // Several independent loads in flight per thread.
  for (; e + (kUnroll - 1) * step < end; e += kUnroll * step) {
    acc_t v[kUnroll];
    index_t q[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      index_t offset;
      locate<LAYOUT, index_t>(static_cast<index_t>(e + u * step), C, hw, w, sC, sH, sW, offset, q[u]);
      v[u] = static_cast<acc_t>(a[offset]);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      acc += v[u] > acc_t(0) ? v[u] * d[q[u]] : acc_t(0);
    }
  }
  for (; e < end; e += step) {
    index_t offset, q;
    locate<LAYOUT, index_t>(static_cast<index_t>(e), C, hw, w, sC, sH, sW, offset, q);
    const acc_t v = static_cast<acc_t>(a[offset]);
    acc += v > acc_t(0) ? v * d[q] : acc_t(0);
  }
  acc = block_reduce_sum(acc);
  if (threadIdx.x == 0) {
    partial[blockIdx.x] = acc;
  }
}

template <typename scalar_t, typename acc_t, int LAYOUT, typename index_t>
__global__ void __launch_bounds__(kThreads) relu_grad_kernel(
    const acc_t* __restrict__ grad,
    const scalar_t* __restrict__ activation,
    const acc_t* __restrict__ weights,
    const scalar_t* __restrict__ base,
    scalar_t* __restrict__ out,
    index_t total,
    index_t C,
    index_t h,
    index_t w,
    index_t sN,
    index_t sC,
    index_t sH,
    index_t sW) {
  const index_t hw = h * w;
  const index_t per_sample = C * hw;
  // 64-bit loop counter: with an int32 counter, e + gridDim.x * kThreads wraps
  // negative once total lies within one grid's width of 2^31 (ATen keeps its
  // kernel loop's counter 64-bit for the same reason).
  for (int64_t e64 = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; e64 < total;
       e64 += static_cast<int64_t>(gridDim.x) * kThreads) {
    const index_t e = static_cast<index_t>(e64);
    // `out` is dense in the activation's layout (contiguous for kStrided),
    // so e is also its offset, and `base`'s (same strides, never aliasing out).
    const index_t n = e / per_sample;
    index_t offset, q;
    locate<LAYOUT, index_t>(e - n * per_sample, C, hw, w, sC, sH, sW, offset, q);
    const acc_t v = static_cast<acc_t>(activation[n * sN + offset]);
    const acc_t added_to = base == nullptr ? acc_t(0) : static_cast<acc_t>(base[e]);
    out[e] = static_cast<scalar_t>(added_to + (v > acc_t(0) ? grad[n] * weights[n * hw + q] : acc_t(0)));
  }
}

std::vector<at::Tensor> downscale_mask_cuda(
    const at::Tensor& mask,
    c10::IntArrayRef kernel_sizes,
    c10::IntArrayRef sizes,
    std::optional<at::ScalarType> dtype) {
  const auto pairs = check_downscale_mask_args(mask, kernel_sizes, sizes, dtype);
  const c10::cuda::CUDAGuard guard(mask.device());
  const at::Tensor m = mask_as_nhw(mask);
  const int64_t N = m.size(0), H = m.size(1), W = m.size(2);
  const auto out_dtype = downscaled_dtype(mask, dtype);
  std::vector<at::Tensor> outputs;
  for (const auto& [h, w] : pairs) {
    outputs.push_back(at::empty({N, h, w}, m.options().dtype(out_dtype)));
  }
  if (N == 0) {
    return outputs;
  }
  const auto stream = c10::cuda::getCurrentCUDAStream();
  // Max pooling is exact in float for every mask dtype but float64.
  const auto work_dtype = m.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  // One dilated mask per distinct kernel size (one in all for Eq. 7's single k).
  for (const auto& group : group_by_kernel_size(kernel_sizes, pairs.size())) {
    // Plain locals, not a structured binding: the dispatch lambdas below capture them, capturing a
    // structured binding is C++20, and torch 2.11 (the GPU machine's) builds extensions as C++17.
    const int64_t kernel_size = group.first;
    const std::vector<size_t>& layers = group.second;
    const int64_t Hd = dilated_size(H, kernel_size), Wd = dilated_size(W, kernel_size);
    at::Tensor dilated = at::empty({N, Hd, Wd}, m.options().dtype(work_dtype));
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, m.scalar_type(), "downscale_mask_cuda", [&] {
      using mask_t = scalar_t;
      AT_DISPATCH_FLOATING_TYPES(work_dtype, "downscale_mask_cuda_work", [&] {
        using work_t = scalar_t;
        if (kernel_size <= 3) {
          dilate_kernel<mask_t, work_t><<<num_blocks_for(N * Hd * Wd), kThreads, 0, stream>>>(
              m.const_data_ptr<mask_t>(), m.stride(0), m.stride(1), m.stride(2), N, H, W, kernel_size,
              dilated.mutable_data_ptr<work_t>());
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        } else {
          at::Tensor rows = at::empty({N, H, Wd}, m.options().dtype(work_dtype));
          dilate_rows_kernel<mask_t, work_t><<<num_blocks_for(N * H * Wd), kThreads, 0, stream>>>(
              m.const_data_ptr<mask_t>(), m.stride(0), m.stride(1), m.stride(2), N, H, W, kernel_size,
              rows.mutable_data_ptr<work_t>());
          C10_CUDA_KERNEL_LAUNCH_CHECK();
          dilate_cols_kernel<work_t><<<num_blocks_for(N * Hd * Wd), kThreads, 0, stream>>>(
              rows.const_data_ptr<work_t>(), N, H, Wd, kernel_size, dilated.mutable_data_ptr<work_t>());
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
        for (const size_t l : layers) {
          const int64_t h = pairs[l].first, w = pairs[l].second;
          const int64_t warps = N * h * w;
          AT_DISPATCH_FLOATING_TYPES(out_dtype, "downscale_mask_cuda_out", [&] {
            window_mean_kernel<work_t, scalar_t><<<num_blocks_for(warps * 32), kThreads, 0, stream>>>(
                dilated.const_data_ptr<work_t>(), N, Hd, Wd, h, w, outputs[l].mutable_data_ptr<scalar_t>());
            C10_CUDA_KERNEL_LAUNCH_CHECK();
          });
        }
      });
    });
  }
  return outputs;
}

template <typename scalar_t, typename acc_t, int LAYOUT, typename index_t>
void launch_weighted_sum_partial(
    const at::Tensor& a, const at::Tensor& weights, at::Tensor& partial, int blocks_per_sample) {
  const auto stream = c10::cuda::getCurrentCUDAStream();
  weighted_sum_partial_kernel<scalar_t, acc_t, LAYOUT, index_t><<<partial.numel(), kThreads, 0, stream>>>(
      a.const_data_ptr<scalar_t>(), weights.const_data_ptr<acc_t>(), partial.mutable_data_ptr<acc_t>(),
      static_cast<index_t>(a.size(1)), static_cast<index_t>(a.size(2)), static_cast<index_t>(a.size(3)), a.stride(0),
      static_cast<index_t>(a.stride(1)), static_cast<index_t>(a.stride(2)), static_cast<index_t>(a.stride(3)),
      blocks_per_sample);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, typename acc_t, typename index_t>
void launch_weighted_sum_partial_any_layout(
    const at::Tensor& a, const at::Tensor& weights, at::Tensor& partial, int blocks_per_sample) {
  switch (layout_of(a)) {
  case kContiguous:
    launch_weighted_sum_partial<scalar_t, acc_t, kContiguous, index_t>(a, weights, partial, blocks_per_sample);
    break;
  case kChannelsLast:
    launch_weighted_sum_partial<scalar_t, acc_t, kChannelsLast, index_t>(a, weights, partial, blocks_per_sample);
    break;
  default:
    launch_weighted_sum_partial<scalar_t, acc_t, kStrided, index_t>(a, weights, partial, blocks_per_sample);
  }
}

// True when every element offset of `t` (and of a dense tensor of its size)
// fits in int32.
bool fits_int32(const at::Tensor& t) {
  return !cuda_launch_limits().force_64bit_index && at::native::canUse32BitIndexMath(t) &&
      t.numel() <= std::numeric_limits<int32_t>::max();
}

at::Tensor weighted_relu_sum_cuda(const at::Tensor& activation, const at::Tensor& weights) {
  check_weighted_relu_sum_args(activation, weights);
  const c10::cuda::CUDAGuard guard(activation.device());
  const int64_t N = activation.size(0), C = activation.size(1), h = activation.size(2), w = activation.size(3);
  const auto acc_dtype = accumulate_dtype(activation.scalar_type());
  if (activation.numel() == 0) {
    return at::zeros({N}, activation.options().dtype(acc_dtype));
  }
  const at::Tensor wts = weights.to(acc_dtype).contiguous();
  const int64_t per_sample = C * h * w;
  const int64_t sms = multiprocessor_count();
  // At least kThreads * kUnroll * 2 elements per block, and about 16 blocks
  // per SM over the whole batch (a test limit on blocks lowers both).
  const int64_t by_work = (per_sample + kThreads * kUnroll * 2 - 1) / (kThreads * kUnroll * 2);
  const int64_t by_occupancy = std::max<int64_t>(1, (sms * 16 + N - 1) / N);
  const int64_t by_limit = std::max<int64_t>(1, limit_blocks_x(by_occupancy * N) / N);
  const int blocks_per_sample = static_cast<int>(std::max<int64_t>(1, std::min({by_work, by_occupancy, by_limit})));
  at::Tensor partial = at::empty({N, blocks_per_sample}, activation.options().dtype(acc_dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, activation.scalar_type(), "weighted_relu_sum_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    if (fits_int32(activation)) {
      launch_weighted_sum_partial_any_layout<scalar_t, acc_t, int32_t>(activation, wts, partial, blocks_per_sample);
    } else {
      launch_weighted_sum_partial_any_layout<scalar_t, acc_t, int64_t>(activation, wts, partial, blocks_per_sample);
    }
  });
  return partial.sum(1);
}

template <typename scalar_t, typename acc_t, int LAYOUT, typename index_t>
void launch_relu_grad(
    const at::Tensor& g, const at::Tensor& a, const at::Tensor& d, const at::Tensor& base, at::Tensor& out) {
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t blocks = num_blocks_for(a.numel());
  relu_grad_kernel<scalar_t, acc_t, LAYOUT, index_t><<<blocks, kThreads, 0, stream>>>(
      g.const_data_ptr<acc_t>(), a.const_data_ptr<scalar_t>(), d.const_data_ptr<acc_t>(),
      base.defined() ? base.const_data_ptr<scalar_t>() : nullptr, out.mutable_data_ptr<scalar_t>(),
      static_cast<index_t>(a.numel()), static_cast<index_t>(a.size(1)), static_cast<index_t>(a.size(2)),
      static_cast<index_t>(a.size(3)), static_cast<index_t>(a.stride(0)), static_cast<index_t>(a.stride(1)),
      static_cast<index_t>(a.stride(2)), static_cast<index_t>(a.stride(3)));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, typename acc_t, typename index_t>
void launch_relu_grad_any_layout(
    const at::Tensor& g, const at::Tensor& a, const at::Tensor& d, const at::Tensor& base, at::Tensor& out) {
  switch (layout_of(a)) {
  case kContiguous:
    launch_relu_grad<scalar_t, acc_t, kContiguous, index_t>(g, a, d, base, out);
    break;
  case kChannelsLast:
    launch_relu_grad<scalar_t, acc_t, kChannelsLast, index_t>(g, a, d, base, out);
    break;
  default:
    launch_relu_grad<scalar_t, acc_t, kStrided, index_t>(g, a, d, base, out);
  }
}

at::Tensor weighted_relu_sum_backward_cuda(
    const at::Tensor& grad,
    const at::Tensor& activation,
    const at::Tensor& weights,
    const std::optional<at::Tensor>& base) {
  check_weighted_relu_sum_backward_args(grad, activation, weights, base);
  const c10::cuda::CUDAGuard guard(activation.device());
  at::Tensor out = empty_activation_grad(activation);
  if (activation.numel() == 0) {
    return out;
  }
  const at::Tensor added_to = base_in_layout_of(base, out);
  const auto acc_dtype = accumulate_dtype(activation.scalar_type());
  const at::Tensor g = grad.to(acc_dtype).contiguous();
  const at::Tensor d = weights.to(acc_dtype).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, activation.scalar_type(), "weighted_relu_sum_backward_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        if (fits_int32(activation)) {
          launch_relu_grad_any_layout<scalar_t, acc_t, int32_t>(g, activation, d, added_to, out);
        } else {
          launch_relu_grad_any_layout<scalar_t, acc_t, int64_t>(g, activation, d, added_to, out);
        }
      });
  return out;
}

} // namespace

TORCH_LIBRARY_IMPL(auditkit, CUDA, m) {
  m.impl("downscale_mask", &downscale_mask_cuda);
  m.impl("weighted_relu_sum", &weighted_relu_sum_cuda);
  m.impl("weighted_relu_sum_backward", &weighted_relu_sum_backward_cuda);
}

} // namespace auditkit
