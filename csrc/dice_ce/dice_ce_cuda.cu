// CUDA kernels of the dice_ce ops, over the (N, K, S) view of the logits (contiguous or
// channels-last, Geometry). One thread per voxel: it walks the voxel's K logits (sk elements
// apart; with contiguous logits the threads of a warp read consecutive addresses) with the online softmax of dice_ce_math.h, then walks them again for the
// per-class sums (forward) or the gradient (backward). All indexing is 64-bit.
//
// Forward sums per (n, k) are split over many blocks, each covering kVoxels voxels of one sample:
// a block reduces its voxels (warp shuffles, then its warps in a fixed order) and writes one
// partial per class plus one cross-entropy partial; merge kernels then add the partials of each
// (n, k), and of the cross-entropy, in a fixed order. No atomics: results are deterministic.
// Classes are handled kClassChunk at a time so that shared memory does not grow with K; with more
// classes than that, the voxel's softmax is recomputed for each chunk.
#include <ATen/OpMathType.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include "dice_ce_ops.h"

namespace effseg {
namespace dice_ce {
namespace {

constexpr int kThreads = 256;  // threads per block, a power of two (tree reductions)
constexpr int kWarpSize = 32;
constexpr int kWarps = kThreads / kWarpSize;
constexpr int kClassChunk = 32;   // classes per pass of the forward partials kernel
constexpr int64_t kVoxels = 4096;  // voxels per forward block
constexpr unsigned kFullMask = 0xffffffffu;

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

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

template <typename scalar_t, typename label_t, typename acc_t> struct ForwardParams {
  const scalar_t* logits;
  const label_t* labels;
  const acc_t* weight;
  int64_t ignore_index;
  int64_t K, S, sn, sk, sv;
  int64_t blocks_per_sample;
  ClassSums<acc_t>* class_part;  // [N][blocks_per_sample][K]
  CeSums<acc_t>* ce_part;        // [N][blocks_per_sample]
};

template <typename scalar_t, typename label_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    forward_partials_kernel(const ForwardParams<scalar_t, label_t, acc_t> a) {
  // Per-warp running sums of the current class chunk: only lane 0 of a warp writes its row.
  __shared__ acc_t s_inter[kWarps][kClassChunk];
  __shared__ acc_t s_prob[kWarps][kClassChunk];
  __shared__ int s_count[kWarps][kClassChunk];
  __shared__ CeSums<acc_t> s_ce[kThreads];
  const int64_t n = blockIdx.x / a.blocks_per_sample, b = blockIdx.x % a.blocks_per_sample;
  const int64_t v0 = b * kVoxels, v1 = min(v0 + kVoxels, a.S);
  const scalar_t* z = a.logits + n * a.sn;
  const label_t* y = a.labels + n * a.S;
  const int lane = threadIdx.x % kWarpSize, warp = threadIdx.x / kWarpSize;
  CeSums<acc_t> ce{};
  for (int64_t k0 = 0; k0 < a.K; k0 += kClassChunk) {
    const int chunk = a.K - k0 < kClassChunk ? int(a.K - k0) : kClassChunk;
    for (int j = threadIdx.x; j < kWarps * kClassChunk; j += kThreads) {
      s_inter[j / kClassChunk][j % kClassChunk] = acc_t(0);
      s_prob[j / kClassChunk][j % kClassChunk] = acc_t(0);
      s_count[j / kClassChunk][j % kClassChunk] = 0;
    }
    __syncthreads();
    // The trip count is the same for every thread, so that whole warps reach the shuffles;
    // threads past the end carry an ignored voxel.
    for (int64_t base = v0; base < v1; base += kThreads) {
      const int64_t v = base + threadIdx.x;
      int64_t cls = kIgnored;
      acc_t max = acc_t(0), inv_sum = acc_t(0);
      if (v < v1) {
        cls = label_class(int64_t(y[v]), a.K, a.ignore_index);
        OnlineSoftmax<acc_t> sm(acc_t(z[v * a.sv]), acc_t(0));
        for (int64_t k = 1; k < a.K; ++k) sm.push(acc_t(z[k * a.sk + v * a.sv]), acc_t(0));
        max = sm.max;
        inv_sum = acc_t(1) / sm.sum;
        if (k0 == 0) {
          if (cls >= 0) {
            const acc_t w = a.weight[cls];
            ce.wnll += w * nll(acc_t(z[cls * a.sk + v * a.sv]), sm.max, sm.sum);
            ce.w += w;
          } else if (cls == kInvalid) {
            ce.invalid += 1;
          }
        }
      }
      for (int j = 0; j < chunk; ++j) {
        const int64_t k = k0 + j;
        acc_t prob = acc_t(0), inter = acc_t(0);
        int count = 0;
        if (cls >= 0) {
          prob = softmax_exp(acc_t(z[k * a.sk + v * a.sv]), max) * inv_sum;
          inter = cls == k ? prob : acc_t(0);
          count = cls == k;
        }
        prob = warp_sum(prob);
        inter = warp_sum(inter);
        count = warp_sum(count);
        if (lane == 0) {
          s_prob[warp][j] += prob;
          s_inter[warp][j] += inter;
          s_count[warp][j] += count;
        }
      }
    }
    __syncthreads();
    if (threadIdx.x < chunk) {
      ClassSums<acc_t> sums{};
      for (int w = 0; w < kWarps; ++w)
        sums = merge(sums, ClassSums<acc_t>{s_inter[w][threadIdx.x], s_prob[w][threadIdx.x],
                                            s_count[w][threadIdx.x]});
      a.class_part[blockIdx.x * a.K + k0 + threadIdx.x] = sums;
    }
    __syncthreads();  // the next chunk clears the shared sums
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
  const int64_t nk = blockIdx.x, n = nk / K, k = nk % K;
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
};

// Grid-stride over the N * S voxels; each thread writes the K gradients of its voxel.
template <typename scalar_t, typename label_t, typename acc_t>
__global__ void __launch_bounds__(kThreads)
    backward_kernel(const BackwardParams<scalar_t, label_t, acc_t> a) {
  const acc_t grad = a.grad[0];
  const acc_t ce_scale = grad * a.coef_ce[0];
  const int64_t total = a.N * a.S;
  for (int64_t i = int64_t(blockIdx.x) * kThreads + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * kThreads) {
    const int64_t n = i / a.S, v = i % a.S;
    const scalar_t* z = a.logits + n * a.sn + v * a.sv;
    scalar_t* dz = a.dz + n * a.sn + v * a.sv;
    const int64_t cls = label_class(int64_t(a.labels[i]), a.K, a.ignore_index);
    if (cls < 0) {
      // Ignored voxels (and invalid labels, which forward rejects) get no gradient; their class
      // is never used as an index.
      for (int64_t k = 0; k < a.K; ++k) dz[k * a.sk] = scalar_t(0);
      continue;
    }
    const acc_t* cd = a.coef_dice + n * a.K * 2;
    OnlineSoftmax<acc_t> sm(acc_t(z[0]), grad * dice_coef(cd[0], cd[1], cls == 0));
    for (int64_t k = 1; k < a.K; ++k)
      sm.push(acc_t(z[k * a.sk]), grad * dice_coef(cd[2 * k], cd[2 * k + 1], cls == k));
    const acc_t inv_sum = acc_t(1) / sm.sum;
    const acc_t cbar = sm.dot * inv_sum;
    const acc_t ce_w = ce_scale * a.weight[cls];
    for (int64_t k = 0; k < a.K; ++k) {
      const bool is_label = cls == k;
      const acc_t p = softmax_exp(acc_t(z[k * a.sk]), sm.max) * inv_sum;
      const acc_t c = grad * dice_coef(cd[2 * k], cd[2 * k + 1], is_label);
      dz[k * a.sk] = scalar_t(logit_grad(p, is_label, ce_w, c, cbar));
    }
  }
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
          per_sample, class_part, ce_part};
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
          dz.data_ptr<scalar_t>(), a.ignore_index, g.N, g.K, g.S, g.sn, g.sk, g.sv};
      backward_kernel<<<blocks, kThreads, 0, stream>>>(p);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
};

}  // namespace

EFFSEG_REGISTER_DICE_CE(CUDA, CudaKernels)

}  // namespace dice_ce
}  // namespace effseg
