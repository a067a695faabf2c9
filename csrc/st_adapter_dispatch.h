// The one dtype x KT table of the ST-Adapter kernels and the dispatch from runtime values (DType,
// kt) to template instantiations. Every kernel file dispatches through it, binding.cpp checks its
// inputs against it, and the CPU emulation compiles the same kernel files and exports it
// (cpu_emulation_api.cpp), so no list of dtypes or kernel sizes is written twice.
//
// Free of torch and of CUDA types: the dispatch hands the callee tags (DTypeTag, IntTag), and the
// kernel files turn a DTypeTag into float / __half / __nv_bfloat16 (CType in st_adapter_tile.cuh).
#pragma once

#include <stdint.h>

#include <type_traits>

#include "st_adapter_index.cuh"

namespace st_adapter {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

template <DType D>
using DTypeTag = std::integral_constant<DType, D>;
template <int N>
using IntTag = std::integral_constant<int, N>;

template <DType... Ds>
struct DTypeList {};
template <int... Ns>
struct IntList {};

// ---------------------------------------------------------------------------------- the table
// The work model (st_adapter_fast/backends/cuda_model.py) compiles each kernel file with the
// table cut down to one entry -- -DSTA_ONLY_DTYPE=<DType> -DSTA_ONLY_KT=<kt> -DSTA_ONLY_CONFIG=<index>
// -- for the registers and spills of exactly the instantiations a launch dispatches to, in
// seconds instead of minutes. Nothing else defines these.
#if defined(STA_ONLY_DTYPE) && defined(STA_ONLY_KT) && defined(STA_ONLY_CONFIG)
#define STA_ONLY_ONE_ENTRY 1
using ComputeDTypes = DTypeList<static_cast<DType>(STA_ONLY_DTYPE)>;
using KernelSizes = IntList<STA_ONLY_KT>;
constexpr int kMaxFp32Operands = 0;
#else
// Compute dtypes, i.e. the weights' dtype: fp16/bf16 on tensor cores, fp32 on IEEE SIMT.
using ComputeDTypes = DTypeList<DType::kFloat32, DType::kFloat16, DType::kBFloat16>;
// Temporal kernel sizes the conv kernels are instantiated for (the register window is unrolled
// per KT): every odd size up to kMaxKT.
using KernelSizes = IntList<1, 3, 5, 7, 9>;
// Operand dtypes of one launch: every operand in the compute dtype, except that at most one of
// them -- the caller's activations x or dO -- may be fp32 under autocast (cast on load, as the
// Triton kernels' _mma does). The work buffers g, h, dh are always in the compute dtype.
constexpr int kMaxFp32Operands = 1;
#endif
// Tile configurations, selectable per call for the GPU sweep (an index into GemmConfigs; 0 = the
// first, the default; st_adapter_fast.backends.cuda.gemm_configs() lists them): the K depth of a
// 16-bit block step and the depth of its cp.async ring (STAGES tiles keep STAGES - 1 K steps in
// flight), the down-conv / conv-backward rows per block (0: kConvBlockM<KT>, 64 for kt <= 3, 32
// above) and the up-residual rows per block. 0: 32-deep steps x 3 stages; 1: 16-deep x 4 (half the
// shared memory per stage, one more step in flight); 2: 32-row window tiles for every kt and
// 64-row up-residual tiles (2x the blocks: the shape-A window grid gets the Triton kernel's 49 row
// blocks instead of 25, which fill 1.14 waves of 132 SMs). The kernels are templated on the
// resolved sizes, so an entry compiles only the instantiations no other entry has (entry 2: kt 1
// and 3 window kernels, the up-residual). fp32 kernels (IEEE SIMT, loads in-step) take the
// entry's tile rows with the default K depth.
template <int BK, int STAGES, int CONV_BM = 0, int UP_BM = 128>
struct GemmConfig {
  static constexpr int kBlockK = BK;
  static constexpr int kStages = STAGES;
  static constexpr int kConvBlockM = CONV_BM;
  static constexpr int kUpBlockM = UP_BM;
};
template <typename... Cs>
struct ConfigList {};
using AllGemmConfigs = ConfigList<GemmConfig<32, 3>, GemmConfig<16, 4>, GemmConfig<32, 3, 32, 64>>;
template <int I, typename... Cs>
struct ConfigAt;
template <typename C, typename... Cs>
struct ConfigAt<0, C, Cs...> {
  using type = C;
};
template <int I, typename C, typename... Cs>
struct ConfigAt<I, C, Cs...> : ConfigAt<I - 1, Cs...> {};
template <int I, typename List>
struct OneConfig;
template <int I, typename... Cs>
struct OneConfig<I, ConfigList<Cs...>> {
  using type = ConfigList<typename ConfigAt<I, Cs...>::type>;
};
#ifdef STA_ONLY_ONE_ENTRY
using GemmConfigs = typename OneConfig<STA_ONLY_CONFIG, AllGemmConfigs>::type;
#else
using GemmConfigs = AllGemmConfigs;
#endif
using DefaultGemmConfig = GemmConfig<32, 3>;
// The fp32 twin of a config: its tile rows, the default K depth.
template <typename C>
using Fp32GemmConfig = GemmConfig<DefaultGemmConfig::kBlockK, DefaultGemmConfig::kStages, C::kConvBlockM, C::kUpBlockM>;

// Rows per block of a config's window kernels for KT, and of its up-residual.
template <typename C, int KT>
constexpr int conv_tile_m() {
  return C::kConvBlockM ? C::kConvBlockM : kConvBlockM<KT>;
}

// ----------------------------------------------------------------------------- dispatch
namespace detail {

template <int... Ks>
constexpr int max_kt(IntList<Ks...>) {
  int m = 0;
  ((m = Ks > m ? Ks : m), ...);
  return m;
}

template <typename R, typename F, int... Ns>
R dispatch_int(int value, R fallback, F& f, IntList<Ns...>) {
  R out = fallback;
  ((value == Ns ? (out = f(IntTag<Ns>{}), true) : false) || ...);
  return out;
}

// Picks each operand's dtype (compute or fp32) one at a time; Done holds those already picked.
template <typename R, typename F, typename... Cs>
R dispatch_config(int index, R fallback, F& f, ConfigList<Cs...>) {
  R out = fallback;
  int i = 0;
  ((index == i++ ? (out = f(Cs{}), true) : false) || ...);
  return out;
}

template <DType C, DType... Done, typename R, typename F>
R pick_operands(DTypeList<Done...>, R /*fallback*/, F& f) {
  return f(DTypeTag<Done>{}..., DTypeTag<C>{});
}
template <DType C, DType... Done, typename R, typename F, typename... Rest>
R pick_operands(DTypeList<Done...>, R fallback, F& f, DType first, Rest... rest) {
  constexpr int fp32_picked = (0 + ... + (Done == DType::kFloat32 ? 1 : 0));
  if (first == C) return pick_operands<C>(DTypeList<Done..., C>{}, fallback, f, rest...);
  if constexpr (C != DType::kFloat32 && fp32_picked < kMaxFp32Operands) {
    if (first == DType::kFloat32) return pick_operands<C>(DTypeList<Done..., DType::kFloat32>{}, fallback, f, rest...);
  }
  return fallback;
}

template <typename R, typename F, DType... Cs, typename... Ops>
R dispatch_dtypes(DType compute, R fallback, F& f, DTypeList<Cs...>, Ops... operands) {
  R out = fallback;
  ((compute == Cs ? (out = pick_operands<Cs>(DTypeList<>{}, fallback, f, operands...), true) : false) || ...);
  return out;
}

}  // namespace detail

#ifndef STA_ONLY_ONE_ENTRY
static_assert(detail::max_kt(KernelSizes{}) == kMaxKT, "the table's widest KT is the register window's kMaxKT");
#endif

// f(IntTag<kt>{}) for a kt of the table, else fallback.
template <typename R, typename F>
R dispatch_kt(int kt, R fallback, F&& f) {
  return detail::dispatch_int(kt, fallback, f, KernelSizes{});
}

// f(GemmConfig<...>{}) for the config index of the table, else fallback; fp32 compute (a
// DTypeTag) gets the entry's fp32 twin: its kernels have no pipeline.
template <typename ComputeTag, typename R, typename F>
R dispatch_gemm_config(int config, R fallback, F&& f) {
  if constexpr (ComputeTag::value == DType::kFloat32) {
    auto fp32 = [&](auto c) { return f(Fp32GemmConfig<decltype(c)>{}); };
    return detail::dispatch_config(config, fallback, fp32, GemmConfigs{});
  } else {
    return detail::dispatch_config(config, fallback, f, GemmConfigs{});
  }
}

// f(DTypeTag<operand dtype>{}..., DTypeTag<compute>{}) for a pairing the table allows, else fallback.
template <typename R, typename F, typename... Ops>
R dispatch_dtypes(DType compute, R fallback, F&& f, Ops... operand_dtypes) {
  static_assert((std::is_same<Ops, DType>::value && ...), "operand dtypes are DType values");
  return detail::dispatch_dtypes(compute, fallback, f, ComputeDTypes{}, operand_dtypes...);
}

// Host-side questions for binding.cpp and the tests, answered by the same dispatch.
inline bool kt_supported(int kt) {
  return dispatch_kt(kt, false, [](auto) { return true; });
}
inline bool gemm_config_supported(int config) {
  return dispatch_gemm_config<DTypeTag<DType::kFloat16>>(config, false, [](auto) { return true; });
}
inline int gemm_config_count() {
  int n = 0;
  while (gemm_config_supported(n)) ++n;
  return n;
}
// A config's tiles, for the host plan: (K depth, stages, window rows for kt, up-residual rows).
inline int conv_block_m_for(int config, int kt) {
  return dispatch_gemm_config<DTypeTag<DType::kFloat16>>(config, conv_block_m(kt), [&](auto c) {
    return decltype(c)::kConvBlockM ? decltype(c)::kConvBlockM : conv_block_m(kt);
  });
}
inline int up_block_m_for(int config) {
  return dispatch_gemm_config<DTypeTag<DType::kFloat16>>(config, kUpBlockM, [](auto c) { return decltype(c)::kUpBlockM; });
}
inline int gemm_block_k_for(int config) {
  return dispatch_gemm_config<DTypeTag<DType::kFloat16>>(config, 0, [](auto c) { return decltype(c)::kBlockK; });
}
inline int gemm_stages_for(int config) {
  return dispatch_gemm_config<DTypeTag<DType::kFloat16>>(config, 0, [](auto c) { return decltype(c)::kStages; });
}

template <typename... Ops>
bool dtypes_supported(DType compute, Ops... operand_dtypes) {
  return dispatch_dtypes(compute, false, [](auto...) { return true; }, operand_dtypes...);
}

}  // namespace st_adapter
