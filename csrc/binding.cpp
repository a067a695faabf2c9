// Torch binding of the ST-Adapter CUDA kernels: input checks, buffer allocation, the launch
// sequence, and the pybind11 module st_adapter_fast._cuda (or the JIT-built twin that
// st_adapter_fast.backends.cuda loads). The kernels (*.cu) stay free of torch headers.
//
//   fwd(x, T, P, Wd, bd?, taps, bc?, Wu, bu?, frames_per_run=0, gemm_config=0, n_whole_rows=0)
//       -> out (F, L, C), x's dtype
//   bwd(dO, x, T, P, Wd, bd?, taps, bc?, Wu, bu?, frames_per_run=0, gemm_config=0, n_whole_rows=0)
//       -> (dx, dWd, dbd?, dtaps (Ca, KT), dbc?, dWu, dbu?), parameter grads in the weights' dtype
//          (summed in fp32, cast by the finalize launch), dx in dO's dtype
//
// x, dO: (F = B*T, L, C) with any strides; Wd (Ca, C), Wu (C, Ca) any strides; taps (Ca, KT).
// x / dO may be fp32 with fp16/bf16 weights (autocast): the kernels cast on load. gemm_config:
// the tile configuration, an index into st_adapter_dispatch.h's GemmConfigs (0 = default).
// frames_per_run, n_whole_rows: the window grid's plan (st_adapter_fast.backends.cuda plans it from
// occupancy, as the Triton launchers do); frames_per_run = 0: the binding's own (conv_plan).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include <optional>
#include <tuple>
#include <vector>

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

// Up-front check of a launch's 1-D grid against gridDim.x's limit (the launchers refuse it too,
// with a bare cudaErrorInvalidConfiguration), so a huge input gets an error that says why.
void check_grid(int64_t blocks, const char* what) {
  TORCH_CHECK_VALUE(st_adapter::grid_fits(blocks) || blocks == 0, "st_adapter_fast CUDA kernel ", what, " needs ",
                    blocks, " blocks, more than the GPU's grid limit of ", st_adapter::kMaxGridX,
                    " (gridDim.x); split the batch");
}

struct Dims {
  int64_t F = 0, L = 0, C = 0, B = 0, T = 0, P = 0, S = 0, Ca = 0;
  int KT = 0;
  int gemm_config = 0;  // index into GemmConfigs (16-bit tile K depth x cp.async stages), 0 = default
};

void check_param(const at::Tensor& t, const char* name, const at::Tensor& x, at::ScalarType wtype,
                 std::initializer_list<int64_t> shape) {
  TORCH_CHECK_VALUE(t.device() == x.device(), name, " is on ", t.device(), " but x is on ", x.device());
  TORCH_CHECK_TYPE(t.scalar_type() == wtype, name, " must be ", wtype, " like fc1.weight, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.sizes().equals(shape), name, " must have shape ", at::IntArrayRef(shape), ", got ", t.sizes());
}

// x or dO against the weights: a pairing of the kernels' dispatch table (st_adapter_dispatch.h).
void check_activation_dtype(const at::Tensor& t, const char* name, const at::Tensor& wd) {
  TORCH_CHECK_TYPE(st_adapter::dtypes_supported(dtype_of(wd, "fc1 weight"), dtype_of(t, name)), name,
                   " must have the weights' dtype ", wd.scalar_type(), " (or float32 under autocast), got ",
                   t.scalar_type());
}

Dims check_inputs(const at::Tensor& x, int64_t T, int64_t P, const at::Tensor& wd, const OptTensor& bd,
                  const at::Tensor& taps, const OptTensor& bc, const at::Tensor& wu, const OptTensor& bu,
                  int64_t gemm_config) {
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
  check_activation_dtype(x, "x", wd);
  TORCH_CHECK_VALUE(taps.dim() == 2 && taps.size(0) == d.Ca, "conv taps must have shape (Ca=", d.Ca, ", KT), got ",
                    taps.sizes());
  d.KT = static_cast<int>(taps.size(1));
  TORCH_CHECK_VALUE(st_adapter::kt_supported(d.KT), "temporal kernel size must be odd and <= ", st_adapter::kMaxKT,
                    ", got ", taps.size(1));
  TORCH_CHECK_VALUE(st_adapter::gemm_config_supported(static_cast<int>(gemm_config)),
                    "gemm_config must index the kernels' GemmConfigs (0 = default .. ", st_adapter::gemm_config_count() - 1,
                    "), got ", gemm_config);
  d.gemm_config = static_cast<int>(gemm_config);
  check_param(wd, "fc1 weight", x, wtype, {d.Ca, d.C});
  check_param(taps, "conv taps", x, wtype, {d.Ca, static_cast<int64_t>(d.KT)});
  check_param(wu, "fc2 weight", x, wtype, {d.C, d.Ca});
  if (bd) check_param(*bd, "fc1 bias", x, wtype, {d.Ca});
  if (bc) check_param(*bc, "conv bias", x, wtype, {d.Ca});
  if (bu) check_param(*bu, "fc2 bias", x, wtype, {d.C});
  return d;
}

const void* opt_ptr(const OptTensor& t) { return t ? t->data_ptr() : nullptr; }

// The down-conv / conv-backward window grid plan: the caller's, else conv_plan (st_adapter_index.cuh).
st_adapter::ConvPlan pick_plan(const Dims& d, int64_t requested, int64_t n_whole_rows) {
  TORCH_CHECK_VALUE(requested >= 0 && n_whole_rows >= 0, "frames_per_run and n_whole_rows must be >= 0, got ",
                    requested, " and ", n_whole_rows);
  if (requested > 0) return {requested < d.T ? requested : d.T, n_whole_rows};
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  return st_adapter::conv_plan(st_adapter::conv_block_m_for(d.gemm_config, d.KT), d.KT, d.B, d.T, d.S, d.Ca,
                               requested, sms);
}

// ------------------------------------------------------- the views every launch is filled from
// A token tensor (F, L, K) or a flat (N = F*S, K) buffer.
st_adapter::TokenView token_view(const at::Tensor& t, const Dims& d, const char* name) {
  if (t.dim() == 3) return {t.data_ptr(), dtype_of(t, name), d.P, t.stride(0), t.stride(1), t.stride(2)};
  return {t.data_ptr(), dtype_of(t, name), 0, d.S * t.stride(0), t.stride(0), t.stride(1)};
}

// W(n, k) = w[n, k], or w[k, n] when transposed.
st_adapter::WeightView weight_view(const at::Tensor& w, bool transposed) {
  if (transposed) return {w.data_ptr(), w.stride(1), w.stride(0)};
  return {w.data_ptr(), w.stride(0), w.stride(1)};
}

st_adapter::ConvShape conv_shape(const Dims& d, const st_adapter::ConvPlan& plan) {
  return {d.B, d.T, d.S, d.C, d.Ca, d.KT, plan.frames_per_run, plan.n_whole_rows};
}

// ------------------------------------------------------------------------------ launches
// The backward's fp32 partials still to be summed, and the buffers that hold them (alive until the
// one finalize launch is enqueued).
struct Finalize {
  st_adapter::PartialSums sums;
  std::vector<at::Tensor> parts;
  // out = sum over the n_parts leading slices of part, in a fixed order (deterministic).
  // out: in the parameters' dtype (the finalize casts), every segment alike.
  void add(const at::Tensor& part, const at::Tensor& out, int64_t n_parts) {
    parts.push_back(part);
    sums.out_dtype = dtype_of(out, "gradient");
    sums.add(part.data_ptr<float>(), out.data_ptr(), n_parts, out.numel());
  }
  void launch(cudaStream_t stream) {
    if (sums.n == 0) return;
    check_grid(st_adapter::sum_partials_blocks(sums.total()), "sum_partials");
    check_launch(st_adapter::sum_partials_many(sums, stream), "sum_partials");
  }
};

// g (and h) (N, Ca) in the weights' dtype.
void run_down_conv(const at::Tensor& x, const Dims& d, const at::Tensor& wd, const OptTensor& bd,
                   const at::Tensor& taps, const OptTensor& bc, const at::Tensor& g, const at::Tensor* h,
                   const st_adapter::ConvPlan& plan, cudaStream_t stream) {
  const st_adapter::DownConvParams p{conv_shape(d, plan), token_view(x, d, "x"), weight_view(wd, false),
                                     dtype_of(wd, "fc1 weight"), opt_ptr(bd), taps.data_ptr(), opt_ptr(bc),
                                     g.data_ptr(), h != nullptr ? h->data_ptr() : nullptr, d.gemm_config};
  check_grid(st_adapter::conv_blocks(p, st_adapter::conv_block_m_for(d.gemm_config, d.KT)), "down_conv_forward");
  check_launch(st_adapter::down_conv_forward(p, stream), "down_conv_forward");
}

// dh (N, Ca); the conv-parameter gradients dwc (Ca, KT), dbc (Ca,) go to the finalize.
void run_conv_backward(const at::Tensor& dout, const Dims& d, const at::Tensor& wu, const at::Tensor& taps,
                       const at::Tensor& h, const at::Tensor& dh, const at::Tensor& dwc, const at::Tensor& dbc,
                       const st_adapter::ConvPlan& plan, Finalize& fin, cudaStream_t stream) {
  const auto f32 = dout.options().dtype(at::kFloat);
  const int block_m = st_adapter::conv_block_m_for(d.gemm_config, d.KT);
  const int64_t n_parts = st_adapter::conv_parts(conv_shape(d, plan), block_m);
  at::Tensor dwc_part = at::empty({n_parts, d.Ca, d.KT}, f32);
  at::Tensor dbc_part = at::empty({n_parts, d.Ca}, f32);
  // W(n = ca, k = c) = Wu[c, ca]
  const st_adapter::ConvBwdParams p{conv_shape(d, plan), token_view(dout, d, "grad_out"), weight_view(wu, true),
                                    dtype_of(wu, "fc2 weight"), taps.data_ptr(), h.data_ptr(), dh.data_ptr(),
                                    dwc_part.data_ptr<float>(), dbc_part.data_ptr<float>(), d.gemm_config};
  check_grid(st_adapter::conv_blocks(p, block_m), "conv_backward");
  check_launch(st_adapter::conv_backward(p, stream), "conv_backward");
  fin.add(dwc_part, dwc, n_parts);
  fin.add(dbc_part, dbc, n_parts);
}

// out (F, L, NOUT) = res + [spatial] (a W^T + bias); W(n, k) = w[n, k], or w[k, n] when transposed.
void run_up_residual(const at::Tensor& res, const Dims& d, const at::Tensor& a, const at::Tensor& w, bool transposed,
                     const OptTensor& bias, const at::Tensor& out, cudaStream_t stream) {
  const int64_t nout = out.size(2);
  const st_adapter::UpResidualParams p{token_view(res, d, "residual"), a.data_ptr(), weight_view(w, transposed),
                                       dtype_of(w, "weight"), opt_ptr(bias), out.data_ptr(), d.F, d.S, a.size(1),
                                       nout, d.gemm_config};
  check_grid(st_adapter::up_residual_blocks(d.F, d.L, nout, st_adapter::up_block_m_for(d.gemm_config)),
             "up_residual_forward");
  check_launch(st_adapter::up_residual_forward(p, stream), "up_residual_forward");
}

// (sum_n A[n]^T B[n] (I, J), sum_n A[n] (I,) if with_bias) in the parameters' dtype `grad`,
// deterministic: the fp32 split partials go to the finalize, which sums and casts them.
std::pair<at::Tensor, OptTensor> run_weight_grad(const at::Tensor& a, const at::Tensor& b, const Dims& d,
                                                 DType compute, const at::TensorOptions& grad, bool with_bias,
                                                 Finalize& fin, cudaStream_t stream) {
  const int64_t I = a.size(-1), J = b.size(-1), N = d.F * d.S;
  const auto f32 = a.options().dtype(at::kFloat);
  at::Tensor dw = at::empty({I, J}, grad);
  OptTensor db;
  if (with_bias) db = at::empty({I}, grad);
  if (N == 0) {
    dw.zero_();
    if (db) db->zero_();
    return {dw, db};
  }
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const st_adapter::WgradSplit split = st_adapter::wgrad_split(N, I, J, sms);
  at::Tensor dw_part = at::empty({split.splits, I, J}, f32);
  OptTensor db_part;
  if (with_bias) db_part = at::empty({split.splits, I}, f32);
  const st_adapter::WgradParams p{token_view(a, d, "operand"), token_view(b, d, "operand"), compute, d.S, N, I, J,
                                  split, dw_part.data_ptr<float>(), db_part ? db_part->data_ptr<float>() : nullptr,
                                  d.gemm_config};
  check_grid(st_adapter::wgrad_blocks(I, J, split.splits), "weight_grad");
  check_launch(st_adapter::weight_grad(p, stream), "weight_grad");
  fin.add(dw_part, dw, split.splits);
  if (db) fin.add(*db_part, *db, split.splits);
  return {dw, db};
}

at::Tensor fwd(const at::Tensor& x, int64_t T, int64_t P, const at::Tensor& wd, const OptTensor& bd_in,
               const at::Tensor& taps_in, const OptTensor& bc_in, const at::Tensor& wu, const OptTensor& bu_in,
               int64_t frames_per_run, int64_t gemm_config, int64_t n_whole_rows) {
  const Dims d = check_inputs(x, T, P, wd, bd_in, taps_in, bc_in, wu, bu_in, gemm_config);
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
  if (g.numel() > 0) run_down_conv(x, d, wd, bd, taps, bc, g, nullptr, pick_plan(d, frames_per_run, n_whole_rows), stream);
  run_up_residual(x, d, g, wu, false, bu, out, stream);
  return out;
}

std::tuple<at::Tensor, at::Tensor, OptTensor, at::Tensor, OptTensor, at::Tensor, OptTensor> bwd(
    const at::Tensor& dout, const at::Tensor& x, int64_t T, int64_t P, const at::Tensor& wd, const OptTensor& bd_in,
    const at::Tensor& taps_in, const OptTensor& bc_in, const at::Tensor& wu, const OptTensor& bu_in,
    int64_t frames_per_run, int64_t gemm_config, int64_t n_whole_rows) {
  const Dims d = check_inputs(x, T, P, wd, bd_in, taps_in, bc_in, wu, bu_in, gemm_config);
  TORCH_CHECK_VALUE(dout.device() == x.device() && dout.sizes().equals(x.sizes()),
                    "grad_out must match x: expected ", x.sizes(), " on ", x.device(), ", got ", dout.sizes(), " on ",
                    dout.device());
  check_activation_dtype(dout, "grad_out", wd);
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
  const st_adapter::ConvPlan plan = pick_plan(d, frames_per_run, n_whole_rows);
  if (N > 0) run_down_conv(x, d, wd, bd, taps, bc, g, &h, plan, stream);

  // 2. dh and the conv-parameter gradients (summed by the finalize, 5.)
  Finalize fin;
  at::Tensor dh = at::empty({N, d.Ca}, wd.options());
  at::Tensor dwc = at::empty({d.Ca, d.KT}, wd.options());
  at::Tensor dbc_full = at::empty({d.Ca}, wd.options());
  if (N > 0) {
    run_conv_backward(dout, d, wu, taps, h, dh, dwc, dbc_full, plan, fin, stream);
  } else {
    dwc.zero_();
    dbc_full.zero_();
  }
  h.reset();

  // 3. dx = dO + dh Wd: the up-residual kernel with W(n = c, k = ca) = Wd[ca, c]
  at::Tensor dx = at::empty({d.F, d.L, d.C}, dout.options());
  if (dx.numel() > 0) run_up_residual(dout, d, dh, wd, true, OptTensor(), dx, stream);

  // 4. dWu = dy^T g (+ dbu), dWd = dh^T x_s (+ dbd)
  const DType wtype = dtype_of(wd, "fc1 weight");
  auto [dwu, dbu] = run_weight_grad(dout, g, d, wtype, wd.options(), bu_in.has_value(), fin, stream);
  auto [dwd, dbd] = run_weight_grad(dh, x, d, wtype, wd.options(), bd_in.has_value(), fin, stream);

  // 5. one launch sums every fp32 partial (dwc, dbc, dWu, dbu, dWd, dbd) in a fixed order: with
  // 1-4 the backward is 6 launches (down-conv, conv-backward, dgrad, two wgrads, finalize)
  fin.launch(stream);
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
        pybind11::arg("fc2_bias"), pybind11::arg("frames_per_run") = 0, pybind11::arg("gemm_config") = 0,
        pybind11::arg("n_whole_rows") = 0);
  m.def("bwd", &bwd, "fused backward with recompute: (dx, dWd, dbd, dtaps, dbc, dWu, dbu)", pybind11::arg("grad_out"),
        pybind11::arg("x"), pybind11::arg("num_frames"), pybind11::arg("num_prefix_tokens"),
        pybind11::arg("fc1_weight"), pybind11::arg("fc1_bias"), pybind11::arg("conv_taps"), pybind11::arg("conv_bias"),
        pybind11::arg("fc2_weight"), pybind11::arg("fc2_bias"), pybind11::arg("frames_per_run") = 0,
        pybind11::arg("gemm_config") = 0, pybind11::arg("n_whole_rows") = 0);
  m.attr("MAX_KT") = st_adapter::kMaxKT;
}
