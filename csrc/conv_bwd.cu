// Backward step 2: dg = dy Wu per frame (dy = dO's spatial rows), the transposed temporal conv in
// the same register window as the forward (dg never goes to memory), and per-block fp32 partial
// sums of dwc[c, j] = sum dg_t * h_{t+j-KT/2} and dbc = sum dg over the frames the block owns.
// The partials are reduced in a fixed order (sum_partials): deterministic, no float atomics.
// Mirrors kernels/adapter_bwd.py's adapter_conv_bwd_kernel.
#include "st_adapter.h"
#include "st_adapter_tile.cuh"

namespace st_adapter {
namespace {

// BM, BK, STAGES: the GEMM config's resolved tile (st_adapter_dispatch.h's GemmConfigs).
template <typename TD, typename T, int KT, int BM, int BK, int STAGES>
__global__ void __launch_bounds__(kThreads, 1) conv_bwd_kernel(ConvBwdParams p) {
  constexpr int BN = kConvBlockN;
  constexpr int PAD = KT / 2;
  constexpr int E = BM * BN / kThreads;
  constexpr int ROW_STEP = kThreads / BN;
  static_assert(kThreads % BN == 0, "a thread's elements must share one channel");
  using Layout = GemmLayout<T, BM, BN, BK, STAGES>;

  __shared__ __align__(128) unsigned char smem[Layout::kBytes];
  __shared__ int64_t row_base[BM];  // dO offset of row m's token at frame 0, -1 past B*S
  __shared__ int64_t tok_base[BM];  // flat token index of row m at frame 0 (frame t adds t*S)
  __shared__ int64_t row_off[BM];
  __shared__ float reduce_buf[ROW_STEP][BN];

  const TD* __restrict__ dout = static_cast<const TD*>(p.dout.ptr);
  const T* __restrict__ wu = static_cast<const T*>(p.wu.ptr);
  const T* __restrict__ taps = static_cast<const T*>(p.taps);
  const T* __restrict__ h_buf = static_cast<const T*>(p.h);
  T* __restrict__ dh = static_cast<T*>(p.dh);

  // BLOCK_M of the B*S flattened (clip, spatial) rows, whole clip or a frame run (window_grid)
  const WindowBlock run = window_block(blockIdx.x, conv_grid(p, BM), p.T);
  const int64_t ca0 = run.ca_block * BN;
  const int64_t r0 = run.row_block * BM;
  const int64_t n_rows = p.B * p.S;
  for (int m = threadIdx.x; m < BM; m += kThreads) {
    const bool ok = r0 + m < n_rows;
    row_base[m] = ok ? flat_row_offset(r0 + m, p.S, p.T, p.dout.P, p.dout.stride_f, p.dout.stride_l) : -1;
    tok_base[m] = ok ? flat_row_token(r0 + m, p.S, p.T) : -1;
  }
  __syncthreads();

  const int col = threadIdx.x % BN;
  const int row_first = threadIdx.x / BN;
  const int64_t ca = ca0 + col;
  const bool ca_ok = ca < p.Ca;

  // transposed conv: taps in natural order (see conv_window_step)
  float r[KT];
#pragma unroll
  for (int i = 0; i < KT; ++i) r[i] = ca_ok ? to_float(taps[ca * KT + i]) : 0.f;

  const bool vec_a = rows_vector_ok<TD, T>(p.dout.ptr, p.C, p.dout.stride_c, p.dout.stride_f, p.dout.stride_l);

  float q[ConvWindow<KT>::kPartials][E];
#pragma unroll
  for (int i = 0; i < ConvWindow<KT>::kPartials; ++i)
#pragma unroll
    for (int e = 0; e < E; ++e) q[i][e] = 0.f;
  float dwc_acc[KT];
#pragma unroll
  for (int j = 0; j < KT; ++j) dwc_acc[j] = 0.f;
  float dbc_acc = 0.f;

  for (int64_t t_in = halo_begin(run.t0, KT); t_in < halo_end(run.t1, KT); ++t_in) {
    float dg[E];
#pragma unroll
    for (int e = 0; e < E; ++e) dg[e] = 0.f;
    if (in_clip(t_in, p.T)) {
      __syncthreads();  // the previous frame's readers of smem / row_off are done
      for (int m = threadIdx.x; m < BM; m += kThreads)
        row_off[m] = row_base[m] >= 0 ? row_base[m] + t_in * p.dout.stride_f : -1;
      __syncthreads();
      // dg = dy @ Wu: B(k = c, n = ca) = Wu[c, ca] = W(n, k) of the view wu
      block_gemm<TD, T, BM, BN, BK, STAGES>(smem, dout, row_off, p.C, p.dout.stride_c, vec_a, wu, ca0, p.Ca, p.wu.stride_n,
                                    p.wu.stride_k);
      const float* cs = Layout::c(smem);
#pragma unroll
      for (int e = 0; e < E; ++e) dg[e] = cs[(row_first + e * ROW_STEP) * Layout::kLdC + col];
      // conv-parameter gradients from the frames this block owns (halo frames belong to the
      // neighbouring run). Rows past B*S and channels past Ca hold dg = 0 (zero-filled loads).
      if (t_in >= run.t0 && t_in < run.t1) {
#pragma unroll
        for (int e = 0; e < E; ++e) dbc_acc += dg[e];
#pragma unroll
        for (int j = 0; j < KT; ++j) {
          const int64_t t_h = t_in + j - PAD;
          if (in_clip(t_h, p.T) && ca_ok) {
            const int64_t h_frame = t_h * p.S;
            float part = 0.f;
#pragma unroll
            for (int e = 0; e < E; ++e) {
              const int64_t tok = tok_base[row_first + e * ROW_STEP];
              if (tok >= 0) part = fmaf(dg[e], to_float(h_buf[(tok + h_frame) * p.Ca + ca]), part);
            }
            dwc_acc[j] += part;
          }
        }
      }
    }
    float dh_out[E];
    conv_window_step<KT, E>(dg, q, r, dh_out);
    const int64_t t_out = t_in - PAD;
    if (t_out >= run.t0) {
#pragma unroll
      for (int e = 0; e < E; ++e) {
        const int64_t tok = tok_base[row_first + e * ROW_STEP];
        if (ca_ok && tok >= 0) dh[(tok + t_out * p.S) * p.Ca + ca] = from_float<T>(dh_out[e]);
      }
    }
  }

  // Fixed-order reduction of the ROW_STEP threads that share a channel, then one partial per
  // (row block x frame run, channel).
  const int64_t part = run.part;
#pragma unroll
  for (int j = 0; j <= KT; ++j) {  // j == KT: dbc
    __syncthreads();
    reduce_buf[row_first][col] = j < KT ? dwc_acc[j] : dbc_acc;
    __syncthreads();
    if (threadIdx.x < BN && ca_ok) {
      float sum = 0.f;
#pragma unroll
      for (int i = 0; i < ROW_STEP; ++i) sum += reduce_buf[i][col];
      if (j < KT)
        p.dwc_part[(part * p.Ca + ca) * KT + j] = sum;
      else
        p.dbc_part[part * p.Ca + ca] = sum;
    }
  }
}

}  // namespace

cudaError_t conv_backward(const ConvBwdParams& p, cudaStream_t stream) {
  return dispatch_dtypes(p.w_dtype, cudaErrorInvalidValue, [&](auto dout_dtype, auto w_dtype) {
    return dispatch_kt(p.KT, cudaErrorInvalidValue, [&](auto kt) {
      return dispatch_gemm_config<decltype(w_dtype)>(p.gemm_config, cudaErrorInvalidValue, [&](auto config) {
        using CFG = decltype(config);
        constexpr int KT = decltype(kt)::value;
        constexpr int BM = conv_tile_m<CFG, KT>();
        auto kernel = conv_bwd_kernel<CType<decltype(dout_dtype)>, CType<decltype(w_dtype)>, KT, BM, CFG::kBlockK,
                                      CFG::kStages>;
        return launch_1d(kernel, conv_blocks(p, BM), kThreads, stream, p);
      });
    });
  }, p.dout.dtype);
}

}  // namespace st_adapter
