// Kernel 2 of the fused forward: out = x + g Wu^T + bu on the spatial rows, prefix rows copied,
// over all F*L rows so the prefix passthrough needs no extra launch. Run with res = dO, a = dh
// and W = Wd^T (strides swapped), no bias, it is also the backward's dgrad: dx = dO + dh Wd.
// Mirrors kernels/adapter_fwd.py's adapter_up_residual_fwd_kernel.
#include "st_adapter.h"
#include "st_adapter_tile.cuh"

namespace st_adapter {
namespace {

// BM, BK, STAGES: the GEMM config's resolved tile (st_adapter_dispatch.h's GemmConfigs).
template <typename TR, typename T, int BM, int BK, int STAGES>
__global__ void __launch_bounds__(kThreads, 1) up_residual_kernel(UpResidualParams p) {
  constexpr int BN = kUpBlockN;
  constexpr int E = BM * BN / kThreads;
  constexpr int ROW_STEP = kThreads / BN;
  using Layout = GemmLayout<T, BM, BN, BK, STAGES>;

  __shared__ __align__(128) unsigned char smem[Layout::kBytes];
  __shared__ int64_t row_off[BM];

  const TR* __restrict__ res = static_cast<const TR*>(p.res.ptr);
  const T* __restrict__ a = static_cast<const T*>(p.a);
  const T* __restrict__ w = static_cast<const T*>(p.w.ptr);
  TR* __restrict__ out = static_cast<TR*>(p.out);

  const int64_t L = p.res.P + p.S;
  const int64_t n_rows = p.F * L;
  const int64_t n_n_tiles = cdiv(p.NOUT, BN);
  const BlockCoord blk = decode_block(blockIdx.x, n_n_tiles, cdiv(n_rows, BM));
  const int64_t n0 = blk.x * BN;
  const int64_t row0 = blk.y * BM;

  // rows of `a` this tile multiplies: spatial token rows; prefix and past-the-end rows are zeros
  for (int m = threadIdx.x; m < BM; m += kThreads) {
    const int64_t row = row0 + m;
    const RowPos rp = row_position(row, L, p.res.P, p.S);
    row_off[m] = (row < n_rows && rp.spatial) ? rp.token * p.K : -1;
  }
  __syncthreads();
  // `a` rows are token * K
  const bool vec_a = rows_vector_ok<T, T>(p.a, p.K, 1, p.K, p.K);
  block_gemm<T, T, BM, BN, BK, STAGES>(smem, a, row_off, p.K, 1, vec_a, w, n0, p.NOUT, p.w.stride_n, p.w.stride_k);

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
    const RowPos rp = row_position(row, L, p.res.P, p.S);
    const float y = rp.spatial ? cs[m * Layout::kLdC + col] + bias : 0.f;
    const float r = to_float(res[rp.frame * p.res.stride_f + rp.l * p.res.stride_l + n * p.res.stride_c]);
    out[row * p.NOUT + n] = from_float<TR>(r + y);
  }
}

}  // namespace

cudaError_t up_residual_forward(const UpResidualParams& p, cudaStream_t stream) {
  return dispatch_dtypes(p.w_dtype, cudaErrorInvalidValue, [&](auto res_dtype, auto w_dtype) {
    return dispatch_gemm_config<decltype(w_dtype)>(p.gemm_config, cudaErrorInvalidValue, [&](auto config) {
      using CFG = decltype(config);
      auto kernel = up_residual_kernel<CType<decltype(res_dtype)>, CType<decltype(w_dtype)>, CFG::kUpBlockM,
                                       CFG::kBlockK, CFG::kStages>;
      return launch_1d(kernel, up_residual_blocks(p.F, p.res.P + p.S, p.NOUT, CFG::kUpBlockM), kThreads, stream, p);
    });
  }, p.res.dtype);
}

}  // namespace st_adapter
