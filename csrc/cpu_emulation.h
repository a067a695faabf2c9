// CPU emulation of the CUDA subset the ST-Adapter kernels use, so tests can run the real kernel
// code (csrc/*.cu compiled with g++ -DSTA_CPU_EMULATION) on machines without a GPU:
// - a block's threads are fibers on one OS thread (ucontext); __syncthreads and the warp
//   barriers of the warp-collective instructions switch fibers; __shared__ locals become
//   function-level statics (shared by the block's threads; blocks run one after another);
// - __half is _Float16 and __nv_bfloat16 is a round-to-nearest-even bf16, bit-compatible with
//   torch's CPU float16 / bfloat16;
// - ldmatrix and mma.sync m16n8k16 are warp-collective: each lane posts its address / fragment
//   registers, a warp barrier, each lane takes its own part by the PTX fragment layouts, a warp
//   barrier; mma multiplies exactly rounded operands with fp32 accumulation (what HMMA computes,
//   up to summation order);
// - cp.async copies land when cp.async.wait_group retires their group, not before.
// Not emulated: timing, races a real GPU could expose, the HMMA summation order.
// Used by tests/cuda/test_cuda_emulated.py only; never part of the extension build.
#pragma once

#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <memory>
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
inline StaEmuDim3 threadIdx;
inline StaEmuDim3 blockIdx;
inline StaEmuDim3 blockDim;

using cudaError_t = int;
constexpr cudaError_t cudaSuccess = 0;
constexpr cudaError_t cudaErrorInvalidValue = 1;
constexpr cudaError_t cudaErrorInvalidConfiguration = 9;  // CUDA's value
using cudaStream_t = void*;
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline const char* cudaGetErrorString(cudaError_t err) {
  return err == cudaSuccess ? "no error" : err == cudaErrorInvalidConfiguration ? "invalid configuration argument" : "invalid value";
}

[[noreturn]] inline void sta_emu_fail(const char* why) {
  std::fprintf(stderr, "st_adapter CPU emulation: %s (block %u, thread %u)\n", why, blockIdx.x, threadIdx.x);
  std::abort();
}

// ------------------------------------------------------------------ threads as fibers
// A block's threads are fibers (ucontext) on one OS thread: a barrier is a switch to the
// scheduler, ~100x cheaper than waking 256 OS threads, which the warp-collective instructions
// below (two warp barriers per ldmatrix / mma) need. A round of the scheduler that resumes no
// thread is a deadlock -- a barrier not reached by every thread -- and aborts.
struct StaEmuBarrier {
  unsigned expected = 0, arrived = 0;
  uint64_t generation = 0;
};

// cp.async state of one thread: copies issued but not committed, and committed groups in order.
struct StaEmuCopy {
  void* dst;
  unsigned char bytes[16];
  int size;
};
struct StaEmuAsync {
  std::vector<StaEmuCopy> open;
  std::deque<std::vector<StaEmuCopy>> groups;
};

struct StaEmuFiber {
  ucontext_t ctx;
  std::unique_ptr<char[]> stack;  // uninitialised: no 32 MB memset per launch
  unsigned tid = 0;
  bool done = false;
  const StaEmuBarrier* waiting = nullptr;
  uint64_t wait_generation = 0;
  StaEmuAsync async;
};

constexpr int kStaEmuMaxWarps = 32;
inline ucontext_t sta_emu_scheduler;
inline StaEmuFiber* sta_emu_current = nullptr;
inline StaEmuBarrier sta_emu_block_barrier;
inline StaEmuBarrier sta_emu_warp_barrier[kStaEmuMaxWarps];
inline void (*sta_emu_entry)(void*) = nullptr;
inline void* sta_emu_entry_arg = nullptr;

inline void sta_emu_arrive(StaEmuBarrier& b) {
  const uint64_t gen = b.generation;
  if (++b.arrived == b.expected) {  // the last thread releases the others and runs on
    b.arrived = 0;
    ++b.generation;
    return;
  }
  sta_emu_current->waiting = &b;
  sta_emu_current->wait_generation = gen;
  swapcontext(&sta_emu_current->ctx, &sta_emu_scheduler);
}
inline void __syncthreads() { sta_emu_arrive(sta_emu_block_barrier); }
inline void sta_emu_syncwarp() { sta_emu_arrive(sta_emu_warp_barrier[threadIdx.x / 32]); }

inline void sta_emu_fiber_main() {
  sta_emu_entry(sta_emu_entry_arg);
  if (!sta_emu_current->async.open.empty() || !sta_emu_current->async.groups.empty())
    sta_emu_fail("cp.async copies issued but never waited for");
  sta_emu_current->done = true;  // uc_link returns to the scheduler
}

// Kernel launches so far (tests/cuda/test_cuda_emulated.py counts a pass's launches with it).
inline int64_t sta_emu_launches = 0;

// Runs kernel(args...) over `blocks` blocks of `threads` threads, one block at a time.
template <typename Kernel, typename... Args>
void sta_emu_launch(Kernel kernel, unsigned blocks, unsigned threads, Args... args) {
  if (threads % 32 != 0 || threads / 32 > kStaEmuMaxWarps) sta_emu_fail("block size must be whole warps");
  ++sta_emu_launches;
  auto call = [&] { kernel(args...); };
  sta_emu_entry = [](void* f) { (*static_cast<decltype(call)*>(f))(); };
  sta_emu_entry_arg = &call;
  constexpr size_t kStack = 128 * 1024;
  std::vector<StaEmuFiber> fibers(threads);
  for (auto& f : fibers) f.stack.reset(new char[kStack]);
  for (unsigned b = 0; b < blocks; ++b) {
    blockIdx.x = b;
    blockDim.x = threads;
    sta_emu_block_barrier = StaEmuBarrier{threads, 0, 0};
    for (unsigned w = 0; w < threads / 32; ++w) sta_emu_warp_barrier[w] = StaEmuBarrier{32, 0, 0};
    for (unsigned t = 0; t < threads; ++t) {
      StaEmuFiber& f = fibers[t];
      f.tid = t;
      f.done = false;
      f.waiting = nullptr;
      getcontext(&f.ctx);
      f.ctx.uc_stack.ss_sp = f.stack.get();
      f.ctx.uc_stack.ss_size = kStack;
      f.ctx.uc_link = &sta_emu_scheduler;
      makecontext(&f.ctx, sta_emu_fiber_main, 0);
    }
    for (unsigned remaining = threads; remaining > 0;) {
      bool progress = false;
      for (auto& f : fibers) {
        if (f.done || (f.waiting != nullptr && f.waiting->generation == f.wait_generation)) continue;
        f.waiting = nullptr;
        sta_emu_current = &f;
        threadIdx.x = f.tid;
        swapcontext(&sta_emu_scheduler, &f.ctx);
        progress = true;
        if (f.done) --remaining;
      }
      if (!progress) sta_emu_fail("deadlock: a barrier that not every thread of the block or warp reaches");
    }
    sta_emu_current = nullptr;
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


inline float sta_emu_to_float(float v) { return v; }
inline float sta_emu_to_float(__half v) { return __half2float(v); }
inline float sta_emu_to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

// ------------------------------------------------------- warp-level PTX (sm_80 subset)
// cp.async: the source bytes are read at issue and land in shared memory only when a
// cp.async.wait_group retires their group -- so a kernel that reads a stage before waiting for it
// reads stale data here too, and fails parity.
inline void sta_emu_cp_async16(void* dst, const void* src, int src_size) {
  StaEmuCopy c{dst, {}, 16};
  if (src_size > 0) std::memcpy(c.bytes, src, src_size);  // the rest is zero-filled
  sta_emu_current->async.open.push_back(c);
}
inline void sta_emu_cp_async_commit() {
  auto& a = sta_emu_current->async;
  a.groups.push_back(std::move(a.open));
  a.open.clear();
}
inline void sta_emu_cp_async_wait(int pending) {
  auto& a = sta_emu_current->async;
  while (static_cast<int>(a.groups.size()) > pending) {
    for (const StaEmuCopy& c : a.groups.front()) std::memcpy(c.dst, c.bytes, c.size);
    a.groups.pop_front();
  }
}

// Per-warp exchange slots of the warp-collective instructions.
struct StaEmuWarpSlots {
  const unsigned char* row[32];
  uint32_t a[32][4];
  uint32_t b[32][2];
};
inline StaEmuWarpSlots sta_emu_warp_slots[kStaEmuMaxWarps];

// ldmatrix.sync.aligned.m8n8.xNUM[.trans].shared.b16: lanes 8i..8i+7 give the row addresses of
// 8x8 matrix i (16 bytes per row); each lane gets, per matrix, the two b16 values at row lane/4,
// columns 2*(lane%4) and +1 -- or, transposed, at rows 2*(lane%4) and +1 of column lane/4.
template <int NUM, bool TRANS>
inline void sta_emu_ldmatrix(uint32_t* r, const void* row_addr) {
  const unsigned warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  StaEmuWarpSlots& w = sta_emu_warp_slots[warp];
  w.row[lane] = static_cast<const unsigned char*>(row_addr);
  sta_emu_syncwarp();
  for (int i = 0; i < NUM; ++i) {
    uint16_t v[2];
    for (int e = 0; e < 2; ++e) {
      const unsigned row = TRANS ? 2 * (lane % 4) + e : lane / 4;
      const unsigned col = TRANS ? lane / 4 : 2 * (lane % 4) + e;
      std::memcpy(&v[e], w.row[8 * i + row] + 2 * col, 2);
    }
    r[i] = static_cast<uint32_t>(v[0]) | (static_cast<uint32_t>(v[1]) << 16);
  }
  sta_emu_syncwarp();
}

inline float sta_emu_b16_to_float(uint16_t bits, bool bf16) {
  if (bf16) {
    const uint32_t u = static_cast<uint32_t>(bits) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
  }
  _Float16 h;
  std::memcpy(&h, &bits, 2);
  return static_cast<float>(h);
}

// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}: d = a b + c with the PTX fragment layouts
// (g = lane / 4, t = lane % 4): a regs {(g, 2t..), (g+8, 2t..), (g, 2t+8..), (g+8, 2t+8..)} of
// A (16x16); b regs {(k 2t.., n g), (k 2t+8.., n g)} of B (16x8); c/d {(g, 2t), (g, 2t+1),
// (g+8, 2t), (g+8, 2t+1)}. Exact products, fp32 accumulation in k order.
inline void sta_emu_mma16816(float* d, const uint32_t* a, const uint32_t* b, const float* c, bool bf16) {
  const unsigned warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  StaEmuWarpSlots& w = sta_emu_warp_slots[warp];
  for (int i = 0; i < 4; ++i) w.a[lane][i] = a[i];
  for (int i = 0; i < 2; ++i) w.b[lane][i] = b[i];
  sta_emu_syncwarp();
  auto elem = [&](uint32_t reg, int k) { return sta_emu_b16_to_float(static_cast<uint16_t>(reg >> (16 * (k % 2))), bf16); };
  auto A = [&](int m, int k) { return elem(w.a[(m % 8) * 4 + (k % 8) / 2][(m >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0)], k); };
  auto B = [&](int k, int n) { return elem(w.b[n * 4 + (k % 8) / 2][k >= 8 ? 1 : 0], k); };
  const int g = lane / 4, t = lane % 4;
  float out[4];
  for (int i = 0; i < 4; ++i) {
    const int m = g + (i >= 2 ? 8 : 0), n = 2 * t + i % 2;
    float acc = c[i];
    for (int k = 0; k < 16; ++k) acc = std::fmaf(A(m, k), B(k, n), acc);
    out[i] = acc;
  }
  sta_emu_syncwarp();
  for (int i = 0; i < 4; ++i) d[i] = out[i];
}

