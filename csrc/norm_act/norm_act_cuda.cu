// CUDA kernels of the norm-act ops, written to stream the tensor at memory bandwidth.
//
// Every pass over the (N, C, S) data reads and writes 16 bytes per instruction (Vec: 4 floats,
// 8 halves, 2 doubles) wherever the pointers allow it, with kLoads independent vector loads
// issued before any arithmetic or store, so that each thread keeps several loads in flight.
// Elements before the first 16-byte boundary (the head) and after the last whole vector (the
// tail) are handled one at a time. When two pointers of one pass are not congruent modulo 16
// bytes (a tensor sliced at an odd offset) the whole pass runs element by element.
//
// Elementwise passes (forward apply, backward to the input): a tiny kernel first computes each
// group's coefficients (scale and shift; dx's k1, k2, k3 and the inverse affine map) into a [G]
// buffer, so that the streaming kernel is pure per-element math. The data is a set of segments,
// each a flat array whose element e has channel e % P:
// - contiguous [N][C][S]: one segment per (n, c), P = 1 (one coefficient set per segment);
// - channels-last [N][S][C]: one segment per sample (instance statistics) or one for the whole
//   batch, P = C. A vector covers V consecutive elements, so consecutive channels, wrapping
//   around C. The grid's active threads T are a multiple of P / gcd(P, V), so that thread t's
//   vectors (t, t + T, ...) start at the same channel every time: a thread loads its V
//   channels' coefficients once into registers, for any C.
// In place (forward, and backward with dx = dy) every element is read and written by the same
// thread, and all of a thread's loads of an unrolled step come before its stores; inputs that
// are never written (y in backward, every input of a reduction) are read through the read-only
// cache.
//
// Reductions (statistics, backward sums) are split over many blocks, each writing a partial
// result, and a second kernel merges the partials of each group in a fixed order (no atomics,
// so results are deterministic). Accumulation is in float32 (float64 for double).
// - contiguous [N][C][S]: block b handles kSpan elements of one (n, c) span: p = b % P, nc = b / P;
// - channels-last [N][S][C]: a block handles `rows` consecutive voxels of one sample and a tile
//   of Lx channel vectors (V channels each when C is a multiple of V and the data is aligned,
//   else 1): Lx x Ly threads, Lx = the tile's vectors (at most kMaxLx), Ly = kThreads / Lx
//   rows at a time, so that every lane of the block works whatever C is (C = 16 in bfloat16 is
//   2 vectors per row: 128 rows at a time).
// Partial results are stored [N][P][C] for both layouts.
#include <cstdint>
#include <limits>
#include <numeric>
#include <type_traits>

#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "cuda_vec.h"
#include "norm_act_ops.h"

namespace effseg {
namespace {

constexpr int kThreads = 256;    // threads per block, a power of two
constexpr int kMinBlocks = 2;    // streaming kernels: 2 blocks per SM, at most 128 registers
constexpr int kLoads = 4;        // independent 16-byte loads in flight per thread ...
template <int kIn>
constexpr int kUnroll = kLoads / kIn;  // ... over kIn inputs: vectors per input and step
constexpr int64_t kSpan = 8192;  // contiguous reductions: elements per block
constexpr int kMaxLx = 64;       // channels-last reductions: most channel vectors per tile
constexpr int64_t kRows = 64;    // channels-last reductions: fewest rows per block
constexpr int kBlocksPerSm = 8;  // resident blocks of kThreads per SM (2048 threads) ...
constexpr int kWaves = 2;        // ... times this many waves: the size of a streaming grid
#ifndef EFFSEG_CUDA_MAX_ROW_BLOCKS  // the CPU emulator's tests lower it to reach large `rows`
#define EFFSEG_CUDA_MAX_ROW_BLOCKS 1024
#endif
constexpr int64_t kMaxRowBlocks = EFFSEG_CUDA_MAX_ROW_BLOCKS;  // channels-last: most row blocks
                                                               // per sample

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

int64_t sm_count() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }

// A 1-D grid holds at most 2^31 - 1 blocks; a launch would silently narrow a larger count.
void check_grid(int64_t blocks, const Geometry& g) {
  TORCH_CHECK_VALUE(blocks <= std::numeric_limits<int32_t>::max(),
                    "effseg: input too large for one launch (N=", g.N, ", C=", g.C, ", S=", g.S,
                    " needs ", blocks, " blocks)");
}

// The tensor inputs of a pass.
template <typename scalar_t, int kIn> struct Inputs {
  const scalar_t* p[kIn];
};

template <typename scalar_t, int kIn>
__device__ void load_values(const Inputs<scalar_t, kIn>& in, int64_t e,
                            at::opmath_type<scalar_t> (&v)[kIn]) {
#pragma unroll
  for (int i = 0; i < kIn; ++i) v[i] = at::opmath_type<scalar_t>(in.p[i][e]);
}

// Tree reduction over the first `count` entries of `smem` with stride `stride`, into smem[0]; any
// count (a power of two or not), a fixed order of merges. Every thread of the block calls it.
template <typename Acc>
__device__ void tree_reduce(Acc* smem, int lane, int count, int stride) {
  int half = 1;
  while (half < count) half <<= 1;
  for (int s = half / 2; s > 0; s >>= 1) {
    __syncthreads();
    if (lane < s && lane + s < count)
      smem[lane * stride] = merge(smem[lane * stride], smem[(lane + s) * stride]);
  }
  __syncthreads();
}

// Reducers: what a thread accumulates (Local) from the values of one element of channel c, and
// what it hands to the block's tree of merges (Acc).
template <typename scalar_t, typename acc_t> struct StatsReducer {
  static constexpr int kIn = 1;
  using Acc = Moments<acc_t>;
  using Local = ShiftedSums<acc_t>;
  struct Chan {};
  __device__ Chan channel(int64_t) const { return {}; }
  __device__ void add(Local& a, const Chan&, const acc_t (&v)[kIn]) const { push(a, v[0]); }
  static __device__ Acc finish(const Local& a) { return moments(a); }
};

// Each channel's activation parameter: PReLU's own slope (kSlope), or the op's one parameter.
template <typename acc_t, bool kSlope> struct ChanAct {
  ActParam<acc_t> p;
  __device__ const ActParam<acc_t>& get(const ActParam<acc_t>&) const { return p; }
  __device__ void set(const acc_t* slope, int64_t c) { p = ActParam<acc_t>(slope[c]); }
};
template <typename acc_t> struct ChanAct<acc_t, false> {
  __device__ const ActParam<acc_t>& get(const ActParam<acc_t>& uniform) const { return uniform; }
  __device__ void set(const acc_t*, int64_t) {}
};

// Backward sums (inputs y, dy); kSlope adds PReLU's sum(dy * z) over z <= 0 (SlopeGradSums).
template <typename scalar_t, typename acc_t, Act A, bool kSlope> struct GradReducer {
  static constexpr int kIn = 2;
  using Acc = std::conditional_t<kSlope, SlopeGradSums<acc_t>, GradSums<acc_t>>;
  using Local = Acc;
  struct Chan {
    Affine<acc_t> af;
    ChanAct<acc_t, kSlope> act;
  };
  const acc_t* gamma;
  const acc_t* beta;
  ActParam<acc_t> param;
  const acc_t* slope;  // PReLU: (C,), else null
  __device__ Chan channel(int64_t c) const {
    Chan ch;
    ch.af = {acc_t(1) / clamp_gamma(gamma[c]), beta[c]};
    ch.act.set(slope, c);
    return ch;
  }
  __device__ void add(Acc& a, const Chan& ch, const acc_t (&v)[kIn]) const {
    acc_t dz, xhat;
    const ActParam<acc_t>& p = ch.act.get(param);
    recover<A>(v[0], v[1], ch.af, p, dz, xhat);
    a.dz += dz;
    a.dz_xhat += dz * xhat;
    if constexpr (kSlope) a.dy_z += slope_grad_term(v[0], v[1], p);
  }
  static __device__ Acc finish(const Local& a) { return a; }
};

template <typename R, typename scalar_t>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    reduce_contiguous_kernel(R r, Inputs<scalar_t, R::kIn> in, typename R::Acc* part,
                             int64_t C, int64_t S, int64_t P, bool vec) {
  using Acc = typename R::Acc;
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int V = Vec<scalar_t>::kSize, kIn = R::kIn;
  __shared__ Acc smem[kThreads];
  const int64_t p = blockIdx.x % P, nc = blockIdx.x / P, c = nc % C, n = nc / C;
  const int64_t begin = nc * S + p * kSpan, len = min(kSpan, S - p * kSpan);
  const auto chan = r.channel(c);
  typename R::Local acc{};
  const int64_t h = vec ? min(head_elements(in.p[0] + begin), len) : len;
  const int64_t Q = (len - h) / V, tail = h + Q * V;
  for (int64_t k = threadIdx.x; k < h + len - tail; k += kThreads) {
    acc_t v[kIn];
    load_values(in, begin + (k < h ? k : tail + (k - h)), v);
    r.add(acc, chan, v);
  }
  const int64_t first = begin + h;
  for (int64_t q = threadIdx.x; q < Q; q += kUnroll<kIn> * kThreads) {
    Vec<scalar_t> a[kUnroll<kIn>][kIn];
#pragma unroll
    for (int u = 0; u < kUnroll<kIn>; ++u) {
      if (q + u * kThreads < Q) {
#pragma unroll
        for (int i = 0; i < kIn; ++i)
          a[u][i] = load_vec_ro(in.p[i] + first + (q + u * kThreads) * V);
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll<kIn>; ++u) {
      if (q + u * kThreads < Q) {
#pragma unroll
        for (int j = 0; j < V; ++j) {
          acc_t v[kIn];
#pragma unroll
          for (int i = 0; i < kIn; ++i) v[i] = acc_t(a[u][i].v[j]);
          r.add(acc, chan, v);
        }
      }
    }
  }
  smem[threadIdx.x] = R::finish(acc);
  tree_reduce(smem, threadIdx.x, kThreads, 1);
  if (threadIdx.x == 0) part[(n * P + p) * C + c] = smem[0];
}

// The channels-last reduction's decomposition (see the top of the file).
struct RowTiling {
  int64_t C, S;
  int64_t P;     // row blocks per sample
  int64_t rows;  // rows per block
  int64_t tiles;
  int vw;  // channels per lane: V (C a multiple of V, aligned data) or 1
  int W;   // channel vectors per row
  int Lx;  // channel vectors per tile
  int Ly;  // rows at a time
};

template <typename R, typename scalar_t>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    reduce_channels_last_kernel(R r, Inputs<scalar_t, R::kIn> in, typename R::Acc* part,
                                RowTiling t) {
  using Acc = typename R::Acc;
  using acc_t = at::opmath_type<scalar_t>;
  constexpr int V = Vec<scalar_t>::kSize, kIn = R::kIn;
  __shared__ Acc smem[kThreads];
  const int tx = threadIdx.x % t.Lx, ty = threadIdx.x / t.Lx;
  int64_t b = blockIdx.x;
  const int64_t tile = b % t.tiles;
  b /= t.tiles;
  const int64_t p = b % t.P, n = b / t.P;
  const int64_t w = tile * t.Lx + tx, c0 = w * t.vw;
  const bool active = ty < t.Ly && w < t.W;
  const int64_t r0 = p * t.rows, r1 = min(r0 + t.rows, t.S);
  typename R::Local acc[V] = {};
  if (active && t.vw == V) {
    typename R::Chan ch[V];
#pragma unroll
    for (int j = 0; j < V; ++j) ch[j] = r.channel(c0 + j);
    for (int64_t row = r0 + ty; row < r1; row += kUnroll<kIn> * t.Ly) {
      Vec<scalar_t> a[kUnroll<kIn>][kIn];
#pragma unroll
      for (int u = 0; u < kUnroll<kIn>; ++u) {
        const int64_t ru = row + u * t.Ly;
        if (ru < r1) {
#pragma unroll
          for (int i = 0; i < kIn; ++i)
            a[u][i] = load_vec_ro(in.p[i] + (n * t.S + ru) * t.C + c0);
        }
      }
#pragma unroll
      for (int u = 0; u < kUnroll<kIn>; ++u) {
        if (row + u * t.Ly < r1) {
#pragma unroll
          for (int j = 0; j < V; ++j) {
            acc_t v[kIn];
#pragma unroll
            for (int i = 0; i < kIn; ++i) v[i] = acc_t(a[u][i].v[j]);
            r.add(acc[j], ch[j], v);
          }
        }
      }
    }
  } else if (active) {
    const auto ch = r.channel(c0);
    for (int64_t row = r0 + ty; row < r1; row += t.Ly) {
      acc_t v[kIn];
      load_values(in, (n * t.S + row) * t.C + c0, v);
      r.add(acc[0], ch, v);
    }
  }
  // One tree per channel of the lane's vector: t.vw is the same for the whole block.
#pragma unroll
  for (int j = 0; j < V; ++j) {
    if (j < t.vw) {
      smem[threadIdx.x] = R::finish(acc[j]);
      tree_reduce(smem + tx, ty, t.Ly, t.Lx);
      if (ty == 0 && w < t.W) part[(n * t.P + p) * t.C + c0 + j] = smem[tx];
    }
  }
}

// Merges the partials [N][P][C] of group g (channel g % C over all samples, or of sample g / C).
template <typename Acc, typename Finish>
__global__ void __launch_bounds__(kThreads)
    merge_kernel(const Acc* part, int64_t N, int64_t P, int64_t C, bool per_sample,
                 Finish finish) {
  __shared__ Acc smem[kThreads];
  const int64_t g = blockIdx.x, c = g % C;
  const int64_t n0 = per_sample ? g / C : 0, total = (per_sample ? 1 : N) * P;
  Acc acc{};
  for (int64_t e = threadIdx.x; e < total; e += kThreads)
    acc = merge(acc, part[((n0 + e / P) * P + e % P) * C + c]);
  smem[threadIdx.x] = acc;
  tree_reduce(smem, threadIdx.x, kThreads, 1);
  if (threadIdx.x == 0) finish(g, smem[0]);
}

template <typename acc_t> struct StatsFinish {
  acc_t* mean;
  acc_t* var;
  __device__ void operator()(int64_t g, const Moments<acc_t>& m) const {
    mean[g] = m.mean;
    var[g] = m.m2 / acc_t(m.n);
  }
};

template <typename acc_t> struct SumsFinish {
  acc_t* sum_dz;
  acc_t* sum_dz_xhat;
  acc_t* sum_dy_z;  // PReLU only
  __device__ void operator()(int64_t g, const GradSums<acc_t>& s) const {
    sum_dz[g] = s.dz;
    sum_dz_xhat[g] = s.dz_xhat;
  }
  __device__ void operator()(int64_t g, const SlopeGradSums<acc_t>& s) const {
    sum_dz[g] = s.dz;
    sum_dz_xhat[g] = s.dz_xhat;
    sum_dy_z[g] = s.dy_z;
  }
};

template <typename scalar_t> RowTiling row_tiling(const Geometry& g, bool vec) {
  constexpr int V = Vec<scalar_t>::kSize;
  RowTiling t;
  t.C = g.C;
  t.S = g.S;
  t.vw = vec && g.C % V == 0 ? V : 1;
  TORCH_CHECK_VALUE(g.C / t.vw <= std::numeric_limits<int32_t>::max(),
                    "effseg: too many channels (", g.C, ")");
  t.W = int(g.C / t.vw);
  t.tiles = ceil_div(t.W, kMaxLx);
  t.Lx = int(ceil_div(t.W, t.tiles));
  t.Ly = kThreads / t.Lx;
  // Enough blocks to fill the device a few times over, at least kRows rows each, and at most
  // kMaxRowBlocks row blocks per sample so that the merge stays short.
  const int64_t target = sm_count() * kBlocksPerSm * kWaves;
  t.rows = std::max({kRows, ceil_div(g.N * g.S * t.tiles, target), ceil_div(g.S, kMaxRowBlocks)});
  t.P = ceil_div(g.S, t.rows);
  return t;
}

// Two-pass reduction of every group; `finish` stores each group's merged result.
template <typename R, typename scalar_t, typename Finish>
void reduce_groups(const at::Tensor& like, const Geometry& g, bool per_sample, const R& r,
                   const Inputs<scalar_t, R::kIn>& in, const Finish& finish) {
  using Acc = typename R::Acc;
  check_grid(g.groups(per_sample), g);
  const bool vec = congruent16({in.p[0], in.p[R::kIn - 1]});
  auto stream = at::cuda::getCurrentCUDAStream();
  int64_t P;
  at::Tensor buf;
  if (g.channels_last) {
    const RowTiling t = row_tiling<scalar_t>(g, aligned16({in.p[0], in.p[R::kIn - 1]}));
    P = t.P;
    check_grid(t.tiles * g.N * t.P, g);
    buf = at::empty({g.N * P * g.C * int64_t(sizeof(Acc))}, like.options().dtype(at::kByte));
    reduce_channels_last_kernel<<<t.tiles * g.N * t.P, kThreads, 0, stream>>>(
        r, in, reinterpret_cast<Acc*>(buf.data_ptr()), t);
  } else {
    P = ceil_div(g.S, kSpan);
    check_grid(g.N * g.C * P, g);
    buf = at::empty({g.N * P * g.C * int64_t(sizeof(Acc))}, like.options().dtype(at::kByte));
    reduce_contiguous_kernel<<<g.N * g.C * P, kThreads, 0, stream>>>(
        r, in, reinterpret_cast<Acc*>(buf.data_ptr()), g.C, g.S, P, vec);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  merge_kernel<<<g.groups(per_sample), kThreads, 0, stream>>>(
      reinterpret_cast<const Acc*>(buf.data_ptr()), g.N, P, g.C, per_sample, finish);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Elementwise ops: the coefficients of group g (g = n * C + c with instance statistics, else c)
// and the output value from one element's inputs.
// kReadOnly: how many leading inputs the pass never writes (read through the read-only cache).
template <typename scalar_t, typename acc_t, Act A, bool kSlope> struct ForwardOp {
  static constexpr int kIn = 1;
  static constexpr int kReadOnly = 0;  // x is written in place
  struct Coef {
    ForwardCoef<acc_t> k;
    ChanAct<acc_t, kSlope> act;
  };
  const acc_t* mean;
  const acc_t* var;
  const acc_t* gamma;
  const acc_t* beta;
  acc_t eps;
  ActParam<acc_t> param;
  const acc_t* slope;  // PReLU: (C,), else null
  int64_t C;
  __device__ Coef coef(int64_t g) const {
    const int64_t c = g % C;
    Coef k;
    k.k = forward_coef(mean[g], var[g], gamma[c], beta[c], eps);
    k.act.set(slope, c);
    return k;
  }
  __device__ acc_t value(const Coef& k, const acc_t (&v)[kIn]) const {
    return forward_value<A>(v[0], k.k, k.act.get(param));
  }
};

template <typename scalar_t, typename acc_t, Act A, bool kSlope> struct InputGradOp {
  static constexpr int kIn = 2;  // y, dy
  static constexpr int kReadOnly = 1;  // y; dx may be dy
  struct Coef {
    InputGradCoef<acc_t> k;
    Affine<acc_t> af;
    ChanAct<acc_t, kSlope> act;
  };
  const acc_t* var;
  const acc_t* gamma;
  const acc_t* beta;
  const acc_t* sum_dz;  // null with fixed statistics
  const acc_t* sum_dz_xhat;
  acc_t eps;
  ActParam<acc_t> param;
  const acc_t* slope;  // PReLU: (C,), else null
  acc_t count;
  int64_t C;
  __device__ Coef coef(int64_t g) const {
    const int64_t c = g % C;
    const bool batch = sum_dz != nullptr;
    Coef k;
    k.k = input_grad_coef(var[g], gamma[c], eps, batch, batch ? sum_dz[g] : acc_t(0),
                          batch ? sum_dz_xhat[g] : acc_t(0), count);
    k.af = {acc_t(1) / clamp_gamma(gamma[c]), beta[c]};
    k.act.set(slope, c);
    return k;
  }
  __device__ acc_t value(const Coef& k, const acc_t (&v)[kIn]) const {
    acc_t dz, xhat;
    recover<A>(v[0], v[1], k.af, k.act.get(param), dz, xhat);
    return input_grad_value(dz, xhat, k.k);
  }
};

template <typename Op>
__global__ void __launch_bounds__(kThreads)
    coef_kernel(Op op, typename Op::Coef* coef, int64_t groups) {
  const int64_t g = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (g < groups) coef[g] = op.coef(g);
}

// The segments of an elementwise pass (see the top of the file).
struct Segments {
  int64_t count, L;  // how many, and their length
  int64_t P;         // element e of a segment has channel e % P
  int64_t coef_mod, coef_stride;  // segment s reads coefficients from (s % coef_mod) * coef_stride
  int64_t T;                      // active threads, a multiple of P / gcd(P, V)
  bool vec;                       // the pointers are congruent modulo 16 bytes
};

template <typename Op, typename scalar_t, bool kChannelsLast>
__global__ void __launch_bounds__(kThreads, kMinBlocks)
    apply_kernel(Op op, const typename Op::Coef* coefs, Inputs<scalar_t, Op::kIn> in,
                 scalar_t* out, Segments sg) {
  using acc_t = at::opmath_type<scalar_t>;
  using Coef = typename Op::Coef;
  constexpr int V = Vec<scalar_t>::kSize, kIn = Op::kIn, kCoefs = kChannelsLast ? V : 1;
  const int64_t t = int64_t(blockIdx.x) * kThreads + threadIdx.x;
  if (t >= sg.T) return;
  for (int64_t s = blockIdx.y; s < sg.count; s += gridDim.y) {
    const int64_t base = s * sg.L;
    const Coef* k = coefs + s % sg.coef_mod * sg.coef_stride;
    const int64_t h = sg.vec ? min(head_elements(out + base), sg.L) : sg.L;
    const int64_t Q = (sg.L - h) / V, tail = h + Q * V;
    for (int64_t r = t; r < h + sg.L - tail; r += sg.T) {
      const int64_t e = r < h ? r : tail + (r - h);
      acc_t v[kIn];
      load_values(in, base + e, v);
      out[base + e] = scalar_t(op.value(k[kChannelsLast ? e % sg.P : 0], v));
    }
    if (t >= Q) continue;
    // This thread's vectors all start at channel c0 (T * V is a multiple of P).
    Coef kv[kCoefs];
    int64_t c = kChannelsLast ? (h + V * t) % sg.P : 0;
#pragma unroll
    for (int j = 0; j < kCoefs; ++j) {
      kv[j] = k[c];
      c = c + 1 == sg.P ? 0 : c + 1;
    }
    const int64_t first = base + h;
    for (int64_t q = t; q < Q; q += kUnroll<kIn> * sg.T) {
      Vec<scalar_t> a[kUnroll<kIn>][kIn];
#pragma unroll
      for (int u = 0; u < kUnroll<kIn>; ++u) {
        if (q + u * sg.T < Q) {
#pragma unroll
          for (int i = 0; i < kIn; ++i) {
            const scalar_t* p = in.p[i] + first + (q + u * sg.T) * V;
            a[u][i] = i < Op::kReadOnly ? load_vec_ro(p) : load_vec(p);
          }
        }
      }
#pragma unroll
      for (int u = 0; u < kUnroll<kIn>; ++u) {
        if (q + u * sg.T < Q) {
          Vec<scalar_t> o;
#pragma unroll
          for (int j = 0; j < V; ++j) {
            acc_t v[kIn];
#pragma unroll
            for (int i = 0; i < kIn; ++i) v[i] = acc_t(a[u][i].v[j]);
            o.v[j] = scalar_t(op.value(kv[kChannelsLast ? j : 0], v));
          }
          store_vec(out + first + (q + u * sg.T) * V, o);
        }
      }
    }
  }
}

template <typename Op, typename scalar_t>
void apply_elementwise(const at::Tensor& like, const Geometry& g, bool per_sample, const Op& op,
                       const Inputs<scalar_t, Op::kIn>& in, scalar_t* out) {
  using Coef = typename Op::Coef;
  constexpr int V = Vec<scalar_t>::kSize;
  const int64_t groups = g.groups(per_sample);
  auto stream = at::cuda::getCurrentCUDAStream();
  check_grid(ceil_div(groups, kThreads), g);
  at::Tensor buf = at::empty({groups * int64_t(sizeof(Coef))}, like.options().dtype(at::kByte));
  Coef* coefs = reinterpret_cast<Coef*>(buf.data_ptr());
  coef_kernel<<<ceil_div(groups, kThreads), kThreads, 0, stream>>>(op, coefs, groups);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  Segments sg;
  if (g.channels_last) {
    sg.count = per_sample ? g.N : 1;
    sg.L = (per_sample ? g.S : g.N * g.S) * g.C;
    sg.P = g.C;
    sg.coef_mod = sg.count;
    sg.coef_stride = g.C;
  } else {
    sg.count = g.N * g.C;
    sg.L = g.S;
    sg.P = 1;
    sg.coef_mod = groups;
    sg.coef_stride = 1;
  }
  sg.vec = congruent16({in.p[0], in.p[Op::kIn - 1], out});
  // Threads per segment for kUnroll vectors each, within a grid that fills the device a few
  // times over; a small tensor gets fewer vectors per thread rather than idle SMs (at least
  // kMinBlocks blocks per SM while there is a vector per thread); at least one thread per
  // distinct channel offset of a vector (U).
  const int64_t U = sg.P / std::gcd(sg.P, int64_t(V));
  const int64_t gy = std::min<int64_t>(sg.count, 65535);
  const int64_t sms = sm_count();
  const int64_t cap = std::max<int64_t>(1, sms * kBlocksPerSm * kWaves / gy);
  const int64_t per_step = int64_t(kThreads) * kUnroll<Op::kIn> * V;
  int64_t bx = std::min(ceil_div(sg.L, per_step), cap);
  bx = std::max(bx, std::min(ceil_div(sms * kMinBlocks, gy), ceil_div(sg.L, kThreads * V)));
  bx = std::max(bx, ceil_div(U, kThreads));
  check_grid(bx, g);
  sg.T = bx * kThreads / U * U;
  const dim3 grid(bx, gy);
  if (g.channels_last)
    apply_kernel<Op, scalar_t, true><<<grid, kThreads, 0, stream>>>(op, coefs, in, out, sg);
  else
    apply_kernel<Op, scalar_t, false><<<grid, kThreads, 0, stream>>>(op, coefs, in, out, sg);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename acc_t> const acc_t* slope_ptr(const at::Tensor& slope) {
  return slope.defined() ? slope.const_data_ptr<acc_t>() : nullptr;
}

// Calls f.template operator()<kSlope>() with whether a PReLU slope is given.
template <typename F> void dispatch_slope(const at::Tensor& slope, const F& f) {
  if (slope.defined())
    f.template operator()<true>();
  else
    f.template operator()<false>();
}

struct CudaKernels {
  static void stats(const at::Tensor& x, const StatsArgs& a) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "norm_stats", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      reduce_groups(x, a.g, a.per_sample, StatsReducer<scalar_t, acc_t>{},
                    Inputs<scalar_t, 1>{{x.const_data_ptr<scalar_t>()}},
                    StatsFinish<acc_t>{a.mean.data_ptr<acc_t>(), a.var.data_ptr<acc_t>()});
    });
  }

  static void forward(at::Tensor& x, const ForwardArgs& a) {
    dispatch_dtype_activation(x.scalar_type(), a.act, [&]<typename scalar_t, Act A>() {
      using acc_t = at::opmath_type<scalar_t>;
      dispatch_slope(a.slope, [&]<bool kSlope>() {
        if constexpr (!kSlope || A == Act::LeakyRelu) {
          scalar_t* px = x.data_ptr<scalar_t>();
          apply_elementwise(x, a.g, a.per_sample,
                            ForwardOp<scalar_t, acc_t, A, kSlope>{
                                a.mean.const_data_ptr<acc_t>(), a.var.const_data_ptr<acc_t>(),
                                a.gamma.const_data_ptr<acc_t>(), a.beta.const_data_ptr<acc_t>(),
                                acc_t(a.eps), ActParam<acc_t>(acc_t(a.param)),
                                slope_ptr<acc_t>(a.slope), a.g.C},
                            Inputs<scalar_t, 1>{{px}}, px);
        }
      });
    });
  }

  static void backward_reduce(const at::Tensor& y, const at::Tensor& dy, const ReduceArgs& a) {
    dispatch_dtype_activation(y.scalar_type(), a.act, [&]<typename scalar_t, Act A>() {
      using acc_t = at::opmath_type<scalar_t>;
      const SumsFinish<acc_t> finish{a.sum_dz.data_ptr<acc_t>(), a.sum_dz_xhat.data_ptr<acc_t>(),
                                     a.slope.defined() ? a.sum_dy_z.data_ptr<acc_t>() : nullptr};
      dispatch_slope(a.slope, [&]<bool kSlope>() {
        if constexpr (!kSlope || A == Act::LeakyRelu) {
          reduce_groups(y, a.g, a.per_sample,
                        GradReducer<scalar_t, acc_t, A, kSlope>{
                            a.gamma.const_data_ptr<acc_t>(), a.beta.const_data_ptr<acc_t>(),
                            ActParam<acc_t>(acc_t(a.param)), slope_ptr<acc_t>(a.slope)},
                        Inputs<scalar_t, 2>{{y.const_data_ptr<scalar_t>(),
                                             dy.const_data_ptr<scalar_t>()}},
                        finish);
        }
      });
    });
  }

  static void backward_input(const at::Tensor& y, const at::Tensor& dy, const at::Tensor& dx,
                             const InputGradArgs& a) {
    dispatch_dtype_activation(y.scalar_type(), a.act, [&]<typename scalar_t, Act A>() {
      using acc_t = at::opmath_type<scalar_t>;
      dispatch_slope(a.slope, [&]<bool kSlope>() {
        if constexpr (!kSlope || A == Act::LeakyRelu) {
          apply_elementwise(
              y, a.g, a.per_sample,
              InputGradOp<scalar_t, acc_t, A, kSlope>{
                  a.var.const_data_ptr<acc_t>(), a.gamma.const_data_ptr<acc_t>(),
                  a.beta.const_data_ptr<acc_t>(),
                  a.batch_stats ? a.sum_dz.const_data_ptr<acc_t>() : nullptr,
                  a.batch_stats ? a.sum_dz_xhat.const_data_ptr<acc_t>() : nullptr, acc_t(a.eps),
                  ActParam<acc_t>(acc_t(a.param)), slope_ptr<acc_t>(a.slope), acc_t(a.count),
                  a.g.C},
              Inputs<scalar_t, 2>{{y.const_data_ptr<scalar_t>(), dy.const_data_ptr<scalar_t>()}},
              dx.data_ptr<scalar_t>());
        }
      });
    });
  }
};

}  // namespace

EFFSEG_REGISTER_NORM_ACT(CUDA, CudaKernels)

}  // namespace effseg
