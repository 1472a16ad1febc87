// CUDA kernels of the TAP penalty (TAP paper Eq. 7-8).
//
// downscale_mask_kernel: one thread per D(M)[n,i,j]; the stride-1 max pool is
//   evaluated inside each adaptive window (D is tiny: N*h*w outputs).
// penalty_partial_kernel: each sample is split over `blocks_per_sample` blocks
//   that stream its activation once, in memory order, and reduce
//   sum relu(A) * D into one partial per block; partials are then summed per
//   sample (deterministic, no atomics).
// penalty_backward_kernel: grad = g[n] * D[n,i,j] * 1[A > 0], elementwise.
//
// Mask values are not range-checked here: that would need a device sync on
// every call. The Python wrapper checks them when debug checks are on.
//
// Only c10/ATen core headers are used (no ATen/cuda/CUDAContext.h), so a CUDA
// toolkit without the math libraries' headers (cuBLAS, cuSPARSE) suffices.
#include "../tap_penalty.h"

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

int64_t multiprocessor_count() {
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(
      &count, cudaDevAttrMultiProcessorCount, c10::cuda::current_device()));
  return count;
}

int64_t num_blocks_for(int64_t elements) {
  const int64_t sms = multiprocessor_count();
  const int64_t wanted = (elements + kThreads - 1) / kThreads;
  return std::max<int64_t>(1, std::min<int64_t>(wanted, sms * 16));
}

template <typename mask_t, typename out_t>
__global__ void downscale_mask_kernel(
    const mask_t* __restrict__ mask,
    int64_t sN,
    int64_t sH,
    int64_t sW,
    int64_t N,
    int64_t H,
    int64_t W,
    int64_t h,
    int64_t w,
    int64_t k,
    out_t* __restrict__ out) {
  const int64_t total = N * h * w;
  const int64_t pad = k / 2;
  const int64_t Hd = dilated_size(H, k);
  const int64_t Wd = dilated_size(W, k);
  for (int64_t idx = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
       idx < total;
       idx += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t j = idx % w;
    const int64_t i = (idx / w) % h;
    const int64_t n = idx / (h * w);
    const mask_t* m = mask + n * sN;
    const int64_t r0 = adaptive_start(i, Hd, h), r1 = adaptive_end(i, Hd, h);
    const int64_t c0 = adaptive_start(j, Wd, w), c1 = adaptive_end(j, Wd, w);
    out_t sum = 0;
    for (int64_t r = r0; r < r1; ++r) {
      // Max-pool windows are clipped to the image (padding is -inf); each
      // holds at least one pixel because pad = k/2 < k.
      const int64_t ylo = r - pad > 0 ? r - pad : 0;
      const int64_t yhi = r - pad + k < H ? r - pad + k : H;
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t xlo = c - pad > 0 ? c - pad : 0;
        const int64_t xhi = c - pad + k < W ? c - pad + k : W;
        out_t best = static_cast<out_t>(m[ylo * sH + xlo * sW]);
        for (int64_t y = ylo; y < yhi; ++y) {
          for (int64_t x = xlo; x < xhi; ++x) {
            const out_t v = static_cast<out_t>(m[y * sH + x * sW]);
            best = v > best ? v : best;
          }
        }
        sum += best;
      }
    }
    out[idx] = sum / static_cast<out_t>((r1 - r0) * (c1 - c0));
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
__global__ void __launch_bounds__(kThreads) penalty_partial_kernel(
    const scalar_t* __restrict__ activation,
    const acc_t* __restrict__ dmask,
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
  const acc_t* d = dmask + n * hw;
  const index_t step = static_cast<index_t>(blocks_per_sample) * kThreads;
  acc_t acc = 0;
  index_t e = b * kThreads + threadIdx.x;
  // Several independent loads in flight per thread.
  // Written as a difference so that it cannot overflow index_t.
  for (; e < per_sample - (kUnroll - 1) * step; e += kUnroll * step) {
    acc_t v[kUnroll];
    index_t q[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      index_t offset;
      locate<LAYOUT, index_t>(e + u * step, C, hw, w, sC, sH, sW, offset, q[u]);
      v[u] = static_cast<acc_t>(a[offset]);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      acc += v[u] > acc_t(0) ? v[u] * d[q[u]] : acc_t(0);
    }
  }
  for (; e < per_sample; e += step) {
    index_t offset, q;
    locate<LAYOUT, index_t>(e, C, hw, w, sC, sH, sW, offset, q);
    const acc_t v = static_cast<acc_t>(a[offset]);
    acc += v > acc_t(0) ? v * d[q] : acc_t(0);
  }
  acc = block_reduce_sum(acc);
  if (threadIdx.x == 0) {
    partial[blockIdx.x] = acc;
  }
}

template <typename scalar_t, typename acc_t, int LAYOUT, typename index_t>
__global__ void __launch_bounds__(kThreads) penalty_backward_kernel(
    const acc_t* __restrict__ grad,
    const scalar_t* __restrict__ activation,
    const acc_t* __restrict__ dmask,
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
  for (index_t e = blockIdx.x * static_cast<index_t>(kThreads) + threadIdx.x;
       e < total;
       e += static_cast<index_t>(gridDim.x) * kThreads) {
    // `out` is dense in the activation's layout (contiguous for kStrided),
    // so e is also its offset.
    const index_t n = e / per_sample;
    index_t offset, q;
    locate<LAYOUT, index_t>(e - n * per_sample, C, hw, w, sC, sH, sW, offset, q);
    const acc_t v = static_cast<acc_t>(activation[n * sN + offset]);
    out[e] = static_cast<scalar_t>(
        v > acc_t(0) ? grad[n] * dmask[n * hw + q] : acc_t(0));
  }
}

at::Tensor downscale_mask_cuda_impl(
    const at::Tensor& mask,
    int64_t h,
    int64_t w,
    int64_t k,
    at::ScalarType out_dtype) {
  const at::Tensor m = mask_as_nhw(mask);
  const int64_t N = m.size(0), H = m.size(1), W = m.size(2);
  at::Tensor out = at::empty({N, h, w}, m.options().dtype(out_dtype));
  if (N == 0) {
    return out;
  }
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t blocks = num_blocks_for(N * h * w);
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, m.scalar_type(), "downscale_mask_cuda", [&] {
        using mask_t = scalar_t;
        AT_DISPATCH_FLOATING_TYPES(out_dtype, "downscale_mask_cuda_out", [&] {
          downscale_mask_kernel<mask_t, scalar_t>
              <<<blocks, kThreads, 0, stream>>>(
                  m.const_data_ptr<mask_t>(), m.stride(0), m.stride(1),
                  m.stride(2), N, H, W, h, w, k,
                  out.mutable_data_ptr<scalar_t>());
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        });
      });
  return out;
}

at::Tensor downscale_mask_cuda(
    const at::Tensor& mask,
    int64_t height,
    int64_t width,
    int64_t kernel_size) {
  check_downscale_mask_args(mask, height, width, kernel_size);
  const c10::cuda::CUDAGuard guard(mask.device());
  return downscale_mask_cuda_impl(
      mask, height, width, kernel_size,
      mask.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
}

template <typename scalar_t, typename acc_t, int LAYOUT, typename index_t>
void launch_penalty_partial(
    const at::Tensor& a,
    const at::Tensor& dmask,
    at::Tensor& partial,
    int blocks_per_sample) {
  const auto stream = c10::cuda::getCurrentCUDAStream();
  penalty_partial_kernel<scalar_t, acc_t, LAYOUT, index_t>
      <<<partial.numel(), kThreads, 0, stream>>>(
          a.const_data_ptr<scalar_t>(), dmask.const_data_ptr<acc_t>(),
          partial.mutable_data_ptr<acc_t>(), static_cast<index_t>(a.size(1)),
          static_cast<index_t>(a.size(2)), static_cast<index_t>(a.size(3)),
          a.stride(0), static_cast<index_t>(a.stride(1)),
          static_cast<index_t>(a.stride(2)), static_cast<index_t>(a.stride(3)),
          blocks_per_sample);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, typename acc_t, typename index_t>
void launch_penalty_partial_any_layout(
    const at::Tensor& a,
    const at::Tensor& dmask,
    at::Tensor& partial,
    int blocks_per_sample) {
  switch (layout_of(a)) {
    case kContiguous:
      launch_penalty_partial<scalar_t, acc_t, kContiguous, index_t>(a, dmask, partial, blocks_per_sample);
      break;
    case kChannelsLast:
      launch_penalty_partial<scalar_t, acc_t, kChannelsLast, index_t>(a, dmask, partial, blocks_per_sample);
      break;
    default:
      launch_penalty_partial<scalar_t, acc_t, kStrided, index_t>(a, dmask, partial, blocks_per_sample);
  }
}

// True when every element offset of `t` (and of a dense tensor of its size)
// fits in int32.
bool fits_int32(const at::Tensor& t) {
  return at::native::canUse32BitIndexMath(t) &&
      t.numel() <= std::numeric_limits<int32_t>::max();
}

std::tuple<at::Tensor, at::Tensor> tap_penalty_cuda(
    const at::Tensor& activation,
    const at::Tensor& mask,
    int64_t kernel_size) {
  check_tap_penalty_args(activation, mask, kernel_size);
  const c10::cuda::CUDAGuard guard(activation.device());
  const int64_t N = activation.size(0), C = activation.size(1),
                h = activation.size(2), w = activation.size(3);
  const auto acc_dtype = accumulate_dtype(activation.scalar_type());
  at::Tensor dmask = downscale_mask_cuda_impl(mask, h, w, kernel_size, acc_dtype);
  if (activation.numel() == 0) {
    return {at::zeros({N}, activation.options().dtype(acc_dtype)), dmask};
  }
  const int64_t per_sample = C * h * w;
  const int64_t sms = multiprocessor_count();
  // At least kThreads * kUnroll * 2 elements per block, and about 16 blocks
  // per SM over the whole batch.
  const int64_t by_work = (per_sample + kThreads * kUnroll * 2 - 1) / (kThreads * kUnroll * 2);
  const int64_t by_occupancy = std::max<int64_t>(1, (sms * 16 + N - 1) / N);
  const int blocks_per_sample =
      static_cast<int>(std::max<int64_t>(1, std::min(by_work, by_occupancy)));
  at::Tensor partial = at::empty({N, blocks_per_sample}, activation.options().dtype(acc_dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, activation.scalar_type(), "tap_penalty_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        if (fits_int32(activation)) {
          launch_penalty_partial_any_layout<scalar_t, acc_t, int32_t>(activation, dmask, partial, blocks_per_sample);
        } else {
          launch_penalty_partial_any_layout<scalar_t, acc_t, int64_t>(activation, dmask, partial, blocks_per_sample);
        }
      });
  return {partial.sum(1), dmask};
}

template <typename scalar_t, typename acc_t, int LAYOUT, typename index_t>
void launch_penalty_backward(
    const at::Tensor& g,
    const at::Tensor& a,
    const at::Tensor& d,
    at::Tensor& out) {
  const auto stream = c10::cuda::getCurrentCUDAStream();
  const int64_t blocks = num_blocks_for(a.numel());
  penalty_backward_kernel<scalar_t, acc_t, LAYOUT, index_t>
      <<<blocks, kThreads, 0, stream>>>(
          g.const_data_ptr<acc_t>(), a.const_data_ptr<scalar_t>(),
          d.const_data_ptr<acc_t>(), out.mutable_data_ptr<scalar_t>(),
          static_cast<index_t>(a.numel()), static_cast<index_t>(a.size(1)),
          static_cast<index_t>(a.size(2)), static_cast<index_t>(a.size(3)),
          static_cast<index_t>(a.stride(0)), static_cast<index_t>(a.stride(1)),
          static_cast<index_t>(a.stride(2)), static_cast<index_t>(a.stride(3)));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, typename acc_t, typename index_t>
void launch_penalty_backward_any_layout(
    const at::Tensor& g,
    const at::Tensor& a,
    const at::Tensor& d,
    at::Tensor& out) {
  switch (layout_of(a)) {
    case kContiguous:
      launch_penalty_backward<scalar_t, acc_t, kContiguous, index_t>(g, a, d, out);
      break;
    case kChannelsLast:
      launch_penalty_backward<scalar_t, acc_t, kChannelsLast, index_t>(g, a, d, out);
      break;
    default:
      launch_penalty_backward<scalar_t, acc_t, kStrided, index_t>(g, a, d, out);
  }
}

at::Tensor tap_penalty_backward_cuda(
    const at::Tensor& grad,
    const at::Tensor& activation,
    const at::Tensor& downscaled_mask) {
  check_tap_penalty_backward_args(grad, activation, downscaled_mask);
  const c10::cuda::CUDAGuard guard(activation.device());
  at::Tensor out = empty_activation_grad(activation);
  if (activation.numel() == 0) {
    return out;
  }
  const auto acc_dtype = accumulate_dtype(activation.scalar_type());
  const at::Tensor g = grad.to(acc_dtype).contiguous();
  const at::Tensor d = downscaled_mask.to(acc_dtype).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, activation.scalar_type(), "tap_penalty_backward_cuda", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        if (fits_int32(activation)) {
          launch_penalty_backward_any_layout<scalar_t, acc_t, int32_t>(g, activation, d, out);
        } else {
          launch_penalty_backward_any_layout<scalar_t, acc_t, int64_t>(g, activation, d, out);
        }
      });
  return out;
}

} // namespace

TORCH_LIBRARY_IMPL(auditkit, CUDA, m) {
  m.impl("tap_penalty", &tap_penalty_cuda);
  m.impl("tap_penalty_backward", &tap_penalty_backward_cuda);
  m.impl("downscale_mask", &downscale_mask_cuda);
}

} // namespace auditkit
