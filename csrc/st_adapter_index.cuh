// Index arithmetic of the ST-Adapter CUDA kernels: token -> (frame, s), prefix offsets, flattened
// (clip, spatial) row tiles, window grids of frame runs with their temporal halo, flattened grids,
// tile configurations, and the sliding-window temporal stencil. Everything here is
// __host__ __device__ and free of CUDA types, so tests/cuda/test_cuda_host_index.py compiles it with
// plain g++ and checks it against Python.
//
// Layout conventions (the same as kernels/_common.py):
// - a token tensor is viewed as (F, L, K) with F = B*T frames (frame = b*T + t); its spatial
//   token n = f*S + s lives at row (f, P + s); S = L - P spatial tokens per frame.
// - flat work buffers g, h, dh are (N, Ca) with N = F*S: the same addressing with P = 0,
//   stride_f = S*Ca, stride_l = Ca.
// - every offset is int64: a (B*T, L, C) tensor of 16*32*197*1024 elements already passes 2^31.
#pragma once

#include <stdint.h>

#if defined(__CUDACC__)
#define STA_HD __host__ __device__ __forceinline__
#define STA_UNROLL _Pragma("unroll")
#else
#define STA_HD inline
#define STA_UNROLL  // host compilers (binding.cpp, the host test) unroll on their own
#endif

namespace st_adapter {

// Widest temporal kernel the register window holds (the Triton kernels' MAX_FUSED_KT).
constexpr int kMaxKT = 9;
// Every kernel runs 8 warps; tile configurations below assume it.
constexpr int kThreads = 256;

STA_HD int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// ------------------------------------------------------------------------------ tokens
struct TokenPos {
  int64_t frame;  // f = b*T + t
  int64_t s;      // spatial index within the frame, 0..S-1
};

STA_HD TokenPos token_position(int64_t n, int64_t S) {
  TokenPos p;
  p.frame = n / S;
  p.s = n - p.frame * S;
  return p;
}

// Element offset of (frame, spatial s) in a token tensor whose prefix has P tokens.
STA_HD int64_t frame_token_offset(int64_t frame, int64_t s, int64_t P, int64_t stride_f, int64_t stride_l) {
  return frame * stride_f + (s + P) * stride_l;
}

// Element offset of spatial token n (= f*S + s) at row (f, P + s).
STA_HD int64_t token_offset(int64_t n, int64_t S, int64_t P, int64_t stride_f, int64_t stride_l) {
  TokenPos p = token_position(n, S);
  return frame_token_offset(p.frame, p.s, P, stride_f, stride_l);
}

// A row of the up-residual kernel, which walks all F*L rows (prefix rows included, so the
// passthrough needs no extra launch).
struct RowPos {
  int64_t frame;
  int64_t l;      // token index within the frame, 0..L-1
  int64_t token;  // spatial token n = frame*S + (l - P); meaningful only when spatial
  bool spatial;   // l >= P
};

STA_HD RowPos row_position(int64_t row, int64_t L, int64_t P, int64_t S) {
  RowPos r;
  r.frame = row / L;
  r.l = row - r.frame * L;
  r.spatial = r.l >= P;
  r.token = r.frame * S + (r.l - P);
  return r;
}

// ------------------------------------------------------------------- flattened row tiles
// The down-conv and conv-backward blocks own BLOCK_M rows of the B*S flattened (clip, spatial
// position) rows -- a tile may span two clips; S = 196 is not padded up to the tile per clip
// (196 -> 256 rows cost 1.31x the FLOPs on shape A) -- and walk frames t in order, the same t for
// every row of the tile (every clip has T frames). Mirrors kernels/_common.py's _flat_rows.
struct FlatRow {
  int64_t b;  // clip
  int64_t s;  // spatial position, 0..S-1
};

STA_HD FlatRow flat_row(int64_t r, int64_t S) {
  FlatRow f;
  f.b = r / S;
  f.s = r - f.b * S;
  return f;
}

// Flat token index (frame b*T, s) of row r at frame 0; frame t adds t * S. One division per row
// per block, none per frame.
STA_HD int64_t flat_row_token(int64_t r, int64_t S, int64_t T) {
  const FlatRow f = flat_row(r, S);
  return f.b * T * S + f.s;
}

// Element offset of row r's token at frame 0 of its clip in a token tensor (prefix P); frame t
// adds t * stride_f.
STA_HD int64_t flat_row_offset(int64_t r, int64_t S, int64_t T, int64_t P, int64_t stride_f, int64_t stride_l) {
  const FlatRow f = flat_row(r, S);
  return f.b * T * stride_f + (f.s + P) * stride_l;
}

// ------------------------------------------------------------------- window grids
// A 1-D grid of (Ca block, row block, frame run) blocks: the first n_whole_rows row blocks walk
// whole clips (ca_blocks blocks each), every later row block is split into `runs` runs of
// frames_per_run frames (ca_blocks blocks per run, Ca fastest so blocks sharing x tiles run
// together). A run [t0, t1) walks input frames [t0 - KT/2, t1 + KT/2): the halo frames on both
// sides are recomputed, never shared. Mirrors kernels/_common.py's _window_program.
struct WindowGrid {
  int64_t ca_blocks, row_blocks, n_whole_rows, runs, frames_per_run;
};

// frames_per_run is clamped to [1, T]; with one run per clip every row block is whole.
STA_HD WindowGrid window_grid(int64_t n_rows, int64_t T, int64_t Ca, int block_m, int block_n,
                              int64_t frames_per_run, int64_t n_whole_rows) {
  WindowGrid g;
  g.ca_blocks = cdiv(Ca, block_n);
  g.row_blocks = cdiv(n_rows, block_m);
  g.frames_per_run = frames_per_run < 1 ? 1 : (frames_per_run > T ? T : frames_per_run);
  g.runs = T > 0 ? cdiv(T, g.frames_per_run) : 1;
  const int64_t whole = n_whole_rows < 0 ? 0 : (n_whole_rows > g.row_blocks ? g.row_blocks : n_whole_rows);
  g.n_whole_rows = g.runs == 1 ? g.row_blocks : whole;
  return g;
}

// dwc/dbc partials of a window grid: one per (row block, run).
STA_HD int64_t window_grid_parts(const WindowGrid& g) {
  return g.n_whole_rows + (g.row_blocks - g.n_whole_rows) * g.runs;
}
STA_HD int64_t window_grid_blocks(const WindowGrid& g) { return g.ca_blocks * window_grid_parts(g); }

struct WindowBlock {
  int64_t ca_block, row_block;
  int64_t t0, t1;  // output frames this block owns
  int64_t part;    // its dwc/dbc partial
};

STA_HD WindowBlock window_block(int64_t linear, const WindowGrid& g, int64_t T) {
  WindowBlock w;
  const int64_t n_whole = g.n_whole_rows * g.ca_blocks;
  if (linear < n_whole) {
    w.row_block = linear / g.ca_blocks;
    w.ca_block = linear - w.row_block * g.ca_blocks;
    w.t0 = 0;
    w.t1 = T;
    w.part = w.row_block;
  } else {
    const int64_t q = linear - n_whole;
    const int64_t per_row = g.ca_blocks * g.runs;
    const int64_t rr = q / per_row;
    const int64_t rem = q - rr * per_row;
    const int64_t j = rem / g.ca_blocks;
    w.ca_block = rem - j * g.ca_blocks;
    w.row_block = g.n_whole_rows + rr;
    w.t0 = j * g.frames_per_run;
    const int64_t end = w.t0 + g.frames_per_run;
    w.t1 = end < T ? end : T;
    w.part = g.n_whole_rows + rr * g.runs + j;
  }
  return w;
}

STA_HD int64_t halo_begin(int64_t t0, int kt) { return t0 - kt / 2; }
STA_HD int64_t halo_end(int64_t t1, int kt) { return t1 + kt / 2; }
// Frames outside 0..T-1 are the conv's zero padding (no wrap-around across clips).
STA_HD bool in_clip(int64_t t, int64_t T) { return t >= 0 && t < T; }

// Frames one down-conv block walks: whole clips when the grid already fills the GPU, shorter
// runs (each recomputing a KT/2 halo on both sides) when the batch is small (B=4, T=32). A run
// stays >= 2*KT frames so the halo costs at most half of the useful work. blocks_per_frame_run:
// the grid's blocks with one run per clip (Ca blocks x row blocks). The binding's fallback when
// its caller plans nothing: st_adapter_fast.backends.cuda hands it the Triton launchers'
// occupancy plan (kernels/_common.py window_plan) instead. backends/cuda.py frames_per_run
// restates this policy (tests/cuda/test_cuda_host_index.py checks the two agree).
STA_HD int64_t frames_per_run(int64_t T, int kt, int64_t blocks_per_frame_run, int64_t sms) {
  int64_t per = blocks_per_frame_run > 1 ? blocks_per_frame_run : 1;
  int64_t want_runs = cdiv(2 * sms, per);
  if (want_runs < 1) want_runs = 1;
  int64_t max_runs = T / (2 * kt);
  if (max_runs < 1) max_runs = 1;
  int64_t runs = want_runs < max_runs ? want_runs : max_runs;
  return cdiv(T, runs);
}

// --------------------------------------------------------------------- flattened grids
// Grids are 1-D (gridDim.x allows 2^31 - 1 blocks; y and z stop at 65535, which B*T*L / 128
// passes for long clips). x is the fastest coordinate: blocks sharing an input tile run together.
constexpr int64_t kMaxGridX = 2147483647;  // 2^31 - 1
constexpr int64_t kMaxGridYZ = 65535;

// Whether a grid fits the hardware limits. Every launch checks its int64 block count here before
// the cast to unsigned, so a too-large launch fails with an error instead of wrapping silently.
STA_HD bool grid_fits(int64_t x, int64_t y = 1, int64_t z = 1) {
  return x >= 1 && x <= kMaxGridX && y >= 1 && y <= kMaxGridYZ && z >= 1 && z <= kMaxGridYZ;
}

struct BlockCoord {
  int64_t x, y, z;
};

STA_HD BlockCoord decode_block(int64_t linear, int64_t nx, int64_t ny) {
  BlockCoord c;
  c.x = linear % nx;
  int64_t rest = linear / nx;
  c.y = rest % ny;
  c.z = rest / ny;
  return c;
}

// ------------------------------------------------------------------ tile configurations
// Down-conv and conv-backward: BLOCK_M flattened (clip, spatial) rows x BLOCK_N adapter channels per frame,
// plus KT-1 fp32 window partials of that tile in registers: (BLOCK_M*BLOCK_N/256)*(KT-1) floats
// per thread. 64x64 for kt <= 3 (32 window registers); wider kernels halve the rows (kt = 5 at
// 64x64 spilled 44-140 bytes on sm_90 once the next K step's loads were staged in registers).
template <int KT>
constexpr int kConvBlockM = KT <= 3 ? 64 : 32;
STA_HD int conv_block_m(int kt) { return kt <= 3 ? 64 : 32; }
constexpr int kConvBlockN = 64;
// Up-residual (also the dgrad dx = dO + dh Wd).
constexpr int kUpBlockM = 128;
constexpr int kUpBlockN = 64;
// Weight gradients: (I, J) tile; token splits are multiples of kWgradBlockK (the fp32 step;
// 16-bit steps take GemmConfigs' K depth, a divisor of it).
constexpr int kWgradBlockM = 64;
constexpr int kWgradBlockN = 64;
constexpr int kWgradBlockK = 32;

// Token splits of a weight-gradient GEMM: the Triton launchers' policy (kernels/_common.py
// token_splits) -- the fewest splits that minimise whole waves x (token steps per block + the
// cost of its fp32 partial, kWgradPartialSteps steps), each split >= 8 token steps -- for
// kWgradCtasPerSm resident blocks per SM (the 16-bit kernel: 118-122 registers, 25-31 KB shared
// memory on sm_90). Shape A's dWu: 11 splits, 792 blocks on 264 slots (was 4: 288 blocks, 1.09
// waves). tokens_per_split is a multiple of kWgradBlockK.
constexpr int kWgradCtasPerSm = 2;
constexpr int kWgradPartialSteps = 4;

struct WgradSplit {
  int64_t splits;
  int64_t tokens_per_split;
};

STA_HD WgradSplit wgrad_split(int64_t num_tokens, int64_t I, int64_t J, int64_t sms) {
  const int64_t tiles = cdiv(I, kWgradBlockM) * cdiv(J, kWgradBlockN);
  const int64_t slots = (sms > 1 ? sms : 1) * kWgradCtasPerSm;
  const int64_t steps = num_tokens > kWgradBlockK ? cdiv(num_tokens, kWgradBlockK) : 1;
  const int64_t most = steps / 8 > 1 ? steps / 8 : 1;
  int64_t splits = 1, best_cost = -1;
  for (int64_t s = 1; s <= most; ++s) {
    const int64_t cost = cdiv(tiles * s, slots) * (cdiv(steps, s) + kWgradPartialSteps);
    if (best_cost < 0 || cost < best_cost) {
      splits = s;
      best_cost = cost;
    }
  }
  int64_t n = num_tokens > 1 ? num_tokens : 1;
  int64_t tps = cdiv(cdiv(n, splits), kWgradBlockK) * kWgradBlockK;
  WgradSplit w;
  w.tokens_per_split = tps;
  w.splits = cdiv(num_tokens, tps);
  if (w.splits < 1) w.splits = 1;
  return w;
}

// ---------------------------------------------------------- down-conv / conv-backward grids
// The down-conv / conv-backward window grid over the B*S flattened (clip, spatial) rows.
// block_m: the launch's rows per block (conv_block_m(kt), or its GEMM config's; st_adapter_dispatch.h).
STA_HD WindowGrid conv_grid(int block_m, int64_t B, int64_t T, int64_t S, int64_t Ca, int64_t frames_per_run,
                            int64_t n_whole_rows) {
  return window_grid(B * S, T, Ca, block_m, kConvBlockN, frames_per_run, n_whole_rows);
}
// The binding's fallback grid plan (its caller passed frames_per_run = 0): frames_per_run
// (requested > 0, else the frames_per_run policy for `sms` SMs); split row blocks only
// (n_whole_rows = 0) when runs > 1.
struct ConvPlan {
  int64_t frames_per_run, n_whole_rows;
};
STA_HD ConvPlan conv_plan(int block_m, int kt, int64_t B, int64_t T, int64_t S, int64_t Ca, int64_t requested,
                          int64_t sms) {
  ConvPlan p;
  if (requested > 0) {
    p.frames_per_run = requested < T ? requested : T;
  } else {
    const WindowGrid whole = conv_grid(block_m, B, T, S, Ca, T, 0);
    p.frames_per_run = frames_per_run(T, kt, whole.ca_blocks * whole.row_blocks, sms);
  }
  p.n_whole_rows = 0;
  return p;
}

// ------------------------------------------------------------------ temporal stencil
// One step of the sliding-window temporal stencil, frame by frame, each input frame once.
// Input frame t_in's value h contributes r[i] * h to output frame t_in - KT/2 + i. The partials
// q[i] hold output frame t_in - KT/2 + 1 + i before the step; the step returns the finished
// output frame t_in - KT/2 and shifts the window. With r[i] = wc[KT-1-i] this is the forward
// conv (g_t = sum_j wc_j h_{t+j-p}); with r[i] = wc[i] it is its transpose (dh from dg).
// E values per thread share one channel (one set of taps). All indices are compile-time, so
// q stays in registers.
template <int KT>
struct ConvWindow {
  static constexpr int kPartials = KT > 1 ? KT - 1 : 1;
};

template <int KT, int E>
STA_HD void conv_window_step(const float (&h)[E], float (&q)[ConvWindow<KT>::kPartials][E],
                             const float (&r)[KT], float (&out)[E]) {
STA_UNROLL
  for (int e = 0; e < E; ++e) {
    if (KT == 1) {
      out[e] = r[0] * h[e];
    } else {
      out[e] = q[0][e] + r[0] * h[e];
STA_UNROLL
      for (int i = 0; i + 1 < KT - 1; ++i) q[i][e] = q[i + 1][e] + r[i + 1] * h[e];
      q[KT > 1 ? KT - 2 : 0][e] = r[KT - 1] * h[e];
    }
  }
}

}  // namespace st_adapter
