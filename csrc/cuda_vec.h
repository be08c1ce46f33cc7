// 16-byte vector access for the CUDA kernels of every op family: one load or store instruction
// (LDG.E.128 / STG.E.128) moves 4 floats, 8 halves or 2 doubles, which is what it takes to keep
// enough bytes in flight to stream a tensor at memory bandwidth. Included by the .cu files only.
#pragma once

#include <cstdint>
#include <cstring>
#include <initializer_list>

namespace effseg {

// 16 bytes of consecutive elements.
template <typename T> struct alignas(16) Vec {
  static_assert(16 % sizeof(T) == 0, "a vector holds whole elements");
  static constexpr int kSize = 16 / int(sizeof(T));
  T v[kSize];
};

template <typename T> __device__ __forceinline__ Vec<T> load_vec(const T* p) {
  return *reinterpret_cast<const Vec<T>*>(p);
}

// For data that no thread of the kernel writes (a __restrict__ input): through the read-only
// data cache, LDG.E.128.CONSTANT. Never for a buffer the same kernel writes (dy when dx = dy).
template <typename T> __device__ __forceinline__ Vec<T> load_vec_ro(const T* p) {
  const uint4 b = __ldg(reinterpret_cast<const uint4*>(p));
  Vec<T> v;
  memcpy(&v, &b, sizeof(v));
  return v;
}

// On the device one st.global.v4: nvcc splits a plain 16-byte store (of the struct, or of a
// uint4) into 32-bit stores when the loop around it is unrolled (seen with CUDA 13.0, sm_90).
template <typename T> __device__ __forceinline__ void store_vec(T* p, const Vec<T>& v) {
#if defined(__CUDA_ARCH__)
  uint4 b;
  memcpy(&b, &v, sizeof(b));
  asm volatile("st.global.v4.u32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(b.x), "r"(b.y), "r"(b.z),
               "r"(b.w)
               : "memory");
#else
  *reinterpret_cast<Vec<T>*>(p) = v;
#endif
}

// Elements from p to the next 16-byte boundary (the scalar head before the first vector).
template <typename T> __device__ __forceinline__ int64_t head_elements(const T* p) {
  return int64_t((16 - reinterpret_cast<uintptr_t>(p) % 16) % 16 / sizeof(T));
}

// Host: whether every pointer has the same offset modulo 16 bytes, so that one head aligns all.
inline bool congruent16(std::initializer_list<const void*> ptrs) {
  const uintptr_t first = reinterpret_cast<uintptr_t>(*ptrs.begin()) % 16;
  for (const void* p : ptrs)
    if (reinterpret_cast<uintptr_t>(p) % 16 != first) return false;
  return true;
}

// Host: whether every pointer is 16-byte aligned.
inline bool aligned16(std::initializer_list<const void*> ptrs) {
  for (const void* p : ptrs)
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0) return false;
  return true;
}

}  // namespace effseg
