// Kernel 1 of the fused forward (and the backward's recompute): g = conv_t(x_s Wd^T + bd) + bc.
//
// A block owns BLOCK_M rows of the B*S flattened (clip, spatial position) rows -- no per-clip
// padding of S to the tile -- x 64 adapter channels, for the whole clip or a frame run [t0, t1)
// (window_grid), and walks input frames t0 - KT/2 .. t1 + KT/2 - 1 in order. Per frame it computes the
// down-projection tile h on tensor cores (fp16/bf16) or SIMT (fp32), adds bd, and pushes it
// through a register sliding window (conv_window_step) that emits the finished output frame
// t_in - KT/2: each h tile is computed once (plus the halo), h never goes to memory (unless the
// backward asks for it), and g is written once. Mirrors kernels/adapter_fwd.py's
// adapter_down_conv_fwd_kernel.
#include "st_adapter.h"
#include "st_adapter_tile.cuh"

namespace st_adapter {
namespace {

// BM, BK, STAGES: the GEMM config's resolved tile (st_adapter_dispatch.h's GemmConfigs), so configs
// that agree on them share one instantiation.
template <typename TX, typename T, int KT, int BM, int BK, int STAGES>
__global__ void __launch_bounds__(kThreads, 1) down_conv_fwd_kernel(DownConvParams p) {
  constexpr int BN = kConvBlockN;
  constexpr int PAD = KT / 2;
  constexpr int E = BM * BN / kThreads;  // tile elements per thread, all in one channel
  constexpr int ROW_STEP = kThreads / BN;
  static_assert(kThreads % BN == 0, "a thread's elements must share one channel");
  using Layout = GemmLayout<T, BM, BN, BK, STAGES>;

  __shared__ __align__(128) unsigned char smem[Layout::kBytes];
  __shared__ int64_t row_base[BM];  // x offset of row m's token at frame 0, -1 past B*S
  __shared__ int64_t tok_base[BM];  // flat token index of row m at frame 0 (frame t adds t*S)
  __shared__ int64_t row_off[BM];

  const TX* __restrict__ x = static_cast<const TX*>(p.x.ptr);
  const T* __restrict__ wd = static_cast<const T*>(p.wd.ptr);
  const T* __restrict__ taps = static_cast<const T*>(p.taps);
  T* __restrict__ g = static_cast<T*>(p.g);
  T* __restrict__ h_out = static_cast<T*>(p.h);

  const WindowBlock run = window_block(blockIdx.x, conv_grid(p, BM), p.T);
  const int64_t ca0 = run.ca_block * BN;
  const int64_t r0 = run.row_block * BM;
  const int64_t n_rows = p.B * p.S;
  for (int m = threadIdx.x; m < BM; m += kThreads) {
    const bool ok = r0 + m < n_rows;
    row_base[m] = ok ? flat_row_offset(r0 + m, p.S, p.T, p.x.P, p.x.stride_f, p.x.stride_l) : -1;
    tok_base[m] = ok ? flat_row_token(r0 + m, p.S, p.T) : -1;
  }
  __syncthreads();

  // This thread's channel and rows in the tile: elements (row_first + e*ROW_STEP, col).
  const int col = threadIdx.x % BN;
  const int row_first = threadIdx.x / BN;
  const int64_t ca = ca0 + col;
  const bool ca_ok = ca < p.Ca;

  // forward conv: the window wants taps reversed (see conv_window_step)
  float r[KT];
#pragma unroll
  for (int i = 0; i < KT; ++i) r[i] = ca_ok ? to_float(taps[ca * KT + (KT - 1 - i)]) : 0.f;
  const float bd = (ca_ok && p.bd != nullptr) ? to_float(static_cast<const T*>(p.bd)[ca]) : 0.f;
  const float bc = (ca_ok && p.bc != nullptr) ? to_float(static_cast<const T*>(p.bc)[ca]) : 0.f;

  const bool vec_a = rows_vector_ok<TX, T>(p.x.ptr, p.C, p.x.stride_c, p.x.stride_f, p.x.stride_l);

  float q[ConvWindow<KT>::kPartials][E];
#pragma unroll
  for (int i = 0; i < ConvWindow<KT>::kPartials; ++i)
#pragma unroll
    for (int e = 0; e < E; ++e) q[i][e] = 0.f;

  for (int64_t t_in = halo_begin(run.t0, KT); t_in < halo_end(run.t1, KT); ++t_in) {
    float h[E];
#pragma unroll
    for (int e = 0; e < E; ++e) h[e] = 0.f;  // frames outside the clip: zero padding, no bias
    if (in_clip(t_in, p.T)) {  // uniform across the block
      __syncthreads();  // the previous frame's readers of smem / row_off are done
      for (int m = threadIdx.x; m < BM; m += kThreads)
        row_off[m] = row_base[m] >= 0 ? row_base[m] + t_in * p.x.stride_f : -1;
      __syncthreads();
      // B(k = c, n = ca) = Wd[ca, c]
      block_gemm<TX, T, BM, BN, BK, STAGES>(smem, x, row_off, p.C, p.x.stride_c, vec_a, wd, ca0, p.Ca, p.wd.stride_n,
                                    p.wd.stride_k);
      const float* cs = Layout::c(smem);
      const bool store_h = h_out != nullptr && t_in >= run.t0 && t_in < run.t1;
#pragma unroll
      for (int e = 0; e < E; ++e) {
        const int row = row_first + e * ROW_STEP;
        h[e] = cs[row * Layout::kLdC + col] + bd;
        const int64_t tok = tok_base[row];
        if (store_h && ca_ok && tok >= 0) h_out[(tok + t_in * p.S) * p.Ca + ca] = from_float<T>(h[e]);
      }
    }
    float out[E];
    conv_window_step<KT, E>(h, q, r, out);
    const int64_t t_out = t_in - PAD;
    if (t_out >= run.t0) {
#pragma unroll
      for (int e = 0; e < E; ++e) {
        const int64_t tok = tok_base[row_first + e * ROW_STEP];
        if (ca_ok && tok >= 0) g[(tok + t_out * p.S) * p.Ca + ca] = from_float<T>(out[e] + bc);
      }
    }
  }
}

}  // namespace

cudaError_t down_conv_forward(const DownConvParams& p, cudaStream_t stream) {
  return dispatch_dtypes(p.w_dtype, cudaErrorInvalidValue, [&](auto x_dtype, auto w_dtype) {
    return dispatch_kt(p.KT, cudaErrorInvalidValue, [&](auto kt) {
      return dispatch_gemm_config<decltype(w_dtype)>(p.gemm_config, cudaErrorInvalidValue, [&](auto config) {
        using CFG = decltype(config);
        constexpr int KT = decltype(kt)::value;
        constexpr int BM = conv_tile_m<CFG, KT>();
        auto kernel = down_conv_fwd_kernel<CType<decltype(x_dtype)>, CType<decltype(w_dtype)>, KT, BM, CFG::kBlockK,
                                           CFG::kStages>;
        return launch_1d(kernel, conv_blocks(p, BM), kThreads, stream, p);
      });
    });
  }, p.x.dtype);
}

}  // namespace st_adapter
