// The dice_ce ops' front ends, written once for both devices: argument checks, output allocation,
// the device guard and the label check. `Kernels` (CpuKernels in dice_ce_cpu.cpp, CudaKernels in
// dice_ce_cuda.cu) supplies only the two kernel launches:
//
//   static void forward(const at::Tensor& logits, const at::Tensor& labels, const ForwardArgs&);
//   static void backward(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& dz,
//                        const BackwardArgs&);
//
// The Python layer (effseg.losses) checks arguments first and raises precise errors; these checks
// are the backstop for direct torch.ops.effseg calls, so that no input reaches a kernel with a
// shape, dtype or device it does not expect.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/core/DeviceGuard.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <string>
#include <tuple>
#include <vector>

#include "dice_ce_math.h"

namespace effseg {
namespace dice_ce {

// The (N, K, S) view of (N, K, *spatial) logits whose spatial axes flatten to one strided axis
// (contiguous: sk = S, sv = 1; channels-last: sk = 1, sv = K); labels are contiguous (N, S).
// Logits element (n, k, v) is at n * sn + k * sk + v * sv, and so is its gradient: backward's
// output has the logits' strides.
struct Geometry {
  int64_t N;
  int64_t K;
  int64_t S;
  int64_t sn;
  int64_t sk;
  int64_t sv;
};

struct ForwardArgs {
  Geometry g;
  int64_t ignore_index;
  at::Tensor weight;   // (K,) accumulation type
  at::Tensor stats;    // output (N, K, 3): I, P, G
  at::Tensor ce;       // output (2,): sum w_y * nll, sum w_y
  at::Tensor invalid;  // output (1,) int64: voxels whose label is neither a class nor ignored
};

struct BackwardArgs {
  Geometry g;
  int64_t ignore_index;
  at::Tensor weight;     // (K,) accumulation type
  at::Tensor grad;       // (1,) accumulation type: dL/dloss
  at::Tensor coef_dice;  // (N, K, 2) accumulation type: alpha, beta
  at::Tensor coef_ce;    // (1,) accumulation type
};

inline at::ScalarType acc_type_of(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// Whether the kernels can read `x` in place: no element twice and no gap (so that backward's
// gradient, allocated like `x`, has the same strides), and spatial axes that flatten to one
// strided axis. True for contiguous and channels-last tensors; false for crops, transposed
// spatial axes and the like.
inline bool flattens(const at::Tensor& x) {
  if (!x.is_non_overlapping_and_dense()) return false;
  int64_t inner = -1;  // the spatial axis inside the current one, skipping size-1 axes
  for (int64_t d = x.dim() - 1; d >= 2; --d) {
    if (x.size(d) == 1) continue;
    if (inner >= 0 && x.stride(d) != x.stride(inner) * x.size(inner)) return false;
    inner = d;
  }
  return true;
}

inline Geometry check_logits(const at::Tensor& x) {
  TORCH_CHECK_VALUE(x.dim() >= 2, "effseg: logits must have shape (N, K, *spatial), got ",
                    x.dim(), " dimension(s)");
  TORCH_CHECK_TYPE(at::isFloatingType(x.scalar_type()),
                   "effseg: logits must be float64, float32, float16 or bfloat16, got ",
                   x.scalar_type());
  TORCH_CHECK_VALUE(x.numel() > 0, "effseg: logits are empty (shape ", x.sizes(), ")");
  TORCH_CHECK_VALUE(x.size(1) >= 2, "effseg: logits need K >= 2 classes along dim 1, got ",
                    x.size(1));
  TORCH_CHECK_VALUE(x.size(1) <= std::numeric_limits<int32_t>::max(),
                    "effseg: too many classes: ", x.size(1));
  TORCH_CHECK(flattens(x), "effseg: internal error: logits of strides ", x.strides(),
              " reached the kernels without readable_logits");
  const int64_t N = x.size(0), K = x.size(1), S = x.numel() / (N * K);
  int64_t sv = 1;
  for (int64_t d = x.dim() - 1; d >= 2; --d) {
    if (x.size(d) != 1) {
      sv = x.stride(d);
      break;
    }
  }
  return {N, K, S, x.stride(0), x.stride(1), sv};
}

// The logits as the kernels read them: `x` itself when its spatial axes flatten (contiguous,
// channels-last), else one contiguous copy.
inline at::Tensor readable_logits(const at::Tensor& x) {
  return flattens(x) ? x : x.contiguous();
}

// Labels as a contiguous (N, *spatial) integer tensor (a copy only when they are strided).
inline at::Tensor check_labels(const at::Tensor& labels, const at::Tensor& logits) {
  const auto t = labels.scalar_type();
  TORCH_CHECK_TYPE(t == at::kLong || t == at::kInt || t == at::kByte,
                   "effseg: labels must be int64, int32 or uint8 class indices, got ", t);
  TORCH_CHECK_VALUE(labels.device() == logits.device(), "effseg: labels are on ",
                    labels.device(), " but the logits are on ", logits.device());
  std::vector<int64_t> want{logits.size(0)};
  for (int64_t d = 2; d < logits.dim(); ++d) want.push_back(logits.size(d));
  TORCH_CHECK_VALUE(labels.sizes() == at::IntArrayRef(want), "effseg: labels must have shape ",
                    at::IntArrayRef(want), " (the logits' shape without dim 1), got ",
                    labels.sizes());
  return labels.contiguous();
}

// Class weights as a contiguous (K,) tensor of the accumulation type; ones when absent.
inline at::Tensor class_weight(const std::optional<at::Tensor>& w, const at::Tensor& logits) {
  const auto opts = logits.options().dtype(acc_type_of(logits));
  const int64_t K = logits.size(1);
  if (!w.has_value() || !w->defined()) return at::ones({K}, opts);
  TORCH_CHECK_VALUE(w->dim() == 1 && w->size(0) == K, "effseg: weight must have shape (", K,
                    ",) to match the logits' classes, got ", w->sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(w->scalar_type()),
                   "effseg: weight must be floating point, got ", w->scalar_type());
  TORCH_CHECK_VALUE(w->device() == logits.device(), "effseg: weight is on ", w->device(),
                    " but the logits are on ", logits.device());
  return w->to(opts).contiguous();
}

// A small floating-point tensor of a given number of elements, as a contiguous accumulation-type
// tensor on the logits' device.
inline at::Tensor coefficient(const at::Tensor& t, const at::Tensor& logits, int64_t numel,
                              const char* name, const char* shape) {
  TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), "effseg: ", name,
                   " must be floating point, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.numel() == numel, "effseg: ", name, " must have shape ", shape, ", got ",
                    t.sizes());
  TORCH_CHECK_VALUE(t.device() == logits.device(), "effseg: ", name, " is on ", t.device(),
                    " but the logits are on ", logits.device());
  return t.to(logits.options().dtype(acc_type_of(logits))).contiguous();
}

// Calls f.template operator()<scalar_t, label_t>() for the logits' and the labels' dtypes, so that
// each kernel is compiled per pair: f is a lambda `[&]<typename scalar_t, typename label_t>() {}`.
template <typename F>
void dispatch_types(at::ScalarType logits, at::ScalarType labels, const F& f) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits, "effseg_dice_ce", [&] {
    switch (labels) {
      case at::kLong:
        f.template operator()<scalar_t, int64_t>();
        break;
      case at::kInt:
        f.template operator()<scalar_t, int32_t>();
        break;
      case at::kByte:
        f.template operator()<scalar_t, uint8_t>();
        break;
      default:
        TORCH_CHECK_TYPE(false, "effseg: unsupported label dtype ", labels);
    }
  });
}

template <typename Kernels> struct DiceCeOps {
  static std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& given,
                                                    const at::Tensor& labels,
                                                    const std::optional<at::Tensor>& weight,
                                                    int64_t ignore_index) {
    const c10::DeviceGuard guard(given.device());
    const at::Tensor logits = readable_logits(given);
    ForwardArgs a;
    a.g = check_logits(logits);
    const at::Tensor y = check_labels(labels, logits);
    a.ignore_index = ignore_index;
    a.weight = class_weight(weight, logits);
    const auto opts = logits.options().dtype(acc_type_of(logits));
    a.stats = at::empty({a.g.N, a.g.K, 3}, opts);
    a.ce = at::empty({2}, opts);
    a.invalid = at::empty({1}, logits.options().dtype(at::kLong));
    Kernels::forward(logits, y, a);
    // The kernels counted bad labels while reading them (never using one as an index). On the
    // CPU the count is checked here, exactly. On a GPU reading it back would synchronize the
    // host with the device on every call (and forbid CUDA-graph capture): the check runs on the
    // device instead, as a device-side assertion like cross_entropy's own target check, which
    // fails the next synchronizing call.
    if (a.invalid.is_cpu()) {
      const int64_t invalid = a.invalid.item<int64_t>();
      TORCH_CHECK_VALUE(invalid == 0, "effseg: labels: ", invalid, " voxel(s) have a label "
                        "outside [0, ", a.g.K, ") that is not ignore_index (", ignore_index, ")");
    } else {
      const std::string msg = "effseg: labels: some voxel has a label outside [0, " +
                              std::to_string(a.g.K) + ") that is not ignore_index (" +
                              std::to_string(ignore_index) + ")";
      at::_assert_async(a.invalid.eq(0), msg);
    }
    return {a.stats, a.ce};
  }

  static at::Tensor backward(const at::Tensor& grad, const at::Tensor& given,
                             const at::Tensor& labels, const std::optional<at::Tensor>& weight,
                             int64_t ignore_index, const at::Tensor& coef_dice,
                             const at::Tensor& coef_ce) {
    const c10::DeviceGuard guard(given.device());
    const at::Tensor logits = readable_logits(given);
    BackwardArgs a;
    a.g = check_logits(logits);
    const at::Tensor y = check_labels(labels, logits);
    a.ignore_index = ignore_index;
    a.weight = class_weight(weight, logits);
    a.grad = coefficient(grad, logits, 1, "grad", "() (a scalar)");
    a.coef_ce = coefficient(coef_ce, logits, 1, "coef_ce", "() (a scalar)");
    TORCH_CHECK_VALUE(coef_dice.dim() == 3 && coef_dice.size(0) == a.g.N &&
                          coef_dice.size(1) == a.g.K && coef_dice.size(2) == 2,
                      "effseg: coef_dice must have shape (", a.g.N, ", ", a.g.K, ", 2), got ",
                      coef_dice.sizes());
    a.coef_dice = coefficient(coef_dice, logits, a.g.N * a.g.K * 2, "coef_dice", "(N, K, 2)");
    // The logits' own strides (dense: see flattens), so that the kernels index both alike.
    at::Tensor dz = at::empty_like(logits, at::MemoryFormat::Preserve);
    Kernels::backward(logits, y, dz, a);
    return dz;
  }
};

// Registers the dice_ce ops of one device: EFFSEG_REGISTER_DICE_CE(CPU, CpuKernels).
#define EFFSEG_REGISTER_DICE_CE(DEVICE, KERNELS)                        \
  TORCH_LIBRARY_IMPL(effseg, DEVICE, m) {                               \
    using Ops = ::effseg::dice_ce::DiceCeOps<KERNELS>;                  \
    m.impl("dice_ce_forward", &Ops::forward);                           \
    m.impl("dice_ce_backward", &Ops::backward);                         \
  }

}  // namespace dice_ce
}  // namespace effseg
