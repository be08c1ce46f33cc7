// The per-voxel arithmetic of the fused softmax + cross-entropy + soft-Dice loss, written once for
// both devices: the CPU kernels (dice_ce_cpu.cpp) and the CUDA kernels (dice_ce_cuda.cu) call the
// same expressions, so the CPU tests exercise the formulas the GPU runs.
//
// Notation, for one voxel of sample n: z_k the logits (k < K), y the label, m = max_k z_k,
// e_k = exp(z_k - m), s = sum_k e_k, p_k = e_k / s (softmax), w the class weights.
// Per (n, k) the forward sums I = sum p_k [y == k], P = sum p_k, G = sum [y == k] over the voxels
// that are not ignored; cross-entropy sums w_y * (-log p_y) and w_y.
// Backward gets, per (n, k), alpha and beta such that dLoss/dp_k = c_k = beta + [y == k] * alpha
// (the Dice part, computed in Python from I, P, G), and the cross-entropy factor
// ce = lambda_ce / sum(w_y), so that dLoss/dz_k = ce * w_y * (p_k - [y == k]) + p_k * (c_k - cbar)
// with cbar = sum_j c_j p_j (the softmax Jacobian applied to c).
#pragma once

#include <cmath>
#include <cstdint>

#ifndef EFFSEG_HD
#if defined(__CUDACC__)
#define EFFSEG_HD __host__ __device__ __forceinline__
#else
#define EFFSEG_HD inline
#endif
#endif

namespace effseg {
namespace dice_ce {

// Overloads that resolve to the float or double libm/CUDA function on either device.
EFFSEG_HD float e_exp(float v) { return expf(v); }
EFFSEG_HD double e_exp(double v) { return exp(v); }
EFFSEG_HD float e_log(float v) { return logf(v); }
EFFSEG_HD double e_log(double v) { return log(v); }

// What a voxel's label says: its class in [0, K), or one of these (negative) codes.
constexpr int64_t kIgnored = -1;  // label == ignore_index: left out of every sum
constexpr int64_t kInvalid = -2;  // outside [0, K) and not ignore_index: an error, never an index

// ignore_index wins over a valid class, like torch.nn.functional.cross_entropy. Every kernel
// indexes logits and weights with the result only when it is >= 0, so a bad label can never
// address memory outside the voxel's K logits.
EFFSEG_HD int64_t label_class(int64_t y, int64_t K, int64_t ignore_index) {
  if (y == ignore_index) return kIgnored;
  return (y >= 0 && y < K) ? y : kInvalid;
}

// e_k = exp(z_k - m): at most 1 for the maximum m, so the sum cannot overflow.
template <typename acc_t> EFFSEG_HD acc_t softmax_exp(acc_t z, acc_t max) {
  return e_exp(z - max);
}

// -log p_y = log(s) - (z_y - m), from the voxel's maximum and exp-sum.
template <typename acc_t> EFFSEG_HD acc_t nll(acc_t z_y, acc_t max, acc_t sum) {
  return e_log(sum) - (z_y - max);
}

// Maximum, exp-sum and sum_k c_k e_k of one voxel's logits in one pass (Milakov and Gimelshein's
// online normalizer): when a larger logit arrives, what was summed so far is rescaled to the new
// maximum. Seeded with the first logit, so -inf logits give 0 and NaN propagates. The CUDA
// kernels use it (one thread per voxel, with no room to keep the e_k for a later pass); the CPU
// kernels instead take the maximum first and keep every e_k of a cache-resident tile, so each
// logit costs one exp where the online form plus a later pass would cost two.
template <typename acc_t> struct OnlineSoftmax {
  acc_t max;
  acc_t sum;
  acc_t dot;
  OnlineSoftmax() = default;  // so that a kernel can hold one per voxel of a vector in an array
  EFFSEG_HD OnlineSoftmax(acc_t z0, acc_t c0) : max(z0), sum(acc_t(1)), dot(c0) {}
  EFFSEG_HD void push(acc_t z, acc_t c) {
    if (z > max) {
      const acc_t r = e_exp(max - z);
      sum = sum * r + acc_t(1);
      dot = dot * r + c;
      max = z;
    } else {
      const acc_t e = e_exp(z - max);
      sum += e;
      dot += c * e;
    }
  }
};

// The Dice part of dLoss/dp_k at a voxel: beta + [y == k] * alpha.
template <typename acc_t> EFFSEG_HD acc_t dice_coef(acc_t alpha, acc_t beta, bool is_label) {
  return is_label ? beta + alpha : beta;
}

// dLoss/dz_k at a voxel that is not ignored. ce_w = ce * w_y; c and cbar as in the notes above.
// Both already carry the incoming gradient.
template <typename acc_t>
EFFSEG_HD acc_t logit_grad(acc_t p, bool is_label, acc_t ce_w, acc_t c, acc_t cbar) {
  const acc_t onehot = is_label ? acc_t(1) : acc_t(0);
  return ce_w * (p - onehot) + p * (c - cbar);
}

// Forward sums of one (n, k) over a set of voxels. The count is an integer so that it stays exact
// beyond 2^24 voxels in float32.
template <typename acc_t> struct ClassSums {
  acc_t inter;
  acc_t prob;
  int64_t count;
};

template <typename acc_t>
EFFSEG_HD ClassSums<acc_t> merge(const ClassSums<acc_t>& a, const ClassSums<acc_t>& b) {
  return {a.inter + b.inter, a.prob + b.prob, a.count + b.count};
}

// Cross-entropy sums over a set of voxels, and how many of them had an invalid label.
template <typename acc_t> struct CeSums {
  acc_t wnll;
  acc_t w;
  int64_t invalid;
};

template <typename acc_t>
EFFSEG_HD CeSums<acc_t> merge(const CeSums<acc_t>& a, const CeSums<acc_t>& b) {
  return {a.wnll + b.wnll, a.w + b.w, a.invalid + b.invalid};
}

}  // namespace dice_ce
}  // namespace effseg
