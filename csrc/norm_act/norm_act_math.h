// The arithmetic of in-place activated normalization, written once for both devices.
//
// Every expression here is called by the CPU kernels (norm_act_cpu.cpp) and the CUDA kernels
// (norm_act_cuda.cu) alike, so the CPU tests exercise the very formulas the GPU runs.
//
// Notation: x input, mean/var per-group statistics, r = 1/sqrt(var + eps), g = clamped gamma,
// b = beta, xhat = (x - mean) * r, z = g * xhat + b (pre-activation), y = act(z) (output).
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define EFFSEG_HD __host__ __device__ __forceinline__
#else
#define EFFSEG_HD inline
#endif

namespace effseg {

enum class Act : int { Identity = 0, LeakyRelu = 1, Elu = 2 };

// |gamma| below this is replaced by +-kGammaMin (same sign, +kGammaMin for 0) in forward and
// backward alike: backward divides by gamma to recover xhat from y.
constexpr double kGammaMin = 1e-4;

// Overloads that resolve to the float or double libm/CUDA function on either device.
EFFSEG_HD float e_log1p(float v) { return log1pf(v); }
EFFSEG_HD double e_log1p(double v) { return log1p(v); }
EFFSEG_HD float e_expm1(float v) { return expm1f(v); }
EFFSEG_HD double e_expm1(double v) { return expm1(v); }
EFFSEG_HD float e_max(float a, float b) { return fmaxf(a, b); }
EFFSEG_HD double e_max(double a, double b) { return fmax(a, b); }
EFFSEG_HD float e_rsqrt(float v) {
#if defined(__CUDA_ARCH__)
  return rsqrtf(v);
#else
  return 1.0f / sqrtf(v);
#endif
}
EFFSEG_HD double e_rsqrt(double v) { return 1.0 / sqrt(v); }

// Machine epsilon of the accumulation type: how close to -1 an ELU output divided by alpha may
// come before its inverse would be -inf.
template <typename acc_t> struct Epsilon;
template <> struct Epsilon<float> { static constexpr float value = 1.1920929e-07f; };
template <> struct Epsilon<double> { static constexpr double value = 2.220446049250313e-16; };

// The activation's parameter (leaky slope or ELU alpha) and its reciprocal, so that inverting
// multiplies instead of dividing on every element.
template <typename acc_t> struct ActParam {
  acc_t p;
  acc_t inv;
  ActParam() = default;  // so that kernels can hold per-channel parameters in arrays
  EFFSEG_HD explicit ActParam(acc_t param)
      : p(param), inv(param != acc_t(0) ? acc_t(1) / param : acc_t(0)) {}
};

// Activation forward, inverse and derivative. The derivative is expressed through the output y,
// which is all backward has. All three agree with PyTorch at z == 0 (the negative branch's slope
// there, like torch.nn.functional.leaky_relu / elu backward).
template <Act A, typename acc_t> struct Activation;

template <typename acc_t> struct Activation<Act::Identity, acc_t> {
  static EFFSEG_HD acc_t forward(acc_t z, const ActParam<acc_t>&) { return z; }
  static EFFSEG_HD acc_t inverse(acc_t y, const ActParam<acc_t>&) { return y; }
  static EFFSEG_HD acc_t derivative(acc_t, const ActParam<acc_t>&) { return acc_t(1); }
};

// Both sides of each select are computed unconditionally: the compiler may not speculate a
// floating-point operation guarded by a branch, and a select of two computed values becomes a
// vector blend, so the CPU loops vectorize. NaN takes the negative side and stays NaN.
template <typename acc_t> struct Activation<Act::LeakyRelu, acc_t> {
  static EFFSEG_HD acc_t forward(acc_t z, const ActParam<acc_t>& a) {
    const acc_t neg = z * a.p;
    return z > acc_t(0) ? z : neg;
  }
  static EFFSEG_HD acc_t inverse(acc_t y, const ActParam<acc_t>& a) {
    const acc_t neg = y * a.inv;
    return y > acc_t(0) ? y : neg;
  }
  static EFFSEG_HD acc_t derivative(acc_t y, const ActParam<acc_t>& a) {
    return y > acc_t(0) ? acc_t(1) : a.p;
  }
};

// ELU saturates: once alpha * expm1(z) rounds to -alpha the pre-activation is lost. The inverse
// then returns the most negative z the type can still tell apart (about -16 in float32) instead of
// -inf; the derivative there is 0, so only the xhat-dependent part of dx is affected.
template <typename acc_t> struct Activation<Act::Elu, acc_t> {
  static EFFSEG_HD acc_t forward(acc_t z, const ActParam<acc_t>& a) {
    return z > acc_t(0) ? z : a.p * e_expm1(z);
  }
  static EFFSEG_HD acc_t inverse(acc_t y, const ActParam<acc_t>& a) {
    return y > acc_t(0) ? y : e_log1p(e_max(y * a.inv, acc_t(-1) + Epsilon<acc_t>::value));
  }
  static EFFSEG_HD acc_t derivative(acc_t y, const ActParam<acc_t>& a) {
    const acc_t neg = y + a.p;
    return y > acc_t(0) ? acc_t(1) : neg;
  }
};

template <typename acc_t> EFFSEG_HD acc_t clamp_gamma(acc_t w) {
  const acc_t lo = acc_t(kGammaMin);
  if (w >= lo || w <= -lo) return w;
  return w < acc_t(0) ? -lo : lo;
}

// Count, mean and sum of squared deviations of a set of values; merged with Chan et al.'s
// pairwise formula, which stays accurate when the two sets have very different sizes.
template <typename acc_t> struct Moments {
  int64_t n;
  acc_t mean;
  acc_t m2;
};

template <typename acc_t> EFFSEG_HD Moments<acc_t> merge(const Moments<acc_t>& a,
                                                          const Moments<acc_t>& b) {
  if (b.n == 0) return a;
  if (a.n == 0) return b;
  const int64_t n = a.n + b.n;
  const acc_t fb = acc_t(b.n) / acc_t(n);
  const acc_t d = b.mean - a.mean;
  return {n, a.mean + d * fb, a.m2 + b.m2 + d * d * acc_t(a.n) * fb};
}

// What one thread accumulates over its values before they join the tree of merges: the count
// and the sums of v - shift and (v - shift)^2, shifted by the thread's first value so that the
// sum of squares does not cancel. No division per value (Welford's update would take one).
template <typename acc_t> struct ShiftedSums {
  int n;
  acc_t shift;
  acc_t s1;
  acc_t s2;
};

template <typename acc_t> EFFSEG_HD void push(ShiftedSums<acc_t>& m, acc_t v) {
  if (m.n == 0) m.shift = v;
  const acc_t d = v - m.shift;
  m.n += 1;
  m.s1 += d;
  m.s2 += d * d;
}

template <typename acc_t> EFFSEG_HD Moments<acc_t> moments(const ShiftedSums<acc_t>& m) {
  if (m.n == 0) return {0, acc_t(0), acc_t(0)};
  const acc_t mean_d = m.s1 / acc_t(m.n);
  return {m.n, m.shift + mean_d, e_max(m.s2 - m.s1 * mean_d, acc_t(0))};
}

// The two per-group sums backward needs: sum(dz) and sum(dz * xhat), with dz = dL/dz.
template <typename acc_t> struct GradSums {
  acc_t dz;
  acc_t dz_xhat;
};

template <typename acc_t> EFFSEG_HD GradSums<acc_t> merge(const GradSums<acc_t>& a,
                                                           const GradSums<acc_t>& b) {
  return {a.dz + b.dz, a.dz_xhat + b.dz_xhat};
}

// PReLU runs the LeakyRelu activation with each channel's own learned slope (an ActParam per
// channel). Its slope gradient is sum(dy * z) over the non-positive outputs; z is recovered from
// y by the same inverse, so backward needs no more than for leaky_relu. A slope <= 0 is refused
// before any kernel runs (y would not determine z).
template <typename acc_t>
EFFSEG_HD acc_t slope_grad_term(acc_t y, acc_t dy, const ActParam<acc_t>& a) {
  const acc_t neg = dy * (y * a.inv);
  return y > acc_t(0) ? acc_t(0) : neg;
}

// The three per-group sums of a PReLU backward: GradSums plus sum(dy * z) over z <= 0.
template <typename acc_t> struct SlopeGradSums {
  acc_t dz;
  acc_t dz_xhat;
  acc_t dy_z;
};

template <typename acc_t> EFFSEG_HD SlopeGradSums<acc_t> merge(const SlopeGradSums<acc_t>& a,
                                                                const SlopeGradSums<acc_t>& b) {
  return {a.dz + b.dz, a.dz_xhat + b.dz_xhat, a.dy_z + b.dy_z};
}

// Per-channel constants that turn y back into z and xhat: xhat = (z - beta) * inv_gamma.
template <typename acc_t> struct Affine {
  acc_t inv_gamma;
  acc_t beta;
};

// From one output element and its incoming gradient: dz and the recovered xhat.
template <Act A, typename acc_t>
EFFSEG_HD void recover(acc_t y, acc_t dy, const Affine<acc_t>& af, const ActParam<acc_t>& param,
                       acc_t& dz, acc_t& xhat) {
  dz = dy * Activation<A, acc_t>::derivative(y, param);
  xhat = (Activation<A, acc_t>::inverse(y, param) - af.beta) * af.inv_gamma;
}

// Forward: y = act(x * scale + shift), with scale and shift folded per group.
template <typename acc_t> struct ForwardCoef {
  acc_t scale;
  acc_t shift;
};

template <typename acc_t>
EFFSEG_HD ForwardCoef<acc_t> forward_coef(acc_t mean, acc_t var, acc_t gamma, acc_t beta,
                                           acc_t eps) {
  const acc_t s = clamp_gamma(gamma) * e_rsqrt(var + eps);
  return {s, beta - mean * s};
}

template <Act A, typename acc_t>
EFFSEG_HD acc_t forward_value(acc_t x, const ForwardCoef<acc_t>& c, const ActParam<acc_t>& param) {
  return Activation<A, acc_t>::forward(x * c.scale + c.shift, param);
}

// Backward to the input: dx = k1 * dz + k2 + k3 * xhat. With batch statistics (training)
//   dx = g * r * (dz - sum(dz) / M - xhat * sum(dz * xhat) / M);
// with fixed statistics (eval) k2 = k3 = 0.
template <typename acc_t> struct InputGradCoef {
  acc_t k1;
  acc_t k2;
  acc_t k3;
};

template <typename acc_t>
EFFSEG_HD InputGradCoef<acc_t> input_grad_coef(acc_t var, acc_t gamma, acc_t eps,
                                               bool batch_stats, acc_t sum_dz,
                                               acc_t sum_dz_xhat, acc_t count) {
  const acc_t k1 = clamp_gamma(gamma) * e_rsqrt(var + eps);
  if (!batch_stats) return {k1, acc_t(0), acc_t(0)};
  return {k1, -k1 * sum_dz / count, -k1 * sum_dz_xhat / count};
}

template <typename acc_t>
EFFSEG_HD acc_t input_grad_value(acc_t dz, acc_t xhat, const InputGradCoef<acc_t>& c) {
  return c.k1 * dz + c.k2 + c.k3 * xhat;
}

}  // namespace effseg
