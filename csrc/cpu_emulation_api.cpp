// C entry points of the CPU-emulated kernels for tests/test_cuda_emulated.py (ctypes). Each one
// fills the same parameter struct binding.cpp fills and calls the same host launcher; the
// kernels run on CPU threads (cpu_emulation.h). Build:
//   g++ -std=c++20 -O1 -DSTA_CPU_EMULATION -fPIC -shared -pthread -I csrc \
//       -x c++ csrc/{down_conv_fwd,conv_bwd,up_residual,wgrad}.cu csrc/cpu_emulation_api.cpp
#ifndef STA_CPU_EMULATION
#error "cpu_emulation_api.cpp is the CPU test harness; build it with -DSTA_CPU_EMULATION"
#endif

#include "st_adapter.h"

using namespace st_adapter;

extern "C" {

int sta_emu_down_conv(const void* x, int x_dtype, int64_t sxf, int64_t sxl, int64_t sxc, const void* wd,
                      int64_t swo, int64_t swi, const void* bd, const void* taps, const void* bc, int w_dtype, void* g,
                      void* h, int64_t B, int64_t T, int64_t S, int64_t P, int64_t C, int64_t Ca, int KT,
                      int64_t frames_per_run) {
  DownConvParams p{};
  p.x = x;
  p.x_dtype = static_cast<DType>(x_dtype);
  p.stride_xf = sxf;
  p.stride_xl = sxl;
  p.stride_xc = sxc;
  p.wd = wd;
  p.stride_wd_o = swo;
  p.stride_wd_i = swi;
  p.bd = bd;
  p.taps = taps;
  p.bc = bc;
  p.w_dtype = static_cast<DType>(w_dtype);
  p.g = g;
  p.h = h;
  p.B = B;
  p.T = T;
  p.S = S;
  p.P = P;
  p.C = C;
  p.Ca = Ca;
  p.KT = KT;
  p.frames_per_run = frames_per_run;
  return down_conv_forward(p, nullptr);
}

int sta_emu_conv_bwd(const void* dout, int dout_dtype, int64_t sdf, int64_t sdl, int64_t sdc, const void* wu,
                     int64_t swo, int64_t swi, const void* taps, const void* h, int w_dtype, void* dh, float* dwc_part,
                     float* dbc_part, int64_t B, int64_t T, int64_t S, int64_t P, int64_t C, int64_t Ca, int KT,
                     int64_t frames_per_run) {
  ConvBwdParams p{};
  p.dout = dout;
  p.dout_dtype = static_cast<DType>(dout_dtype);
  p.stride_df = sdf;
  p.stride_dl = sdl;
  p.stride_dc = sdc;
  p.wu = wu;
  p.stride_wu_o = swo;
  p.stride_wu_i = swi;
  p.taps = taps;
  p.h = h;
  p.w_dtype = static_cast<DType>(w_dtype);
  p.dh = dh;
  p.dwc_part = dwc_part;
  p.dbc_part = dbc_part;
  p.B = B;
  p.T = T;
  p.S = S;
  p.P = P;
  p.C = C;
  p.Ca = Ca;
  p.KT = KT;
  p.frames_per_run = frames_per_run;
  return conv_backward(p, nullptr);
}

int sta_emu_up_residual(const void* res, int res_dtype, int64_t srf, int64_t srl, int64_t src, const void* a,
                        const void* w, int64_t swo, int64_t swi, const void* bias, int w_dtype, void* out, int64_t F,
                        int64_t L, int64_t P, int64_t S, int64_t K, int64_t NOUT) {
  UpResidualParams p{};
  p.res = res;
  p.res_dtype = static_cast<DType>(res_dtype);
  p.stride_rf = srf;
  p.stride_rl = srl;
  p.stride_rc = src;
  p.a = a;
  p.w = w;
  p.stride_wo = swo;
  p.stride_wi = swi;
  p.bias = bias;
  p.w_dtype = static_cast<DType>(w_dtype);
  p.out = out;
  p.F = F;
  p.L = L;
  p.P = P;
  p.S = S;
  p.K = K;
  p.NOUT = NOUT;
  return up_residual_forward(p, nullptr);
}

// a_view / b_view: {S, P, stride_f, stride_l, stride_c}
int sta_emu_weight_grad(const void* a, int a_dtype, const int64_t* a_view, const void* b, int b_dtype,
                        const int64_t* b_view, int compute_dtype, int64_t N, int64_t I, int64_t J, int64_t splits,
                        int64_t tokens_per_split, float* dw_part, float* db_part) {
  WgradParams p{};
  p.a = TokenView{a, static_cast<DType>(a_dtype), a_view[0], a_view[1], a_view[2], a_view[3], a_view[4]};
  p.b = TokenView{b, static_cast<DType>(b_dtype), b_view[0], b_view[1], b_view[2], b_view[3], b_view[4]};
  p.compute_dtype = static_cast<DType>(compute_dtype);
  p.N = N;
  p.I = I;
  p.J = J;
  p.split.splits = splits;
  p.split.tokens_per_split = tokens_per_split;
  p.dw_part = dw_part;
  p.db_part = db_part;
  return weight_grad(p, nullptr);
}

int sta_emu_sum_partials(const float* part, float* out, int64_t n_parts, int64_t numel) {
  return sum_partials(part, out, n_parts, numel, nullptr);
}

int64_t sta_emu_frames_per_run(int64_t T, int kt, int64_t S, int64_t Ca, int64_t B, int64_t sms) {
  return frames_per_run(T, kt, conv_blocks_per_run(kt, S, Ca) * B, sms);
}

int64_t sta_emu_conv_bwd_num_parts(int kt, int64_t B, int64_t T, int64_t S, int64_t fpr) {
  return conv_bwd_num_parts(kt, B, T, S, fpr);
}

void sta_emu_wgrad_split(int64_t N, int64_t I, int64_t J, int64_t sms, int64_t* out) {
  const WgradSplit s = wgrad_split(N, I, J, sms);
  out[0] = s.splits;
  out[1] = s.tokens_per_split;
}

}  // extern "C"
