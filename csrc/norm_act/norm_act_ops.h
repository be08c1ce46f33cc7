// The norm-act ops' front ends, written once for both devices: argument checks, output
// allocation and the device guard. `Kernels` (CpuKernels in norm_act_cpu.cpp, CudaKernels in
// norm_act_cuda.cu) supplies only the four kernel launches:
//
//   static void stats(const at::Tensor& x, const StatsArgs&);
//   static void forward(at::Tensor& x, const ForwardArgs&);
//   static void backward_reduce(const at::Tensor& y, const at::Tensor& dy, const ReduceArgs&);
//       (also writes sum_dy_z when ReduceArgs::slope is defined)
//   static void backward_input(const at::Tensor& y, const at::Tensor& dy, const at::Tensor& dx,
//                              const InputGradArgs&);   // dx may be dy
//
// PReLU (the *_prelu ops) is the LeakyRelu kernels with a per-channel slope: `slope` is defined
// in the arguments, and each channel's ActParam comes from it instead of `param`.
#pragma once

#include <c10/core/DeviceGuard.h>

#include <tuple>
#include <vector>

#include "norm_act_host.h"

namespace effseg {

struct StatsArgs {
  Geometry g;
  bool per_sample;
  at::Tensor mean, var;  // outputs
};

struct ForwardArgs {
  Geometry g;
  Act act;
  bool per_sample;
  at::Tensor mean, var, gamma, beta;
  double eps, param;
  at::Tensor slope;  // PReLU: (C,), else undefined
};

struct ReduceArgs {
  Geometry g;
  Act act;
  bool per_sample;
  at::Tensor gamma, beta;
  double param;
  at::Tensor slope;                         // PReLU: (C,), else undefined
  at::Tensor sum_dz, sum_dz_xhat, sum_dy_z;  // outputs (sum_dy_z with a slope only)
};

struct InputGradArgs {
  Geometry g;
  Act act;
  bool per_sample;
  bool batch_stats;  // statistics were the batch's own: sum_dz / sum_dz_xhat are given
  int64_t count;
  at::Tensor var, gamma, beta, sum_dz, sum_dz_xhat;
  double eps, param;
  at::Tensor slope;  // PReLU: (C,), else undefined
};

inline std::vector<int64_t> group_shape(const Geometry& g, bool per_sample) {
  return per_sample ? std::vector<int64_t>{g.N, g.C} : std::vector<int64_t>{g.C};
}

inline InputGradArgs prepare_input_grad(const at::Tensor& y, const at::Tensor& dy,
                                        const at::Tensor& var,
                                        const std::optional<at::Tensor>& weight,
                                        const std::optional<at::Tensor>& bias,
                                        const std::optional<at::Tensor>& sum_dz,
                                        const std::optional<at::Tensor>& sum_dz_xhat,
                                        std::optional<int64_t> count, double eps, Act act,
                                        double activation_param) {
  InputGradArgs a;
  a.g = check_input(y, "output");
  check_same_layout(y, dy, "output", "grad_output");
  a.act = act;
  a.var = group_stat(var, y, a.g, "var", &a.per_sample);
  a.gamma = channel_param(weight, y, a.g, 1.0, "weight");
  a.beta = channel_param(bias, y, a.g, 0.0, "bias");
  const bool has_dz = sum_dz.has_value() && sum_dz->defined();
  const bool has_dzx = sum_dz_xhat.has_value() && sum_dz_xhat->defined();
  TORCH_CHECK_VALUE(has_dz == has_dzx,
                    "effseg: sum_dz and sum_dz_xhat must be given together (batch statistics) "
                    "or both omitted (fixed statistics)");
  a.batch_stats = has_dz;
  a.count = count.has_value() ? *count : a.g.count(a.per_sample);
  TORCH_CHECK_VALUE(a.count > 0, "effseg: count must be positive, got ", a.count);
  if (has_dz) {
    bool ps_dz = false, ps_dzx = false;
    a.sum_dz = group_stat(*sum_dz, y, a.g, "sum_dz", &ps_dz);
    a.sum_dz_xhat = group_stat(*sum_dz_xhat, y, a.g, "sum_dz_xhat", &ps_dzx);
    TORCH_CHECK_VALUE(ps_dz == a.per_sample && ps_dzx == a.per_sample,
                      "effseg: sum_dz and sum_dz_xhat must have the shape of var ", var.sizes());
  }
  a.eps = eps;
  a.param = activation_param;
  return a;
}

template <typename Kernels> struct NormActOps {
  static std::tuple<at::Tensor, at::Tensor> norm_stats(const at::Tensor& x, bool per_sample) {
    const c10::DeviceGuard guard(x.device());
    StatsArgs a{check_input(x, "input"), per_sample, {}, {}};
    TORCH_CHECK_VALUE(a.g.count(per_sample) > 1,
                      "effseg: expected more than 1 value per channel to compute batch "
                      "statistics, got input of shape ",
                      x.sizes());
    const auto opts = x.options().dtype(acc_type_of(x));
    a.mean = at::empty(group_shape(a.g, per_sample), opts);
    a.var = at::empty(group_shape(a.g, per_sample), opts);
    Kernels::stats(x, a);
    return {a.mean, a.var};
  }

  static void norm_act_forward_(at::Tensor& x, const at::Tensor& mean, const at::Tensor& var,
                                const std::optional<at::Tensor>& weight,
                                const std::optional<at::Tensor>& bias, double eps,
                                c10::string_view activation, double activation_param) {
    const c10::DeviceGuard guard(x.device());
    forward(x, mean, var, weight, bias, eps, parse_activation(activation, activation_param),
            activation_param, nullptr);
  }

  static void norm_act_forward_prelu_(at::Tensor& x, const at::Tensor& mean,
                                      const at::Tensor& var,
                                      const std::optional<at::Tensor>& weight,
                                      const std::optional<at::Tensor>& bias, double eps,
                                      const at::Tensor& slope) {
    const c10::DeviceGuard guard(x.device());
    forward(x, mean, var, weight, bias, eps, Act::LeakyRelu, 0.0, &slope);
  }

  static void forward(at::Tensor& x, const at::Tensor& mean, const at::Tensor& var,
                      const std::optional<at::Tensor>& weight,
                      const std::optional<at::Tensor>& bias, double eps, Act act, double param,
                      const at::Tensor* slope) {
    ForwardArgs a;
    a.g = check_input(x, "input");
    a.act = act;
    if (slope != nullptr) a.slope = slope_param(*slope, x, a.g);
    bool ps_var = false;
    a.mean = group_stat(mean, x, a.g, "mean", &a.per_sample);
    a.var = group_stat(var, x, a.g, "var", &ps_var);
    TORCH_CHECK_VALUE(a.per_sample == ps_var, "effseg: mean ", mean.sizes(), " and var ",
                      var.sizes(), " must have the same shape");
    a.gamma = channel_param(weight, x, a.g, 1.0, "weight");
    a.beta = channel_param(bias, x, a.g, 0.0, "bias");
    a.eps = eps;
    a.param = param;
    Kernels::forward(x, a);
  }

  static std::tuple<at::Tensor, at::Tensor> norm_act_backward_reduce(
      const at::Tensor& y, const at::Tensor& dy, const std::optional<at::Tensor>& weight,
      const std::optional<at::Tensor>& bias, bool per_sample, c10::string_view activation,
      double activation_param) {
    const c10::DeviceGuard guard(y.device());
    const ReduceArgs a = reduce(y, dy, weight, bias, per_sample,
                                parse_activation(activation, activation_param), activation_param,
                                nullptr);
    return {a.sum_dz, a.sum_dz_xhat};
  }

  static std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_act_backward_reduce_prelu(
      const at::Tensor& y, const at::Tensor& dy, const std::optional<at::Tensor>& weight,
      const std::optional<at::Tensor>& bias, const at::Tensor& slope, bool per_sample) {
    const c10::DeviceGuard guard(y.device());
    const ReduceArgs a = reduce(y, dy, weight, bias, per_sample, Act::LeakyRelu, 0.0, &slope);
    return {a.sum_dz, a.sum_dz_xhat, a.sum_dy_z};
  }

  static ReduceArgs reduce(const at::Tensor& y, const at::Tensor& dy,
                           const std::optional<at::Tensor>& weight,
                           const std::optional<at::Tensor>& bias, bool per_sample, Act act,
                           double param, const at::Tensor* slope) {
    ReduceArgs a;
    a.g = check_input(y, "output");
    check_same_layout(y, dy, "output", "grad_output");
    a.act = act;
    a.per_sample = per_sample;
    a.gamma = channel_param(weight, y, a.g, 1.0, "weight");
    a.beta = channel_param(bias, y, a.g, 0.0, "bias");
    a.param = param;
    const auto opts = y.options().dtype(acc_type_of(y));
    a.sum_dz = at::empty(group_shape(a.g, per_sample), opts);
    a.sum_dz_xhat = at::empty(group_shape(a.g, per_sample), opts);
    if (slope != nullptr) {
      a.slope = slope_param(*slope, y, a.g);
      a.sum_dy_z = at::empty(group_shape(a.g, per_sample), opts);
    }
    Kernels::backward_reduce(y, dy, a);
    return a;
  }

  static at::Tensor norm_act_backward_input(
      const at::Tensor& y, const at::Tensor& dy, const at::Tensor& var,
      const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
      const std::optional<at::Tensor>& sum_dz, const std::optional<at::Tensor>& sum_dz_xhat,
      std::optional<int64_t> count, double eps, c10::string_view activation,
      double activation_param) {
    const c10::DeviceGuard guard(y.device());
    const InputGradArgs a =
        prepare_input_grad(y, dy, var, weight, bias, sum_dz, sum_dz_xhat, count, eps,
                           parse_activation(activation, activation_param), activation_param);
    at::Tensor dx = at::empty_like(y);
    Kernels::backward_input(y, dy, dx, a);
    return dx;
  }

  static at::Tensor norm_act_backward_input_prelu(
      const at::Tensor& y, const at::Tensor& dy, const at::Tensor& var,
      const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
      const at::Tensor& slope, const std::optional<at::Tensor>& sum_dz,
      const std::optional<at::Tensor>& sum_dz_xhat, std::optional<int64_t> count, double eps) {
    const c10::DeviceGuard guard(y.device());
    InputGradArgs a = prepare_input_grad(y, dy, var, weight, bias, sum_dz, sum_dz_xhat, count,
                                         eps, Act::LeakyRelu, 0.0);
    a.slope = slope_param(slope, y, a.g);
    at::Tensor dx = at::empty_like(y);
    Kernels::backward_input(y, dy, dx, a);
    return dx;
  }

  static void norm_act_backward_input_(
      const at::Tensor& y, at::Tensor& dy, const at::Tensor& var,
      const std::optional<at::Tensor>& weight, const std::optional<at::Tensor>& bias,
      const std::optional<at::Tensor>& sum_dz, const std::optional<at::Tensor>& sum_dz_xhat,
      std::optional<int64_t> count, double eps, c10::string_view activation,
      double activation_param) {
    const c10::DeviceGuard guard(y.device());
    const InputGradArgs a =
        prepare_input_grad(y, dy, var, weight, bias, sum_dz, sum_dz_xhat, count, eps,
                           parse_activation(activation, activation_param), activation_param);
    Kernels::backward_input(y, dy, dy, a);
  }
};

// Registers every norm-act op of one device: EFFSEG_REGISTER_NORM_ACT(CPU, CpuKernels).
#define EFFSEG_REGISTER_NORM_ACT(DEVICE, KERNELS)                                      \
  TORCH_LIBRARY_IMPL(effseg, DEVICE, m) {                                              \
    using Ops = ::effseg::NormActOps<KERNELS>;                                         \
    m.impl("norm_stats", &Ops::norm_stats);                                            \
    m.impl("norm_act_forward_", &Ops::norm_act_forward_);                              \
    m.impl("norm_act_backward_reduce", &Ops::norm_act_backward_reduce);                \
    m.impl("norm_act_backward_input", &Ops::norm_act_backward_input);                  \
    m.impl("norm_act_backward_input_", &Ops::norm_act_backward_input_);                \
    m.impl("norm_act_forward_prelu_", &Ops::norm_act_forward_prelu_);                  \
    m.impl("norm_act_backward_reduce_prelu", &Ops::norm_act_backward_reduce_prelu);    \
    m.impl("norm_act_backward_input_prelu", &Ops::norm_act_backward_input_prelu);      \
  }

}  // namespace effseg
