// CPU kernels of the TAP ops (TAP paper Eq. 7-8).
//
// downscale_mask: per sample, each input row is read once (converted, range
//   checked, dilated horizontally into a ring of k rows); each dilated row is
//   the max over the ring and is added into the row-window sums of every
//   requested size; the column windows are summed at the end. Cost: a few
//   vector operations per mask pixel, for all targeted layers together (one
//   such pass per distinct kernel size when the layers' kernel sizes differ).
// weighted_relu_sum: each (n, c) plane (or, for channels_last, each (n, i)
//   row) is reduced against W in one streaming pass with four independent
//   vector accumulators; partials are added per sample in double, so the
//   result does not depend on the thread count.
#include "../tap_penalty.h"
#include "multiversion.h"

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
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace auditkit {

namespace {

// 64-byte vectors (GCC vector extensions): one zmm register on AVX-512, two
// ymm on AVX2, four xmm on the baseline.
template <typename T>
struct Vec64;
template <>
struct Vec64<float> {
  typedef float type __attribute__((vector_size(64)));
  static constexpr int lanes = 16;
};
template <>
struct Vec64<double> {
  typedef double type __attribute__((vector_size(64)));
  static constexpr int lanes = 8;
};

template <typename T>
inline typename Vec64<T>::type load(const T* p) {
  typename Vec64<T>::type v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// sum_k w[k] * relu(a[k]), or sum_k relu(a[k]) when w is null.
template <typename acc_t>
AUDITKIT_MULTIVERSION acc_t weighted_relu_sum_run(const acc_t* a, const acc_t* w, int64_t len) {
  using V = typename Vec64<acc_t>::type;
  constexpr int L = Vec64<acc_t>::lanes;
  const V zero = {};
  V s0 = {}, s1 = {}, s2 = {}, s3 = {};
  int64_t k = 0;
  if (w != nullptr) {
    for (; k + 4 * L <= len; k += 4 * L) {
      const V a0 = load(a + k), a1 = load(a + k + L), a2 = load(a + k + 2 * L), a3 = load(a + k + 3 * L);
      s0 += a0 > zero ? a0 * load(w + k) : zero;
      s1 += a1 > zero ? a1 * load(w + k + L) : zero;
      s2 += a2 > zero ? a2 * load(w + k + 2 * L) : zero;
      s3 += a3 > zero ? a3 * load(w + k + 3 * L) : zero;
    }
  } else {
    for (; k + 4 * L <= len; k += 4 * L) {
      const V a0 = load(a + k), a1 = load(a + k + L), a2 = load(a + k + 2 * L), a3 = load(a + k + 3 * L);
      s0 += a0 > zero ? a0 : zero;
      s1 += a1 > zero ? a1 : zero;
      s2 += a2 > zero ? a2 : zero;
      s3 += a3 > zero ? a3 : zero;
    }
  }
  const V s = (s0 + s1) + (s2 + s3);
  acc_t acc = 0;
  for (int l = 0; l < L; ++l) {
    acc += s[l];
  }
  for (; k < len; ++k) {
    const acc_t v = a[k];
    acc += v > acc_t(0) ? (w != nullptr ? v * w[k] : v) : acc_t(0);
  }
  return acc;
}

// The same for reduced-precision inputs: converted in small chunks.
template <typename scalar_t, typename acc_t>
acc_t weighted_relu_sum_contiguous(const scalar_t* a, const acc_t* w, int64_t len) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return weighted_relu_sum_run<acc_t>(a, w, len);
  } else {
    constexpr int64_t kChunk = 256;
    acc_t buffer[kChunk];
    acc_t acc = 0;
    for (int64_t start = 0; start < len; start += kChunk) {
      const int64_t n = std::min(kChunk, len - start);
      for (int64_t k = 0; k < n; ++k) {
        buffer[k] = static_cast<acc_t>(a[start + k]);
      }
      acc += weighted_relu_sum_run<acc_t>(buffer, w == nullptr ? nullptr : w + start, n);
    }
    return acc;
  }
}

// out[k] = base[k] + (a[k] > 0 ? w[k] : 0)   (w = g[n] * W[n] for this row;
// base = nullptr reads as 0). `base` has out's strides and may alias it.
template <typename scalar_t, typename acc_t>
AUDITKIT_MULTIVERSION void
relu_grad_row(scalar_t* out, const scalar_t* base, const scalar_t* a, const acc_t* w, int64_t len) {
  if (base == nullptr) {
#pragma omp simd
    for (int64_t k = 0; k < len; ++k) {
      out[k] = static_cast<scalar_t>(static_cast<acc_t>(a[k]) > acc_t(0) ? w[k] : acc_t(0));
    }
  } else {
#pragma omp simd
    for (int64_t k = 0; k < len; ++k) {
      out[k] =
          static_cast<scalar_t>(static_cast<acc_t>(base[k]) + (static_cast<acc_t>(a[k]) > acc_t(0) ? w[k] : acc_t(0)));
    }
  }
}

// out[k] = base[k] + (a[k] > 0 ? weight : 0)
template <typename scalar_t, typename acc_t>
AUDITKIT_MULTIVERSION void
relu_grad_constant(scalar_t* out, const scalar_t* base, const scalar_t* a, acc_t weight, int64_t len) {
  if (base == nullptr) {
#pragma omp simd
    for (int64_t k = 0; k < len; ++k) {
      out[k] = static_cast<scalar_t>(static_cast<acc_t>(a[k]) > acc_t(0) ? weight : acc_t(0));
    }
  } else {
#pragma omp simd
    for (int64_t k = 0; k < len; ++k) {
      out[k] = static_cast<scalar_t>(
          static_cast<acc_t>(base[k]) + (static_cast<acc_t>(a[k]) > acc_t(0) ? weight : acc_t(0)));
    }
  }
}

// ---- downscale_mask -----------------------------------------------------------

// dst[c] = max_{t < k} src[c + t * stride]: one max-pool direction over a
// whole padded plane (stride 1: along rows; stride = row length: along columns).
template <typename work_t>
AUDITKIT_MULTIVERSION void
window_max(work_t* __restrict__ dst, const work_t* __restrict__ src, int64_t len, int64_t k, int64_t stride) {
  if (k == 3) { // the default kernel size: one pass
    const work_t* s1 = src + stride;
    const work_t* s2 = src + 2 * stride;
#pragma omp simd
    for (int64_t c = 0; c < len; ++c) {
      const work_t m = src[c] > s1[c] ? src[c] : s1[c];
      dst[c] = m > s2[c] ? m : s2[c];
    }
    return;
  }
#pragma omp simd
  for (int64_t c = 0; c < len; ++c) {
    dst[c] = src[c];
  }
  for (int64_t t = 1; t < k; ++t) {
    const work_t* st = src + t * stride;
#pragma omp simd
    for (int64_t c = 0; c < len; ++c) {
      dst[c] = st[c] > dst[c] ? st[c] : dst[c];
    }
  }
}

// Copies one mask row into the work buffer and counts values outside [0, 1]
// (NaN included) on the way. (Written as a plain loop: GCC vectorises it per
// target clone, while explicit vector-extension compares combined with & are
// lowered for the baseline target and end up scalar.)
template <typename mask_t, typename work_t>
AUDITKIT_MULTIVERSION int64_t
load_row_and_count_outside_unit(work_t* __restrict__ dst, const mask_t* __restrict__ src, int64_t len) {
  work_t bad = 0; // exact: per-lane counts stay far below 2^24
#pragma omp simd reduction(+ : bad)
  for (int64_t x = 0; x < len; ++x) {
    const work_t v = static_cast<work_t>(src[x]);
    dst[x] = v;
    bad += (v >= work_t(0) && v <= work_t(1)) ? work_t(0) : work_t(1);
  }
  return static_cast<int64_t>(bad);
}

// sums[c] += max_{t < k} src[c + t * stride]: the vertical max pool fused
// with the row-window sum of the adaptive average.
template <typename work_t>
AUDITKIT_MULTIVERSION void
add_window_max(work_t* __restrict__ sums, const work_t* __restrict__ src, int64_t len, int64_t k, int64_t stride) {
  if (k == 3) {
    const work_t* s1 = src + stride;
    const work_t* s2 = src + 2 * stride;
#pragma omp simd
    for (int64_t c = 0; c < len; ++c) {
      const work_t m = src[c] > s1[c] ? src[c] : s1[c];
      sums[c] += m > s2[c] ? m : s2[c];
    }
    return;
  }
  for (int64_t c = 0; c < len; ++c) {
    work_t m = src[c];
    for (int64_t t = 1; t < k; ++t) {
      const work_t v = src[c + t * stride];
      m = v > m ? v : m;
    }
    sums[c] += m;
  }
}

// One targeted layer's output size, its adaptive windows over the dilated
// mask (precomputed: 64-bit divisions are not cheap) and, when its windows
// are exact unions of a finer layer's windows, that layer (its D is then
// summed from the finer window sums instead of from the mask).
struct LayerWindows {
  int64_t h, w;
  int64_t finer = -1; // index into the size list, or -1
  std::vector<int64_t> row_start, row_end, col_start, col_end;

  LayerWindows(int64_t h_, int64_t w_, int64_t Hd, int64_t Wd) : h(h_), w(w_) {
    for (int64_t i = 0; i < h; ++i) {
      row_start.push_back(adaptive_start(i, Hd, h));
      row_end.push_back(adaptive_end(i, Hd, h));
    }
    for (int64_t j = 0; j < w; ++j) {
      col_start.push_back(adaptive_start(j, Wd, w));
      col_end.push_back(adaptive_end(j, Wd, w));
    }
  }
};

// Sizes from finest to coarsest, each linked to a finer size that nests it.
std::vector<size_t> plan_layer_windows(std::vector<LayerWindows>& sizes, int64_t Hd, int64_t Wd) {
  std::vector<size_t> order(sizes.size());
  for (size_t l = 0; l < order.size(); ++l) {
    order[l] = l;
  }
  std::stable_sort(order.begin(), order.end(), [&](size_t a, size_t b) {
    return sizes[a].h * sizes[a].w > sizes[b].h * sizes[b].w;
  });
  for (size_t pos = 0; pos < order.size(); ++pos) {
    LayerWindows& coarse = sizes[order[pos]];
    for (size_t prev = 0; prev < pos; ++prev) {
      const LayerWindows& fine = sizes[order[prev]];
      const bool nests =
          Hd % fine.h == 0 && Wd % fine.w == 0 && fine.h % coarse.h == 0 && fine.w % coarse.w == 0 && fine.finer < 0;
      if (nests) {
        coarse.finer = static_cast<int64_t>(order[prev]);
        break;
      }
    }
  }
  return order;
}

// Per-thread buffers for one mask geometry (H, W, k).
template <typename work_t>
struct DownscaleWorkspace {
  int64_t H = -1, W = -1, k = -1;
  std::vector<work_t> gathered; // one strided mask row
  std::vector<work_t> row; // one mask row with a -inf border of k/2
  std::vector<work_t> horiz; // horizontal max of every row, (H + 2 pad) x Wd, -inf border rows
  std::vector<work_t> row_sums; // sum over one row window: Wd
  std::vector<std::vector<double>> window_sums; // per size: h x w

  void prepare(int64_t H_, int64_t W_, int64_t k_) {
    if (H_ == H && W_ == W && k_ == k) {
      return;
    }
    H = H_, W = W_, k = k_;
    const int64_t pad = k / 2;
    const work_t neg_inf = -std::numeric_limits<work_t>::infinity();
    gathered.assign(W, 0);
    row.assign(W + 2 * pad, neg_inf); // the border stays -inf; the interior is overwritten
    horiz.assign((H + 2 * pad) * dilated_size(W, k), neg_inf);
    row_sums.assign(dilated_size(W, k), 0);
  }
};

// D(M) for one sample and every size. Each mask row is read once (converted,
// range checked and max-pooled along the row); the max pool along columns is
// fused with the row-window sums. -inf borders stand for the clipping of the
// pooling windows. Returns the number of mask values outside [0, 1] (NaN
// included).
template <typename mask_t, typename work_t, typename out_t>
int64_t downscale_one_sample(
    const mask_t* m,
    int64_t sH,
    int64_t sW,
    int64_t H,
    int64_t W,
    int64_t k,
    const std::vector<LayerWindows>& sizes,
    const std::vector<size_t>& order,
    const std::vector<out_t*>& outs,
    DownscaleWorkspace<work_t>& ws) {
  ws.prepare(H, W, k);
  const int64_t pad = k / 2;
  const int64_t Wd = dilated_size(W, k);
  int64_t bad = 0;
  work_t* row = ws.row.data() + pad;
  for (int64_t r = 0; r < H; ++r) {
    const mask_t* src = m + r * sH;
    if (sW == 1) {
      bad += load_row_and_count_outside_unit<mask_t, work_t>(row, src, W);
    } else {
      for (int64_t x = 0; x < W; ++x) {
        ws.gathered[x] = static_cast<work_t>(src[x * sW]);
      }
      bad += load_row_and_count_outside_unit<work_t, work_t>(row, ws.gathered.data(), W);
    }
    work_t* dst = ws.horiz.data() + (r + pad) * Wd;
    if (k > 1) {
      window_max<work_t>(dst, ws.row.data(), Wd, k, 1);
    } else {
      std::copy_n(row, W, dst);
    }
  }
  ws.window_sums.resize(sizes.size());
  for (const size_t l : order) {
    const LayerWindows& win = sizes[l];
    std::vector<double>& sums = ws.window_sums[l];
    sums.assign(win.h * win.w, 0.0);
    if (win.finer >= 0) {
      // Exact unions of the finer layer's windows: add their sums.
      const LayerWindows& fine = sizes[win.finer];
      const std::vector<double>& fine_sums = ws.window_sums[win.finer];
      const int64_t bh = fine.h / win.h, bw = fine.w / win.w;
      for (int64_t i = 0; i < fine.h; ++i) {
        double* coarse_row = sums.data() + (i / bh) * win.w;
        const double* fine_row = fine_sums.data() + i * fine.w;
        for (int64_t j = 0; j < win.w; ++j) {
          for (int64_t b = 0; b < bw; ++b) {
            coarse_row[j] += fine_row[j * bw + b];
          }
        }
      }
    } else {
      work_t* row_sums = ws.row_sums.data();
      for (int64_t i = 0; i < win.h; ++i) {
        std::fill(row_sums, row_sums + Wd, work_t(0));
        for (int64_t r = win.row_start[i]; r < win.row_end[i]; ++r) {
          // Dilated row r is the max over padded horizontal rows r .. r + k - 1.
          add_window_max<work_t>(row_sums, ws.horiz.data() + r * Wd, Wd, k, Wd);
        }
        for (int64_t j = 0; j < win.w; ++j) {
          double total = 0.0;
          for (int64_t c = win.col_start[j]; c < win.col_end[j]; ++c) {
            total += static_cast<double>(row_sums[c]);
          }
          sums[i * win.w + j] = total;
        }
      }
    }
    for (int64_t i = 0; i < win.h; ++i) {
      const double rows = static_cast<double>(win.row_end[i] - win.row_start[i]);
      for (int64_t j = 0; j < win.w; ++j) {
        const double count = rows * static_cast<double>(win.col_end[j] - win.col_start[j]);
        outs[l][i * win.w + j] = static_cast<out_t>(sums[i * win.w + j] / count);
      }
    }
  }
  return bad;
}

// D(M) with one kernel size k for the sizes `pairs[l]`, l in `layers`, written into `outputs[l]`.
// Returns the number of mask values outside [0, 1] (NaN included).
int64_t downscale_mask_one_kernel_cpu(
    const at::Tensor& m,
    int64_t kernel_size,
    const std::vector<std::pair<int64_t, int64_t>>& pairs,
    const std::vector<size_t>& layers,
    std::vector<at::Tensor>& outputs,
    at::ScalarType out_dtype) {
  const int64_t N = m.size(0), H = m.size(1), W = m.size(2);
  std::vector<LayerWindows> layer_sizes;
  for (const size_t l : layers) {
    layer_sizes.emplace_back(
        pairs[l].first, pairs[l].second, dilated_size(H, kernel_size), dilated_size(W, kernel_size));
  }
  const auto order = plan_layer_windows(layer_sizes, dilated_size(H, kernel_size), dilated_size(W, kernel_size));
  std::atomic<int64_t> bad_values{0};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, m.scalar_type(), "downscale_mask_cpu", [&] {
    using mask_t = scalar_t;
    // Max pooling is exact in float for every mask dtype but float64.
    using work_t = std::conditional_t<std::is_same_v<mask_t, double>, double, float>;
    const mask_t* mp = m.const_data_ptr<mask_t>();
    AT_DISPATCH_FLOATING_TYPES(out_dtype, "downscale_mask_cpu_out", [&] {
      using out_t = scalar_t;
      const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, H * W * (kernel_size + 1)));
      at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
        // Kept per thread across calls: a training step asks for the same
        // geometry every batch, so the buffers are allocated once.
        thread_local DownscaleWorkspace<work_t> ws;
        std::vector<out_t*> outs(layers.size());
        int64_t bad = 0;
        for (int64_t n = begin; n < end; ++n) {
          for (size_t g = 0; g < layers.size(); ++g) {
            outs[g] = outputs[layers[g]].mutable_data_ptr<out_t>() + n * layer_sizes[g].h * layer_sizes[g].w;
          }
          bad += downscale_one_sample<mask_t, work_t, out_t>(
              mp + n * m.stride(0), m.stride(1), m.stride(2), H, W, kernel_size, layer_sizes, order, outs, ws);
        }
        bad_values.fetch_add(bad);
      });
    });
  });
  return bad_values.load();
}

std::vector<at::Tensor> downscale_mask_cpu(
    const at::Tensor& mask,
    c10::IntArrayRef kernel_sizes,
    c10::IntArrayRef sizes,
    std::optional<at::ScalarType> dtype) {
  const auto pairs = check_downscale_mask_args(mask, kernel_sizes, sizes, dtype);
  const at::Tensor m = mask_as_nhw(mask);
  const int64_t N = m.size(0);
  const auto out_dtype = downscaled_dtype(mask, dtype);
  std::vector<at::Tensor> outputs;
  for (const auto& [h, w] : pairs) {
    outputs.push_back(at::empty({N, h, w}, m.options().dtype(out_dtype)));
  }
  if (N == 0) {
    return outputs;
  }
  // One pass over the mask per distinct kernel size (one pass in all for Eq. 7's single k).
  for (const auto& [kernel_size, layers] : group_by_kernel_size(kernel_sizes, pairs.size())) {
    const int64_t bad = downscale_mask_one_kernel_cpu(m, kernel_size, pairs, layers, outputs, out_dtype);
    TORCH_CHECK_VALUE(
        bad == 0, "tap_penalty: `mask` values must lie in [0, 1] (1 = spurious pixel); found ", bad,
        " outside that range or NaN");
  }
  return outputs;
}

// ---- weighted_relu_sum ----------------------------------------------------------

struct Strides4 {
  int64_t n, c, h, w;
};

Strides4 strides_of(const at::Tensor& t) {
  return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)};
}

// Planes smaller than this are reduced several channels per call: when a
// sample's channels are contiguous, W is tiled over `planes_per_tile` planes
// (an L1-resident buffer) and the block is one long dot product; per-plane
// calls would be dominated by call and loop overhead.
constexpr int64_t kSmallPlane = 2048;
constexpr int64_t kTileElements = 2048;
constexpr int64_t kElementsPerUnit = 32768;

template <typename scalar_t, typename acc_t>
void weighted_relu_sum_cpu_kernel(const at::Tensor& activation, const acc_t* wts, acc_t* penalty) {
  const int64_t N = activation.size(0), C = activation.size(1), h = activation.size(2), w = activation.size(3);
  const int64_t hw = h * w;
  const Strides4 s = strides_of(activation);
  const scalar_t* a = activation.const_data_ptr<scalar_t>();
  enum class Mode { kChannelsInner, kChannelBlocks, kPlanes };
  const Mode mode = (s.c == 1 && s.w != 1 && C > 1)             ? Mode::kChannelsInner
      : (s.w == 1 && s.h == w && s.c == hw && hw < kSmallPlane) ? Mode::kChannelBlocks
                                                                : Mode::kPlanes;
  const int64_t planes_per_tile = std::max<int64_t>(1, kTileElements / hw);
  // Work units: (n, i) rows, (n, channel block) or (n, c) planes; one partial
  // each, summed per sample in double so the result does not depend on the
  // thread count.
  const int64_t block = std::clamp<int64_t>((kElementsPerUnit + hw - 1) / hw, 1, C);
  const int64_t units_per_sample = mode == Mode::kChannelsInner ? h
      : mode == Mode::kChannelBlocks                            ? (C + block - 1) / block
                                                                : C;
  const int64_t unit_elems = mode == Mode::kChannelsInner ? w * C : mode == Mode::kChannelBlocks ? block * hw : hw;
  const int64_t units = N * units_per_sample;
  std::vector<acc_t> partial(static_cast<size_t>(units));
  const int64_t grain = std::max<int64_t>(1, kElementsPerUnit / std::max<int64_t>(1, unit_elems));
  at::parallel_for(0, units, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> tiled(mode == Mode::kChannelBlocks ? planes_per_tile * hw : 0);
    int64_t tiled_for = -1; // the sample whose W is tiled in `tiled`
    for (int64_t u = begin; u < end; ++u) {
      const int64_t n = u / units_per_sample, part = u % units_per_sample;
      const acc_t* wn = wts + n * hw;
      acc_t acc = 0;
      if (mode == Mode::kChannelsInner) {
        const scalar_t* row = a + n * s.n + part * s.h;
        for (const auto j : c10::irange(w)) {
          acc += wn[part * w + j] * weighted_relu_sum_contiguous<scalar_t, acc_t>(row + j * s.w, nullptr, C);
        }
      } else if (mode == Mode::kChannelBlocks) {
        if (tiled_for != n) {
          for (int64_t p = 0; p < planes_per_tile; ++p) {
            std::copy_n(wn, hw, tiled.data() + p * hw);
          }
          tiled_for = n;
        }
        const int64_t c_end = std::min(C, (part + 1) * block);
        for (int64_t c = part * block; c < c_end; c += planes_per_tile) {
          const int64_t planes = std::min(planes_per_tile, c_end - c);
          acc += weighted_relu_sum_contiguous<scalar_t, acc_t>(a + n * s.n + c * hw, tiled.data(), planes * hw);
        }
      } else {
        const scalar_t* plane = a + n * s.n + part * s.c;
        if (s.w == 1 && s.h == w) {
          acc = weighted_relu_sum_contiguous<scalar_t, acc_t>(plane, wn, hw);
        } else if (s.w == 1) {
          for (const auto i : c10::irange(h)) {
            acc += weighted_relu_sum_contiguous<scalar_t, acc_t>(plane + i * s.h, wn + i * w, w);
          }
        } else {
          for (const auto i : c10::irange(h)) {
            for (const auto j : c10::irange(w)) {
              const acc_t v = static_cast<acc_t>(plane[i * s.h + j * s.w]);
              acc += v > acc_t(0) ? v * wn[i * w + j] : acc_t(0);
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

at::Tensor weighted_relu_sum_cpu(const at::Tensor& activation, const at::Tensor& weights) {
  check_weighted_relu_sum_args(activation, weights);
  const auto acc_dtype = accumulate_dtype(activation.scalar_type());
  at::Tensor penalty = at::zeros({activation.size(0)}, activation.options().dtype(acc_dtype));
  if (activation.numel() == 0) {
    return penalty;
  }
  const at::Tensor wts = weights.to(acc_dtype).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, activation.scalar_type(), "weighted_relu_sum_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    weighted_relu_sum_cpu_kernel<scalar_t, acc_t>(
        activation, wts.const_data_ptr<acc_t>(), penalty.mutable_data_ptr<acc_t>());
  });
  return penalty;
}

template <typename scalar_t, typename acc_t>
void weighted_relu_sum_backward_cpu_kernel(
    const acc_t* g, const at::Tensor& activation, const acc_t* wts, const scalar_t* base, at::Tensor& grad_activation) {
  const int64_t N = activation.size(0), C = activation.size(1), h = activation.size(2), w = activation.size(3);
  const int64_t hw = h * w;
  const Strides4 s = strides_of(activation);
  const Strides4 o = strides_of(grad_activation);
  const scalar_t* a = activation.const_data_ptr<scalar_t>();
  scalar_t* out = grad_activation.mutable_data_ptr<scalar_t>();
  const bool channels_inner = s.c == 1 && o.c == 1 && (s.w != 1 || o.w != 1) && C > 1;
  const int64_t units = channels_inner ? N * h : N * C;
  const int64_t unit_elems = channels_inner ? w * C : hw;
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, unit_elems));
  at::parallel_for(0, units, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> scaled(static_cast<size_t>(channels_inner ? 0 : hw));
    int64_t scaled_for = -1; // the sample whose g * W is in `scaled`
    for (int64_t u = begin; u < end; ++u) {
      if (channels_inner) {
        const int64_t n = u / h, i = u % h;
        const acc_t* wrow = wts + n * hw + i * w;
        for (const auto j : c10::irange(w)) {
          const int64_t at_out = n * o.n + i * o.h + j * o.w;
          relu_grad_constant<scalar_t, acc_t>(
              out + at_out, base == nullptr ? nullptr : base + at_out, a + n * s.n + i * s.h + j * s.w, g[n] * wrow[j],
              C);
        }
        continue;
      }
      const int64_t n = u / C, c = u % C;
      if (scaled_for != n) {
        for (const auto k : c10::irange(hw)) {
          scaled[k] = g[n] * wts[n * hw + k];
        }
        scaled_for = n;
      }
      const scalar_t* plane = a + n * s.n + c * s.c;
      scalar_t* oplane = out + n * o.n + c * o.c;
      const scalar_t* bplane = base == nullptr ? nullptr : base + n * o.n + c * o.c;
      if (s.w == 1 && o.w == 1 && s.h == w && o.h == w) {
        relu_grad_row<scalar_t, acc_t>(oplane, bplane, plane, scaled.data(), hw);
      } else if (s.w == 1 && o.w == 1) {
        for (const auto i : c10::irange(h)) {
          relu_grad_row<scalar_t, acc_t>(
              oplane + i * o.h, bplane == nullptr ? nullptr : bplane + i * o.h, plane + i * s.h, scaled.data() + i * w,
              w);
        }
      } else {
        for (const auto i : c10::irange(h)) {
          for (const auto j : c10::irange(w)) {
            const acc_t v = static_cast<acc_t>(plane[i * s.h + j * s.w]);
            const acc_t b = bplane == nullptr ? acc_t(0) : static_cast<acc_t>(bplane[i * o.h + j * o.w]);
            oplane[i * o.h + j * o.w] = static_cast<scalar_t>(b + (v > acc_t(0) ? scaled[i * w + j] : acc_t(0)));
          }
        }
      }
    }
  });
}

at::Tensor weighted_relu_sum_backward_cpu(
    const at::Tensor& grad,
    const at::Tensor& activation,
    const at::Tensor& weights,
    const std::optional<at::Tensor>& base) {
  check_weighted_relu_sum_backward_args(grad, activation, weights, base);
  at::Tensor grad_activation = empty_activation_grad(activation);
  if (activation.numel() == 0) {
    return grad_activation;
  }
  const at::Tensor added_to = base_in_layout_of(base, grad_activation);
  const auto acc_dtype = accumulate_dtype(activation.scalar_type());
  const at::Tensor g = grad.to(acc_dtype).contiguous();
  const at::Tensor wts = weights.to(acc_dtype).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, activation.scalar_type(), "weighted_relu_sum_backward_cpu", [&] {
        using acc_t = at::opmath_type<scalar_t>;
        weighted_relu_sum_backward_cpu_kernel<scalar_t, acc_t>(
            g.const_data_ptr<acc_t>(), activation, wts.const_data_ptr<acc_t>(),
            added_to.defined() ? added_to.const_data_ptr<scalar_t>() : nullptr, grad_activation);
      });
  return grad_activation;
}

} // namespace

TORCH_LIBRARY_IMPL(auditkit, CPU, m) {
  m.impl("downscale_mask", &downscale_mask_cpu);
  m.impl("weighted_relu_sum", &weighted_relu_sum_cpu);
  m.impl("weighted_relu_sum_backward", &weighted_relu_sum_backward_cpu);
}

} // namespace auditkit
