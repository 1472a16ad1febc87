// auditkit::_build_info() -> str: how this extension was built, so that
// `auditkit doctor` can say which kernels are live and why.
#include <torch/library.h>
#if __has_include(<torch/headeronly/version.h>)
#include <torch/headeronly/version.h>
#else
#include <torch/version.h>
#endif

#include <string>

#ifdef AUDITKIT_WITH_CUDA
namespace auditkit {
int64_t cuda_runtime_version_compiled(); // ops/cuda/cuda_info.cu
std::string cuda_arch_list_compiled(); // ops/cuda/cuda_info.cu
} // namespace auditkit
#endif

namespace auditkit {

namespace {

std::string build_info() {
  std::string info = "torch=" TORCH_VERSION;
#ifdef AUDITKIT_WITH_CUDA
  info += ";cuda=" + std::to_string(cuda_runtime_version_compiled());
  info += ";cuda_archs=" + cuda_arch_list_compiled();
#else
  info += ";cuda=none";
#endif
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(AUDITKIT_NO_TARGET_CLONES)
  info += ";cpu_simd=multiversioned(x86-64-v4,x86-64-v3,baseline)";
#else
  info += ";cpu_simd=baseline";
#endif
  return info;
}

} // namespace

TORCH_LIBRARY_FRAGMENT(auditkit, m) {
  m.def("_build_info() -> str", &build_info);
}

} // namespace auditkit
