// Block-tile GEMM pieces shared by the ST-Adapter kernels: dtype conversion, the launch helper,
// shared-memory tile layouts, stage loaders that cast to the compute dtype on load where they must
// (autocast: fp32 x against fp16/bf16 weights, as the Triton kernels' _mma does), and the
// per-block MMA: tensor cores (mma.sync m16n8k16 fed by ldmatrix, fp32 accumulate) for fp16/bf16,
// an fp32 SIMT micro-tile for fp32 (IEEE fp32 like torch's matmul without TF32, so fp32 parity
// holds).
//
// A block is 256 threads (8 warps). 16-bit: a ring of STAGES shared-memory (A, B) tiles filled by
// 16-byte cp.async chunks keeps STAGES - 1 K steps in flight while the warps multiply (element
// loads where the data is fp32, strided or misaligned). fp32: one tile, loaded in-step. After the
// K loop the fp32 accumulators go to a BM x BN shared tile C (aliasing the A/B tiles) that the
// kernels' epilogues read element-wise with a channel-stable thread mapping.
#pragma once

#include <stdint.h>

#include <type_traits>

#ifdef STA_CPU_EMULATION
#include "cpu_emulation.h"  // tests only: the kernels on CPU threads
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

#include "st_adapter_dispatch.h"
#include "st_adapter_index.cuh"
#include "st_adapter_mma.cuh"

namespace st_adapter {

// The element type of a dispatch tag (st_adapter_dispatch.h): CType<DTypeTag<kFloat16>> = __half.
template <DType D>
struct CTypeOf;
template <>
struct CTypeOf<DType::kFloat32> {
  using type = float;
};
template <>
struct CTypeOf<DType::kFloat16> {
  using type = __half;
};
template <>
struct CTypeOf<DType::kBFloat16> {
  using type = __nv_bfloat16;
};
template <typename Tag>
using CType = typename CTypeOf<Tag::value>::type;

// kernel<<<blocks, threads, 0, stream>>>(args...) on a 1-D grid: nothing for 0 blocks, and
// cudaErrorInvalidConfiguration (never a wrapped grid) past gridDim.x's limit (grid_fits).
template <typename Kernel, typename... Args>
cudaError_t launch_1d(Kernel kernel, int64_t blocks, int threads, cudaStream_t stream, const Args&... args) {
  if (blocks == 0) return cudaSuccess;
  if (!grid_fits(blocks)) return cudaErrorInvalidConfiguration;
#ifdef STA_CPU_EMULATION
  (void)stream;
  sta_emu_launch(kernel, static_cast<unsigned>(blocks), static_cast<unsigned>(threads), args...);
#else
  kernel<<<static_cast<unsigned>(blocks), threads, 0, stream>>>(args...);
#endif
  return cudaGetLastError();
}

template <typename T>
__device__ __forceinline__ float to_float(T v);
template <>
__device__ __forceinline__ float to_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Shared-memory layout of one block tile. Row pads keep every ldmatrix row 16-byte aligned
// (lda, ldb multiples of 8 16-bit elements) and skew banks (80-byte rows: 8 rows hit 8 disjoint bank quads).
template <typename T, int BM, int BN, int BK>
struct TileLayout {
  static constexpr int kLdA = BK + 8;  // As[m][k]
  static constexpr int kLdB = BN + 8;  // Bs[k][n]
  static constexpr int kLdC = BN + 4;  // Cs[m][n], fp32
  static constexpr int kBytesA = BM * kLdA * (int)sizeof(T);
  static constexpr int kOffsetB = (kBytesA + 127) / 128 * 128;
  static constexpr int kBytesAB = kOffsetB + BK * kLdB * (int)sizeof(T);
  static constexpr int kBytesC = BM * kLdC * (int)sizeof(float);
  static constexpr int kBytes = kBytesAB > kBytesC ? kBytesAB : kBytesC;

  __device__ static T* a(unsigned char* smem) { return reinterpret_cast<T*>(smem); }
  __device__ static T* b(unsigned char* smem) { return reinterpret_cast<T*>(smem + kOffsetB); }
  __device__ static float* c(unsigned char* smem) { return reinterpret_cast<float*>(smem); }
};

// Whether A rows may go to shared memory as 16-byte chunks (cp.async): 16-bit A in the compute
// dtype, k-contiguous, K and every row offset (frame and
// token strides) multiples of 8 elements, base 16-byte aligned. Uniform per launch.
template <typename TS, typename T>
__host__ __device__ __forceinline__ bool rows_vector_ok(const void* base, int64_t K, int64_t stride_k,
                                                         int64_t stride_f, int64_t stride_l) {
  return sizeof(TS) == 2 && sizeof(T) == 2 && stride_k == 1 && K % 8 == 0 && stride_f % 8 == 0 &&
         stride_l % 8 == 0 && reinterpret_cast<uintptr_t>(base) % 16 == 0;
}

// ------------------------------------------------------------------------ block MMA
// WM x WN warps; warp (wm, wn) owns rows [wm*BM/WM, ...) and columns [wn*BN/WN, ...) as
// kFragM x kFragN tiles of mma.sync m16n8k16 (fp32 accumulators in registers). Per 16-deep k
// slice, ldmatrix.x4 loads one 16x16 A fragment from As[m][k] and ldmatrix.x4.trans two 16x8 B
// fragments from Bs[k][n] (rows 16-byte aligned: the TileLayout pads keep lda, ldb multiples of 8).
template <typename T, int BM, int BN, int BK, int WM, int WN>
struct BlockMma {
  static_assert(WM * WN * 32 == kThreads, "8 warps per block");
  static constexpr int kFragM = BM / (16 * WM);
  static constexpr int kFragN = BN / (8 * WN);
  static_assert(kFragM >= 1 && kFragN >= 2 && kFragN % 2 == 0 && BM % (16 * WM) == 0 && BN % (16 * WN) == 0,
                "tile/warp mismatch");
  static_assert(BK % 16 == 0, "BK must be a multiple of the MMA k");

  float acc[kFragM][kFragN][4];

  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int i = 0; i < kFragM; ++i)
#pragma unroll
      for (int j = 0; j < kFragN; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;
  }

  // A_KM: As is [k][m] (wgrad's token-major A^T tiles), else [m][k]; b_nk: Bs is [n][k], else [k][n].
  template <bool A_KM = false>
  __device__ __forceinline__ void step(const T* As, int lda, const T* Bs, int ldb, bool b_nk = false) {
    const int warp = threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    const int row0 = (warp / WN) * (BM / WM);
    const int col0 = (warp % WN) * (BN / WN);
    // ldmatrix.x4 takes 4 8x8 matrices, lanes 8q..8q+7 giving matrix q's rows: lane & 7 is the
    // row within a matrix, bits 3 and 4 of the lane pick the matrix.
    const int r8 = lane & 7, q1 = (lane >> 3) & 1, q2 = lane >> 4;
#pragma unroll
    for (int kk = 0; kk < BK; kk += 16) {
      uint32_t a[kFragM][4];
      uint32_t b[kFragN][2];
#pragma unroll
      for (int i = 0; i < kFragM; ++i) {
        if constexpr (A_KM)  // matrices (k 0-7, m 0-7), (k 0-7, m 8-15), (k 8-15, m 0-7), (k 8-15, m 8-15)
          ldmatrix_x4<true>(a[i], As + (kk + r8 + 8 * q2) * lda + row0 + 16 * i + 8 * q1);
        else  // matrices (m 0-7 | 8-15) x (k 0-7 | 8-15), m fastest
          ldmatrix_x4<false>(a[i], As + (row0 + 16 * i + r8 + 8 * q1) * lda + kk + 8 * q2);
      }
#pragma unroll
      for (int j = 0; j < kFragN; j += 2) {  // two n8 fragments: (k 0-7 | 8-15) x (n 0-7 | 8-15)
        uint32_t r[4];
        if (b_nk)
          ldmatrix_x4<false>(r, Bs + (col0 + 8 * j + r8 + 8 * q2) * ldb + kk + 8 * q1);
        else
          ldmatrix_x4<true>(r, Bs + (kk + r8 + 8 * q1) * ldb + col0 + 8 * j + 8 * q2);
        b[j][0] = r[0];
        b[j][1] = r[1];
        b[j + 1][0] = r[2];
        b[j + 1][1] = r[3];
      }
#pragma unroll
      for (int i = 0; i < kFragM; ++i)
#pragma unroll
        for (int j = 0; j < kFragN; ++j) mma_16816<T>(acc[i][j], a[i], b[j]);
    }
  }

  __device__ __forceinline__ void store(float* Cs, int ldc) {
    const int warp = threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    const int row = (warp / WN) * (BM / WM) + lane / 4;
    const int col = (warp % WN) * (BN / WN) + 2 * (lane % 4);
#pragma unroll
    for (int i = 0; i < kFragM; ++i)
#pragma unroll
      for (int j = 0; j < kFragN; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) Cs[(row + 16 * i + (e / 2) * 8) * ldc + col + 8 * j + e % 2] = acc[i][j][e];
  }
};

// fp32: a 16 x 16 thread grid, each thread a (BM/16) x (BN/16) micro-tile at rows ty + 16*i,
// columns tx + 16*j (strided, so a warp reads 16 consecutive B columns: no bank conflicts).
template <int BM, int BN, int BK, int WM, int WN>
struct BlockMma<float, BM, BN, BK, WM, WN> {
  static constexpr int kTM = BM / 16;
  static constexpr int kTN = BN / 16;
  float acc[kTM][kTN];

  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int i = 0; i < kTM; ++i)
#pragma unroll
      for (int j = 0; j < kTN; ++j) acc[i][j] = 0.f;
  }

  __device__ __forceinline__ void step(const float* As, int lda, const float* Bs, int ldb) {
    const int ty = threadIdx.x / 16;
    const int tx = threadIdx.x % 16;
#pragma unroll 8
    for (int k = 0; k < BK; ++k) {
      float a[kTM];
      float b[kTN];
#pragma unroll
      for (int i = 0; i < kTM; ++i) a[i] = As[(ty + 16 * i) * lda + k];
#pragma unroll
      for (int j = 0; j < kTN; ++j) b[j] = Bs[k * ldb + tx + 16 * j];
#pragma unroll
      for (int i = 0; i < kTM; ++i)
#pragma unroll
        for (int j = 0; j < kTN; ++j) acc[i][j] = fmaf(a[i], b[j], acc[i][j]);
    }
  }

  __device__ __forceinline__ void store(float* Cs, int ldc) {
    const int ty = threadIdx.x / 16;
    const int tx = threadIdx.x % 16;
#pragma unroll
    for (int i = 0; i < kTM; ++i)
#pragma unroll
      for (int j = 0; j < kTN; ++j) Cs[(ty + 16 * i) * ldc + tx + 16 * j] = acc[i][j];
  }
};

// Warp grids per tile shape (8 warps; each warp a whole number of 16 x 16 fragments).
template <int BM, int BN>
struct WarpGrid {
  static constexpr int kM = BM >= 64 ? 4 : 2;
  static constexpr int kN = 8 / kM;
};

// ----------------------------------------------------------------- cp.async pipeline (16-bit)
// How a weight tile reaches shared memory, uniform per launch: 16-byte cp.async chunks along
// whichever of W's dims is contiguous (Bs[n][k] for k, Bs[k][n] for n), else element loads
// into Bs[k][n] (any strides, or N / K / strides not multiples of 8, or a misaligned base).
enum class WeightLoad : int { kKChunks, kNChunks, kElements };

__host__ __device__ __forceinline__ WeightLoad weight_load(const void* w, int64_t N, int64_t K, int64_t stride_n,
                                                          int64_t stride_k) {
  if (reinterpret_cast<uintptr_t>(w) % 16 != 0) return WeightLoad::kElements;
  if (stride_k == 1 && K % 8 == 0 && stride_n % 8 == 0) return WeightLoad::kKChunks;
  if (stride_n == 1 && N % 8 == 0 && stride_k % 8 == 0) return WeightLoad::kNChunks;
  return WeightLoad::kElements;
}

// STAGES copies of the A (As[m][k]) and B (Bs[n][k] or Bs[k][n]) tiles, 16-bit; C (fp32) aliases them.
template <typename T, int BM, int BN, int BK, int STAGES>
struct PipeLayout {
  static constexpr int kLdA = BK + 8;   // As[m][k]
  static constexpr int kLdBk = BK + 8;  // Bs[n][k]
  static constexpr int kLdBn = BN + 8;  // Bs[k][n]
  static constexpr int kLdC = BN + 4;
  static constexpr int kElemsA = BM * kLdA;
  static constexpr int kElemsB = BN * kLdBk > BK * kLdBn ? BN * kLdBk : BK * kLdBn;
  static constexpr int kStageBytes = ((kElemsA + kElemsB) * (int)sizeof(T) + 127) / 128 * 128;
  static constexpr int kBytesAB = STAGES * kStageBytes;
  static constexpr int kBytesC = BM * kLdC * (int)sizeof(float);
  static constexpr int kBytes = kBytesAB > kBytesC ? kBytesAB : kBytesC;

  __device__ static T* a(unsigned char* smem, int s) { return reinterpret_cast<T*>(smem + s * kStageBytes); }
  __device__ static T* b(unsigned char* smem, int s) { return a(smem, s) + kElemsA; }
  __device__ static float* c(unsigned char* smem) { return reinterpret_cast<float*>(smem); }
};

template <typename T, int BM, int BN, int BK, int STAGES>
using GemmLayout = typename std::conditional<std::is_same<T, float>::value, TileLayout<T, BM, BN, BK>,
                                             PipeLayout<T, BM, BN, BK, STAGES>>::type;

// One stage of A(m, k) = src[row_off[m] + (k0 + k) * stride_k] into As[m][k]: 16-byte cp.async
// chunks in vector mode (rows_vector_ok), else element loads cast to T (autocast, strided x).
template <typename TS, typename T, int BM, int BK>
__device__ __forceinline__ void load_rows_stage(T* As, const TS* __restrict__ src, const int64_t* row_off, int64_t k0,
                                                int64_t K, int64_t stride_k, bool vec_a) {
  constexpr int LDA = BK + 8;
  if constexpr (sizeof(TS) == 2) {
    if (vec_a) {
      for (int c = threadIdx.x; c < BM * BK / 8; c += kThreads) {
        const int m = c / (BK / 8);
        const int k = (c - m * (BK / 8)) * 8;
        const int64_t off = row_off[m];
        const bool ok = off >= 0 && k0 + k < K;
        cp_async16(As + m * LDA + k, ok ? src + off + k0 + k : src, ok ? 16 : 0);
      }
      return;
    }
  }
  for (int idx = threadIdx.x; idx < BM * BK; idx += kThreads) {
    const int m = idx / BK;
    const int k = idx - m * BK;
    const int64_t off = row_off[m];
    float x = 0.f;
    if (off >= 0 && k0 + k < K) x = to_float(src[off + (k0 + k) * stride_k]);
    As[m * LDA + k] = from_float<T>(x);
  }
}

// One stage of W(n0 + n, k0 + k) = w[(n0 + n) * stride_n + (k0 + k) * stride_k]: Bs[n][k]
// (kKChunks) or Bs[k][n] (kNChunks, kElements), zeros outside (N, K).
template <typename T, int BN, int BK>
__device__ __forceinline__ void load_weight_stage(T* Bs, const T* __restrict__ w, int64_t n0, int64_t N, int64_t k0,
                                                  int64_t K, int64_t stride_n, int64_t stride_k, WeightLoad mode) {
  constexpr int LDBK = BK + 8;
  constexpr int LDBN = BN + 8;
  if (mode == WeightLoad::kKChunks) {
    for (int c = threadIdx.x; c < BN * BK / 8; c += kThreads) {
      const int n = c / (BK / 8);
      const int k = (c - n * (BK / 8)) * 8;
      const bool ok = n0 + n < N && k0 + k < K;
      cp_async16(Bs + n * LDBK + k, ok ? w + (n0 + n) * stride_n + k0 + k : w, ok ? 16 : 0);
    }
  } else if (mode == WeightLoad::kNChunks) {
    for (int c = threadIdx.x; c < BN * BK / 8; c += kThreads) {
      const int k = c / (BN / 8);
      const int n = (c - k * (BN / 8)) * 8;
      const bool ok = k0 + k < K && n0 + n < N;
      cp_async16(Bs + k * LDBN + n, ok ? w + (k0 + k) * stride_k + n0 + n : w, ok ? 16 : 0);
    }
  } else {
    const bool k_fastest = stride_k == 1;  // coalesced along whichever dim is contiguous
    for (int idx = threadIdx.x; idx < BN * BK; idx += kThreads) {
      int n, k;
      if (k_fastest) {
        n = idx / BK;
        k = idx - n * BK;
      } else {
        k = idx / BN;
        n = idx - k * BN;
      }
      T x = from_float<T>(0.f);
      if (n0 + n < N && k0 + k < K) x = w[(n0 + n) * stride_n + (k0 + k) * stride_k];
      Bs[k * LDBN + n] = x;
    }
  }
}

// ------------------------------------------------------------------------ block GEMM
// The K loop every GEMM kernel but wgrad runs: C (BM x BN fp32 at Layout::c(smem), Layout =
// GemmLayout) = A B with A(m, k) = src[row_off[m] + k * stride_k] (row_off < 0 rows are zeros)
// and B(k, n) = W(n0 + n, k) = w[(n0 + n) * stride_wn + k * stride_wk], k in [0, K), n0 + n < N.
// row_off must be visible to every thread (synced) before the call; C is visible to every
// thread after it.
template <typename TS, typename T, int BM, int BN, int BK, int STAGES>
__device__ __forceinline__ void block_gemm(unsigned char* smem, const TS* __restrict__ src, const int64_t* row_off,
                                           int64_t K, int64_t stride_k, bool vec_a, const T* __restrict__ w, int64_t n0,
                                           int64_t N, int64_t stride_wn, int64_t stride_wk) {
  using Warps = WarpGrid<BM, BN>;
  BlockMma<T, BM, BN, BK, Warps::kM, Warps::kN> mma;
  mma.zero();
  if constexpr (std::is_same<T, float>::value) {
    // fp32 (IEEE SIMT): element loads in-step; the SIMT accumulators (plus the conv kernels'
    // window) left no registers to stage the next step (252 registers, spills on sm_80/sm_90).
    using Layout = TileLayout<T, BM, BN, BK>;
    for (int64_t k0 = 0; k0 < K; k0 += BK) {
      __syncthreads();  // the previous step's MMA is done with As / Bs
      load_rows_stage<TS, T, BM, BK>(Layout::a(smem), src, row_off, k0, K, stride_k, false);
      load_weight_stage<T, BN, BK>(Layout::b(smem), w, n0, N, k0, K, stride_wn, stride_wk, WeightLoad::kElements);
      __syncthreads();
      mma.step(Layout::a(smem), Layout::kLdA, Layout::b(smem), Layout::kLdB);
    }
    __syncthreads();  // C aliases A / B
    mma.store(Layout::c(smem), Layout::kLdC);
  } else {
    // 16-bit: a STAGES-deep cp.async ring, STAGES - 1 K steps in flight during each step's MMA.
    using Layout = PipeLayout<T, BM, BN, BK, STAGES>;
    static_assert(STAGES >= 2, "a pipeline needs two stages");
    const WeightLoad mode = weight_load(w, N, K, stride_wn, stride_wk);
    const bool b_nk = mode == WeightLoad::kKChunks;
    const int ldb = b_nk ? Layout::kLdBk : Layout::kLdBn;
    const int64_t nk = cdiv(K, BK);
    auto load = [&](int stage, int64_t kt) {
      load_rows_stage<TS, T, BM, BK>(Layout::a(smem, stage), src, row_off, kt * BK, K, stride_k, vec_a);
      load_weight_stage<T, BN, BK>(Layout::b(smem, stage), w, n0, N, kt * BK, K, stride_wn, stride_wk, mode);
    };
#pragma unroll
    for (int s = 0; s < STAGES - 1; ++s) {
      if (s < nk) load(s, s);
      cp_async_commit();  // one group per stage, empty ones included, so the waits count stages
    }
    for (int64_t kt = 0; kt < nk; ++kt) {
      cp_async_wait<STAGES - 2>();  // this thread's copies of stage kt have landed
      __syncthreads();              // ... everyone's; and step kt - 1's readers are done with its stage
      if (kt + STAGES - 1 < nk) load(static_cast<int>((kt + STAGES - 1) % STAGES), kt + STAGES - 1);
      cp_async_commit();
      const int s = static_cast<int>(kt % STAGES);
      mma.step(Layout::a(smem, s), Layout::kLdA, Layout::b(smem, s), ldb, b_nk);
    }
    cp_async_wait<0>();
    __syncthreads();  // C aliases the stages
    mma.store(Layout::c(smem), Layout::kLdC);
  }
  __syncthreads();
}

}  // namespace st_adapter
