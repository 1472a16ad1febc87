// Launch sizing shared by the CUDA kernels, with limits the tests can tighten.
//
// Production sizes reach some code paths only on large inputs (a second
// grid-stride pass, the 64-bit index instantiations, a grid taller than
// 65,535 targets). `auditkit::_cuda_set_test_limits` lowers the limits so the
// GPU check reaches every path on small tensors; 0 / false restores the
// defaults. Host-only: never read inside a kernel.
#pragma once

#include <cstdint>

namespace auditkit {

struct CudaLaunchLimits {
  int64_t max_blocks = 0; // > 0: at most this many blocks in x (forces grid-stride passes)
  int64_t max_grid_y = 0; // > 0: at most this many blocks in y (forces the y loop); else 65,535
  bool force_64bit_index = false; // take the int64 instantiations even when int32 would do
};

// The current limits (process-wide; set only by tests).
const CudaLaunchLimits& cuda_launch_limits();

// `wanted` blocks in x, lowered to the test limit when one is set; at least 1.
int64_t limit_blocks_x(int64_t wanted);

// Blocks in y for `rows` independent rows: min(rows, 65,535 or the test limit); at least 1.
int64_t limit_blocks_y(int64_t rows);

// Blocks for `elements` grid-stride elements: enough for one per thread, at
// most 16 per multiprocessor of the current device (then loops take over).
int64_t grid_stride_blocks(int64_t elements, int threads);

// Multiprocessors of the current device.
int64_t multiprocessor_count();

} // namespace auditkit
