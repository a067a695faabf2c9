// Kernel 2 of the fused forward: out = x + g Wu^T + bu on the spatial rows, prefix rows copied,
// over all F*L rows so the prefix passthrough needs no extra launch. Run with res = dO, a = dh
// and W = Wd^T (strides swapped), no bias, it is also the backward's dgrad: dx = dO + dh Wd.
// Mirrors kernels/adapter_fwd.py's adapter_up_residual_fwd_kernel.
#include <type_traits>

#include "st_adapter.h"
#include "st_adapter_tile.cuh"

namespace st_adapter {
namespace {

template <typename TR, typename T>
__global__ void __launch_bounds__(kThreads, 1) up_residual_kernel(UpResidualParams p) {
  constexpr int BM = kUpBlockM;
  constexpr int BN = kUpBlockN;
  constexpr int BK = kUpBlockK;
  constexpr int E = BM * BN / kThreads;
  constexpr int ROW_STEP = kThreads / BN;
  // fp32: the 8x4 SIMT accumulators plus staged loads reach 252 registers; load in-step instead
  constexpr bool kPipeline = !std::is_same<T, float>::value;
  using Layout = TileLayout<T, BM, BN, BK>;
  using Warps = WarpGrid<BM, BN>;

  __shared__ __align__(128) unsigned char smem[Layout::kBytes];
  __shared__ int64_t row_off[BM];

  const TR* __restrict__ res = static_cast<const TR*>(p.res);
  const T* __restrict__ a = static_cast<const T*>(p.a);
  const T* __restrict__ w = static_cast<const T*>(p.w);
  TR* __restrict__ out = static_cast<TR*>(p.out);

  const int64_t n_rows = p.F * p.L;
  const int64_t n_n_tiles = cdiv(p.NOUT, BN);
  const BlockCoord blk = decode_block(blockIdx.x, n_n_tiles, cdiv(n_rows, BM));
  const int64_t n0 = blk.x * BN;
  const int64_t row0 = blk.y * BM;

  // rows of `a` this tile multiplies: spatial token rows; prefix and past-the-end rows are zeros
  for (int m = threadIdx.x; m < BM; m += kThreads) {
    const int64_t row = row0 + m;
    const RowPos rp = row_position(row, p.L, p.P, p.S);
    row_off[m] = (row < n_rows && rp.spatial) ? rp.token * p.K : -1;
  }
  __syncthreads();
  // the next K step's loads fly during this step's MMA; `a` rows are token * K
  const bool vec_a = rows_vector_ok<T, T>(p.a, p.K, 1, p.K, p.K);
  RowsTile<T, T, BM, BK> a_tile;
  WeightTile<T, BN, BK> b_tile;
  if constexpr (kPipeline) {
    a_tile.fetch(a, row_off, 0, p.K, 1, vec_a);
    b_tile.fetch(w, n0, p.NOUT, 0, p.K, p.stride_wo, p.stride_wi);
  }
  BlockMma<T, BM, BN, BK, Warps::kM, Warps::kN> mma;
  mma.zero();
  for (int64_t k0 = 0; k0 < p.K; k0 += BK) {
    if constexpr (!kPipeline) {
      a_tile.fetch(a, row_off, k0, p.K, 1, vec_a);
      b_tile.fetch(w, n0, p.NOUT, k0, p.K, p.stride_wo, p.stride_wi);
    }
    __syncthreads();
    a_tile.template commit<Layout::kLdA>(Layout::a(smem), vec_a);
    b_tile.template commit<Layout::kLdB>(Layout::b(smem), p.stride_wi);
    __syncthreads();
    if (kPipeline && k0 + BK < p.K) {
      a_tile.fetch(a, row_off, k0 + BK, p.K, 1, vec_a);
      b_tile.fetch(w, n0, p.NOUT, k0 + BK, p.K, p.stride_wo, p.stride_wi);
    }
    mma.step(Layout::a(smem), Layout::kLdA, Layout::b(smem), Layout::kLdB);
  }
  __syncthreads();
  mma.store(Layout::c(smem), Layout::kLdC);
  __syncthreads();

  const float* cs = Layout::c(smem);
  const int col = threadIdx.x % BN;
  const int64_t n = n0 + col;
  const bool n_ok = n < p.NOUT;
  const float bias = (n_ok && p.bias != nullptr) ? to_float(static_cast<const T*>(p.bias)[n]) : 0.f;
#pragma unroll 4
  for (int e = 0; e < E; ++e) {
    const int m = threadIdx.x / BN + e * ROW_STEP;
    const int64_t row = row0 + m;
    if (!n_ok || row >= n_rows) continue;
    const RowPos rp = row_position(row, p.L, p.P, p.S);
    const float y = rp.spatial ? cs[m * Layout::kLdC + col] + bias : 0.f;
    const float r = to_float(res[rp.frame * p.stride_rf + rp.l * p.stride_rl + n * p.stride_rc]);
    out[row * p.NOUT + n] = from_float<TR>(r + y);
  }
}

template <typename TR, typename T>
cudaError_t launch(const UpResidualParams& p, cudaStream_t stream) {
  const int64_t blocks = cdiv(p.NOUT, kUpBlockN) * cdiv(p.F * p.L, kUpBlockM);
  if (blocks == 0) return cudaSuccess;
  auto kernel = up_residual_kernel<TR, T>;
  STA_LAUNCH(kernel, static_cast<unsigned>(blocks), kThreads, stream, p);
  return cudaGetLastError();
}

}  // namespace

cudaError_t up_residual_forward(const UpResidualParams& p, cudaStream_t stream) {
  if (p.res_dtype == p.w_dtype) {
    switch (p.w_dtype) {
      case DType::kFloat32: return launch<float, float>(p, stream);
      case DType::kFloat16: return launch<__half, __half>(p, stream);
      case DType::kBFloat16: return launch<__nv_bfloat16, __nv_bfloat16>(p, stream);
    }
  } else if (p.res_dtype == DType::kFloat32) {
    switch (p.w_dtype) {
      case DType::kFloat16: return launch<float, __half>(p, stream);
      case DType::kBFloat16: return launch<float, __nv_bfloat16>(p, stream);
      default: break;
    }
  }
  return cudaErrorInvalidValue;
}

}  // namespace st_adapter
