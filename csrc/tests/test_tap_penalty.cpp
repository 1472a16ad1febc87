// C++ test of the TAP ops (downscale_mask, weighted_relu_sum) through the dispatcher, against an ATen composition
// of TAP Eq. 7-8. Built and run by CMake (tools/cmake_check.sh).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/util/Exception.h>

#include <cstdlib>
#include <iostream>
#include <string>
#include <optional>
#include <vector>

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
  auto downscale = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("auditkit::downscale_mask", "")
                       .typed<std::vector<at::Tensor>(
                           const at::Tensor&, c10::IntArrayRef, c10::IntArrayRef, std::optional<at::ScalarType>)>();
  auto weighted_sum = c10::Dispatcher::singleton()
                          .findSchemaOrThrow("auditkit::weighted_relu_sum", "")
                          .typed<at::Tensor(const at::Tensor&, const at::Tensor&)>();
  auto weighted_sum_backward =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("auditkit::weighted_relu_sum_backward", "")
          .typed<at::Tensor(
              const at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&)>();

  for (const int64_t k : {1, 2, 3, 5}) {
    const auto activation = at::randn({3, 6, 7, 9});
    const auto mask = (at::rand({3, 1, 30, 37}) > 0.6).to(at::kFloat);
    const auto weights_all = downscale.call(mask, {k}, {7, 9, 3, 4}, std::nullopt);
    const auto& weights = weights_all[0];
    expect(
        at::allclose(weights.to(at::kDouble), reference_weights(mask, 7, 9, k), 1e-6, 1e-7),
        "D(M) equals adaptive_avg_pool(max_pool(M)), k=" + std::to_string(k));
    expect(
        at::allclose(weights_all[1].to(at::kDouble), reference_weights(mask, 3, 4, k), 1e-6, 1e-7),
        "a second size in the same call, k=" + std::to_string(k));

    const auto per_layer = downscale.call(mask, {k, 2 * k + 1}, {7, 9, 3, 4}, std::nullopt);
    expect(
        at::allclose(per_layer[0].to(at::kDouble), reference_weights(mask, 7, 9, k), 1e-6, 1e-7) &&
            at::allclose(per_layer[1].to(at::kDouble), reference_weights(mask, 3, 4, 2 * k + 1), 1e-6, 1e-7),
        "one kernel size per layer, k=" + std::to_string(k) + " and " + std::to_string(2 * k + 1));

    const auto penalty = weighted_sum.call(activation, weights);
    const auto expected = (activation.to(at::kDouble).relu() * weights.to(at::kDouble).unsqueeze(1)).sum({1, 2, 3});
    expect(
        at::allclose(penalty.to(at::kDouble), expected, 1e-5, 1e-5),
        "penalty equals the ATen composition, k=" + std::to_string(k));

    const auto grad = at::randn({3});
    const auto grad_activation = weighted_sum_backward.call(grad, activation, weights, std::nullopt);
    const auto expected_grad = grad.view({3, 1, 1, 1}) * weights.unsqueeze(1) * (activation > 0);
    expect(
        at::allclose(grad_activation, expected_grad, 1e-6, 1e-7),
        "backward equals g * D * 1[A > 0], k=" + std::to_string(k));
    const auto base = at::randn({3, 6, 7, 9});
    expect(
        at::allclose(weighted_sum_backward.call(grad, activation, weights, base), base + expected_grad, 1e-6, 1e-6),
        "backward with a base adds it, k=" + std::to_string(k));

    const auto channels_last = activation.contiguous(at::MemoryFormat::ChannelsLast);
    expect(
        at::allclose(weighted_sum.call(channels_last, weights), penalty, 1e-5, 1e-5),
        "channels_last gives the same penalty");
  }

  bool raised = false;
  try {
    weighted_sum.call(at::randn({2, 3, 4, 4}), at::ones({3, 4, 4}));
  } catch (const c10::ValueError& error) {
    raised = std::string(error.what()).find("`weights` must have shape") != std::string::npos;
  }
  expect(raised, "mismatched batch sizes raise a ValueError naming the argument");

  raised = false;
  try {
    downscale.call(at::full({1, 1, 8, 8}, 2.0), {3}, {4, 4}, std::nullopt);
  } catch (const c10::ValueError& error) {
    raised = std::string(error.what()).find("values must lie in [0, 1]") != std::string::npos;
  }
  expect(raised, "mask values outside [0, 1] raise a ValueError");

  std::cout << (failures == 0 ? "all C++ tests passed" : "C++ tests FAILED") << std::endl;
  return failures == 0 ? EXIT_SUCCESS : EXIT_FAILURE;
}
