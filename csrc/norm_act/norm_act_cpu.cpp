// CPU kernels of the norm-act ops: hand-written loops over the (N, C, S) view, parallel over
// blocks of a few thousand elements with at::parallel_for. Reductions are two-level: each block
// reduces its elements (inner loops written so the compiler can vectorize them: independent
// lanes for contiguous spans, the channel loop for channels-last rows), then the per-block
// results are merged in a fixed order, so results do not depend on the thread count.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "norm_act_ops.h"

namespace effseg {
namespace {

// Elements per block: small enough to stay in L1/L2 between the two passes of a block.
constexpr int64_t kBlock = 4096;
constexpr int kLanes = 8;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The block decomposition shared by every CPU kernel. Contiguous layout: block (n, c, k) is
// elements [k * kBlock, ...) of the span of sample n, channel c. Channels-last layout: block
// (n, k) is rows [k * R, ...) of sample n, each row holding the C channels of one voxel.
struct Blocks {
  Geometry g;
  int64_t rows_per_block;  // channels-last only
  int64_t P;               // blocks per span (contiguous) or per sample (channels-last)

  explicit Blocks(const Geometry& geo) : g(geo) {
    rows_per_block = std::max<int64_t>(1, kBlock / g.C);
    P = g.channels_last ? ceil_div(g.S, rows_per_block) : ceil_div(g.S, kBlock);
  }
  // Elements (contiguous) or rows (channels-last) in block k of a span / sample.
  int64_t length(int64_t k) const {
    const int64_t step = g.channels_last ? rows_per_block : kBlock;
    return std::min(step, g.S - k * step);
  }

  // span(n, c, k, offset, len) for contiguous; rows(n, k, offset, nrows) for channels-last.
  template <typename SpanFn, typename RowsFn>
  void run(const SpanFn& span, const RowsFn& rows) const {
    if (!g.channels_last) {
      at::parallel_for(0, g.N * g.C * P, 1, [&](int64_t begin, int64_t end) {
        for (int64_t t = begin; t < end; ++t) {
          const int64_t k = t % P, nc = t / P;
          span(nc / g.C, nc % g.C, k, nc * g.S + k * kBlock, length(k));
        }
      });
    } else {
      at::parallel_for(0, g.N * P, 1, [&](int64_t begin, int64_t end) {
        for (int64_t t = begin; t < end; ++t) {
          const int64_t n = t / P, k = t % P;
          rows(n, k, (n * g.S + k * rows_per_block) * g.C, length(k));
        }
      });
    }
  }
};

// Sum of f(i) for i in [0, len) over kLanes independent accumulators, which the compiler can
// keep in one vector register without reassociating floating-point additions.
template <typename acc_t, typename F> acc_t lane_sum(int64_t len, const F& f) {
  acc_t lane[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= len; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) lane[j] += f(i + j);
  }
  acc_t s = 0;
  for (; i < len; ++i) s += f(i);
  for (int j = 0; j < kLanes; ++j) s += lane[j];
  return s;
}

// Per-block partial results, stored [N][P][C] whatever the layout, with the element count of
// each block (the same for all channels of a block); `c` only when a third sum is asked for.
template <typename acc_t> struct Partials {
  std::vector<acc_t> a, b, c;
  std::vector<int64_t> count;
  Partials(const Blocks& bl, bool third = false)
      : a(bl.g.N * bl.P * bl.g.C), b(a.size()), c(third ? a.size() : 0), count(bl.g.N * bl.P) {
    for (int64_t n = 0; n < bl.g.N; ++n)
      for (int64_t k = 0; k < bl.P; ++k) count[n * bl.P + k] = bl.length(k);
  }
  int64_t index(const Blocks& bl, int64_t n, int64_t k, int64_t c) const {
    return (n * bl.P + k) * bl.g.C + c;
  }
};

// 1/gamma (clamped) and beta of each channel, which turn y back into xhat.
template <typename acc_t>
std::vector<Affine<acc_t>> channel_affine(const at::Tensor& gamma, const at::Tensor& beta) {
  const acc_t *gp = gamma.const_data_ptr<acc_t>(), *bp = beta.const_data_ptr<acc_t>();
  std::vector<Affine<acc_t>> af(gamma.numel());
  for (size_t c = 0; c < af.size(); ++c) af[c] = {acc_t(1) / clamp_gamma(gp[c]), bp[c]};
  return af;
}

// The activation parameter of each channel: PReLU's own slopes, or the one parameter.
template <typename acc_t>
std::vector<ActParam<acc_t>> channel_act(const at::Tensor& slope, double param, int64_t C) {
  std::vector<ActParam<acc_t>> ap;
  ap.reserve(C);
  const acc_t* sp = slope.defined() ? slope.const_data_ptr<acc_t>() : nullptr;
  for (int64_t c = 0; c < C; ++c) ap.emplace_back(sp ? sp[c] : acc_t(param));
  return ap;
}

// The channels-last row loops run over the C channels of a voxel innermost. They read their
// per-channel constants from one plain array per field through restrict-qualified pointers, and
// rebuild the small structs of norm_act_math.h in registers: with arrays of structs, which a
// store into the tensor might alias, the compiler neither vectorizes the channel loop nor keeps
// the constants out of memory.
template <typename acc_t> struct ActArrays {
  std::vector<acc_t> p, inv;
  explicit ActArrays(const std::vector<ActParam<acc_t>>& ap) : p(ap.size()), inv(ap.size()) {
    for (size_t c = 0; c < ap.size(); ++c) {
      p[c] = ap[c].p;
      inv[c] = ap[c].inv;
    }
  }
};

template <typename acc_t> EFFSEG_HD ActParam<acc_t> act_at(const acc_t* __restrict__ p,
                                                           const acc_t* __restrict__ inv,
                                                           int64_t c) {
  ActParam<acc_t> a;
  a.p = p[c];
  a.inv = inv[c];
  return a;
}

// Merges the partials of each group in a fixed order: group g is channel g % C, over all samples
// (per_sample false) or sample g / C only. entry(idx, n, k) builds one partial; finish(g, acc)
// stores the merged result.
template <typename acc_t, typename Acc, typename Entry, typename Finish>
void merge_groups(const Blocks& bl, bool per_sample, const Entry& entry, const Finish& finish) {
  const Geometry& g = bl.g;
  at::parallel_for(0, g.groups(per_sample), 1, [&](int64_t begin, int64_t end) {
    for (int64_t gi = begin; gi < end; ++gi) {
      const int64_t c = gi % g.C;
      const int64_t n0 = per_sample ? gi / g.C : 0, n1 = per_sample ? n0 + 1 : g.N;
      Acc acc{};
      for (int64_t n = n0; n < n1; ++n)
        for (int64_t k = 0; k < bl.P; ++k) acc = merge(acc, entry((n * bl.P + k) * g.C + c, n, k));
      finish(gi, acc);
    }
  });
}

template <typename scalar_t> void stats_kernel(const at::Tensor& x, const StatsArgs& a) {
  using acc_t = at::opmath_type<scalar_t>;
  const Geometry& g = a.g;
  const Blocks bl(g);
  Partials<acc_t> part(bl);
  const scalar_t* xp = x.const_data_ptr<scalar_t>();
  bl.run(
      [&](int64_t n, int64_t c, int64_t k, int64_t off, int64_t len) {
        const scalar_t* p = xp + off;
        const acc_t m = lane_sum<acc_t>(len, [&](int64_t i) { return acc_t(p[i]); }) / acc_t(len);
        const acc_t m2 = lane_sum<acc_t>(len, [&](int64_t i) {
          const acc_t d = acc_t(p[i]) - m;
          return d * d;
        });
        const int64_t idx = part.index(bl, n, k, c);
        part.a[idx] = m;
        part.b[idx] = m2;
      },
      [&](int64_t n, int64_t k, int64_t off, int64_t rows) {
        const scalar_t* __restrict__ p = xp + off;
        acc_t* __restrict__ m = part.a.data() + part.index(bl, n, k, 0);
        acc_t* __restrict__ m2 = part.b.data() + part.index(bl, n, k, 0);
        const int64_t C = g.C;
        std::fill(m, m + C, acc_t(0));
        std::fill(m2, m2 + C, acc_t(0));
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t c = 0; c < C; ++c) m[c] += acc_t(p[r * C + c]);
        for (int64_t c = 0; c < C; ++c) m[c] /= acc_t(rows);
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t c = 0; c < C; ++c) {
            const acc_t d = acc_t(p[r * C + c]) - m[c];
            m2[c] += d * d;
          }
      });
  acc_t* mp = a.mean.data_ptr<acc_t>();
  acc_t* vp = a.var.data_ptr<acc_t>();
  merge_groups<acc_t, Moments<acc_t>>(
      bl, a.per_sample,
      [&](int64_t idx, int64_t n, int64_t k) {
        return Moments<acc_t>{part.count[n * bl.P + k], part.a[idx], part.b[idx]};
      },
      [&](int64_t gi, const Moments<acc_t>& m) {
        mp[gi] = m.mean;
        vp[gi] = m.m2 / acc_t(m.n);
      });
}

template <typename scalar_t, Act A> void forward_kernel(at::Tensor& x, const ForwardArgs& a) {
  using acc_t = at::opmath_type<scalar_t>;
  const Geometry& g = a.g;
  const bool per_sample = a.per_sample;
  const int64_t G = g.groups(per_sample);
  std::vector<ForwardCoef<acc_t>> coef(G);
  const acc_t *mp = a.mean.const_data_ptr<acc_t>(), *vp = a.var.const_data_ptr<acc_t>();
  const acc_t *gp = a.gamma.const_data_ptr<acc_t>(), *bp = a.beta.const_data_ptr<acc_t>();
  for (int64_t gi = 0; gi < G; ++gi)
    coef[gi] = forward_coef<acc_t>(mp[gi], vp[gi], gp[gi % g.C], bp[gi % g.C], acc_t(a.eps));
  const std::vector<ActParam<acc_t>> ap = channel_act<acc_t>(a.slope, a.param, g.C);
  const ActArrays<acc_t> aa(ap);
  std::vector<acc_t> scale(G), shift(G);
  for (int64_t gi = 0; gi < G; ++gi) {
    scale[gi] = coef[gi].scale;
    shift[gi] = coef[gi].shift;
  }
  scalar_t* xp = x.data_ptr<scalar_t>();
  Blocks(g).run(
      [&](int64_t n, int64_t c, int64_t, int64_t off, int64_t len) {
        const ForwardCoef<acc_t> cf = coef[per_sample ? n * g.C + c : c];
        const ActParam<acc_t> prm = ap[c];
        scalar_t* p = xp + off;
        for (int64_t i = 0; i < len; ++i) p[i] = scalar_t(forward_value<A>(acc_t(p[i]), cf, prm));
      },
      [&](int64_t n, int64_t, int64_t off, int64_t rows) {
        const int64_t C = g.C, base = per_sample ? n * C : 0;
        const acc_t *__restrict__ sc = scale.data() + base, *__restrict__ sh = shift.data() + base;
        const acc_t *__restrict__ pp = aa.p.data(), *__restrict__ pi = aa.inv.data();
        scalar_t* __restrict__ p = xp + off;
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t c = 0; c < C; ++c)
            p[r * C + c] = scalar_t(forward_value<A>(acc_t(p[r * C + c]),
                                                     ForwardCoef<acc_t>{sc[c], sh[c]},
                                                     act_at(pp, pi, c)));
      });
}

// Channels-last rows of one block: per channel sum(dz), sum(dz * xhat) and, kSlope, the PReLU
// slope's sum(dy * z) over z <= 0. A template flag rather than a test per element, so that the
// loop without the slope stays as it was.
template <bool kSlope, Act A, typename scalar_t, typename acc_t>
void reduce_rows(const scalar_t* __restrict__ yb, const scalar_t* __restrict__ db, int64_t rows,
                 int64_t C, const acc_t* __restrict__ ig, const acc_t* __restrict__ be,
                 const acc_t* __restrict__ pp, const acc_t* __restrict__ pi,
                 acc_t* __restrict__ s1, acc_t* __restrict__ s2, acc_t* __restrict__ s3) {
  std::fill(s1, s1 + C, acc_t(0));
  std::fill(s2, s2 + C, acc_t(0));
  if constexpr (kSlope) std::fill(s3, s3 + C, acc_t(0));
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < C; ++c) {
      const acc_t y = acc_t(yb[r * C + c]), dy = acc_t(db[r * C + c]);
      const ActParam<acc_t> ap = act_at(pp, pi, c);
      acc_t dz, xhat;
      recover<A>(y, dy, Affine<acc_t>{ig[c], be[c]}, ap, dz, xhat);
      s1[c] += dz;
      s2[c] += dz * xhat;
      if constexpr (kSlope) s3[c] += slope_grad_term(y, dy, ap);
    }
}

// Affine constants as one array per field (see ActArrays).
template <typename acc_t> struct AffineArrays {
  std::vector<acc_t> inv_gamma, beta;
  explicit AffineArrays(const std::vector<Affine<acc_t>>& af)
      : inv_gamma(af.size()), beta(af.size()) {
    for (size_t c = 0; c < af.size(); ++c) {
      inv_gamma[c] = af[c].inv_gamma;
      beta[c] = af[c].beta;
    }
  }
};

template <typename scalar_t, Act A>
void backward_reduce_kernel(const at::Tensor& y, const at::Tensor& dy, const ReduceArgs& ra) {
  using acc_t = at::opmath_type<scalar_t>;
  const Geometry& g = ra.g;
  const std::vector<Affine<acc_t>> af = channel_affine<acc_t>(ra.gamma, ra.beta);
  const std::vector<ActParam<acc_t>> ap = channel_act<acc_t>(ra.slope, ra.param, g.C);
  const bool slope = ra.sum_dy_z.defined();
  const scalar_t *yp = y.const_data_ptr<scalar_t>(), *dyp = dy.const_data_ptr<scalar_t>();
  const Blocks bl(g);
  Partials<acc_t> part(bl, slope);
  const AffineArrays<acc_t> afa(af);
  const ActArrays<acc_t> aa(ap);
  bl.run(
      [&](int64_t n, int64_t c, int64_t k, int64_t off, int64_t len) {
        // Values, not references into shared state, inside the element loops: then the
        // compiler can keep them in registers and vectorize.
        const Affine<acc_t> a = af[c];
        const ActParam<acc_t> p = ap[c];
        const scalar_t *yb = yp + off, *db = dyp + off;
        const int64_t idx = part.index(bl, n, k, c);
        // Two (three) passes over a cache-resident block: each sum vectorizes on its own.
        part.a[idx] = lane_sum<acc_t>(len, [=](int64_t i) {
          return acc_t(db[i]) * Activation<A, acc_t>::derivative(acc_t(yb[i]), p);
        });
        part.b[idx] = lane_sum<acc_t>(len, [=](int64_t i) {
          acc_t dz, xhat;
          recover<A>(acc_t(yb[i]), acc_t(db[i]), a, p, dz, xhat);
          return dz * xhat;
        });
        if (slope)
          part.c[idx] = lane_sum<acc_t>(
              len, [=](int64_t i) { return slope_grad_term(acc_t(yb[i]), acc_t(db[i]), p); });
      },
      [&](int64_t n, int64_t k, int64_t off, int64_t rows) {
        const int64_t idx = part.index(bl, n, k, 0);
        if (slope)
          reduce_rows<true, A>(yp + off, dyp + off, rows, g.C, afa.inv_gamma.data(),
                               afa.beta.data(), aa.p.data(), aa.inv.data(), part.a.data() + idx,
                               part.b.data() + idx, part.c.data() + idx);
        else
          reduce_rows<false, A>(yp + off, dyp + off, rows, g.C, afa.inv_gamma.data(),
                                afa.beta.data(), aa.p.data(), aa.inv.data(), part.a.data() + idx,
                                part.b.data() + idx, (acc_t*)nullptr);
      });
  acc_t* s1p = ra.sum_dz.data_ptr<acc_t>();
  acc_t* s2p = ra.sum_dz_xhat.data_ptr<acc_t>();
  if (slope) {
    acc_t* s3p = ra.sum_dy_z.data_ptr<acc_t>();
    merge_groups<acc_t, SlopeGradSums<acc_t>>(
        bl, ra.per_sample,
        [&](int64_t idx, int64_t, int64_t) {
          return SlopeGradSums<acc_t>{part.a[idx], part.b[idx], part.c[idx]};
        },
        [&](int64_t gi, const SlopeGradSums<acc_t>& s) {
          s1p[gi] = s.dz;
          s2p[gi] = s.dz_xhat;
          s3p[gi] = s.dy_z;
        });
    return;
  }
  merge_groups<acc_t, GradSums<acc_t>>(
      bl, ra.per_sample,
      [&](int64_t idx, int64_t, int64_t) { return GradSums<acc_t>{part.a[idx], part.b[idx]}; },
      [&](int64_t gi, const GradSums<acc_t>& s) {
        s1p[gi] = s.dz;
        s2p[gi] = s.dz_xhat;
      });
}

template <typename scalar_t, Act A>
void backward_input_kernel(const at::Tensor& y, const at::Tensor& dy, const at::Tensor& dx,
                           const InputGradArgs& a) {
  using acc_t = at::opmath_type<scalar_t>;
  const Geometry& g = a.g;
  const int64_t G = g.groups(a.per_sample);
  const acc_t *vp = a.var.const_data_ptr<acc_t>(), *gp = a.gamma.const_data_ptr<acc_t>();
  const acc_t* s1 = a.batch_stats ? a.sum_dz.const_data_ptr<acc_t>() : nullptr;
  const acc_t* s2 = a.batch_stats ? a.sum_dz_xhat.const_data_ptr<acc_t>() : nullptr;
  std::vector<InputGradCoef<acc_t>> coef(G);
  for (int64_t gi = 0; gi < G; ++gi)
    coef[gi] = input_grad_coef<acc_t>(vp[gi], gp[gi % g.C], acc_t(a.eps), a.batch_stats,
                                      s1 ? s1[gi] : acc_t(0), s2 ? s2[gi] : acc_t(0),
                                      acc_t(a.count));
  const std::vector<Affine<acc_t>> af = channel_affine<acc_t>(a.gamma, a.beta);
  const std::vector<ActParam<acc_t>> ap = channel_act<acc_t>(a.slope, a.param, g.C);
  const AffineArrays<acc_t> afa(af);
  const ActArrays<acc_t> aa(ap);
  std::vector<acc_t> k1(G), k2(G), k3(G);
  for (int64_t gi = 0; gi < G; ++gi) {
    k1[gi] = coef[gi].k1;
    k2[gi] = coef[gi].k2;
    k3[gi] = coef[gi].k3;
  }
  const scalar_t *yp = y.const_data_ptr<scalar_t>(), *dyp = dy.const_data_ptr<scalar_t>();
  scalar_t* dxp = dx.data_ptr<scalar_t>();
  const bool ps = a.per_sample;
  Blocks(g).run(
      [&](int64_t n, int64_t c, int64_t, int64_t off, int64_t len) {
        const InputGradCoef<acc_t> k = coef[ps ? n * g.C + c : c];
        const Affine<acc_t> aff = af[c];
        const ActParam<acc_t> p = ap[c];
        for (int64_t i = off; i < off + len; ++i) {
          acc_t dz, xhat;
          recover<A>(acc_t(yp[i]), acc_t(dyp[i]), aff, p, dz, xhat);
          dxp[i] = scalar_t(input_grad_value(dz, xhat, k));
        }
      },
      [&](int64_t n, int64_t, int64_t off, int64_t rows) {
        const int64_t C = g.C, base = ps ? n * C : 0;
        const acc_t *__restrict__ c1 = k1.data() + base, *__restrict__ c2 = k2.data() + base,
                    *__restrict__ c3 = k3.data() + base;
        const acc_t *__restrict__ ig = afa.inv_gamma.data(), *__restrict__ be = afa.beta.data();
        const acc_t *__restrict__ pp = aa.p.data(), *__restrict__ pi = aa.inv.data();
        // dx may be dy itself (the in-place variant): the tensors' pointers are not restrict.
        const scalar_t *yb = yp + off, *db = dyp + off;
        scalar_t* xb = dxp + off;
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t c = 0; c < C; ++c) {
            const int64_t i = r * C + c;
            acc_t dz, xhat;
            recover<A>(acc_t(yb[i]), acc_t(db[i]), Affine<acc_t>{ig[c], be[c]},
                       act_at(pp, pi, c), dz, xhat);
            xb[i] = scalar_t(input_grad_value(dz, xhat, InputGradCoef<acc_t>{c1[c], c2[c], c3[c]}));
          }
      });
}

struct CpuKernels {
  static void stats(const at::Tensor& x, const StatsArgs& a) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "norm_stats_cpu",
                                    [&] { stats_kernel<scalar_t>(x, a); });
  }
  static void forward(at::Tensor& x, const ForwardArgs& a) {
    dispatch_dtype_activation(x.scalar_type(), a.act, [&]<typename scalar_t, Act A>() {
      forward_kernel<scalar_t, A>(x, a);
    });
  }
  static void backward_reduce(const at::Tensor& y, const at::Tensor& dy, const ReduceArgs& a) {
    dispatch_dtype_activation(y.scalar_type(), a.act, [&]<typename scalar_t, Act A>() {
                                backward_reduce_kernel<scalar_t, A>(y, dy, a);
                              });
  }
  static void backward_input(const at::Tensor& y, const at::Tensor& dy, const at::Tensor& dx,
                             const InputGradArgs& a) {
    dispatch_dtype_activation(y.scalar_type(), a.act, [&]<typename scalar_t, Act A>() {
                                backward_input_kernel<scalar_t, A>(y, dy, dx, a);
                              });
  }
};

}  // namespace

EFFSEG_REGISTER_NORM_ACT(CPU, CpuKernels)

}  // namespace effseg
