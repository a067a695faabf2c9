// Weight gradients dWu = dy^T g (+ dbu = sum dy) and dWd = dh^T x_s (+ dbd = sum dh), split over
// tokens into fp32 partials (splits, I, J) that sum_partials_many adds in a fixed order:
// deterministic, no float atomics. Mirrors kernels/adapter_bwd.py's adapter_wgrad_kernel.
#include <type_traits>

#include "st_adapter.h"
#include "st_adapter_tile.cuh"

namespace st_adapter {
namespace {

// This block's (I, J) tile origin, token split and token range [n_start, n_end): the grid is
// (J tiles, I tiles, splits) flattened into x. The bias partial is written by the blocks of the
// first J tile only.
struct WgradBlock {
  int64_t j0, i0, split, n_start, n_end;
  bool with_bias;
};

template <int BM, int BN>
__device__ __forceinline__ WgradBlock wgrad_block(const WgradParams& p) {
  const BlockCoord blk = decode_block(blockIdx.x, cdiv(p.J, BN), cdiv(p.I, BM));
  WgradBlock b;
  b.j0 = blk.x * BN;
  b.i0 = blk.y * BM;
  b.split = blk.z;
  b.n_start = b.split * p.split.tokens_per_split;
  const int64_t n_end_split = b.n_start + p.split.tokens_per_split;
  b.n_end = n_end_split < p.N ? n_end_split : p.N;
  b.with_bias = p.db_part != nullptr && blk.x == 0;
  return b;
}

// Writes the block's (BM x BN) fp32 partial from C (smem) to dw_part[split], and the bias partial
// db_part[split] from every thread's column sum (thread tid summed column tid % BM).
template <int BM, int BN>
__device__ __forceinline__ void store_partials(const WgradParams& p, const float* cs, int ldc, int64_t split,
                                               int64_t i0, int64_t j0, bool with_bias, float bias_acc,
                                               float (&bias_buf)[kThreads / BM][BM]) {
  float* dw = p.dw_part + split * p.I * p.J;
  const int col = threadIdx.x % BN;
#pragma unroll 4
  for (int idx = threadIdx.x; idx < BM * BN; idx += kThreads) {
    const int i = idx / BN;
    if (i0 + i < p.I && j0 + col < p.J) dw[(i0 + i) * p.J + j0 + col] = cs[i * ldc + col];
  }
  if (with_bias) {  // uniform per block
    const int my_i = threadIdx.x % BM;
    bias_buf[threadIdx.x / BM][my_i] = bias_acc;
    __syncthreads();
    if (threadIdx.x < BM && i0 + my_i < p.I) {
      float sum = 0.f;
#pragma unroll
      for (int r = 0; r < kThreads / BM; ++r) sum += bias_buf[r][my_i];
      p.db_part[split * p.I + i0 + my_i] = sum;
    }
  }
}

// fp32 (IEEE SIMT): token offsets double-buffered in shared memory, the next step's loads staged
// in registers during this step's MMA.
template <typename TA, typename TB, typename T>
__global__ void __launch_bounds__(kThreads, 1) wgrad_simt_kernel(WgradParams p) {
  constexpr int BM = kWgradBlockM;  // I per tile
  constexpr int BN = kWgradBlockN;  // J per tile
  constexpr int BK = kWgradBlockK;  // tokens per step
  constexpr int ROW_STEP = kThreads / BM;
  static_assert(kThreads % BM == 0 && kThreads % BN == 0, "thread mapping");
  using Layout = TileLayout<T, BM, BN, BK>;
  using Warps = WarpGrid<BM, BN>;

  __shared__ __align__(128) unsigned char smem[Layout::kBytes];
  __shared__ int64_t off_a[2][BK];  // token offsets of this step and the next (double-buffered)
  __shared__ int64_t off_b[2][BK];
  __shared__ float bias_buf[ROW_STEP][BM];

  const TA* __restrict__ a = static_cast<const TA*>(p.a.ptr);
  const TB* __restrict__ b = static_cast<const TB*>(p.b.ptr);
  const WgradBlock wb = wgrad_block<BM, BN>(p);
  const int64_t j0 = wb.j0, i0 = wb.i0, split = wb.split, n_start = wb.n_start, n_end = wb.n_end;
  const bool with_bias = wb.with_bias;

  // A^T tile loads run i-fastest: thread tid always loads column i = tid % BM, so it can keep a
  // private fp32 bias sum of the values it loads (in their source precision, before the cast).
  float bias_acc = 0.f;

  // Token offsets of the BK tokens from n0 into buffer buf (-1 past the split's end).
  auto fill_offsets = [&](int buf, int64_t n0) {
    if (threadIdx.x < BK) {
      const int64_t n = n0 + threadIdx.x;
      off_a[buf][threadIdx.x] = n < n_end ? token_offset(n, p.S, p.a.P, p.a.stride_f, p.a.stride_l) : -1;
    } else if (threadIdx.x < 2 * BK) {
      const int64_t n = n0 + threadIdx.x - BK;
      off_b[buf][threadIdx.x - BK] = n < n_end ? token_offset(n, p.S, p.b.P, p.b.stride_f, p.b.stride_l) : -1;
    }
  };
  // Register-staged tiles: As[i][k] = A[token n0 + k][i0 + i], Bs[k][j] = B[token n0 + k][j0 + j].
  constexpr int A_PER = BM * BK / kThreads;
  constexpr int B_PER = BN * BK / kThreads;
  T a_v[A_PER];
  T b_v[B_PER];
  auto fetch = [&](int buf) {
#pragma unroll
    for (int r = 0; r < A_PER; ++r) {
      const int idx = threadIdx.x + r * kThreads;
      const int k = idx / BM;
      const int i = idx - k * BM;
      const int64_t off = off_a[buf][k];
      float v = 0.f;
      if (off >= 0 && i0 + i < p.I) v = to_float(a[off + (i0 + i) * p.a.stride_c]);
      bias_acc += v;
      a_v[r] = from_float<T>(v);
    }
#pragma unroll
    for (int r = 0; r < B_PER; ++r) {
      const int idx = threadIdx.x + r * kThreads;
      const int k = idx / BN;
      const int j = idx - k * BN;
      const int64_t off = off_b[buf][k];
      float v = 0.f;
      if (off >= 0 && j0 + j < p.J) v = to_float(b[off + (j0 + j) * p.b.stride_c]);
      b_v[r] = from_float<T>(v);
    }
  };

  BlockMma<T, BM, BN, BK, Warps::kM, Warps::kN> mma;
  mma.zero();
  T* As = Layout::a(smem);
  T* Bs = Layout::b(smem);
  fill_offsets(0, n_start);
  __syncthreads();
  if (n_start < n_end) fetch(0);
  int buf = 0;
  for (int64_t n0 = n_start; n0 < n_end; n0 += BK, buf ^= 1) {
    __syncthreads();  // the previous step's MMA is done with As / Bs
#pragma unroll
    for (int r = 0; r < A_PER; ++r) {
      const int idx = threadIdx.x + r * kThreads;
      const int k = idx / BM;
      As[(idx - k * BM) * Layout::kLdA + k] = a_v[r];
    }
#pragma unroll
    for (int r = 0; r < B_PER; ++r) {
      const int idx = threadIdx.x + r * kThreads;
      const int k = idx / BN;
      Bs[k * Layout::kLdB + idx - k * BN] = b_v[r];
    }
    fill_offsets(buf ^ 1, n0 + BK);
    __syncthreads();
    if (n0 + BK < n_end) fetch(buf ^ 1);  // in flight during this step's MMA
    mma.step(As, Layout::kLdA, Bs, Layout::kLdB);
  }
  __syncthreads();
  mma.store(Layout::c(smem), Layout::kLdC);
  __syncthreads();

  store_partials<BM, BN>(p, Layout::c(smem), Layout::kLdC, split, i0, j0, with_bias, bias_acc, bias_buf);
}

// One stage of the A^T (or B) tile of a wgrad step: Xs[k][c] = X[token n0 + k][c0 + c] for
// c < COLS (zeros past n_end / n_cols), 16-byte cp.async chunks when `vector` (16-bit X in the
// compute dtype, column-contiguous, aligned rows), else element loads cast to T that add each
// value, before the cast, to col_sum (thread tid always loads column tid % COLS).
template <typename TX, typename T, int COLS, int BK>
__device__ __forceinline__ void load_tokens_stage(T* Xs, const TX* __restrict__ x, const TokenView& v, int64_t S,
                                                  int64_t n0, int64_t n_end, int64_t c0, int64_t n_cols,
                                                  bool vector, float& col_sum) {
  constexpr int LD = COLS + 8;
  if constexpr (sizeof(TX) == 2) {
    if (vector) {
      for (int c = threadIdx.x; c < BK * COLS / 8; c += kThreads) {
        const int k = c / (COLS / 8);
        const int col = (c - k * (COLS / 8)) * 8;
        const int64_t n = n0 + k;
        const bool ok = n < n_end && c0 + col < n_cols;
        const TX* src = ok ? x + token_offset(n, S, v.P, v.stride_f, v.stride_l) + c0 + col : x;
        cp_async16(Xs + k * LD + col, src, ok ? 16 : 0);
      }
      return;
    }
  }
#pragma unroll 4
  for (int idx = threadIdx.x; idx < BK * COLS; idx += kThreads) {
    const int k = idx / COLS;
    const int col = idx - k * COLS;
    const int64_t n = n0 + k;
    float val = 0.f;
    if (n < n_end && c0 + col < n_cols)
      val = to_float(x[token_offset(n, S, v.P, v.stride_f, v.stride_l) + (c0 + col) * v.stride_c]);
    col_sum += val;
    Xs[k * LD + col] = from_float<T>(val);
  }
}

// 16-bit: token-major A^T and B tiles (As[k][i], Bs[k][j]) through a CFG::kStages-deep cp.async
// ring, kStages - 1 token steps in flight during each step's mma.sync (A fragments by ldmatrix.trans).
// BK, STAGES: the GEMM config's resolved K depth and ring (configs that agree share a kernel).
template <typename TA, typename TB, typename T, int BK, int STAGES>
__global__ void __launch_bounds__(kThreads, 1) wgrad_mma_kernel(WgradParams p) {
  constexpr int BM = kWgradBlockM;  // I per tile
  constexpr int BN = kWgradBlockN;  // J per tile
  static_assert(kWgradBlockK % BK == 0, "token splits (multiples of kWgradBlockK) are whole steps");
  constexpr int LDA = BM + 8;       // As[k][i]
  constexpr int LDB = BN + 8;       // Bs[k][j]
  using Layout = PipeLayout<T, BM, BN, BK, STAGES>;
  static_assert(BK * LDA <= Layout::kElemsA && BK * LDB <= Layout::kElemsB, "token-major tiles fit the stages");
  using Warps = WarpGrid<BM, BN>;

  __shared__ __align__(128) unsigned char smem[Layout::kBytes];
  __shared__ float bias_buf[kThreads / BM][BM];

  const TA* __restrict__ a = static_cast<const TA*>(p.a.ptr);
  const TB* __restrict__ b = static_cast<const TB*>(p.b.ptr);
  const WgradBlock wb = wgrad_block<BM, BN>(p);
  const int64_t j0 = wb.j0, i0 = wb.i0, split = wb.split, n_start = wb.n_start, n_end = wb.n_end;
  const bool with_bias = wb.with_bias;
  const bool vec_a = rows_vector_ok<TA, T>(p.a.ptr, p.I, p.a.stride_c, p.a.stride_f, p.a.stride_l);
  const bool vec_b = rows_vector_ok<TB, T>(p.b.ptr, p.J, p.b.stride_c, p.b.stride_f, p.b.stride_l);

  float bias_acc = 0.f;  // column threadIdx.x % BM of A, summed in token order
  float unused = 0.f;
  const int64_t nk = n_end > n_start ? cdiv(n_end - n_start, BK) : 0;
  auto load = [&](int stage, int64_t kt) {
    const int64_t n0 = n_start + kt * BK;
    load_tokens_stage<TA, T, BM, BK>(Layout::a(smem, stage), a, p.a, p.S, n0, n_end, i0, p.I, vec_a, bias_acc);
    load_tokens_stage<TB, T, BN, BK>(Layout::b(smem, stage), b, p.b, p.S, n0, n_end, j0, p.J, vec_b, unused);
  };
  BlockMma<T, BM, BN, BK, Warps::kM, Warps::kN> mma;
  mma.zero();
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < nk) load(s, s);
    cp_async_commit();
  }
  for (int64_t kt = 0; kt < nk; ++kt) {
    cp_async_wait<STAGES - 2>();
    __syncthreads();  // stage kt landed everywhere; step kt - 1's readers are done with its stage
    if (kt + STAGES - 1 < nk) load(static_cast<int>((kt + STAGES - 1) % STAGES), kt + STAGES - 1);
    cp_async_commit();
    const int s = static_cast<int>(kt % STAGES);
    const T* As = Layout::a(smem, s);
    if (with_bias && vec_a) {  // chunks bypass registers: sum this thread's column from the stage
#pragma unroll
      for (int k = threadIdx.x / BM; k < BK; k += kThreads / BM) bias_acc += to_float(As[k * LDA + threadIdx.x % BM]);
    }
    mma.template step<true>(As, LDA, Layout::b(smem, s), LDB);
  }
  cp_async_wait<0>();
  __syncthreads();  // C aliases the stages
  mma.store(Layout::c(smem), Layout::kLdC);
  __syncthreads();
  store_partials<BM, BN>(p, Layout::c(smem), Layout::kLdC, split, i0, j0, with_bias, bias_acc, bias_buf);
}

// Thread i of the grid sums element i of the concatenated outputs: it finds its segment, then
// adds that segment's partials in order p = 0, 1, ... (deterministic, no atomics), and casts.
template <typename TO>
__global__ void sum_partials_kernel(PartialSums sums) {
  int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  for (int seg = 0; seg < sums.n; ++seg) {
    if (i < sums.numel[seg]) {
      const float* __restrict__ part = sums.part[seg];
      const int64_t numel = sums.numel[seg];
      float sum = 0.f;
      for (int64_t q = 0; q < sums.n_parts[seg]; ++q) sum += part[q * numel + i];
      static_cast<TO*>(sums.out[seg])[i] = from_float<TO>(sum);
      return;
    }
    i -= sums.numel[seg];
  }
}

}  // namespace

cudaError_t weight_grad(const WgradParams& p, cudaStream_t stream) {
  // Operands are token tensors in x's dtype (fp32 under autocast) or buffers in the weights'.
  return dispatch_dtypes(p.compute_dtype, cudaErrorInvalidValue, [&](auto a_dtype, auto b_dtype, auto dtype) {
    using TA = CType<decltype(a_dtype)>;
    using TB = CType<decltype(b_dtype)>;
    using T = CType<decltype(dtype)>;
    return dispatch_gemm_config<decltype(dtype)>(p.gemm_config, cudaErrorInvalidValue, [&](auto config) {
      const int64_t blocks = wgrad_blocks(p.I, p.J, p.split.splits);
      if constexpr (std::is_same<T, float>::value)
        return launch_1d(wgrad_simt_kernel<TA, TB, T>, blocks, kThreads, stream, p);
      else
        return launch_1d(wgrad_mma_kernel<TA, TB, T, decltype(config)::kBlockK, decltype(config)::kStages>, blocks,
                         kThreads, stream, p);
    });
  }, p.a.dtype, p.b.dtype);
}

cudaError_t sum_partials_many(const PartialSums& sums, cudaStream_t stream) {
  if (sums.n < 0 || sums.n > PartialSums::kMax) return cudaErrorInvalidValue;
  return dispatch_dtypes(sums.out_dtype, cudaErrorInvalidValue, [&](auto dtype) {
    return launch_1d(sum_partials_kernel<CType<decltype(dtype)>>, sum_partials_blocks(sums.total()),
                     kSumPartialsThreads, stream, sums);
  });
}

cudaError_t sum_partials(const float* part, float* out, int64_t n_parts, int64_t numel, cudaStream_t stream) {
  PartialSums sums;
  sums.add(part, out, n_parts, numel);
  return sum_partials_many(sums, stream);
}

}  // namespace st_adapter
