// Fused batch norm + leaky ReLU from C++: effseg's ops are called through the dispatcher by name
// and schema, exactly as from Python (torch.ops.effseg.*), and checked against ATen's batch norm.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cstdio>
#include <optional>
#include <tuple>

int main() {
  // Linking libeffseg registered the ops when the program was loaded.
  auto& dispatcher = c10::Dispatcher::singleton();
  const auto norm_stats =
      dispatcher.findSchemaOrThrow("effseg::norm_stats", "")
          .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, bool)>();
  const auto norm_act_forward =
      dispatcher.findSchemaOrThrow("effseg::norm_act_forward_", "")
          .typed<void(at::Tensor&, const at::Tensor&, const at::Tensor&,
                      const std::optional<at::Tensor>&, const std::optional<at::Tensor>&, double,
                      c10::string_view, double)>();
  std::printf("%s\n", c10::toString(norm_stats.schema()).c_str());

  at::manual_seed(0);
  const at::Tensor x = at::randn({2, 4, 8, 8, 8}) * 3 + 1;  // (N, C, D, H, W)
  const at::Tensor weight = at::rand({4}) + 0.5, bias = at::randn({4});
  const double eps = 1e-5, slope = 0.01;

  // Batch statistics per channel, then normalize + affine + leaky ReLU in place.
  auto [mean, var] = norm_stats.call(x, /*per_sample=*/false);
  at::Tensor y = x.clone();
  norm_act_forward.call(y, mean, var, weight, bias, eps, "leaky_relu", slope);

  const at::Tensor expected = at::leaky_relu(
      at::batch_norm(x, weight, bias, {}, {}, /*training=*/true, 0.1, eps, false), slope);
  const double error = (y - expected).abs().max().item<double>();
  std::printf("effseg norm_act_forward_ vs ATen batch_norm + leaky_relu: max abs error %.3g\n",
              error);
  return error <= 1e-4 ? 0 : 1;
}
