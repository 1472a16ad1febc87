// C++ test of the TAP ops through the dispatcher, against an ATen composition
// of TAP Eq. 7-8. Built and run by CMake (tools/cmake_check.sh).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>

#include <cstdlib>
#include <iostream>
#include <string>
#include <tuple>

namespace {

int failures = 0;

void expect(bool ok, const std::string& what) {
  std::cout << (ok ? "ok    " : "FAIL  ") << what << std::endl;
  failures += ok ? 0 : 1;
}

at::Tensor reference_weights(const at::Tensor& mask, int64_t h, int64_t w, int64_t k) {
  const auto dilated = at::max_pool2d(mask.to(at::kDouble), {k, k}, {1, 1}, {k / 2, k / 2});
  return at::adaptive_avg_pool2d(dilated, {h, w}).select(1, 0);
}

} // namespace

int main() {
  at::manual_seed(0);
  auto tap_penalty = c10::Dispatcher::singleton()
      .findSchemaOrThrow("auditkit::tap_penalty", "")
      .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, int64_t)>();
  auto tap_backward = c10::Dispatcher::singleton()
      .findSchemaOrThrow("auditkit::tap_penalty_backward", "")
      .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&)>();

  for (const int64_t k : {1, 2, 3, 5}) {
    const auto activation = at::randn({3, 6, 7, 9});
    const auto mask = (at::rand({3, 1, 30, 37}) > 0.6).to(at::kFloat);
    auto [penalty, weights] = tap_penalty.call(activation, mask, k);
    const auto expected_weights = reference_weights(mask, 7, 9, k);
    const auto expected = (activation.to(at::kDouble).relu() * expected_weights.unsqueeze(1)).sum({1, 2, 3});
    expect(at::allclose(weights.to(at::kDouble), expected_weights, 1e-6, 1e-7),
           "D(M) equals adaptive_avg_pool(max_pool(M)), k=" + std::to_string(k));
    expect(at::allclose(penalty.to(at::kDouble), expected, 1e-5, 1e-5),
           "penalty equals the ATen composition, k=" + std::to_string(k));

    const auto grad = at::randn({3});
    const auto grad_activation = tap_backward.call(grad, activation, weights);
    const auto expected_grad = grad.view({3, 1, 1, 1}) * weights.unsqueeze(1) * (activation > 0);
    expect(at::allclose(grad_activation, expected_grad, 1e-6, 1e-7),
           "backward equals g * D * 1[A > 0], k=" + std::to_string(k));

    const auto channels_last = activation.contiguous(at::MemoryFormat::ChannelsLast);
    const auto penalty_cl = std::get<0>(tap_penalty.call(channels_last, mask, k));
    expect(at::allclose(penalty_cl, penalty, 1e-5, 1e-5), "channels_last gives the same penalty");
  }

  bool raised = false;
  try {
    tap_penalty.call(at::randn({2, 3, 4, 4}), at::ones({3, 1, 8, 8}), 3);
  } catch (const c10::ValueError& error) {
    raised = std::string(error.what()).find("batch size") != std::string::npos;
  }
  expect(raised, "mismatched batch sizes raise a ValueError naming the batch size");

  std::cout << (failures == 0 ? "all C++ tests passed" : "C++ tests FAILED") << std::endl;
  return failures == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
