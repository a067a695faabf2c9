// Host API of the ST-Adapter CUDA kernels: raw pointers, sizes, strides and a stream; no torch.
// binding.cpp allocates buffers and fills these structs; the .cu files dispatch on dtype and KT.
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

#include "st_adapter_index.cuh"

namespace st_adapter {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// g = conv_t(x_s Wd^T + bd) + bc per clip; also h = x_s Wd^T + bd when h != nullptr (backward).
struct DownConvParams {
  const void* x;
  DType x_dtype;  // the weights' dtype, or fp32 under autocast (cast on load)
  int64_t stride_xf, stride_xl, stride_xc;
  const void* wd;
  int64_t stride_wd_o, stride_wd_i;
  const void* bd;    // (Ca,) or nullptr
  const void* taps;  // (Ca, KT)
  const void* bc;    // (Ca,) or nullptr
  DType w_dtype;
  void* g;  // (N, Ca)
  void* h;  // (N, Ca) or nullptr
  int64_t B, T, S, P, C, Ca;
  int KT;
  int64_t frames_per_run;
};

// dh = conv_t^T(dO_s Wu) and per-block fp32 partials of dwc (n_parts, Ca, KT) and dbc (n_parts, Ca).
struct ConvBwdParams {
  const void* dout;
  DType dout_dtype;
  int64_t stride_df, stride_dl, stride_dc;
  const void* wu;  // (C, Ca)
  int64_t stride_wu_o, stride_wu_i;
  const void* taps;  // (Ca, KT)
  const void* h;     // (N, Ca), from DownConvParams.h
  DType w_dtype;
  void* dh;          // (N, Ca)
  float* dwc_part;   // (n_parts, Ca, KT)
  float* dbc_part;   // (n_parts, Ca)
  int64_t B, T, S, P, C, Ca;
  int KT;
  int64_t frames_per_run;
};

// out (F, L, NOUT) contiguous = res + [row is spatial] * (a[token] W^T + bias).
// Forward: res = x, a = g, W = Wu. Backward dgrad: res = dO, a = dh, W = Wd^T (strides swapped).
struct UpResidualParams {
  const void* res;
  DType res_dtype;  // also out's dtype
  int64_t stride_rf, stride_rl, stride_rc;
  const void* a;  // (N, K) contiguous, w_dtype
  const void* w;  // W(n, k) = w[n * stride_wo + k * stride_wi]
  int64_t stride_wo, stride_wi;
  const void* bias;  // (NOUT,) or nullptr
  DType w_dtype;
  void* out;
  int64_t F, L, P, S, K, NOUT;
};

// A token tensor (F, L, K) or a flat (N, K) buffer (S = S, P = 0, stride_f = S*K, stride_l = K).
struct TokenView {
  const void* ptr;
  DType dtype;
  int64_t S, P, stride_f, stride_l, stride_c;
};

// dw_part[split] = sum over the split's tokens of A[n]^T B[n] (I, J) fp32; db_part[split] =
// sum of A[n] (I,) when db_part != nullptr.
struct WgradParams {
  TokenView a;  // I columns
  TokenView b;  // J columns
  DType compute_dtype;
  int64_t N, I, J;
  WgradSplit split;
  float* dw_part;  // (splits, I, J)
  float* db_part;  // (splits, I) or nullptr
};

cudaError_t down_conv_forward(const DownConvParams& p, cudaStream_t stream);
cudaError_t conv_backward(const ConvBwdParams& p, cudaStream_t stream);
cudaError_t up_residual_forward(const UpResidualParams& p, cudaStream_t stream);
cudaError_t weight_grad(const WgradParams& p, cudaStream_t stream);
// out[i] = sum_p part[p * numel + i], summed in order p = 0, 1, ...: deterministic.
cudaError_t sum_partials(const float* part, float* out, int64_t n_parts, int64_t numel, cudaStream_t stream);

// Blocks of one frame run of the down-conv / conv-backward grids (for frames_per_run), and the
// number of dwc/dbc partials conv_backward writes.
inline int64_t conv_blocks_per_run(int kt, int64_t S, int64_t Ca) {
  return cdiv(S, conv_block_m(kt)) * cdiv(Ca, kConvBlockN);
}
inline int64_t conv_bwd_num_parts(int kt, int64_t B, int64_t T, int64_t S, int64_t frames_per_run) {
  return B * cdiv(T, frames_per_run) * cdiv(S, conv_block_m(kt));
}

}  // namespace st_adapter
