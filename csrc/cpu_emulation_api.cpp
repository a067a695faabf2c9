// C entry points of the CPU-emulated kernels for tests/cuda/test_cuda_emulated.py (ctypes). Each
// one fills the parameter struct from the same three views binding.cpp fills it from (TokenView,
// WeightView, ConvShape; passed here as int64 arrays) and calls the same host launcher, which
// dispatches through st_adapter_dispatch.h's table; the kernels run on CPU threads
// (cpu_emulation.h). The table itself is exported too, so the tests ask it instead of restating it.
// Build:
//   g++ -std=c++20 -O1 -DSTA_CPU_EMULATION -fPIC -shared -pthread -I csrc -x c++
//       csrc/{down_conv_fwd,conv_bwd,up_residual,wgrad}.cu csrc/cpu_emulation_api.cpp
#ifndef STA_CPU_EMULATION
#error "cpu_emulation_api.cpp is the CPU test harness; build it with -DSTA_CPU_EMULATION"
#endif

#include "st_adapter.h"

using namespace st_adapter;

namespace {

// view: {P, stride_f, stride_l, stride_c}
TokenView token_view(const void* ptr, int dtype, const int64_t* view) {
  return TokenView{ptr, static_cast<DType>(dtype), view[0], view[1], view[2], view[3]};
}
// view: {stride_n, stride_k}
WeightView weight_view(const void* ptr, const int64_t* view) { return WeightView{ptr, view[0], view[1]}; }
// shape: {B, T, S, C, Ca, KT, frames_per_run, n_whole_rows}
ConvShape conv_shape(const int64_t* s) {
  return ConvShape{s[0], s[1], s[2], s[3], s[4], static_cast<int>(s[5]), s[6], s[7]};
}

}  // namespace

extern "C" {

int sta_emu_down_conv(const void* x, int x_dtype, const int64_t* x_view, const void* wd, const int64_t* wd_view,
                      int w_dtype, const void* bd, const void* taps, const void* bc, void* g, void* h,
                      const int64_t* shape, int gemm_config) {
  const DownConvParams p{conv_shape(shape), token_view(x, x_dtype, x_view), weight_view(wd, wd_view),
                         static_cast<DType>(w_dtype), bd, taps, bc, g, h, gemm_config};
  return down_conv_forward(p, nullptr);
}

int sta_emu_conv_bwd(const void* dout, int dout_dtype, const int64_t* dout_view, const void* wu,
                     const int64_t* wu_view, int w_dtype, const void* taps, const void* h, void* dh, float* dwc_part,
                     float* dbc_part, const int64_t* shape, int gemm_config) {
  const ConvBwdParams p{conv_shape(shape), token_view(dout, dout_dtype, dout_view), weight_view(wu, wu_view),
                        static_cast<DType>(w_dtype), taps, h, dh, dwc_part, dbc_part, gemm_config};
  return conv_backward(p, nullptr);
}

int sta_emu_up_residual(const void* res, int res_dtype, const int64_t* res_view, const void* a, const void* w,
                        const int64_t* w_view, int w_dtype, const void* bias, void* out, int64_t F, int64_t S,
                        int64_t K, int64_t NOUT, int gemm_config) {
  const UpResidualParams p{token_view(res, res_dtype, res_view), a, weight_view(w, w_view),
                           static_cast<DType>(w_dtype), bias, out, F, S, K, NOUT, gemm_config};
  return up_residual_forward(p, nullptr);
}

int sta_emu_weight_grad(const void* a, int a_dtype, const int64_t* a_view, const void* b, int b_dtype,
                        const int64_t* b_view, int compute_dtype, int64_t S, int64_t N, int64_t I, int64_t J,
                        int64_t splits, int64_t tokens_per_split, float* dw_part, float* db_part, int gemm_config) {
  const WgradParams p{token_view(a, a_dtype, a_view), token_view(b, b_dtype, b_view),
                      static_cast<DType>(compute_dtype), S, N, I, J, WgradSplit{splits, tokens_per_split},
                      dw_part, db_part, gemm_config};
  return weight_grad(p, nullptr);
}

int sta_emu_sum_partials(const float* part, float* out, int64_t n_parts, int64_t numel) {
  return sum_partials(part, out, n_parts, numel, nullptr);
}

// Sums of up to PartialSums::kMax segments in one launch, cast to out_dtype; parts/outs: n
// pointers, counts: n_parts then numel, n each.
int sta_emu_sum_partials_many(int n, const float* const* parts, void* const* outs, const int64_t* counts,
                              int out_dtype) {
  PartialSums sums;
  sums.out_dtype = static_cast<DType>(out_dtype);
  if (n < 0 || n > PartialSums::kMax) return static_cast<int>(cudaErrorInvalidValue);
  for (int i = 0; i < n; ++i) sums.add(parts[i], outs[i], counts[i], counts[n + i]);
  return sum_partials_many(sums, nullptr);
}

// binding.cpp's grid plan (conv_plan, rows per block from GEMM config `config`):
// out = {frames_per_run, n_whole_rows}.
void sta_emu_conv_plan(int kt, int64_t B, int64_t T, int64_t S, int64_t Ca, int64_t requested, int64_t sms,
                       int config, int64_t* out) {
  const ConvPlan p = conv_plan(conv_block_m_for(config, kt), kt, B, T, S, Ca, requested, sms);
  out[0] = p.frames_per_run;
  out[1] = p.n_whole_rows;
}

// The window grid of a conv shape (as sta_emu_down_conv takes it) under GEMM config `config`:
// out = {blocks, parts}.
void sta_emu_conv_grid(const int64_t* shape, int config, int64_t* out) {
  const ConvShape s = conv_shape(shape);
  const int block_m = conv_block_m_for(config, s.KT);
  out[0] = conv_blocks(s, block_m);
  out[1] = conv_parts(s, block_m);
}

// The config table: out = {K depth, stages, window rows for kt, up-residual rows}; -1 if absent.
int sta_emu_gemm_config_tiles(int config, int kt, int* out) {
  if (!gemm_config_supported(config)) return -1;
  out[0] = gemm_block_k_for(config);
  out[1] = gemm_stages_for(config);
  out[2] = conv_block_m_for(config, kt);
  out[3] = up_block_m_for(config);
  return 0;
}

void sta_emu_wgrad_split(int64_t N, int64_t I, int64_t J, int64_t sms, int64_t* out) {
  const WgradSplit s = wgrad_split(N, I, J, sms);
  out[0] = s.splits;
  out[1] = s.tokens_per_split;
}

// Kernel launches the emulation has run so far.
int64_t sta_emu_launch_count() { return sta_emu_launches; }

// The dispatch table: whether kt and a GEMM config index have kernels, and whether a compute dtype takes these operand
// dtypes (n_operands of them).
int sta_emu_kt_supported(int kt) { return kt_supported(kt) ? 1 : 0; }

int sta_emu_gemm_config_supported(int config) { return gemm_config_supported(config) ? 1 : 0; }

int sta_emu_dtypes_supported(int compute, int n_operands, const int* operands) {
  const DType c = static_cast<DType>(compute);
  auto op = [&](int i) { return static_cast<DType>(operands[i]); };
  switch (n_operands) {
    case 1: return dtypes_supported(c, op(0)) ? 1 : 0;
    case 2: return dtypes_supported(c, op(0), op(1)) ? 1 : 0;
    default: return -1;
  }
}

}  // extern "C"
