// CPU kernels of the dice_ce ops: hand-written loops over the (N, K, S) view of the logits
// (contiguous or channels-last, Geometry), parallel over tiles of voxels with at::parallel_for.
// A tile holds a few thousand logits, so it stays in L1/L2 across the passes each kernel makes
// over it (maximum, exponentials, sums or gradients), whichever way its logits are laid out; every
// inner loop runs over the tile's voxels. Each kernel is compiled twice: for a voxel stride of 1
// (contiguous logits: the loops read consecutive addresses and vectorize as before) and for any
// voxel stride (channels-last: the tile's K * voxels logits are one block of memory). Sums are two-level: each tile writes its own partial result and
// the partials are merged in a fixed order, so results do not depend on the thread count.
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "dice_ce_ops.h"

namespace effseg {
namespace dice_ce {
namespace {

constexpr int64_t kTileLogits = 8192;  // logits per tile (voxels * K): 32 KiB of float32
constexpr int64_t kMinTile = 16;       // voxels, for very many classes
constexpr int kLanes = 8;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Tile t covers voxels [v0, v0 + len) of sample n = t / per_sample.
struct Tiles {
  Geometry g;
  int64_t voxels;      // per tile
  int64_t per_sample;  // tiles per sample

  explicit Tiles(const Geometry& geo) : g(geo) {
    voxels = std::min(g.S, std::max(kMinTile, kTileLogits / g.K));
    per_sample = ceil_div(g.S, voxels);
  }
  int64_t count() const { return g.N * per_sample; }

  // f(t, n, v0, len, buffers) for every tile, with one set of scratch buffers per worker.
  template <typename Buffers, typename F> void run(const F& f) const {
    at::parallel_for(0, count(), 1, [&](int64_t begin, int64_t end) {
      Buffers buf(g.K, voxels);
      for (int64_t t = begin; t < end; ++t) {
        const int64_t n = t / per_sample, v0 = (t % per_sample) * voxels;
        f(t, n, v0, std::min(voxels, g.S - v0), buf);
      }
    });
  }
};

// Per-voxel scratch of one tile: the label's class (or a negative code), the maximum logit, the
// exp-sum (later its reciprocal), backward's ce_w and cbar (dice_ce_math.h), and e_k =
// exp(z_k - max) of every class ([K][voxels]), which later becomes p_k.
template <typename acc_t> struct Buffers {
  std::vector<int32_t> cls;
  std::vector<acc_t> max, sum, ce_w, cbar, e;
  Buffers(int64_t K, int64_t T) : cls(T), max(T), sum(T), ce_w(T), cbar(T), e(K * T) {}
};

// The voxel stride: a constant 1 for contiguous logits, so that their loops stay unit-stride.
template <bool kUnit> inline int64_t voxel_stride(const Geometry& g) { return kUnit ? 1 : g.sv; }

// Classes, maximum, e_k and exp-sum of the voxels [0, len) of one tile. z points at the tile's
// first voxel in class 0; class k is sk elements further on, voxel i is i * sv.
template <bool kUnit, typename scalar_t, typename label_t, typename acc_t>
void softmax_tile(const scalar_t* z, const label_t* y, int64_t len, const Geometry& g,
                  int64_t ignore_index, Buffers<acc_t>& b) {
  const int64_t sv = voxel_stride<kUnit>(g);
  int32_t* cls = b.cls.data();
  acc_t *m = b.max.data(), *s = b.sum.data();
  for (int64_t i = 0; i < len; ++i) cls[i] = int32_t(label_class(int64_t(y[i]), g.K, ignore_index));
  for (int64_t i = 0; i < len; ++i) m[i] = acc_t(z[i * sv]);
  for (int64_t k = 1; k < g.K; ++k) {
    const scalar_t* zk = z + k * g.sk;
    for (int64_t i = 0; i < len; ++i) {
      const acc_t v = acc_t(zk[i * sv]);
      m[i] = v > m[i] ? v : m[i];  // NaN never replaces the maximum; it propagates through e_k
    }
  }
  std::fill(s, s + len, acc_t(0));
  for (int64_t k = 0; k < g.K; ++k) {
    const scalar_t* zk = z + k * g.sk;
    acc_t* ek = b.e.data() + k * len;
    for (int64_t i = 0; i < len; ++i) {
      ek[i] = softmax_exp(acc_t(zk[i * sv]), m[i]);
      s[i] += ek[i];
    }
  }
}

template <bool kUnit, typename scalar_t, typename label_t>
void forward_kernel(const at::Tensor& logits, const at::Tensor& labels, const ForwardArgs& a) {
  using acc_t = at::opmath_type<scalar_t>;
  const Geometry& g = a.g;
  const int64_t sv = voxel_stride<kUnit>(g);
  const Tiles tiles(g);
  std::vector<ClassSums<acc_t>> class_part(tiles.count() * g.K);
  std::vector<CeSums<acc_t>> ce_part(tiles.count());
  const scalar_t* zp = logits.const_data_ptr<scalar_t>();
  const label_t* yp = labels.const_data_ptr<label_t>();
  const acc_t* wp = a.weight.const_data_ptr<acc_t>();
  tiles.run<Buffers<acc_t>>([&](int64_t t, int64_t n, int64_t v0, int64_t len,
                                Buffers<acc_t>& b) {
    const scalar_t* z = zp + n * g.sn + v0 * sv;
    softmax_tile<kUnit>(z, yp + n * g.S + v0, len, g, a.ignore_index, b);
    const int32_t* cls = b.cls.data();
    acc_t *m = b.max.data(), *s = b.sum.data();
    CeSums<acc_t> ce{};
    for (int64_t i = 0; i < len; ++i) {
      const int64_t c = cls[i];
      if (c >= 0) {
        ce.wnll += wp[c] * nll(acc_t(z[c * g.sk + i * sv]), m[i], s[i]);
        ce.w += wp[c];
      } else if (c == kInvalid) {
        ce.invalid += 1;
      }
    }
    ce_part[t] = ce;
    for (int64_t i = 0; i < len; ++i) s[i] = acc_t(1) / s[i];
    for (int32_t k = 0; k < int32_t(g.K); ++k) {
      const acc_t* ek = b.e.data() + k * len;
      // kLanes independent accumulators per sum: one vector register each, no reassociation.
      acc_t inter[kLanes] = {}, prob[kLanes] = {};
      int64_t count[kLanes] = {};
      int64_t i = 0;
      for (; i + kLanes <= len; i += kLanes) {
        for (int j = 0; j < kLanes; ++j) {
          const acc_t p = ek[i + j] * s[i + j];
          const int32_t c = cls[i + j];
          prob[j] += c >= 0 ? p : acc_t(0);
          inter[j] += c == k ? p : acc_t(0);
          count[j] += c == k;
        }
      }
      ClassSums<acc_t> sums{};
      for (; i < len; ++i) {
        const acc_t p = ek[i] * s[i];
        sums.prob += cls[i] >= 0 ? p : acc_t(0);
        sums.inter += cls[i] == k ? p : acc_t(0);
        sums.count += cls[i] == k;
      }
      for (int j = 0; j < kLanes; ++j) sums = merge(sums, ClassSums<acc_t>{inter[j], prob[j],
                                                                           count[j]});
      class_part[t * g.K + k] = sums;
    }
  });
  // Fixed-order merges: tiles of a sample in order for each (n, k), all tiles in order for CE.
  acc_t* stats = a.stats.data_ptr<acc_t>();
  at::parallel_for(0, g.N * g.K, 1, [&](int64_t begin, int64_t end) {
    for (int64_t nk = begin; nk < end; ++nk) {
      const int64_t n = nk / g.K, k = nk % g.K;
      ClassSums<acc_t> sums{};
      for (int64_t p = 0; p < tiles.per_sample; ++p)
        sums = merge(sums, class_part[(n * tiles.per_sample + p) * g.K + k]);
      stats[nk * 3 + 0] = sums.inter;
      stats[nk * 3 + 1] = sums.prob;
      stats[nk * 3 + 2] = acc_t(sums.count);
    }
  });
  CeSums<acc_t> ce{};
  for (const CeSums<acc_t>& part : ce_part) ce = merge(ce, part);
  acc_t* cep = a.ce.data_ptr<acc_t>();
  cep[0] = ce.wnll;
  cep[1] = ce.w;
  a.invalid.data_ptr<int64_t>()[0] = ce.invalid;
}

template <bool kUnit, typename scalar_t, typename label_t>
void backward_kernel(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& dz,
                     const BackwardArgs& a) {
  using acc_t = at::opmath_type<scalar_t>;
  const Geometry& g = a.g;
  const int64_t sv = voxel_stride<kUnit>(g);
  const acc_t grad = a.grad.const_data_ptr<acc_t>()[0];
  const acc_t ce_scale = grad * a.coef_ce.const_data_ptr<acc_t>()[0];
  // alpha and beta of every (n, k), times the incoming gradient, as [N][K] arrays.
  std::vector<acc_t> alpha(g.N * g.K), beta(g.N * g.K);
  const acc_t* cd = a.coef_dice.const_data_ptr<acc_t>();
  for (int64_t nk = 0; nk < g.N * g.K; ++nk) {
    alpha[nk] = grad * cd[nk * 2];
    beta[nk] = grad * cd[nk * 2 + 1];
  }
  const scalar_t* zp = logits.const_data_ptr<scalar_t>();
  const label_t* yp = labels.const_data_ptr<label_t>();
  const acc_t* wp = a.weight.const_data_ptr<acc_t>();
  scalar_t* dzp = dz.data_ptr<scalar_t>();
  Tiles(g).run<Buffers<acc_t>>([&](int64_t, int64_t n, int64_t v0, int64_t len,
                                   Buffers<acc_t>& b) {
    // dz has the logits' strides (dice_ce_ops.h), so one offset serves both.
    const int64_t base = n * g.sn + v0 * sv;
    softmax_tile<kUnit>(zp + base, yp + n * g.S + v0, len, g, a.ignore_index, b);
    const int32_t* cls = b.cls.data();
    acc_t *inv = b.sum.data(), *ce_w = b.ce_w.data(), *cbar = b.cbar.data();
    for (int64_t i = 0; i < len; ++i) {
      inv[i] = acc_t(1) / inv[i];
      // Ignored voxels (and invalid labels, which forward rejects) get no gradient; their class
      // is never used as an index.
      ce_w[i] = cls[i] >= 0 ? ce_scale * wp[cls[i]] : acc_t(0);
      cbar[i] = acc_t(0);
    }
    const acc_t *al = alpha.data() + n * g.K, *be = beta.data() + n * g.K;
    for (int32_t k = 0; k < int32_t(g.K); ++k) {
      acc_t* pk = b.e.data() + k * len;
      for (int64_t i = 0; i < len; ++i) {
        pk[i] *= inv[i];
        cbar[i] += dice_coef(al[k], be[k], cls[i] == k) * pk[i];
      }
    }
    for (int32_t k = 0; k < int32_t(g.K); ++k) {
      const acc_t* pk = b.e.data() + k * len;
      scalar_t* out = dzp + base + k * g.sk;
      for (int64_t i = 0; i < len; ++i) {
        const bool is_label = cls[i] == k;
        const acc_t d = logit_grad(pk[i], is_label, ce_w[i], dice_coef(al[k], be[k], is_label),
                                   cbar[i]);
        out[i * sv] = scalar_t(cls[i] >= 0 ? d : acc_t(0));
      }
    }
  });
}

struct CpuKernels {
  static void forward(const at::Tensor& logits, const at::Tensor& labels, const ForwardArgs& a) {
    dispatch_types(logits.scalar_type(), labels.scalar_type(),
                   [&]<typename scalar_t, typename label_t>() {
                     if (a.g.sv == 1)
                       forward_kernel<true, scalar_t, label_t>(logits, labels, a);
                     else
                       forward_kernel<false, scalar_t, label_t>(logits, labels, a);
                   });
  }
  static void backward(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& dz,
                       const BackwardArgs& a) {
    dispatch_types(logits.scalar_type(), labels.scalar_type(),
                   [&]<typename scalar_t, typename label_t>() {
                     if (a.g.sv == 1)
                       backward_kernel<true, scalar_t, label_t>(logits, labels, dz, a);
                     else
                       backward_kernel<false, scalar_t, label_t>(logits, labels, dz, a);
                   });
  }
};

}  // namespace

EFFSEG_REGISTER_DICE_CE(CPU, CpuKernels)

}  // namespace dice_ce
}  // namespace effseg
