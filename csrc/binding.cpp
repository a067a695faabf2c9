// Torch binding of the ST-Adapter CUDA kernels: input checks, buffer allocation, the launch
// sequence, and the pybind11 module st_adapter_fast._cuda (or the JIT-built twin that
// st_adapter_fast.backends.cuda loads). The kernels (*.cu) stay free of torch headers.
//
//   fwd(x, T, P, Wd, bd?, taps, bc?, Wu, bu?, frames_per_run=0) -> out (F, L, C), x's dtype
//   bwd(dO, x, T, P, Wd, bd?, taps, bc?, Wu, bu?, frames_per_run=0)
//       -> (dx, dWd, dbd?, dtaps (Ca, KT), dbc?, dWu, dbu?), parameter grads fp32, dx dO's dtype
//
// x, dO: (F = B*T, L, C) with any strides; Wd (Ca, C), Wu (C, Ca) any strides; taps (Ca, KT).
// x / dO may be fp32 with fp16/bf16 weights (autocast): the kernels cast on load.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include <optional>
#include <tuple>

#include "st_adapter.h"

namespace {

using st_adapter::DType;
using OptTensor = std::optional<at::Tensor>;

DType dtype_of(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default:
      TORCH_CHECK_TYPE(false, name, " must be float32, float16 or bfloat16, got ", t.scalar_type());
  }
  return DType::kFloat32;  // unreachable
}

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, "st_adapter_fast CUDA kernel ", what, " failed: ", cudaGetErrorString(err));
}

struct Dims {
  int64_t F = 0, L = 0, C = 0, B = 0, T = 0, P = 0, S = 0, Ca = 0;
  int KT = 0;
};

void check_param(const at::Tensor& t, const char* name, const at::Tensor& x, at::ScalarType wtype,
                 std::initializer_list<int64_t> shape) {
  TORCH_CHECK_VALUE(t.device() == x.device(), name, " is on ", t.device(), " but x is on ", x.device());
  TORCH_CHECK_TYPE(t.scalar_type() == wtype, name, " must be ", wtype, " like fc1.weight, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.sizes().equals(shape), name, " must have shape ", at::IntArrayRef(shape), ", got ", t.sizes());
}

Dims check_inputs(const at::Tensor& x, int64_t T, int64_t P, const at::Tensor& wd, const OptTensor& bd,
                  const at::Tensor& taps, const OptTensor& bc, const at::Tensor& wu, const OptTensor& bu) {
  TORCH_CHECK_VALUE(x.is_cuda(), "x must be a CUDA tensor, got device ", x.device());
  TORCH_CHECK_VALUE(x.dim() == 3, "x must have shape (B*T, L, C), got ", x.sizes());
  Dims d;
  d.F = x.size(0);
  d.L = x.size(1);
  d.C = x.size(2);
  TORCH_CHECK_VALUE(T >= 1 && d.F % T == 0, "num_frames must divide x.shape[0] = ", d.F, ", got ", T);
  TORCH_CHECK_VALUE(P >= 0 && P <= d.L, "num_prefix_tokens must be in [0, L=", d.L, "], got ", P);
  d.T = T;
  d.B = d.F / T;
  d.P = P;
  d.S = d.L - P;
  TORCH_CHECK_VALUE(wd.dim() == 2 && wd.size(1) == d.C, "fc1 weight must have shape (Ca, C=", d.C, "), got ",
                    wd.sizes());
  d.Ca = wd.size(0);
  const at::ScalarType wtype = wd.scalar_type();
  dtype_of(wd, "fc1 weight");
  const at::ScalarType xtype = x.scalar_type();
  dtype_of(x, "x");
  TORCH_CHECK_TYPE(xtype == wtype || xtype == at::kFloat,
                   "x must have the weights' dtype ", wtype, " (or float32 under autocast), got ", xtype);
  TORCH_CHECK_VALUE(taps.dim() == 2 && taps.size(0) == d.Ca, "conv taps must have shape (Ca=", d.Ca, ", KT), got ",
                    taps.sizes());
  d.KT = static_cast<int>(taps.size(1));
  TORCH_CHECK_VALUE(d.KT % 2 == 1 && d.KT >= 1 && d.KT <= st_adapter::kMaxKT, "temporal kernel size must be odd and <= ",
                    st_adapter::kMaxKT, ", got ", d.KT);
  check_param(wd, "fc1 weight", x, wtype, {d.Ca, d.C});
  check_param(taps, "conv taps", x, wtype, {d.Ca, static_cast<int64_t>(d.KT)});
  check_param(wu, "fc2 weight", x, wtype, {d.C, d.Ca});
  if (bd) check_param(*bd, "fc1 bias", x, wtype, {d.Ca});
  if (bc) check_param(*bc, "conv bias", x, wtype, {d.Ca});
  if (bu) check_param(*bu, "fc2 bias", x, wtype, {d.C});
  return d;
}

const void* opt_ptr(const OptTensor& t) { return t ? t->data_ptr() : nullptr; }

int64_t pick_frames_per_run(const Dims& d, int64_t requested) {
  if (requested > 0) return requested < d.T ? requested : d.T;
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t per_run = st_adapter::conv_blocks_per_run(d.KT, d.S, d.Ca) * d.B;
  return st_adapter::frames_per_run(d.T, d.KT, per_run, sms);
}

// g (and h) (N, Ca) in the weights' dtype.
void run_down_conv(const at::Tensor& x, const Dims& d, const at::Tensor& wd, const OptTensor& bd,
                   const at::Tensor& taps, const OptTensor& bc, const at::Tensor& g, const at::Tensor* h,
                   int64_t fpr, cudaStream_t stream) {
  st_adapter::DownConvParams p{};
  p.x = x.data_ptr();
  p.x_dtype = dtype_of(x, "x");
  p.stride_xf = x.stride(0);
  p.stride_xl = x.stride(1);
  p.stride_xc = x.stride(2);
  p.wd = wd.data_ptr();
  p.stride_wd_o = wd.stride(0);
  p.stride_wd_i = wd.stride(1);
  p.bd = opt_ptr(bd);
  p.taps = taps.data_ptr();
  p.bc = opt_ptr(bc);
  p.w_dtype = dtype_of(wd, "fc1 weight");
  p.g = g.data_ptr();
  p.h = h != nullptr ? h->data_ptr() : nullptr;
  p.B = d.B;
  p.T = d.T;
  p.S = d.S;
  p.P = d.P;
  p.C = d.C;
  p.Ca = d.Ca;
  p.KT = d.KT;
  p.frames_per_run = fpr;
  check_launch(st_adapter::down_conv_forward(p, stream), "down_conv_forward");
}

// out (F, L, NOUT) = res + [spatial] (a W^T + bias); W(n, k) = w[n * stride_wo + k * stride_wi].
void run_up_residual(const at::Tensor& res, const Dims& d, const at::Tensor& a, const at::Tensor& w,
                     int64_t stride_wo, int64_t stride_wi, int64_t nout, const OptTensor& bias,
                     const at::Tensor& out, cudaStream_t stream) {
  st_adapter::UpResidualParams p{};
  p.res = res.data_ptr();
  p.res_dtype = dtype_of(res, "residual");
  p.stride_rf = res.stride(0);
  p.stride_rl = res.stride(1);
  p.stride_rc = res.stride(2);
  p.a = a.data_ptr();
  p.w = w.data_ptr();
  p.stride_wo = stride_wo;
  p.stride_wi = stride_wi;
  p.bias = opt_ptr(bias);
  p.w_dtype = dtype_of(w, "weight");
  p.out = out.data_ptr();
  p.F = d.F;
  p.L = d.L;
  p.P = d.P;
  p.S = d.S;
  p.K = a.size(1);
  p.NOUT = nout;
  check_launch(st_adapter::up_residual_forward(p, stream), "up_residual_forward");
}

st_adapter::TokenView token_view(const at::Tensor& t, const Dims& d) {
  st_adapter::TokenView v{};
  v.ptr = t.data_ptr();
  v.dtype = dtype_of(t, "operand");
  v.S = d.S;
  if (t.dim() == 3) {  // (F, L, K) token tensor
    v.P = d.P;
    v.stride_f = t.stride(0);
    v.stride_l = t.stride(1);
    v.stride_c = t.stride(2);
  } else {  // flat (N, K) buffer
    v.P = 0;
    v.stride_f = d.S * t.stride(0);
    v.stride_l = t.stride(0);
    v.stride_c = t.stride(1);
  }
  return v;
}

// (sum_n A[n]^T B[n] (I, J), sum_n A[n] (I,) if with_bias), fp32, deterministic.
std::pair<at::Tensor, OptTensor> run_weight_grad(const at::Tensor& a, const at::Tensor& b, const Dims& d,
                                                 at::ScalarType compute, bool with_bias, cudaStream_t stream) {
  const int64_t I = a.size(-1), J = b.size(-1), N = d.F * d.S;
  const auto f32 = a.options().dtype(at::kFloat);
  at::Tensor dw = at::empty({I, J}, f32);
  OptTensor db;
  if (with_bias) db = at::empty({I}, f32);
  if (N == 0) {
    dw.zero_();
    if (db) db->zero_();
    return {dw, db};
  }
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  st_adapter::WgradParams p{};
  p.a = token_view(a, d);
  p.b = token_view(b, d);
  p.compute_dtype = compute == at::kFloat ? DType::kFloat32 : compute == at::kHalf ? DType::kFloat16 : DType::kBFloat16;
  p.N = N;
  p.I = I;
  p.J = J;
  p.split = st_adapter::wgrad_split(N, I, J, sms);
  at::Tensor dw_part = p.split.splits > 1 ? at::empty({p.split.splits, I, J}, f32) : dw;
  OptTensor db_part;
  if (with_bias) db_part = p.split.splits > 1 ? at::empty({p.split.splits, I}, f32) : *db;
  p.dw_part = dw_part.data_ptr<float>();
  p.db_part = db_part ? db_part->data_ptr<float>() : nullptr;
  check_launch(st_adapter::weight_grad(p, stream), "weight_grad");
  if (p.split.splits > 1) {
    check_launch(st_adapter::sum_partials(p.dw_part, dw.data_ptr<float>(), p.split.splits, I * J, stream),
                 "sum_partials");
    if (db)
      check_launch(st_adapter::sum_partials(p.db_part, db->data_ptr<float>(), p.split.splits, I, stream),
                   "sum_partials");
  }
  return {dw, db};
}

at::Tensor fwd(const at::Tensor& x, int64_t T, int64_t P, const at::Tensor& wd, const OptTensor& bd_in,
               const at::Tensor& taps_in, const OptTensor& bc_in, const at::Tensor& wu, const OptTensor& bu_in,
               int64_t frames_per_run) {
  const Dims d = check_inputs(x, T, P, wd, bd_in, taps_in, bc_in, wu, bu_in);
  const c10::cuda::CUDAGuard guard(x.device());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  // the kernels index biases and taps densely
  const at::Tensor taps = taps_in.contiguous();
  const OptTensor bd = bd_in ? OptTensor(bd_in->contiguous()) : OptTensor();
  const OptTensor bc = bc_in ? OptTensor(bc_in->contiguous()) : OptTensor();
  const OptTensor bu = bu_in ? OptTensor(bu_in->contiguous()) : OptTensor();

  at::Tensor out = at::empty({d.F, d.L, d.C}, x.options());
  at::Tensor g = at::empty({d.F * d.S, d.Ca}, wd.options());
  if (out.numel() == 0) return out;
  if (g.numel() > 0) run_down_conv(x, d, wd, bd, taps, bc, g, nullptr, pick_frames_per_run(d, frames_per_run), stream);
  run_up_residual(x, d, g, wu, wu.stride(0), wu.stride(1), d.C, bu, out, stream);
  return out;
}

std::tuple<at::Tensor, at::Tensor, OptTensor, at::Tensor, OptTensor, at::Tensor, OptTensor> bwd(
    const at::Tensor& dout, const at::Tensor& x, int64_t T, int64_t P, const at::Tensor& wd, const OptTensor& bd_in,
    const at::Tensor& taps_in, const OptTensor& bc_in, const at::Tensor& wu, const OptTensor& bu_in,
    int64_t frames_per_run) {
  const Dims d = check_inputs(x, T, P, wd, bd_in, taps_in, bc_in, wu, bu_in);
  TORCH_CHECK_VALUE(dout.device() == x.device() && dout.sizes().equals(x.sizes()),
                    "grad_out must match x: expected ", x.sizes(), " on ", x.device(), ", got ", dout.sizes(), " on ",
                    dout.device());
  TORCH_CHECK_TYPE(dout.scalar_type() == wd.scalar_type() || dout.scalar_type() == at::kFloat,
                   "grad_out must have the weights' dtype ", wd.scalar_type(), " (or float32 under autocast), got ",
                   dout.scalar_type());
  const c10::cuda::CUDAGuard guard(x.device());
  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const at::Tensor taps = taps_in.contiguous();
  const OptTensor bd = bd_in ? OptTensor(bd_in->contiguous()) : OptTensor();
  const OptTensor bc = bc_in ? OptTensor(bc_in->contiguous()) : OptTensor();
  const auto f32 = x.options().dtype(at::kFloat);
  const int64_t N = d.F * d.S;

  // 1. recompute g and h (never saved by the forward)
  at::Tensor g = at::empty({N, d.Ca}, wd.options());
  at::Tensor h = at::empty({N, d.Ca}, wd.options());
  const int64_t fpr = pick_frames_per_run(d, frames_per_run);
  if (N > 0) run_down_conv(x, d, wd, bd, taps, bc, g, &h, fpr, stream);

  // 2. dh and the conv-parameter gradients
  at::Tensor dh = at::empty({N, d.Ca}, wd.options());
  at::Tensor dwc = at::zeros({d.Ca, d.KT}, f32);
  at::Tensor dbc_full = at::zeros({d.Ca}, f32);
  if (N > 0) {
    const int64_t n_parts = st_adapter::conv_bwd_num_parts(d.KT, d.B, d.T, d.S, fpr);
    at::Tensor dwc_part = at::empty({n_parts, d.Ca, d.KT}, f32);
    at::Tensor dbc_part = at::empty({n_parts, d.Ca}, f32);
    st_adapter::ConvBwdParams p{};
    p.dout = dout.data_ptr();
    p.dout_dtype = dtype_of(dout, "grad_out");
    p.stride_df = dout.stride(0);
    p.stride_dl = dout.stride(1);
    p.stride_dc = dout.stride(2);
    p.wu = wu.data_ptr();
    p.stride_wu_o = wu.stride(0);
    p.stride_wu_i = wu.stride(1);
    p.taps = taps.data_ptr();
    p.h = h.data_ptr();
    p.w_dtype = dtype_of(wd, "fc1 weight");
    p.dh = dh.data_ptr();
    p.dwc_part = dwc_part.data_ptr<float>();
    p.dbc_part = dbc_part.data_ptr<float>();
    p.B = d.B;
    p.T = d.T;
    p.S = d.S;
    p.P = d.P;
    p.C = d.C;
    p.Ca = d.Ca;
    p.KT = d.KT;
    p.frames_per_run = fpr;
    check_launch(st_adapter::conv_backward(p, stream), "conv_backward");
    check_launch(st_adapter::sum_partials(p.dwc_part, dwc.data_ptr<float>(), n_parts, d.Ca * d.KT, stream),
                 "sum_partials");
    check_launch(st_adapter::sum_partials(p.dbc_part, dbc_full.data_ptr<float>(), n_parts, d.Ca, stream),
                 "sum_partials");
  }
  h.reset();

  // 3. dx = dO + dh Wd: the up-residual kernel with W(n = c, k = ca) = Wd[ca, c]
  at::Tensor dx = at::empty({d.F, d.L, d.C}, dout.options());
  if (dx.numel() > 0) run_up_residual(dout, d, dh, wd, wd.stride(1), wd.stride(0), d.C, OptTensor(), dx, stream);

  // 4. dWu = dy^T g (+ dbu), dWd = dh^T x_s (+ dbd)
  auto [dwu, dbu] = run_weight_grad(dout, g, d, wd.scalar_type(), bu_in.has_value(), stream);
  auto [dwd, dbd] = run_weight_grad(dh, x, d, wd.scalar_type(), bd_in.has_value(), stream);
  OptTensor dbc;
  if (bc_in) dbc = dbc_full;
  return {dx, dwd, dbd, dwc, dbc, dwu, dbu};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "ST-Adapter fused CUDA kernels (forward and recompute backward)";
  m.def("fwd", &fwd, "fused forward: out = x + fc2(conv_t(fc1(x_s))) on spatial tokens", pybind11::arg("x"),
        pybind11::arg("num_frames"), pybind11::arg("num_prefix_tokens"), pybind11::arg("fc1_weight"),
        pybind11::arg("fc1_bias"), pybind11::arg("conv_taps"), pybind11::arg("conv_bias"), pybind11::arg("fc2_weight"),
        pybind11::arg("fc2_bias"), pybind11::arg("frames_per_run") = 0);
  m.def("bwd", &bwd, "fused backward with recompute: (dx, dWd, dbd, dtaps, dbc, dWu, dbu)", pybind11::arg("grad_out"),
        pybind11::arg("x"), pybind11::arg("num_frames"), pybind11::arg("num_prefix_tokens"),
        pybind11::arg("fc1_weight"), pybind11::arg("fc1_bias"), pybind11::arg("conv_taps"), pybind11::arg("conv_bias"),
        pybind11::arg("fc2_weight"), pybind11::arg("fc2_bias"), pybind11::arg("frames_per_run") = 0);
  m.attr("MAX_KT") = st_adapter::kMaxKT;
}
