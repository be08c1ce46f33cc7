// A CPU emulator for effseg's CUDA kernels, for tests on machines without a GPU.
//
// tests/test_cuda_emulated.py compiles csrc/*/*_cuda.cu as plain C++ with this header first: every
// `kernel<<<grid, block, smem, stream>>>(args)` is rewritten into `emu::launch(...)`, and each
// block runs its threads as cooperative fibers (ucontext), so that the kernels' own code (index
// math, launch geometry, shared memory, __syncthreads, warp shuffles, partial-buffer layouts and
// the host code around the launches) runs unchanged and is compared with the references. It is
// not a GPU: no memory model, no timing, no hardware limits beyond those checked below. What it
// does check, and reports as an exception from the launch:
//   - a __syncthreads that not every thread of the block reaches (a thread exited or waits at a
//     warp shuffle instead): undefined behaviour on a GPU, a deadlock or a wrong result there;
//   - a warp shuffle with the full mask that not all 32 lanes of the warp reach;
//   - a grid or block size that CUDA would refuse or silently narrow.
// Shared-memory races show up as results that depend on the order in which threads run between
// barriers: set_schedule() runs them in reverse (or rotated) order, and the tests require
// bit-identical results for every order.
#pragma once

#include <ucontext.h>
#if defined(__SANITIZE_ADDRESS__)  // AddressSanitizer must be told about every stack switch
#include <sanitizer/common_interface_defs.h>
#endif

// Everything the kernels' sources include from torch, first, so that the macros below touch
// only the kernels.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/core/DeviceGuard.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <functional>
#include <limits>
#include <memory>
#include <string>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// One instance per kernel instantiation, shared by the fibers of the running block (blocks run
// one after another); like shared memory it is not cleared between blocks.
#define __shared__ static
#define C10_CUDA_KERNEL_LAUNCH_CHECK() ((void)0)

struct dim3 {
  unsigned x, y, z;
  dim3(int64_t x_ = 1, int64_t y_ = 1, int64_t z_ = 1) {
    TORCH_CHECK(x_ >= 1 && x_ <= std::numeric_limits<int32_t>::max() && y_ >= 1 &&
                    y_ <= 65535 && z_ >= 1 && z_ <= 65535,
                "cuda_emu: invalid launch dimension (", x_, ", ", y_, ", ", z_, ")");
    x = unsigned(x_), y = unsigned(y_), z = unsigned(z_);
  }
};
struct uint3 {
  unsigned x = 0, y = 0, z = 0;
};
struct alignas(16) uint4 {  // CUDA's 16-byte vector type (one LDG.E.128 / STG.E.128)
  unsigned x, y, z, w;
};

namespace emu {

inline uint3 threadIdx, blockIdx;
inline dim3 blockDim{1}, gridDim{1};

enum class State { Runnable, AtBlockBarrier, AtWarpBarrier, Done };

struct Fiber {
  ucontext_t ctx;
  std::unique_ptr<char[]> stack;
  State state = State::Runnable;
  uint3 tid;
};

constexpr size_t kStackBytes = 256 * 1024;

// 0: threads in order between barriers; 1: reverse order; 2: rotated by half a block.
inline int schedule = 0;
inline void set_schedule(int order) { schedule = order; }

struct Block {
  ucontext_t scheduler;
  std::vector<Fiber> fibers;
  int current = -1;
  std::string error;
  const std::function<void()>* body = nullptr;
};
inline Block* block = nullptr;

// Stack switches, annotated for AddressSanitizer when it is on (tests/test_cuda_emulated.py runs
// the kernels under it too): `to` is the stack being entered, `fake` keeps the leaving one's.
inline const void* host_stack = nullptr;  // the scheduler's stack, learnt on a fiber's first entry
inline size_t host_stack_size = 0;
#if defined(__SANITIZE_ADDRESS__)
inline void enter(void** fake, const void* to, size_t size) {
  __sanitizer_start_switch_fiber(fake, to, size);
}
inline void entered(void* fake) {
  __sanitizer_finish_switch_fiber(fake, &host_stack, &host_stack_size);
}
inline void entered_host(void* fake) { __sanitizer_finish_switch_fiber(fake, nullptr, nullptr); }
#else
inline void enter(void**, const void*, size_t) {}
inline void entered(void*) {}
inline void entered_host(void*) {}
#endif

inline void trampoline() {
  entered(nullptr);
  (*block->body)();
  block->fibers[block->current].state = State::Done;
  enter(nullptr, host_stack, host_stack_size);  // this fiber's stack is done with
  // returning resumes uc_link, the scheduler
}

inline void yield(State s) {
  Fiber& f = block->fibers[block->current];
  f.state = s;
  void* fake = nullptr;
  enter(&fake, host_stack, host_stack_size);
  swapcontext(&f.ctx, &block->scheduler);
  entered(fake);
}

inline int lane_id() {
  return int(threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z));
}

inline std::vector<int> order(int n) {
  std::vector<int> o(n);
  for (int i = 0; i < n; ++i) {
    if (schedule == 1) o[i] = n - 1 - i;
    else if (schedule == 2) o[i] = (i + n / 2) % n;
    else o[i] = i;
  }
  return o;
}

// Runs one block to the end; returns false (with block->error set) on a divergent barrier.
inline bool run_block(const std::function<void()>& body, dim3 bdim) {
  const int n = int(bdim.x * bdim.y * bdim.z);
  Block& b = *block;
  b.body = &body;
  for (int i = 0; i < n; ++i) {
    Fiber& f = b.fibers[i];
    f.state = State::Runnable;
    f.tid = {unsigned(i) % bdim.x, unsigned(i) / bdim.x % bdim.y, unsigned(i) / (bdim.x * bdim.y)};
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack.get();
    f.ctx.uc_stack.ss_size = kStackBytes;
    f.ctx.uc_link = &b.scheduler;
    makecontext(&f.ctx, trampoline, 0);
  }
  const std::vector<int> sequence = order(n);
  const int warps = (n + 31) / 32;
  for (;;) {
    bool ran = false;
    for (int i : sequence) {
      if (b.fibers[i].state != State::Runnable) continue;
      b.current = i;
      threadIdx = b.fibers[i].tid;
      void* fake = nullptr;
      enter(&fake, b.fibers[i].stack.get(), kStackBytes);
      swapcontext(&b.scheduler, &b.fibers[i].ctx);
      entered_host(fake);
      ran = true;
    }
    // a warp whose 32 lanes all wait at a shuffle goes on
    bool released = false;
    for (int w = 0; w < warps; ++w) {
      int waiting = 0, lanes = std::min(32, n - 32 * w);
      for (int l = 0; l < lanes; ++l) waiting += b.fibers[32 * w + l].state == State::AtWarpBarrier;
      if (waiting == 32) {
        for (int l = 0; l < 32; ++l) b.fibers[32 * w + l].state = State::Runnable;
        released = true;
      }
    }
    if (ran || released) continue;
    int done = 0, at_block = 0, at_warp = 0;
    for (const Fiber& f : b.fibers) {
      if (&f - b.fibers.data() >= n) break;
      done += f.state == State::Done;
      at_block += f.state == State::AtBlockBarrier;
      at_warp += f.state == State::AtWarpBarrier;
    }
    if (done == n) return true;
    if (at_block == n) {
      for (int i = 0; i < n; ++i) b.fibers[i].state = State::Runnable;
      continue;
    }
    b.error = "cuda_emu: block (" + std::to_string(blockIdx.x) + ") stuck: " +
              std::to_string(at_block) + " thread(s) at __syncthreads, " +
              std::to_string(at_warp) + " at a full-mask warp shuffle that not all 32 lanes "
              "reach, " + std::to_string(done) + " exited";
    return false;
  }
}

// The launch syntax's four slots; the stream and dynamic shared memory are ignored.
struct Config {
  dim3 grid, threads;
};
template <typename G, typename B, typename... Rest>
Config config(const G& grid, const B& threads, const Rest&...) {
  return {dim3(grid), dim3(threads)};
}

// Launches `body` (the kernel call) on every thread of every block of the grid.
inline void launch(const Config& c, const std::function<void()>& body) {
  const dim3 grid = c.grid, bdim = c.threads;
  const int64_t n = int64_t(bdim.x) * bdim.y * bdim.z;
  TORCH_CHECK(n >= 1 && n <= 1024, "cuda_emu: ", n, " threads per block (at most 1024)");
  Block b;
  b.fibers.resize(n);
  for (Fiber& f : b.fibers) f.stack.reset(new char[kStackBytes]);
  Block* outer = block;
  block = &b;
  blockDim = bdim;
  gridDim = grid;
  std::string error;
  for (unsigned z = 0; z < grid.z && error.empty(); ++z)
    for (unsigned y = 0; y < grid.y && error.empty(); ++y)
      for (unsigned x = 0; x < grid.x && error.empty(); ++x) {
        blockIdx = {x, y, z};
        if (!run_block(body, bdim) || !b.error.empty()) error = b.error;
      }
  block = outer;
  TORCH_CHECK(error.empty(), error);
}

inline void syncthreads() { yield(State::AtBlockBarrier); }

// __shfl_down_sync with a full mask: every lane of the warp must take part.
template <typename T> T shfl_down(T v, unsigned offset) {
  static T exchange[1024];
  const int lane = lane_id();
  const int base = lane / 32 * 32, l = lane % 32;
  exchange[lane] = v;
  yield(State::AtWarpBarrier);
  const T out = l + int(offset) < 32 ? exchange[base + l + int(offset)] : v;
  yield(State::AtWarpBarrier);  // nobody overwrites exchange[] before every lane has read it
  return out;
}

}  // namespace emu

using emu::blockDim;
using emu::blockIdx;
using emu::gridDim;
using emu::threadIdx;

inline void __syncthreads() { emu::syncthreads(); }
template <typename T> T __shfl_down_sync(unsigned mask, T v, unsigned offset) {
  // no exception may leave a fiber: the launch reports it
  if (mask != 0xffffffffu) emu::block->error = "cuda_emu: only full-mask shuffles are emulated";
  return emu::shfl_down(v, offset);
}

template <typename T> T __ldg(const T* p) { return *p; }  // the read-only cache: a plain read

template <typename T> inline T min(T a, T b) { return b < a ? b : a; }
template <typename T> inline T max(T a, T b) { return a < b ? b : a; }

// What the kernels' host code asks of the CUDA runtime.
namespace at::cuda {
struct EmuStream {};
inline EmuStream getCurrentCUDAStream() { return {}; }
struct EmuProperties {
  int multiProcessorCount = 2;  // few, so that grid-stride loops take several turns
};
inline EmuProperties* getCurrentDeviceProperties() {
  static EmuProperties p;
  return &p;
}
}  // namespace at::cuda
