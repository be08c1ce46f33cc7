// CUDA kernels of the norm-act ops. A 3D volume has few channels and millions of voxels, so no
// kernel gives a channel to one block: every reduction is split over many blocks, each writing a
// partial result, and a second kernel merges the partials of each group in a fixed order (no
// atomics, so results are deterministic). Accumulation is in float32 (float64 for double).
//
// Work decomposition, shared by all kernels:
// - contiguous [N][C][S]: block b handles kSpan elements of one (n, c) span: p = b % P, nc = b / P;
// - channels-last [N][S][C]: a block of kTileC x kRowThreads threads handles kTileC channels of
//   `rows` consecutive voxels of one sample (at least kRows, more for large volumes so that a
//   sample has at most kMaxRowBlocks row blocks and the merge stays short); threads of a warp
//   read consecutive channels.
// Partial results are stored [N][P][C] for both layouts.
#include <limits>
#include <type_traits>

#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "norm_act_ops.h"

namespace effseg {
namespace {

constexpr int kThreads = 256;          // threads per block, a power of two (tree reductions)
constexpr int64_t kSpan = 8192;        // contiguous: elements per block
constexpr int kTileC = 32;             // channels-last: channels per block (one warp)
constexpr int kRowThreads = kThreads / kTileC;
constexpr int64_t kRows = 256;         // channels-last: fewest rows per block
#ifndef EFFSEG_CUDA_MAX_ROW_BLOCKS  // the CPU emulator's tests lower it to reach large `rows`
#define EFFSEG_CUDA_MAX_ROW_BLOCKS 1024
#endif
constexpr int64_t kMaxRowBlocks = EFFSEG_CUDA_MAX_ROW_BLOCKS;  // channels-last: most row blocks
                                                               // per sample

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

struct Launch {
  Geometry g;
  int64_t P;      // blocks per span (contiguous) or per sample (channels-last)
  int64_t tiles;  // channel tiles (channels-last)
  int64_t rows;   // rows per block (channels-last), a multiple of kRowThreads

  explicit Launch(const Geometry& geo) : g(geo) {
    rows = std::max(kRows, ceil_div(ceil_div(g.S, kMaxRowBlocks), kRowThreads) * kRowThreads);
    P = g.channels_last ? ceil_div(g.S, rows) : ceil_div(g.S, kSpan);
    tiles = ceil_div(g.C, kTileC);
  }
  int64_t blocks() const { return g.channels_last ? tiles * g.N * P : g.N * g.C * P; }
  dim3 threads() const { return g.channels_last ? dim3(kTileC, kRowThreads) : dim3(kThreads); }
};

// A 1-D grid holds at most 2^31 - 1 blocks; a launch would silently narrow a larger count.
void check_grid(int64_t blocks, const Geometry& g) {
  TORCH_CHECK_VALUE(blocks <= std::numeric_limits<int32_t>::max(),
                    "effseg: input too large for one launch (N=", g.N, ", C=", g.C, ", S=", g.S,
                    " needs ", blocks, " blocks)");
}

// Decodes a block of the channels-last decomposition: sample n, row block p, channel c of this
// thread (c >= C for the idle lanes of the last tile) and rows [r0, r1).
struct RowBlock {
  int64_t n, p, c, r0, r1;
  __device__ RowBlock(int64_t N, int64_t C, int64_t S, int64_t P, int64_t rows) {
    int64_t b = blockIdx.x;
    const int64_t tile = b % ceil_div_d(C, kTileC);
    b /= ceil_div_d(C, kTileC);
    p = b % P;
    n = b / P;
    c = tile * kTileC + threadIdx.x;
    r0 = p * rows;
    r1 = min(r0 + rows, S);
  }
  static __device__ int64_t ceil_div_d(int64_t a, int64_t b) { return (a + b - 1) / b; }
};

// Tree reduction over the first `count` entries of `smem` with stride `stride`, into smem[0].
template <typename Acc>
__device__ void tree_reduce(Acc* smem, int lane, int count, int stride) {
  for (int s = count / 2; s > 0; s >>= 1) {
    __syncthreads();
    if (lane < s) smem[lane * stride] = merge(smem[lane * stride], smem[(lane + s) * stride]);
  }
  __syncthreads();
}

// Reducers: what a thread accumulates (Local) for element i of channel c, and what it hands to
// the block's tree of merges (Acc).
template <typename scalar_t, typename acc_t> struct StatsReducer {
  using Acc = Moments<acc_t>;
  using Local = ShiftedSums<acc_t>;
  struct Chan {};
  const scalar_t* x;
  __device__ Chan channel(int64_t) const { return {}; }
  __device__ void add(Local& a, const Chan&, int64_t i) const { push(a, acc_t(x[i])); }
  static __device__ Acc finish(const Local& a) { return moments(a); }
};

// Each channel's activation parameter: PReLU's own slope, or the op's one parameter.
template <typename acc_t>
__device__ ActParam<acc_t> channel_act(const acc_t* slope, const ActParam<acc_t>& param,
                                       int64_t c) {
  return slope != nullptr ? ActParam<acc_t>(slope[c]) : param;
}

// Backward sums; kSlope adds PReLU's sum(dy * z) over z <= 0 (SlopeGradSums).
template <typename scalar_t, typename acc_t, Act A, bool kSlope = false> struct GradReducer {
  using Acc = std::conditional_t<kSlope, SlopeGradSums<acc_t>, GradSums<acc_t>>;
  using Local = Acc;
  struct Chan {
    Affine<acc_t> af;
    ActParam<acc_t> p;
  };
  const scalar_t* y;
  const scalar_t* dy;
  const acc_t* gamma;
  const acc_t* beta;
  ActParam<acc_t> param;
  const acc_t* slope;  // PReLU: (C,), else null
  __device__ Chan channel(int64_t c) const {
    return {{acc_t(1) / clamp_gamma(gamma[c]), beta[c]}, channel_act(slope, param, c)};
  }
  __device__ void add(Acc& a, const Chan& ch, int64_t i) const {
    const acc_t yv = acc_t(y[i]), dyv = acc_t(dy[i]);
    acc_t dz, xhat;
    recover<A>(yv, dyv, ch.af, ch.p, dz, xhat);
    a.dz += dz;
    a.dz_xhat += dz * xhat;
    if constexpr (kSlope) a.dy_z += slope_grad_term(yv, dyv, ch.p);
  }
  static __device__ Acc finish(const Local& a) { return a; }
};

template <typename R>
__global__ void reduce_contiguous_kernel(R r, typename R::Acc* part, int64_t C, int64_t S,
                                         int64_t P) {
  using Acc = typename R::Acc;
  __shared__ Acc smem[kThreads];
  const int64_t p = blockIdx.x % P, nc = blockIdx.x / P, c = nc % C, n = nc / C;
  const int64_t begin = nc * S + p * kSpan, end = nc * S + min((p + 1) * kSpan, S);
  const auto chan = r.channel(c);
  typename R::Local acc{};
  for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) r.add(acc, chan, i);
  smem[threadIdx.x] = R::finish(acc);
  tree_reduce(smem, threadIdx.x, kThreads, 1);
  if (threadIdx.x == 0) part[(n * P + p) * C + c] = smem[0];
}

template <typename R>
__global__ void reduce_channels_last_kernel(R r, typename R::Acc* part, int64_t N, int64_t C,
                                            int64_t S, int64_t P, int64_t rows) {
  using Acc = typename R::Acc;
  __shared__ Acc smem[kRowThreads * kTileC];
  const RowBlock rb(N, C, S, P, rows);
  typename R::Local acc{};
  if (rb.c < C) {
    const auto chan = r.channel(rb.c);
    for (int64_t row = rb.r0 + threadIdx.y; row < rb.r1; row += kRowThreads)
      r.add(acc, chan, (rb.n * S + row) * C + rb.c);
  }
  Acc* column = smem + threadIdx.x;
  column[threadIdx.y * kTileC] = R::finish(acc);
  tree_reduce(column, threadIdx.y, kRowThreads, kTileC);
  if (threadIdx.y == 0 && rb.c < C) part[(rb.n * P + rb.p) * C + rb.c] = column[0];
}

// Merges the partials [N][P][C] of group g (channel g % C over all samples, or of sample g / C).
template <typename Acc, typename Finish>
__global__ void merge_kernel(const Acc* part, int64_t N, int64_t P, int64_t C, bool per_sample,
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

// Two-pass reduction of every group; `finish` stores each group's merged result.
template <typename R, typename Finish>
void reduce_groups(const at::Tensor& like, const Geometry& g, bool per_sample, const R& r,
                   const Finish& finish) {
  using Acc = typename R::Acc;
  const Launch l(g);
  check_grid(l.blocks(), g);
  check_grid(g.groups(per_sample), g);
  at::Tensor buf =
      at::empty({g.N * l.P * g.C * int64_t(sizeof(Acc))}, like.options().dtype(at::kByte));
  Acc* part = reinterpret_cast<Acc*>(buf.data_ptr());
  auto stream = at::cuda::getCurrentCUDAStream();
  if (g.channels_last) {
    reduce_channels_last_kernel<<<l.blocks(), l.threads(), 0, stream>>>(r, part, g.N, g.C, g.S,
                                                                        l.P, l.rows);
  } else {
    reduce_contiguous_kernel<<<l.blocks(), l.threads(), 0, stream>>>(r, part, g.C, g.S, l.P);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  merge_kernel<<<g.groups(per_sample), kThreads, 0, stream>>>(part, g.N, l.P, g.C, per_sample,
                                                                finish);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Appliers: per-(n, c) coefficients computed once per thread, then one element at a time.
template <typename scalar_t, typename acc_t, Act A> struct ForwardApplier {
  struct Coef {
    ForwardCoef<acc_t> k;
    ActParam<acc_t> p;
  };
  scalar_t* x;
  const acc_t* mean;
  const acc_t* var;
  const acc_t* gamma;
  const acc_t* beta;
  acc_t eps;
  ActParam<acc_t> param;
  const acc_t* slope;  // PReLU: (C,), else null
  bool per_sample;
  int64_t C;
  __device__ Coef coef(int64_t n, int64_t c) const {
    const int64_t g = per_sample ? n * C + c : c;
    return {forward_coef(mean[g], var[g], gamma[c], beta[c], eps), channel_act(slope, param, c)};
  }
  __device__ void apply(const Coef& k, int64_t i) const {
    x[i] = scalar_t(forward_value<A>(acc_t(x[i]), k.k, k.p));
  }
};

template <typename scalar_t, typename acc_t, Act A> struct InputGradApplier {
  struct Coef {
    InputGradCoef<acc_t> k;
    Affine<acc_t> af;
    ActParam<acc_t> p;
  };
  const scalar_t* y;
  const scalar_t* dy;
  scalar_t* dx;  // may be dy
  const acc_t* var;
  const acc_t* gamma;
  const acc_t* beta;
  const acc_t* sum_dz;  // null with fixed statistics
  const acc_t* sum_dz_xhat;
  acc_t eps;
  ActParam<acc_t> param;
  const acc_t* slope;  // PReLU: (C,), else null
  acc_t count;
  bool per_sample;
  int64_t C;
  __device__ Coef coef(int64_t n, int64_t c) const {
    const int64_t g = per_sample ? n * C + c : c;
    const bool batch = sum_dz != nullptr;
    return {input_grad_coef(var[g], gamma[c], eps, batch, batch ? sum_dz[g] : acc_t(0),
                            batch ? sum_dz_xhat[g] : acc_t(0), count),
            {acc_t(1) / clamp_gamma(gamma[c]), beta[c]},
            channel_act(slope, param, c)};
  }
  __device__ void apply(const Coef& k, int64_t i) const {
    acc_t dz, xhat;
    recover<A>(acc_t(y[i]), acc_t(dy[i]), k.af, k.p, dz, xhat);
    dx[i] = scalar_t(input_grad_value(dz, xhat, k.k));
  }
};

template <typename F>
__global__ void apply_contiguous_kernel(F f, int64_t C, int64_t S, int64_t P) {
  const int64_t p = blockIdx.x % P, nc = blockIdx.x / P;
  const int64_t begin = nc * S + p * kSpan, end = nc * S + min((p + 1) * kSpan, S);
  const auto k = f.coef(nc / C, nc % C);
  for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) f.apply(k, i);
}

template <typename F>
__global__ void apply_channels_last_kernel(F f, int64_t N, int64_t C, int64_t S, int64_t P,
                                           int64_t rows) {
  const RowBlock rb(N, C, S, P, rows);
  if (rb.c >= C) return;
  const auto k = f.coef(rb.n, rb.c);
  for (int64_t row = rb.r0 + threadIdx.y; row < rb.r1; row += kRowThreads)
    f.apply(k, (rb.n * S + row) * C + rb.c);
}

template <typename F> void apply_elementwise(const Geometry& g, const F& f) {
  const Launch l(g);
  check_grid(l.blocks(), g);
  auto stream = at::cuda::getCurrentCUDAStream();
  if (g.channels_last) {
    apply_channels_last_kernel<<<l.blocks(), l.threads(), 0, stream>>>(f, g.N, g.C, g.S, l.P,
                                                                       l.rows);
  } else {
    apply_contiguous_kernel<<<l.blocks(), l.threads(), 0, stream>>>(f, g.C, g.S, l.P);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename acc_t> const acc_t* slope_ptr(const at::Tensor& slope) {
  return slope.defined() ? slope.const_data_ptr<acc_t>() : nullptr;
}

struct CudaKernels {
  static void stats(const at::Tensor& x, const StatsArgs& a) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "norm_stats", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      reduce_groups(x, a.g, a.per_sample,
                    StatsReducer<scalar_t, acc_t>{x.const_data_ptr<scalar_t>()},
                    StatsFinish<acc_t>{a.mean.data_ptr<acc_t>(), a.var.data_ptr<acc_t>()});
    });
  }

  static void forward(at::Tensor& x, const ForwardArgs& a) {
    dispatch_dtype_activation(x.scalar_type(), a.act, [&]<typename scalar_t, Act A>() {
      using acc_t = at::opmath_type<scalar_t>;
      apply_elementwise(a.g, ForwardApplier<scalar_t, acc_t, A>{
                                 x.data_ptr<scalar_t>(), a.mean.const_data_ptr<acc_t>(),
                                 a.var.const_data_ptr<acc_t>(), a.gamma.const_data_ptr<acc_t>(),
                                 a.beta.const_data_ptr<acc_t>(), acc_t(a.eps),
                                 ActParam<acc_t>(acc_t(a.param)), slope_ptr<acc_t>(a.slope),
                                 a.per_sample, a.g.C});
    });
  }

  static void backward_reduce(const at::Tensor& y, const at::Tensor& dy, const ReduceArgs& a) {
    dispatch_dtype_activation(y.scalar_type(), a.act, [&]<typename scalar_t, Act A>() {
      using acc_t = at::opmath_type<scalar_t>;
      const SumsFinish<acc_t> finish{a.sum_dz.data_ptr<acc_t>(), a.sum_dz_xhat.data_ptr<acc_t>(),
                                     a.slope.defined() ? a.sum_dy_z.data_ptr<acc_t>() : nullptr};
      const auto reducer = [&]<bool kSlope>() {
        return GradReducer<scalar_t, acc_t, A, kSlope>{
            y.const_data_ptr<scalar_t>(), dy.const_data_ptr<scalar_t>(),
            a.gamma.const_data_ptr<acc_t>(), a.beta.const_data_ptr<acc_t>(),
            ActParam<acc_t>(acc_t(a.param)), slope_ptr<acc_t>(a.slope)};
      };
      if (a.slope.defined())
        reduce_groups(y, a.g, a.per_sample, reducer.template operator()<true>(), finish);
      else
        reduce_groups(y, a.g, a.per_sample, reducer.template operator()<false>(), finish);
    });
  }

  static void backward_input(const at::Tensor& y, const at::Tensor& dy, const at::Tensor& dx,
                             const InputGradArgs& a) {
    dispatch_dtype_activation(y.scalar_type(), a.act, [&]<typename scalar_t, Act A>() {
      using acc_t = at::opmath_type<scalar_t>;
      apply_elementwise(
          a.g, InputGradApplier<scalar_t, acc_t, A>{
                   y.const_data_ptr<scalar_t>(), dy.const_data_ptr<scalar_t>(),
                   dx.data_ptr<scalar_t>(), a.var.const_data_ptr<acc_t>(),
                   a.gamma.const_data_ptr<acc_t>(), a.beta.const_data_ptr<acc_t>(),
                   a.batch_stats ? a.sum_dz.const_data_ptr<acc_t>() : nullptr,
                   a.batch_stats ? a.sum_dz_xhat.const_data_ptr<acc_t>() : nullptr,
                   acc_t(a.eps), ActParam<acc_t>(acc_t(a.param)), slope_ptr<acc_t>(a.slope),
                   acc_t(a.count), a.per_sample, a.g.C});
    });
  }
};

}  // namespace

EFFSEG_REGISTER_NORM_ACT(CUDA, CudaKernels)

}  // namespace effseg
