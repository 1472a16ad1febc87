// CPU kernels of the TAP penalty (TAP paper Eq. 7-8).
//
// Forward reads the activation once: each (n, c) plane (or, for channels_last,
// each (n, i) row) is reduced against the tiny downscaled mask D(M) into a
// per-plane partial sum; the (N, h, w) channel sum is never materialised.
// D(M) is computed per sample with a separable max pool followed by the
// adaptive average windows; the mask range check rides along for free.
#include "../tap_penalty.h"

#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <limits>
#include <vector>

namespace auditkit {

namespace {

// Inner loops compiled for AVX-512, AVX2+FMA and a baseline; the loader picks
// the best one for the running CPU (GCC function multi-versioning).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && \
    !defined(AUDITKIT_NO_TARGET_CLONES)
#define AUDITKIT_MULTIVERSION \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define AUDITKIT_MULTIVERSION
#endif

template <typename scalar_t, typename acc_t>
AUDITKIT_MULTIVERSION acc_t
dot_relu_contiguous(const scalar_t* a, const acc_t* d, int64_t len) {
  acc_t acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int64_t k = 0; k < len; ++k) {
    const acc_t v = static_cast<acc_t>(a[k]);
    acc += v > acc_t(0) ? v * d[k] : acc_t(0);
  }
  return acc;
}

template <typename scalar_t, typename acc_t>
AUDITKIT_MULTIVERSION acc_t sum_relu_contiguous(const scalar_t* a, int64_t len) {
  acc_t acc = 0;
#pragma omp simd reduction(+ : acc)
  for (int64_t k = 0; k < len; ++k) {
    const acc_t v = static_cast<acc_t>(a[k]);
    acc += v > acc_t(0) ? v : acc_t(0);
  }
  return acc;
}

template <typename scalar_t, typename acc_t>
AUDITKIT_MULTIVERSION void grad_row_contiguous(
    scalar_t* out,
    const scalar_t* a,
    const acc_t* weight,
    int64_t len) {
#pragma omp simd
  for (int64_t k = 0; k < len; ++k) {
    const acc_t v = static_cast<acc_t>(a[k]);
    out[k] = static_cast<scalar_t>(v > acc_t(0) ? weight[k] : acc_t(0));
  }
}

template <typename scalar_t, typename acc_t>
AUDITKIT_MULTIVERSION void grad_row_constant_weight(
    scalar_t* out,
    const scalar_t* a,
    acc_t weight,
    int64_t len) {
#pragma omp simd
  for (int64_t k = 0; k < len; ++k) {
    const acc_t v = static_cast<acc_t>(a[k]);
    out[k] = static_cast<scalar_t>(v > acc_t(0) ? weight : acc_t(0));
  }
}

struct Strides4 {
  int64_t n, c, h, w;
};

Strides4 strides_of(const at::Tensor& t) {
  return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

// D(M) for one sample, computed in double: max is exact, the window means are
// rounded once when stored. `bad` is set when a mask value lies outside [0, 1]
// (NaN included), which the caller turns into an error.
template <typename mask_t, typename out_t>
void downscale_one_sample(
    const mask_t* m,
    int64_t sH,
    int64_t sW,
    int64_t H,
    int64_t W,
    int64_t h,
    int64_t w,
    int64_t k,
    out_t* out,
    std::vector<double>& row_max,
    std::vector<double>& dilated,
    bool& bad) {
  const int64_t pad = k / 2;
  const int64_t Hd = dilated_size(H, k);
  const int64_t Wd = dilated_size(W, k);
  row_max.resize(static_cast<size_t>(H * Wd));
  dilated.resize(static_cast<size_t>(Hd * Wd));
  constexpr double neg_inf = -std::numeric_limits<double>::infinity();
  for (const auto r : c10::irange(H)) {
    const mask_t* row = m + r * sH;
    for (const auto c : c10::irange(Wd)) {
      const int64_t lo = std::max<int64_t>(c - pad, 0);
      const int64_t hi = std::min<int64_t>(c - pad + k, W);
      double best = neg_inf;
      for (int64_t x = lo; x < hi; ++x) {
        const double v = static_cast<double>(row[x * sW]);
        best = v > best ? v : best;
      }
      row_max[r * Wd + c] = best;
    }
    for (const auto x : c10::irange(W)) {
      const double v = static_cast<double>(row[x * sW]);
      bad |= !(v >= 0.0 && v <= 1.0);
    }
  }
  for (const auto r : c10::irange(Hd)) {
    const int64_t lo = std::max<int64_t>(r - pad, 0);
    const int64_t hi = std::min<int64_t>(r - pad + k, H);
    double* dst = dilated.data() + r * Wd;
    std::fill(dst, dst + Wd, neg_inf);
    for (int64_t y = lo; y < hi; ++y) {
      const double* src = row_max.data() + y * Wd;
      for (const auto c : c10::irange(Wd)) {
        dst[c] = src[c] > dst[c] ? src[c] : dst[c];
      }
    }
  }
  for (const auto i : c10::irange(h)) {
    const int64_t r0 = adaptive_start(i, Hd, h);
    const int64_t r1 = adaptive_end(i, Hd, h);
    for (const auto j : c10::irange(w)) {
      const int64_t c0 = adaptive_start(j, Wd, w);
      const int64_t c1 = adaptive_end(j, Wd, w);
      double sum = 0.0;
      for (int64_t r = r0; r < r1; ++r) {
        const double* src = dilated.data() + r * Wd;
        for (int64_t c = c0; c < c1; ++c) {
          sum += src[c];
        }
      }
      out[i * w + j] =
          static_cast<out_t>(sum / static_cast<double>((r1 - r0) * (c1 - c0)));
    }
  }
}

// D(M) as a contiguous (N, h, w) tensor of dtype `out_dtype`.
at::Tensor downscale_mask_cpu_impl(
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
  const int64_t sN = m.stride(0), sH = m.stride(1), sW = m.stride(2);
  std::atomic<bool> any_bad{false};
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, m.scalar_type(), "downscale_mask_cpu", [&] {
        using mask_t = scalar_t;
        const mask_t* mp = m.const_data_ptr<mask_t>();
        AT_DISPATCH_FLOATING_TYPES(out_dtype, "downscale_mask_cpu_out", [&] {
          scalar_t* op = out.mutable_data_ptr<scalar_t>();
          // Each sample costs about H*W*(2k+1) operations.
          const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, H * W * (2 * k + 1)));
          at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
            std::vector<double> row_max, dilated;
            bool bad = false;
            for (int64_t n = begin; n < end; ++n) {
              downscale_one_sample<mask_t, scalar_t>(
                  mp + n * sN, sH, sW, H, W, h, w, k, op + n * h * w,
                  row_max, dilated, bad);
            }
            if (bad) {
              any_bad.store(true);
            }
          });
        });
      });
  TORCH_CHECK_VALUE(
      !any_bad.load(),
      "tap_penalty: `mask` values must lie in [0, 1] (1 = spurious pixel); "
      "found values outside that range or NaN");
  return out;
}

at::Tensor downscale_mask_cpu(
    const at::Tensor& mask,
    int64_t height,
    int64_t width,
    int64_t kernel_size) {
  check_downscale_mask_args(mask, height, width, kernel_size);
  return downscale_mask_cpu_impl(
      mask, height, width, kernel_size,
      mask.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
}

template <typename scalar_t, typename acc_t>
void penalty_forward_cpu_kernel(
    const at::Tensor& activation,
    const acc_t* d,
    acc_t* penalty) {
  const int64_t N = activation.size(0), C = activation.size(1),
                h = activation.size(2), w = activation.size(3);
  const int64_t hw = h * w;
  const Strides4 s = strides_of(activation);
  const scalar_t* a = activation.const_data_ptr<scalar_t>();
  // One partial per (n, c) plane, or per (n, i) row for channels_last; summed
  // per sample in double so the result does not depend on the thread count.
  const bool channels_inner = s.c == 1 && s.w != 1 && C > 1;
  const int64_t units = channels_inner ? N * h : N * C;
  const int64_t units_per_sample = channels_inner ? h : C;
  const int64_t unit_elems = channels_inner ? w * C : hw;
  std::vector<acc_t> partial(static_cast<size_t>(units));
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, unit_elems));
  at::parallel_for(0, units, grain, [&](int64_t begin, int64_t end) {
    for (int64_t u = begin; u < end; ++u) {
      acc_t acc = 0;
      if (channels_inner) {
        const int64_t n = u / h, i = u % h;
        const scalar_t* row = a + n * s.n + i * s.h;
        const acc_t* drow = d + n * hw + i * w;
        for (const auto j : c10::irange(w)) {
          acc += drow[j] * sum_relu_contiguous<scalar_t, acc_t>(row + j * s.w, C);
        }
      } else {
        const int64_t n = u / C, c = u % C;
        const scalar_t* plane = a + n * s.n + c * s.c;
        const acc_t* dn = d + n * hw;
        if (s.w == 1 && s.h == w) {
          acc = dot_relu_contiguous<scalar_t, acc_t>(plane, dn, hw);
        } else if (s.w == 1) {
          for (const auto i : c10::irange(h)) {
            acc += dot_relu_contiguous<scalar_t, acc_t>(plane + i * s.h, dn + i * w, w);
          }
        } else {
          for (const auto i : c10::irange(h)) {
            for (const auto j : c10::irange(w)) {
              const acc_t v = static_cast<acc_t>(plane[i * s.h + j * s.w]);
              acc += v > acc_t(0) ? v * dn[i * w + j] : acc_t(0);
            }
          }
        }
      }
      partial[u] = acc;
    }
  });
  for (const auto n : c10::irange(N)) {
    double total = 0.0;
    for (const auto k : c10::irange(units_per_sample)) {
      total += static_cast<double>(partial[n * units_per_sample + k]);
    }
    penalty[n] = static_cast<acc_t>(total);
  }
}

std::tuple<at::Tensor, at::Tensor> tap_penalty_cpu(
    const at::Tensor& activation,
    const at::Tensor& mask,
    int64_t kernel_size) {
  check_tap_penalty_args(activation, mask, kernel_size);
  TORCH_CHECK(activation.device().is_cpu(), "tap_penalty_cpu: expected CPU tensors");
  const int64_t N = activation.size(0), h = activation.size(2),
                w = activation.size(3);
  const auto acc_dtype = accumulate_dtype(activation.scalar_type());
  at::Tensor dmask = downscale_mask_cpu_impl(mask, h, w, kernel_size, acc_dtype);
  at::Tensor penalty = at::zeros({N}, activation.options().dtype(acc_dtype));
  if (activation.numel() == 0) {
    return {penalty, dmask};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, activation.scalar_type(), "tap_penalty_cpu", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        penalty_forward_cpu_kernel<scalar_t, acc_t>(
            activation, dmask.const_data_ptr<acc_t>(),
            penalty.mutable_data_ptr<acc_t>());
      });
  return {penalty, dmask};
}

template <typename scalar_t, typename acc_t>
void penalty_backward_cpu_kernel(
    const acc_t* g,
    const at::Tensor& activation,
    const acc_t* d,
    at::Tensor& grad_activation) {
  const int64_t N = activation.size(0), C = activation.size(1),
                h = activation.size(2), w = activation.size(3);
  const int64_t hw = h * w;
  const Strides4 s = strides_of(activation);
  const Strides4 o = strides_of(grad_activation);
  const scalar_t* a = activation.const_data_ptr<scalar_t>();
  scalar_t* out = grad_activation.mutable_data_ptr<scalar_t>();
  const bool channels_inner = s.c == 1 && o.c == 1 && (s.w != 1 || o.w != 1) && C > 1;
  const int64_t units = channels_inner ? N * h : N * C;
  const int64_t unit_elems = channels_inner ? w * C : hw;
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, unit_elems));
  at::parallel_for(0, units, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> scaled(static_cast<size_t>(channels_inner ? 0 : hw));
    int64_t scaled_for = -1; // sample whose g*D is in `scaled`
    for (int64_t u = begin; u < end; ++u) {
      if (channels_inner) {
        const int64_t n = u / h, i = u % h;
        const acc_t* drow = d + n * hw + i * w;
        for (const auto j : c10::irange(w)) {
          grad_row_constant_weight<scalar_t, acc_t>(
              out + n * o.n + i * o.h + j * o.w, a + n * s.n + i * s.h + j * s.w,
              g[n] * drow[j], C);
        }
        continue;
      }
      const int64_t n = u / C, c = u % C;
      if (scaled_for != n) {
        for (const auto k : c10::irange(hw)) {
          scaled[k] = g[n] * d[n * hw + k];
        }
        scaled_for = n;
      }
      const scalar_t* plane = a + n * s.n + c * s.c;
      scalar_t* oplane = out + n * o.n + c * o.c;
      if (s.w == 1 && o.w == 1 && s.h == w && o.h == w) {
        grad_row_contiguous<scalar_t, acc_t>(oplane, plane, scaled.data(), hw);
      } else if (s.w == 1 && o.w == 1) {
        for (const auto i : c10::irange(h)) {
          grad_row_contiguous<scalar_t, acc_t>(
              oplane + i * o.h, plane + i * s.h, scaled.data() + i * w, w);
        }
      } else {
        for (const auto i : c10::irange(h)) {
          for (const auto j : c10::irange(w)) {
            const acc_t v = static_cast<acc_t>(plane[i * s.h + j * s.w]);
            oplane[i * o.h + j * o.w] =
                static_cast<scalar_t>(v > acc_t(0) ? scaled[i * w + j] : acc_t(0));
          }
        }
      }
    }
  });
}

at::Tensor tap_penalty_backward_cpu(
    const at::Tensor& grad,
    const at::Tensor& activation,
    const at::Tensor& downscaled_mask) {
  check_tap_penalty_backward_args(grad, activation, downscaled_mask);
  at::Tensor grad_activation = empty_activation_grad(activation);
  if (activation.numel() == 0) {
    return grad_activation;
  }
  const auto acc_dtype = accumulate_dtype(activation.scalar_type());
  const at::Tensor g = grad.to(acc_dtype).contiguous();
  const at::Tensor d = downscaled_mask.to(acc_dtype).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, activation.scalar_type(), "tap_penalty_backward_cpu", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        penalty_backward_cpu_kernel<scalar_t, acc_t>(
            g.const_data_ptr<acc_t>(), activation, d.const_data_ptr<acc_t>(),
            grad_activation);
      });
  return grad_activation;
}

} // namespace

TORCH_LIBRARY_IMPL(auditkit, CPU, m) {
  m.impl("tap_penalty", &tap_penalty_cpu);
  m.impl("tap_penalty_backward", &tap_penalty_backward_cpu);
  m.impl("downscale_mask", &downscale_mask_cpu);
}

} // namespace auditkit
