// The norm-act CPU kernels, called through the dispatcher from C++ (as a libtorch program would),
// against ATen's own batch norm, instance statistics and leaky ReLU in float64.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <cstdio>
#include <string>
#include <tuple>

namespace {

int failures = 0;

void expect_close(const at::Tensor& a, const at::Tensor& b, const std::string& what,
                  double tol = 1e-9) {
  const double err = (a.to(at::kDouble) - b.to(at::kDouble)).abs().max().item<double>();
  const double scale = std::max(1.0, b.abs().max().item<double>());
  const bool ok = err <= tol * scale;
  std::printf("%s %-48s max abs error %.3g\n", ok ? "ok  " : "FAIL", what.c_str(), err);
  if (!ok) ++failures;
}

template <typename Sig> auto op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

void check_layout(bool channels_last) {
  const std::string tag = channels_last ? " (channels-last)" : " (contiguous)";
  const auto opts = at::TensorOptions().dtype(at::kDouble);
  at::Tensor x = at::randn({3, 5, 6, 7, 9}, opts) * 2 + 1;
  if (channels_last) x = x.contiguous(at::MemoryFormat::ChannelsLast3d);
  const at::Tensor w = at::rand({5}, opts) + 0.5, b = at::randn({5}, opts);
  const double slope = 0.05, eps = 1e-5;

  auto stats = op<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, bool)>(
      "effseg::norm_stats");
  auto [mean, var] = stats.call(x, false);
  auto [ref_var, ref_mean] = at::var_mean(x, {0, 2, 3, 4}, /*correction=*/0);
  expect_close(mean, ref_mean, "norm_stats mean, per channel" + tag);
  expect_close(var, ref_var, "norm_stats var, per channel" + tag);
  auto [mean_i, var_i] = stats.call(x, true);
  auto [ref_var_i, ref_mean_i] = at::var_mean(x, {2, 3, 4}, 0);
  expect_close(mean_i, ref_mean_i, "norm_stats mean, per sample" + tag);
  expect_close(var_i, ref_var_i, "norm_stats var, per sample" + tag);

  at::Tensor y = x.clone();
  op<void(at::Tensor&, const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
          const std::optional<at::Tensor>&, double, c10::string_view, double)>(
      "effseg::norm_act_forward_")
      .call(y, mean, var, w, b, eps, "leaky_relu", slope);
  const at::Tensor z = at::batch_norm(x, w, b, {}, {}, true, 0.1, eps, false);
  expect_close(y, at::leaky_relu(z, slope), "norm_act_forward_ (leaky_relu)" + tag);

  const at::Tensor dy = at::randn_like(x);
  auto [s1, s2] =
      op<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&,
                                            const std::optional<at::Tensor>&,
                                            const std::optional<at::Tensor>&, bool,
                                            c10::string_view, double)>(
          "effseg::norm_act_backward_reduce")
          .call(y, dy, w, b, false, "leaky_relu", slope);
  const at::Tensor dx =
      op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                    const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                    const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                    std::optional<int64_t>, double, c10::string_view, double)>(
          "effseg::norm_act_backward_input")
          .call(y, dy, var, w, b, s1, s2, std::nullopt, eps, "leaky_relu", slope);
  // ATen: through the leaky ReLU by hand, then batch norm's own backward.
  const at::Tensor dz = dy * at::where(z > 0, at::ones_like(z), at::full_like(z, slope));
  const at::Tensor invstd = (var + eps).rsqrt();
  auto [ref_dx, ref_dw, ref_db] = at::native_batch_norm_backward(
      dz, x, w, {}, {}, mean, invstd, true, eps, {true, true, true});
  expect_close(dx, ref_dx, "norm_act_backward_input" + tag, 1e-8);
  expect_close(s2, ref_dw, "backward sum(dz * xhat) = dweight" + tag, 1e-8);
  expect_close(s1, ref_db, "backward sum(dz) = dbias" + tag, 1e-8);
}

void check_bad_input_raises() {
  auto stats = op<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, bool)>(
      "effseg::norm_stats");
  try {
    stats.call(at::ones({2, 3, 4}, at::kInt), false);
    std::printf("FAIL integer input was accepted\n");
    ++failures;
  } catch (const c10::Error& e) {
    std::printf("ok   integer input raises: %s\n", e.what_without_backtrace());
  }
}

}  // namespace

int main() {
  at::manual_seed(0);
  check_layout(false);
  check_layout(true);
  check_bad_input_raises();
  std::printf("%d failure(s)\n", failures);
  return failures == 0 ? 0 : 1;
}
