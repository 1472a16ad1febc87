// The CUDA runtime version this extension was compiled against, for the
// loader's check against torch.version.cuda.
#include <cuda_runtime_api.h>

#include <cstdint>

namespace auditkit {

int64_t cuda_runtime_version_compiled() {
  return CUDART_VERSION;
}

} // namespace auditkit
