// CUDA kernels of the dice_ce ops, over the (N, K, S) view of the logits (contiguous or
// channels-last, Geometry). A thread handles a group of G voxels: G = V (16 bytes of logits per
// class: 4 floats, 8 halves) when the logits are contiguous, S is a multiple of V and the data
// is 16-byte aligned, so that each class's logits of the group are one vector load (and, in
// backward, the gradients one vector store); else (and always for float64) G = 1, reading the
// logits sk elements apart.
// For each voxel of its group a thread walks the K logits with the online softmax of
// dice_ce_math.h, then walks them again for the per-class sums (forward) or the gradient
// (backward). All indexing is 64-bit.
//
// Forward sums per (n, k) are split over many blocks, each covering kVoxels voxels of one sample:
// every thread accumulates the sums of a chunk of kClassChunk classes over all of its voxels in
// registers, then the block reduces each class once (warp shuffles, then its warps in a fixed
// order) and writes one partial per class plus one cross-entropy partial; merge kernels then add
// the partials of each (n, k), and of the cross-entropy, in a fixed order. No atomics: results are
// deterministic. With more classes than kClassChunk, the voxel's softmax is recomputed for each
// chunk. Labels outside [0, K) are counted (never used as an index); the front end checks the
// count without a host synchronization on a GPU (dice_ce_ops.h).
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include "cuda_vec.h"
#include "dice_ce_ops.h"

namespace effseg {
namespace dice_ce {
namespace {

constexpr int kThreads = 256;  // threads per block, a power of two (tree reductions)
constexpr int kWarpSize = 32;
constexpr int kWarps = kThreads / kWarpSize;
constexpr int kClassChunk = 16;    // classes per pass of the forward partials kernel
constexpr int64_t kVoxels = 4096;  // voxels per forward block, a multiple of every V
constexpr unsigned kFullMask = 0xffffffffu;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Voxels per thread group on the vector path: one 16-byte vector of logits per class; double
// stays at one voxel (two voxels' float64 softmax state spills around its division routine).
template <typename scalar_t>
constexpr int kGroup = sizeof(scalar_t) == 8 ? 1 : Vec<scalar_t>::kSize;

template <typename T> __device__ T warp_sum(T v) {
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1)
    v += __shfl_down_sync(kFullMask, v, offset);
  return v;
}

// Tree reduction of smem[0, kThreads) into smem[0]; every thread of the block must call it.
template <typename Acc> __device__ void block_reduce(Acc* smem) {
  for (int s = kThreads / 2; s > 0; s >>= 1) {
    __syncthreads();
    if (threadIdx.x < s) smem[threadIdx.x] = merge(smem[threadIdx.x], smem[threadIdx.x + s]);
  }
  __syncthreads();
}

// The logits of one class for the G voxels of a group starting at p (voxels sv apart; G > 1 only
// with sv = 1 and p 16-byte aligned).
template <int G, typename scalar_t, typename acc_t>
__device__ void load_group(const scalar_t* p, int64_t sv, acc_t (&z)[G]) {
  if constexpr (G == 1) {
    z[0] = acc_t(p[0]);
  } else {
    static_assert(G == Vec<scalar_t>::kSize, "a group of more than one voxel is one vector");
    const Vec<scalar_t> v = load_vec_ro(p);  // the logits: never written by these kernels
#pragma unroll
    for (int g = 0; g < G; ++g) z[g] = acc_t(v.v[g]);
  }
}

template <int G, typename scalar_t, typename acc_t>
__device__ void store_group(scalar_t* p, const acc_t (&d)[G]) {
  if constexpr (G == 1) {
    p[0] = scalar_t(d[0]);
  } else {
    Vec<scalar_t> v;
#pragma unroll
    for (int g = 0; g < G; ++g) v.v[g] = scalar_t(d[g]);
    store_vec(p, v);
  }
}

template <typename scalar_t, typename label_t, typename acc_t> struct ForwardParams {
  const scalar_t* logits;
  const label_t* labels;
  const acc_t* weight;
  int64_t ignore_index;
  int64_t K, S, sn, sk, sv;
  int64_t blocks_per_sample;
  bool vec;                      // groups of V voxels (see the top of the file)
  ClassSums<acc_t>* class_part;  // [N][blocks_per_sample][K]
  CeSums<acc_t>* ce_part;        // [N][blocks_per_sample]
};

// A thread's sums of the current class chunk over its voxels.
template <typename acc_t> struct ChunkSums {
  acc_t inter[kClassChunk];
  acc_t prob[kClassChunk];
  int count[kClassChunk];
};

// Adds the voxels [v, v + G) of one sample (logits z, labels y) to the chunk's sums (and, for the
// first chunk, to the cross-entropy sums).
template <int G, typename scalar_t, typename label_t, typename acc_t>
__device__ void forward_group(const ForwardParams<scalar_t, label_t, acc_t>& a,
                              const scalar_t* z, const label_t* y, int64_t v, int64_t k0,
                              int chunk, ChunkSums<acc_t>& sums, CeSums<acc_t>& ce) {
  const scalar_t* zv = z + v * a.sv;
  int64_t cls[G];
  acc_t l[G];
  OnlineSoftmax<acc_t> sm[G];
#pragma unroll
  for (int g = 0; g < G; ++g) cls[g] = label_class(int64_t(y[v + g]), a.K, a.ignore_index);
  load_group<G>(zv, a.sv, l);
#pragma unroll
  for (int g = 0; g < G; ++g) sm[g] = OnlineSoftmax<acc_t>(l[g], acc_t(0));
  for (int64_t k = 1; k < a.K; ++k) {
    load_group<G>(zv + k * a.sk, a.sv, l);
#pragma unroll
    for (int g = 0; g < G; ++g) sm[g].push(l[g], acc_t(0));
  }
  acc_t inv_sum[G];
#pragma unroll
  for (int g = 0; g < G; ++g) {
    inv_sum[g] = acc_t(1) / sm[g].sum;
    if (k0 == 0) {
      if (cls[g] >= 0) {
        const acc_t w = a.weight[cls[g]];
        ce.wnll += w * nll(acc_t(zv[cls[g] * a.sk + g * a.sv]), sm[g].max, sm[g].sum);
        ce.w += w;
      } else if (cls[g] == kInvalid) {
        ce.invalid += 1;
      }
    }
  }
#pragma unroll
  for (int j = 0; j < kClassChunk; ++j) {
    if (j < chunk) {
      const int64_t k = k0 + j;
      load_group<G>(zv + k * a.sk, a.sv, l);
#pragma unroll
      for (int g = 0; g < G; ++g) {
        if (cls[g] >= 0) {
          const acc_t prob = softmax_exp(l[g], sm[g].max) * inv_sum[g];
          sums.prob[j] += prob;
          if (cls[g] == k) {
            sums.inter[j] += prob;
            sums.count[j] += 1;
          }
        }
      }
    }
  }
}

template <typename scalar_t, typename label_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    forward_partials_kernel(const ForwardParams<scalar_t, label_t, acc_t> a) {
  constexpr int V = kGroup<scalar_t>;
  // Per-warp sums of the current class chunk: lane 0 of a warp writes its row.
  __shared__ acc_t s_inter[kWarps][kClassChunk];
  __shared__ acc_t s_prob[kWarps][kClassChunk];
  __shared__ int64_t s_count[kWarps][kClassChunk];
  __shared__ CeSums<acc_t> s_ce[kThreads];
  const int64_t n = blockIdx.x / a.blocks_per_sample, b = blockIdx.x % a.blocks_per_sample;
  const int64_t v0 = b * kVoxels, v1 = min(v0 + kVoxels, a.S);
  const scalar_t* z = a.logits + n * a.sn;
  const label_t* y = a.labels + n * a.S;
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  CeSums<acc_t> ce{};
  for (int64_t k0 = 0; k0 < a.K; k0 += kClassChunk) {
    const int chunk = a.K - k0 < kClassChunk ? int(a.K - k0) : kClassChunk;
    ChunkSums<acc_t> sums = {};
    if (V > 1 && a.vec) {  // v1 - v0 is a multiple of V: S is
      for (int64_t v = v0 + int64_t(threadIdx.x) * V; v < v1; v += int64_t(kThreads) * V)
        forward_group<V>(a, z, y, v, k0, chunk, sums, ce);
    } else {
      for (int64_t v = v0 + threadIdx.x; v < v1; v += kThreads)
        forward_group<1>(a, z, y, v, k0, chunk, sums, ce);
    }
    // One reduction per class of the chunk over the whole block.
#pragma unroll
    for (int j = 0; j < kClassChunk; ++j) {
      if (j < chunk) {
        const acc_t inter = warp_sum(sums.inter[j]);
        const acc_t prob = warp_sum(sums.prob[j]);
        const int count = warp_sum(sums.count[j]);
        if (lane == 0) {
          s_inter[warp][j] = inter;
          s_prob[warp][j] = prob;
          s_count[warp][j] = count;
        }
      }
    }
    __syncthreads();
    if (threadIdx.x < chunk) {
      ClassSums<acc_t> total{};
      for (int w = 0; w < kWarps; ++w)
        total = merge(total, ClassSums<acc_t>{s_inter[w][threadIdx.x], s_prob[w][threadIdx.x],
                                              s_count[w][threadIdx.x]});
      a.class_part[blockIdx.x * a.K + k0 + threadIdx.x] = total;
    }
    __syncthreads();  // the next chunk overwrites the shared sums
  }
  s_ce[threadIdx.x] = ce;
  block_reduce(s_ce);
  if (threadIdx.x == 0) a.ce_part[blockIdx.x] = s_ce[0];
}

// Block nk merges the partials of (n, k) = (nk / K, nk % K) over the blocks of sample n.
template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    merge_class_kernel(const ClassSums<acc_t>* part, int64_t K, int64_t blocks_per_sample,
                       acc_t* stats) {
  __shared__ ClassSums<acc_t> smem[kThreads];
  // 32-bit: N * K < 2^31 (checked at launch), and a 64-bit division would be a called routine
  const int nk = blockIdx.x, n = nk / int(K), k = nk % int(K);
  ClassSums<acc_t> sums{};
  for (int64_t b = threadIdx.x; b < blocks_per_sample; b += kThreads)
    sums = merge(sums, part[(n * blocks_per_sample + b) * K + k]);
  smem[threadIdx.x] = sums;
  block_reduce(smem);
  if (threadIdx.x == 0) {
    stats[nk * 3 + 0] = smem[0].inter;
    stats[nk * 3 + 1] = smem[0].prob;
    stats[nk * 3 + 2] = acc_t(smem[0].count);
  }
}

template <typename acc_t>
__global__ void __launch_bounds__(kThreads)
    merge_ce_kernel(const CeSums<acc_t>* part, int64_t count, acc_t* ce, int64_t* invalid) {
  __shared__ CeSums<acc_t> smem[kThreads];
  CeSums<acc_t> sums{};
  for (int64_t b = threadIdx.x; b < count; b += kThreads) sums = merge(sums, part[b]);
  smem[threadIdx.x] = sums;
  block_reduce(smem);
  if (threadIdx.x == 0) {
    ce[0] = smem[0].wnll;
    ce[1] = smem[0].w;
    invalid[0] = smem[0].invalid;
  }
}

template <typename scalar_t, typename label_t, typename acc_t> struct BackwardParams {
  const scalar_t* logits;
  const label_t* labels;
  const acc_t* weight;
  const acc_t* grad;       // (1,)
  const acc_t* coef_dice;  // [N][K][2]: alpha, beta
  const acc_t* coef_ce;    // (1,)
  scalar_t* dz;
  int64_t ignore_index;
  int64_t N, K, S, sn, sk, sv;  // dz has the logits' strides
  bool vec;                     // groups of V voxels (see the top of the file)
};

// Writes the K gradients of the voxels [v, v + G) of sample n.
template <int G, typename scalar_t, typename label_t, typename acc_t>
__device__ void backward_group(const BackwardParams<scalar_t, label_t, acc_t>& a, int64_t n,
                               int64_t v) {
  const acc_t grad = a.grad[0];
  const acc_t ce_scale = grad * a.coef_ce[0];
  const int64_t offset = n * a.sn + v * a.sv;
  const scalar_t* z = a.logits + offset;
  scalar_t* dz = a.dz + offset;
  const acc_t* cd = a.coef_dice + n * a.K * 2;
  int64_t cls[G];
  acc_t l[G];
  OnlineSoftmax<acc_t> sm[G];
#pragma unroll
  for (int g = 0; g < G; ++g)
    cls[g] = label_class(int64_t(a.labels[n * a.S + v + g]), a.K, a.ignore_index);
  load_group<G>(z, a.sv, l);
#pragma unroll
  for (int g = 0; g < G; ++g)
    sm[g] = OnlineSoftmax<acc_t>(l[g], grad * dice_coef(cd[0], cd[1], cls[g] == 0));
  for (int64_t k = 1; k < a.K; ++k) {
    load_group<G>(z + k * a.sk, a.sv, l);
    const acc_t alpha = cd[2 * k], beta = cd[2 * k + 1];
#pragma unroll
    for (int g = 0; g < G; ++g) sm[g].push(l[g], grad * dice_coef(alpha, beta, cls[g] == k));
  }
  acc_t inv_sum[G], cbar[G], ce_w[G];
#pragma unroll
  for (int g = 0; g < G; ++g) {
    inv_sum[g] = acc_t(1) / sm[g].sum;
    cbar[g] = sm[g].dot * inv_sum[g];
    // Ignored voxels (and invalid labels, which forward rejects) get no gradient; their class
    // is never used as an index.
    ce_w[g] = cls[g] >= 0 ? ce_scale * a.weight[cls[g]] : acc_t(0);
  }
  for (int64_t k = 0; k < a.K; ++k) {
    load_group<G>(z + k * a.sk, a.sv, l);
    const acc_t alpha = cd[2 * k], beta = cd[2 * k + 1];
    acc_t d[G];
#pragma unroll
    for (int g = 0; g < G; ++g) {
      const bool is_label = cls[g] == k;
      const acc_t p = softmax_exp(l[g], sm[g].max) * inv_sum[g];
      const acc_t c = grad * dice_coef(alpha, beta, is_label);
      d[g] = cls[g] >= 0 ? logit_grad(p, is_label, ce_w[g], c, cbar[g]) : acc_t(0);
    }
    store_group<G>(dz + k * a.sk, d);
  }
}

// Grid-stride over the groups of the N * S voxels.
template <typename scalar_t, typename label_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    backward_kernel(const BackwardParams<scalar_t, label_t, acc_t> a) {
  constexpr int V = kGroup<scalar_t>;
  const int G = a.vec ? V : 1;
  const int64_t groups = a.N * a.S / G;
  for (int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x; i < groups;
       i += int64_t(gridDim.x) * kThreads) {
    const int64_t n = i * G / a.S, v = i * G % a.S;
    if (V > 1 && a.vec)
      backward_group<V>(a, n, v);
    else
      backward_group<1>(a, n, v);
  }
}

// Whether a thread can take V voxels at a time: contiguous logits (and gradient), S a multiple of
// V, 16-byte aligned data.
template <typename scalar_t>
bool vector_groups(const Geometry& g, std::initializer_list<const void*> ptrs) {
  return kGroup<scalar_t> > 1 && g.sv == 1 && g.sk == g.S && g.S % kGroup<scalar_t> == 0 &&
         aligned16(ptrs);
}

struct CudaKernels {
  static void forward(const at::Tensor& logits, const at::Tensor& labels, const ForwardArgs& a) {
    const Geometry& g = a.g;
    const int64_t per_sample = ceil_div(g.S, kVoxels);
    const int64_t blocks = g.N * per_sample;
    TORCH_CHECK_VALUE(blocks <= std::numeric_limits<int32_t>::max() &&
                          g.N * g.K <= std::numeric_limits<int32_t>::max(),
                      "effseg: logits too large for one launch: ", logits.sizes());
    auto stream = at::cuda::getCurrentCUDAStream();
    dispatch_types(logits.scalar_type(), labels.scalar_type(),
                   [&]<typename scalar_t, typename label_t>() {
      using acc_t = at::opmath_type<scalar_t>;
      const auto bytes = logits.options().dtype(at::kByte);
      at::Tensor class_buf =
          at::empty({blocks * g.K * int64_t(sizeof(ClassSums<acc_t>))}, bytes);
      at::Tensor ce_buf = at::empty({blocks * int64_t(sizeof(CeSums<acc_t>))}, bytes);
      auto* class_part = reinterpret_cast<ClassSums<acc_t>*>(class_buf.data_ptr());
      auto* ce_part = reinterpret_cast<CeSums<acc_t>*>(ce_buf.data_ptr());
      const ForwardParams<scalar_t, label_t, acc_t> p{
          logits.const_data_ptr<scalar_t>(), labels.const_data_ptr<label_t>(),
          a.weight.const_data_ptr<acc_t>(),  a.ignore_index, g.K, g.S, g.sn, g.sk, g.sv,
          per_sample, vector_groups<scalar_t>(g, {logits.const_data_ptr()}), class_part, ce_part};
      forward_partials_kernel<<<blocks, kThreads, 0, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      merge_class_kernel<<<g.N * g.K, kThreads, 0, stream>>>(class_part, g.K, per_sample,
                                                               a.stats.data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      merge_ce_kernel<<<1, kThreads, 0, stream>>>(ce_part, blocks, a.ce.data_ptr<acc_t>(),
                                                  a.invalid.data_ptr<int64_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }

  static void backward(const at::Tensor& logits, const at::Tensor& labels, const at::Tensor& dz,
                       const BackwardArgs& a) {
    const Geometry& g = a.g;
    // Enough blocks to fill the device several times over; the grid-stride loop does the rest.
    const int64_t wanted = ceil_div(g.N * g.S, kThreads);
    const int64_t cap = int64_t(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 32;
    const int64_t blocks = std::max<int64_t>(1, std::min(wanted, cap));
    auto stream = at::cuda::getCurrentCUDAStream();
    dispatch_types(logits.scalar_type(), labels.scalar_type(),
                   [&]<typename scalar_t, typename label_t>() {
      using acc_t = at::opmath_type<scalar_t>;
      const BackwardParams<scalar_t, label_t, acc_t> p{
          logits.const_data_ptr<scalar_t>(), labels.const_data_ptr<label_t>(),
          a.weight.const_data_ptr<acc_t>(),  a.grad.const_data_ptr<acc_t>(),
          a.coef_dice.const_data_ptr<acc_t>(), a.coef_ce.const_data_ptr<acc_t>(),
          dz.data_ptr<scalar_t>(), a.ignore_index, g.N, g.K, g.S, g.sn, g.sk, g.sv,
          vector_groups<scalar_t>(g, {logits.const_data_ptr(), dz.const_data_ptr()})};
      backward_kernel<<<blocks, kThreads, 0, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
};

}  // namespace

EFFSEG_REGISTER_DICE_CE(CUDA, CudaKernels)

}  // namespace dice_ce
}  // namespace effseg
