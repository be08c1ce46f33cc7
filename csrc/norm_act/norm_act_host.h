// Host-side pieces shared by the CPU and CUDA front ends of the norm-act ops: argument checks,
// the view of an (N, C, *) tensor the kernels work on, and the activation name.
//
// The Python layer checks arguments first and raises precise errors; these checks are the backstop
// for direct torch.ops.effseg calls, so that no input can reach a kernel with a wrong shape.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/util/Exception.h>

#include <string>

#include "norm_act_math.h"

namespace effseg {

// An (N, C, S) view of an (N, C, *) tensor: S is the product of the spatial sizes. In
// channels-last layout memory is [N][S][C], otherwise [N][C][S].
struct Geometry {
  int64_t N;
  int64_t C;
  int64_t S;
  bool channels_last;

  int64_t groups(bool per_sample) const { return per_sample ? N * C : C; }
  int64_t count(bool per_sample) const { return per_sample ? S : N * S; }
};

inline bool is_channels_last(const at::Tensor& t) {
  if (t.is_contiguous()) return false;
  if (t.dim() == 5) return t.is_contiguous(at::MemoryFormat::ChannelsLast3d);
  if (t.dim() == 4) return t.is_contiguous(at::MemoryFormat::ChannelsLast);
  return false;
}

inline at::MemoryFormat memory_format_of(const Geometry& g, int64_t dim) {
  if (!g.channels_last) return at::MemoryFormat::Contiguous;
  return dim == 5 ? at::MemoryFormat::ChannelsLast3d : at::MemoryFormat::ChannelsLast;
}

inline Geometry check_input(const at::Tensor& x, const char* name) {
  TORCH_CHECK_VALUE(x.dim() >= 2, "effseg: ", name, " must have shape (N, C, *), got ", x.dim(),
                    " dimension(s)");
  TORCH_CHECK_TYPE(at::isFloatingType(x.scalar_type()), "effseg: ", name,
                   " must be float64, float32, float16 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.numel() > 0, "effseg: ", name, " is empty (shape ", x.sizes(), ")");
  const bool cl = is_channels_last(x);
  TORCH_CHECK_VALUE(cl || x.is_contiguous(), "effseg: ", name,
                    " must be contiguous or channels-last, got strides ", x.strides());
  return {x.size(0), x.size(1), x.numel() / (x.size(0) * x.size(1)), cl};
}

// Whether a and b (of equal sizes) put every element at the same offset: the stride of a
// dimension of size 1 is never used, and PyTorch leaves it arbitrary (a channel slice of a
// concatenation's gradient with N = 1 is contiguous with a batch stride of the whole).
inline bool same_offsets(const at::Tensor& a, const at::Tensor& b) {
  for (int64_t d = 0; d < a.dim(); ++d) {
    if (a.size(d) != 1 && a.stride(d) != b.stride(d)) return false;
  }
  return true;
}

inline void check_same_layout(const at::Tensor& a, const at::Tensor& b, const char* an,
                              const char* bn) {
  TORCH_CHECK_VALUE(a.sizes() == b.sizes(), "effseg: ", bn, " must have the shape of ", an, " ",
                    a.sizes(), ", got ", b.sizes());
  TORCH_CHECK_VALUE(same_offsets(a, b), "effseg: ", bn, " must have the memory layout of ", an,
                    " (strides ", a.strides(), "), got ", b.strides());
  TORCH_CHECK_TYPE(a.scalar_type() == b.scalar_type(), "effseg: ", bn, " must have the dtype of ",
                   an, " (", a.scalar_type(), "), got ", b.scalar_type());
  TORCH_CHECK_VALUE(a.device() == b.device(), "effseg: ", bn, " must be on ", an, "'s device ",
                    a.device(), ", got ", b.device());
}

inline at::ScalarType acc_type_of(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// A per-channel parameter (weight or bias) as a contiguous (C,) tensor of the accumulation type;
// `fill` when absent (affine=False).
inline at::Tensor channel_param(const std::optional<at::Tensor>& t, const at::Tensor& x,
                                const Geometry& g, double fill, const char* name) {
  const auto opts = x.options().dtype(acc_type_of(x));
  if (!t.has_value() || !t->defined()) return at::full({g.C}, fill, opts);
  TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == g.C, "effseg: ", name, " must have shape (",
                    g.C, ",) to match the input's channels, got ", t->sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(t->scalar_type()), "effseg: ", name,
                   " must be floating point, got ", t->scalar_type());
  TORCH_CHECK_VALUE(t->device() == x.device(), "effseg: ", name, " is on ", t->device(),
                    " but the input is on ", x.device());
  return t->to(opts).contiguous();
}

// The per-channel PReLU slope as a contiguous (C,) accumulation-type tensor. A slope <= 0 would
// make the activation non-invertible; on the CPU it is checked here (O(C)), on a GPU by the
// Python layer, since reading a device tensor here would synchronize every call.
inline at::Tensor slope_param(const at::Tensor& t, const at::Tensor& x, const Geometry& g) {
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == g.C, "effseg: slope must have shape (", g.C,
                    ",) to match the input's channels, got ", t.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()),
                   "effseg: slope must be floating point, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == x.device(), "effseg: slope is on ", t.device(),
                    " but the input is on ", x.device());
  at::Tensor s = t.to(x.options().dtype(acc_type_of(x))).contiguous();
  if (s.is_cpu()) {
    TORCH_CHECK_VALUE(s.gt(0).all().item<bool>(),
                      "effseg: prelu needs every slope > 0 to be invertible, got min ",
                      s.min().item<double>());
  }
  return s;
}

// Per-group statistics: (C,) for one value per channel, (N, C) for one per sample and channel.
// Returns the tensor as a contiguous accumulation-type tensor and whether it is per sample.
inline at::Tensor group_stat(const at::Tensor& t, const at::Tensor& x, const Geometry& g,
                             const char* name, bool* per_sample) {
  const bool per_channel = t.dim() == 1 && t.size(0) == g.C;
  const bool per_group = t.dim() == 2 && t.size(0) == g.N && t.size(1) == g.C;
  TORCH_CHECK_VALUE(per_channel || per_group, "effseg: ", name, " must have shape (", g.C,
                    ",) or (", g.N, ", ", g.C, "), got ", t.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), "effseg: ", name,
                   " must be floating point, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == x.device(), "effseg: ", name, " is on ", t.device(),
                    " but the input is on ", x.device());
  *per_sample = per_group;
  return t.to(x.options().dtype(acc_type_of(x))).contiguous();
}

inline Act parse_activation(c10::string_view name, double param) {
  if (name == "identity") return Act::Identity;
  if (name == "leaky_relu") {
    TORCH_CHECK_VALUE(param > 0.0, "effseg: leaky_relu needs a slope > 0 to be invertible, got ",
                      param);
    return Act::LeakyRelu;
  }
  if (name == "elu") {
    TORCH_CHECK_VALUE(param > 0.0, "effseg: elu needs alpha > 0 to be invertible, got ", param);
    return Act::Elu;
  }
  TORCH_CHECK_VALUE(name != "relu",
                    "effseg: activation 'relu' is not invertible, so the in-place op could not "
                    "recover its input in backward; use 'leaky_relu' (e.g. slope 0.01) or a "
                    "recomputing block, which supports exact ReLU");
  TORCH_CHECK_VALUE(false, "effseg: unknown activation '", std::string(name),
                    "'; expected 'leaky_relu', 'elu' or 'identity'");
  return Act::Identity;
}

// Calls f(std::integral_constant<Act, A>{}) with the activation as a compile-time constant, so
// that each kernel is instantiated per activation and the element loop has no switch.
template <typename F> void dispatch_activation(Act a, F&& f) {
  switch (a) {
    case Act::Identity:
      f(std::integral_constant<Act, Act::Identity>{});
      break;
    case Act::LeakyRelu:
      f(std::integral_constant<Act, Act::LeakyRelu>{});
      break;
    case Act::Elu:
      f(std::integral_constant<Act, Act::Elu>{});
      break;
  }
}

// Calls f.template operator()<scalar_t, A>() for the input's dtype and the activation, so that
// each kernel is compiled per dtype and activation: f is a lambda
// `[&]<typename scalar_t, Act A>() { ... }`.
template <typename F> void dispatch_dtype_activation(at::ScalarType t, Act act, const F& f) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t, "effseg_norm_act", [&] {
    dispatch_activation(act,
                        [&](auto a) { f.template operator()<scalar_t, decltype(a)::value>(); });
  });
}

}  // namespace effseg
