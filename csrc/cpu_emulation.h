// CPU emulation of the CUDA subset the ST-Adapter kernels use, so tests can run the real kernel
// code (csrc/*.cu compiled with g++ -DSTA_CPU_EMULATION) on machines without a GPU:
// - a block is 256 std::threads; __syncthreads is a std::barrier; __shared__ locals become
//   function-level statics (shared by the block's threads; blocks run one after another);
// - __half is _Float16 and __nv_bfloat16 is a round-to-nearest-even bf16, bit-compatible with
//   torch's CPU float16 / bfloat16;
// - nvcuda::wmma fragments hold whole 16 x 16 tiles; lane 0 of each warp does the warp's
//   fragment work (the other lanes' calls are no-ops); mma_sync multiplies exactly rounded
//   operands with fp32 accumulation (what HMMA computes, up to summation order).
// Not emulated: warp-level timing, races a real GPU could expose, the HMMA summation order.
// Used by tests/cuda/test_cuda_emulated.py only; never part of the extension build.
#pragma once

#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))

struct StaEmuDim3 {
  unsigned x = 0, y = 0, z = 0;
};
inline thread_local StaEmuDim3 threadIdx;
inline thread_local StaEmuDim3 blockIdx;
inline thread_local StaEmuDim3 blockDim;
inline std::barrier<>* sta_emu_barrier = nullptr;
inline void __syncthreads() { sta_emu_barrier->arrive_and_wait(); }

using cudaError_t = int;
constexpr cudaError_t cudaSuccess = 0;
constexpr cudaError_t cudaErrorInvalidValue = 1;
constexpr cudaError_t cudaErrorInvalidConfiguration = 9;  // CUDA's value
using cudaStream_t = void*;
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline const char* cudaGetErrorString(cudaError_t err) {
  return err == cudaSuccess ? "no error" : err == cudaErrorInvalidConfiguration ? "invalid configuration argument" : "invalid value";
}

// Runs kernel(args...) over `blocks` blocks of `threads` threads, one block at a time.
template <typename Kernel, typename... Args>
void sta_emu_launch(Kernel kernel, unsigned blocks, unsigned threads, Args... args) {
  for (unsigned b = 0; b < blocks; ++b) {
    std::barrier<> bar(threads);
    sta_emu_barrier = &bar;
    std::vector<std::thread> pool;
    pool.reserve(threads);
    for (unsigned t = 0; t < threads; ++t) {
      pool.emplace_back([&, t] {
        threadIdx.x = t;
        blockIdx.x = b;
        blockDim.x = threads;
        kernel(args...);
      });
    }
    for (auto& th : pool) th.join();
  }
}

// ------------------------------------------------------------------ 16-bit float types
struct __half {
  _Float16 v;
};
inline float __half2float(__half h) { return static_cast<float>(h.v); }
inline __half __float2half_rn(float f) { return __half{static_cast<_Float16>(f)}; }

struct __nv_bfloat16 {
  uint16_t bits;
};
inline float __bfloat162float(__nv_bfloat16 h) {
  const uint32_t u = static_cast<uint32_t>(h.bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  if (std::isnan(f)) return __nv_bfloat16{0x7fc0};
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest, ties to even
  return __nv_bfloat16{static_cast<uint16_t>(u >> 16)};
}

inline unsigned short __half_as_ushort(__half v) {
  unsigned short b;
  std::memcpy(&b, &v, sizeof(b));
  return b;
}
inline __half __ushort_as_half(unsigned short b) {
  __half v;
  std::memcpy(&v, &b, sizeof(b));
  return v;
}
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 v) { return v.bits; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short b) { return __nv_bfloat16{b}; }

struct uint4 {
  unsigned x, y, z, w;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }

inline float sta_emu_to_float(float v) { return v; }
inline float sta_emu_to_float(__half v) { return __half2float(v); }
inline float sta_emu_to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

// ------------------------------------------------------------------------------ WMMA
namespace nvcuda {
namespace wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "the emulation covers m16n16k16 only");
  float x[16 * 16];
};

template <typename Use, int M, int N, int K, typename T, typename L>
inline void fill_fragment(fragment<Use, M, N, K, T, L>& f, float v) {
  if (threadIdx.x % 32 != 0) return;
  for (float& e : f.x) e = v;
}

template <typename Use, int M, int N, int K, typename T, typename L>
inline void load_matrix_sync(fragment<Use, M, N, K, T, L>& f, const T* p, unsigned ldm) {
  if (threadIdx.x % 32 != 0) return;
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) f.x[r * 16 + c] = sta_emu_to_float(p[r * ldm + c]);
}

template <typename T, typename LA, typename LB>
inline void mma_sync(fragment<accumulator, 16, 16, 16, float>& d, const fragment<matrix_a, 16, 16, 16, T, LA>& a,
                     const fragment<matrix_b, 16, 16, 16, T, LB>& b, const fragment<accumulator, 16, 16, 16, float>& c) {
  if (threadIdx.x % 32 != 0) return;
  float out[16 * 16];
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 16; ++j) {
      float acc = c.x[i * 16 + j];
      for (int k = 0; k < 16; ++k) acc = std::fmaf(a.x[i * 16 + k], b.x[k * 16 + j], acc);
      out[i * 16 + j] = acc;
    }
  std::memcpy(d.x, out, sizeof(out));
}

// Lane 0 holds the warp's tile and writes it (the kernels sync before reading).
inline void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, 16, float>& f, unsigned ldm, layout_t) {
  if (threadIdx.x % 32 != 0) return;
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 16; ++c) p[r * ldm + c] = f.x[r * 16 + c];
}
}  // namespace wmma
}  // namespace nvcuda
