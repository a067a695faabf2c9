// Host driver for tests/test_cuda_host_index.py: runs the __host__ __device__ index arithmetic of
// st_adapter_index.cuh on the CPU (compiled with plain g++; no CUDA needed) and prints results
// for the Python side to check. One query per input line, one answer per output line:
//
//   tok n S P stride_f stride_l        -> frame s offset
//   row row L P S                      -> frame l token spatial
//   flat r S T P stride_f stride_l     -> b s token offset (flattened (clip, spatial) row r at frame 0)
//   win linear n_rows T Ca bm bn fpr n_whole kt
//                                      -> ca_block row_block t0 t1 part halo_begin halo_end blocks parts
//   plan bm kt B T S Ca requested sms  -> frames_per_run n_whole_rows blocks parts (binding.cpp's plan)
//   fpr T kt blocks_per_run sms        -> frames_per_run
//   split N I J sms                    -> splits tokens_per_split
//   dec linear nx ny                   -> x y z
//   grid x y z                         -> 1 if the grid fits the hardware limits, else 0
//   conv KT T B fpr n_whole transposed v_0 .. v_{B*T-1} w_0 .. w_{KT-1}
//        -> B*T outputs of the sliding-window temporal conv, run split and halo included, two
//           lanes (v and 2v+1) checked against each other; "ERR ..." when a frame is written
//           twice or never.
#include <cstdio>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

#include "st_adapter_index.cuh"

using namespace st_adapter;

template <int KT>
bool sliding_conv(int64_t T, int64_t B, int64_t fpr, int64_t n_whole, bool transposed, const std::vector<double>& v,
                  const std::vector<double>& w, std::vector<double>& out) {
  constexpr int E = 2;
  constexpr int PAD = KT / 2;
  float r[KT];
  for (int i = 0; i < KT; ++i) r[i] = static_cast<float>(transposed ? w[i] : w[KT - 1 - i]);
  std::vector<int> writes(B * T, 0);
  std::vector<double> lane1(B * T, 0.0);
  out.assign(B * T, 0.0);
  // one row per clip, one channel: the window grid's blocks are its (row block, run) pairs
  const WindowGrid grid = window_grid(B, T, 1, 1, 1, fpr, n_whole);
  for (int64_t blk = 0; blk < window_grid_blocks(grid); ++blk) {
    const WindowBlock w = window_block(blk, grid, T);
    struct {
      int64_t b, t0, t1;
    } run{w.row_block, w.t0, w.t1};
    float q[ConvWindow<KT>::kPartials][E] = {};
    for (int64_t t_in = halo_begin(run.t0, KT); t_in < halo_end(run.t1, KT); ++t_in) {
      float h[E] = {0.f, 0.f};
      if (in_clip(t_in, T)) {
        const double x = v[run.b * T + t_in];
        h[0] = static_cast<float>(x);
        h[1] = static_cast<float>(2.0 * x + 1.0);
      }
      float o[E];
      conv_window_step<KT, E>(h, q, r, o);
      const int64_t t_out = t_in - PAD;
      if (t_out >= run.t0) {
        if (t_out >= run.t1) return false;
        const int64_t idx = run.b * T + t_out;
        writes[idx] += 1;
        out[idx] = o[0];
        lane1[idx] = o[1];
      }
    }
  }
  for (int64_t i = 0; i < B * T; ++i) {
    if (writes[i] != 1) return false;
  }
  // lane 1 (input 2v + 1) comes after lane 0: the test checks it separately (lanes never mix)
  for (int64_t i = 0; i < B * T; ++i) out.push_back(lane1[i]);
  return true;
}

int main() {
  std::string line;
  while (std::getline(std::cin, line)) {
    std::istringstream in(line);
    std::string cmd;
    in >> cmd;
    if (cmd == "tok") {
      int64_t n, S, P, sf, sl;
      in >> n >> S >> P >> sf >> sl;
      const TokenPos p = token_position(n, S);
      std::printf("%lld %lld %lld\n", (long long)p.frame, (long long)p.s, (long long)token_offset(n, S, P, sf, sl));
    } else if (cmd == "row") {
      int64_t row, L, P, S;
      in >> row >> L >> P >> S;
      const RowPos r = row_position(row, L, P, S);
      std::printf("%lld %lld %lld %d\n", (long long)r.frame, (long long)r.l, (long long)r.token, r.spatial ? 1 : 0);
    } else if (cmd == "flat") {
      int64_t r, S, T, P, sf, sl;
      in >> r >> S >> T >> P >> sf >> sl;
      const FlatRow f = flat_row(r, S);
      std::printf("%lld %lld %lld %lld\n", (long long)f.b, (long long)f.s, (long long)flat_row_token(r, S, T),
                  (long long)flat_row_offset(r, S, T, P, sf, sl));
    } else if (cmd == "win") {
      int64_t lin, n_rows, T, Ca, fpr, n_whole;
      int bm, bn, kt;
      in >> lin >> n_rows >> T >> Ca >> bm >> bn >> fpr >> n_whole >> kt;
      const WindowGrid g = window_grid(n_rows, T, Ca, bm, bn, fpr, n_whole);
      const WindowBlock w = window_block(lin, g, T);
      std::printf("%lld %lld %lld %lld %lld %lld %lld %lld %lld\n", (long long)w.ca_block, (long long)w.row_block,
                  (long long)w.t0, (long long)w.t1, (long long)w.part, (long long)halo_begin(w.t0, kt),
                  (long long)halo_end(w.t1, kt), (long long)window_grid_blocks(g), (long long)window_grid_parts(g));
    } else if (cmd == "plan") {
      int bm, kt;
      int64_t B, T, S, Ca, req, sms;
      in >> bm >> kt >> B >> T >> S >> Ca >> req >> sms;
      const ConvPlan p = conv_plan(bm, kt, B, T, S, Ca, req, sms);
      const WindowGrid g = conv_grid(bm, B, T, S, Ca, p.frames_per_run, p.n_whole_rows);
      std::printf("%lld %lld %lld %lld\n", (long long)p.frames_per_run, (long long)p.n_whole_rows,
                  (long long)window_grid_blocks(g), (long long)window_grid_parts(g));
    } else if (cmd == "fpr") {
      int64_t T, per, sms;
      int kt;
      in >> T >> kt >> per >> sms;
      std::printf("%lld\n", (long long)frames_per_run(T, kt, per, sms));
    } else if (cmd == "split") {
      int64_t N, I, J, sms;
      in >> N >> I >> J >> sms;
      const WgradSplit s = wgrad_split(N, I, J, sms);
      std::printf("%lld %lld\n", (long long)s.splits, (long long)s.tokens_per_split);
    } else if (cmd == "dec") {
      int64_t lin, nx, ny;
      in >> lin >> nx >> ny;
      const BlockCoord c = decode_block(lin, nx, ny);
      std::printf("%lld %lld %lld\n", (long long)c.x, (long long)c.y, (long long)c.z);
    } else if (cmd == "grid") {
      int64_t x, y, z;
      in >> x >> y >> z;
      std::printf("%d\n", grid_fits(x, y, z) ? 1 : 0);
    } else if (cmd == "conv") {
      int kt;
      int64_t T, B, fpr, n_whole;
      int transposed;
      in >> kt >> T >> B >> fpr >> n_whole >> transposed;
      std::vector<double> v(B * T), w(kt), out;
      for (auto& x : v) in >> x;
      for (auto& x : w) in >> x;
      bool ok = false;
      switch (kt) {
        case 1: ok = sliding_conv<1>(T, B, fpr, n_whole, transposed != 0, v, w, out); break;
        case 3: ok = sliding_conv<3>(T, B, fpr, n_whole, transposed != 0, v, w, out); break;
        case 5: ok = sliding_conv<5>(T, B, fpr, n_whole, transposed != 0, v, w, out); break;
        case 7: ok = sliding_conv<7>(T, B, fpr, n_whole, transposed != 0, v, w, out); break;
        case 9: ok = sliding_conv<9>(T, B, fpr, n_whole, transposed != 0, v, w, out); break;
        default: break;
      }
      if (!ok) {
        std::printf("ERR frame written twice, never, or past its run\n");
      } else {
        for (size_t i = 0; i < out.size(); ++i) std::printf(i ? " %.9g" : "%.9g", out[i]);
        std::printf("\n");
      }
    } else if (!cmd.empty()) {
      std::printf("ERR unknown command %s\n", cmd.c_str());
    }
    std::fflush(stdout);
  }
  return 0;
}
