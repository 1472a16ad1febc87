// What the loader and the tests ask of the CUDA side: the runtime version this
// extension was compiled against, the architectures it carries, and the
// launch limits of launch.h.
#include "launch.h"

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <cuda_runtime_api.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <mutex>
#include <string>

// setup.py passes TORCH_CUDA_ARCH_LIST as one preprocessing number,
// "7.5;8.0;9.0+PTX" -> 7.5_8.0_9.0ptx (no quotes or semicolons to survive
// the shell); stringised here and decoded by auditkit/ops/_extension.py.
#define AUDITKIT_STRINGISE_(x) #x
#define AUDITKIT_STRINGISE(x) AUDITKIT_STRINGISE_(x)

namespace auditkit {

int64_t cuda_runtime_version_compiled() {
  return CUDART_VERSION;
}

std::string cuda_arch_list_compiled() {
#ifdef AUDITKIT_CUDA_ARCHS
  return AUDITKIT_STRINGISE(AUDITKIT_CUDA_ARCHS);
#else
  return "unknown";
#endif
}

namespace {
CudaLaunchLimits limits;
std::mutex limits_mutex;

void set_test_limits(int64_t max_blocks, int64_t max_grid_y, bool force_64bit_index) {
  TORCH_CHECK_VALUE(
      max_blocks >= 0 && max_grid_y >= 0 && max_grid_y <= 65535,
      "_cuda_set_test_limits: max_blocks >= 0 and 0 <= max_grid_y <= 65535");
  const std::lock_guard<std::mutex> lock(limits_mutex);
  limits.max_blocks = max_blocks;
  limits.max_grid_y = max_grid_y;
  limits.force_64bit_index = force_64bit_index;
}
} // namespace

const CudaLaunchLimits& cuda_launch_limits() {
  return limits;
}

int64_t limit_blocks_x(int64_t wanted) {
  const int64_t cap = limits.max_blocks;
  wanted = std::max<int64_t>(1, wanted);
  return cap > 0 ? std::min(wanted, cap) : wanted;
}

int64_t limit_blocks_y(int64_t rows) {
  const int64_t cap = limits.max_grid_y > 0 ? limits.max_grid_y : 65535;
  return std::max<int64_t>(1, std::min(rows, cap));
}

int64_t multiprocessor_count() {
  int count = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, c10::cuda::current_device()));
  return count;
}

int64_t grid_stride_blocks(int64_t elements, int threads) {
  const int64_t wanted = (elements + threads - 1) / threads;
  return limit_blocks_x(std::min<int64_t>(wanted, multiprocessor_count() * 16));
}

TORCH_LIBRARY_FRAGMENT(auditkit, m) {
  // Test hook (see launch.h): tighten the CUDA launch limits; all zero/false restores them.
  m.def("_cuda_set_test_limits(int max_blocks, int max_grid_y, bool force_64bit_index) -> ()", &set_test_limits);
}

} // namespace auditkit
