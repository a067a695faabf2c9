// Host API of the ST-Adapter CUDA kernels: raw pointers, sizes, strides and a stream; no torch.
// binding.cpp (torch tensors) and cpu_emulation_api.cpp (ctypes) fill these structs from the same
// three views -- TokenView, WeightView, ConvShape -- and the .cu files dispatch on dtype and KT
// through the one table of st_adapter_dispatch.h.
//
// Shapes: x, dO, out, dx (F = B*T, L, C) with any strides; g, h, dh (N = F*S, Ca) contiguous in
// the weights' dtype; Wd (Ca, C), Wu (C, Ca) with any strides; taps (Ca, KT) contiguous;
// parameter-gradient partials fp32.
#pragma once

#ifdef STA_CPU_EMULATION
#include "cpu_emulation.h"
#else
#include <cuda_runtime_api.h>
#endif
#include <stdint.h>

#include "st_adapter_dispatch.h"
#include "st_adapter_index.cuh"

namespace st_adapter {

// Spatial tokens of a token tensor (F, L, K) with any strides -- token n = f*S + s is row
// (f, P + s) -- or of a flat (N, K) buffer (P = 0, stride_f = S * stride_l).
struct TokenView {
  const void* ptr;
  DType dtype;  // the weights' dtype, or fp32 under autocast (cast on load)
  int64_t P, stride_f, stride_l, stride_c;
};

// A weight read as W(n, k) = ptr[n * stride_n + k * stride_k], in the compute dtype.
struct WeightView {
  const void* ptr;
  int64_t stride_n, stride_k;
};

// B clips of T frames of S spatial tokens, C model and Ca adapter channels, kernel KT; the down-conv
// and conv-backward grids (window_grid over the B*S flattened rows): the first n_whole_rows row
// blocks walk whole clips, the others runs of frames_per_run frames.
struct ConvShape {
  int64_t B, T, S, C, Ca;
  int KT;
  int64_t frames_per_run;
  int64_t n_whole_rows;
};

// g = conv_t(x_s Wd^T + bd) + bc per clip; also h = x_s Wd^T + bd when h != nullptr (backward).
struct DownConvParams : ConvShape {
  TokenView x;
  WeightView wd;     // W(n = ca, k = c) = Wd[ca, c]
  DType w_dtype;
  const void* bd;    // (Ca,) or nullptr
  const void* taps;  // (Ca, KT)
  const void* bc;    // (Ca,) or nullptr
  void* g;           // (N, Ca)
  void* h;           // (N, Ca) or nullptr
  int gemm_config;   // index into GemmConfigs (16-bit tile K depth x cp.async stages), 0 = default
};

// dh = conv_t^T(dO_s Wu) and per-(row block, run) fp32 partials of dwc (n_parts, Ca, KT) and dbc
// (n_parts, Ca), n_parts = conv_parts().
struct ConvBwdParams : ConvShape {
  TokenView dout;
  WeightView wu;     // W(n = ca, k = c) = Wu[c, ca]
  DType w_dtype;
  const void* taps;  // (Ca, KT)
  const void* h;     // (N, Ca), from DownConvParams.h
  void* dh;          // (N, Ca)
  float* dwc_part;   // (n_parts, Ca, KT)
  float* dbc_part;   // (n_parts, Ca)
  int gemm_config;   // index into GemmConfigs (16-bit tile K depth x cp.async stages), 0 = default
};

// out (F, L = P + S, NOUT) contiguous = res + [row is spatial] * (a[token] W^T + bias).
// Forward: res = x, a = g, W = Wu. Backward dgrad: res = dO, a = dh, W = Wd^T.
struct UpResidualParams {
  TokenView res;     // also out's dtype
  const void* a;     // (N, K) contiguous, w_dtype
  WeightView w;      // W(n, k), (NOUT, K)
  DType w_dtype;
  const void* bias;  // (NOUT,) or nullptr
  void* out;
  int64_t F, S, K, NOUT;
  int gemm_config;   // index into GemmConfigs (16-bit tile K depth x cp.async stages), 0 = default
};

// dw_part[split] = sum over the split's tokens of A[n]^T B[n] (I, J) fp32; db_part[split] =
// sum of A[n] (I,) when db_part != nullptr.
struct WgradParams {
  TokenView a;  // I columns
  TokenView b;  // J columns
  DType compute_dtype;
  int64_t S, N, I, J;
  WgradSplit split;
  float* dw_part;  // (splits, I, J)
  float* db_part;  // (splits, I) or nullptr
  int gemm_config;   // index into GemmConfigs (16-bit tile K depth x cp.async stages), 0 = default
};

cudaError_t down_conv_forward(const DownConvParams& p, cudaStream_t stream);
cudaError_t conv_backward(const ConvBwdParams& p, cudaStream_t stream);
cudaError_t up_residual_forward(const UpResidualParams& p, cudaStream_t stream);
cudaError_t weight_grad(const WgradParams& p, cudaStream_t stream);
// out[i] = sum_p part[p * numel + i], summed in order p = 0, 1, ...: deterministic.
cudaError_t sum_partials(const float* part, float* out, int64_t n_parts, int64_t numel, cudaStream_t stream);

// Up to kMax such sums in one launch (the backward's finalize: dwc, dbc, dWu, dbu, dWd, dbd), cast
// to out_dtype (the parameters'), so the backward stays within 6 launches with no cast after it.
// Segment i: out[i] (numel[i],) = sum over n_parts[i] slices of part[i], in order.
struct PartialSums {
  static constexpr int kMax = 6;
  DType out_dtype = DType::kFloat32;
  int n = 0;
  const float* part[kMax];
  void* out[kMax];
  int64_t n_parts[kMax];
  int64_t numel[kMax];
  void add(const float* p, void* o, int64_t parts, int64_t count) {
    part[n] = p;
    out[n] = o;
    n_parts[n] = parts;
    numel[n] = count;
    ++n;
  }
  int64_t total() const {
    int64_t t = 0;
    for (int i = 0; i < n; ++i) t += numel[i];
    return t;
  }
};
cudaError_t sum_partials_many(const PartialSums& sums, cudaStream_t stream);

// ------------------------------------------------------------------------------ grids
// Blocks of every launch (1-D grids), for the launchers and for binding.cpp's up-front check.
// The down-conv / conv-backward window grid of a launch (st_adapter_index.cuh) with block_m rows
// per block: conv_block_m_for(gemm_config, KT) on the host, the kernel's own BM on the device.
STA_HD WindowGrid conv_grid(const ConvShape& s, int block_m) {
  return conv_grid(block_m, s.B, s.T, s.S, s.Ca, s.frames_per_run, s.n_whole_rows);
}
STA_HD int64_t conv_blocks(const ConvShape& s, int block_m) { return window_grid_blocks(conv_grid(s, block_m)); }
// The number of dwc/dbc partials conv_backward writes.
inline int64_t conv_parts(const ConvShape& s, int block_m) { return window_grid_parts(conv_grid(s, block_m)); }

// block_m: up_block_m_for(gemm_config).
inline int64_t up_residual_blocks(int64_t F, int64_t L, int64_t NOUT, int block_m) {
  return cdiv(NOUT, kUpBlockN) * cdiv(F * L, block_m);
}
inline int64_t wgrad_blocks(int64_t I, int64_t J, int64_t splits) {
  return cdiv(J, kWgradBlockN) * cdiv(I, kWgradBlockM) * splits;
}
constexpr int kSumPartialsThreads = 256;
inline int64_t sum_partials_blocks(int64_t numel) { return cdiv(numel, kSumPartialsThreads); }


}  // namespace st_adapter
