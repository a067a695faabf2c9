"""Host-side check of the CUDA kernels' index arithmetic (csrc/st_adapter_index.cuh).

The token -> (frame, s) mapping, prefix offsets, int64 offsets past 2**31, the up-residual row
mapping, frame runs with their halo, flattened grids and their hardware limits, work splits and the sliding-window
temporal stencil are __host__ __device__ functions. csrc/index_selftest.cpp runs them on the CPU
(plain g++, no GPU, no CUDA toolkit) and this test compares every answer with Python.
"""

import math
import random
import shutil
import subprocess
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parents[2] / "csrc"
CXX = shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")

pytestmark = pytest.mark.skipif(CXX is None, reason="needs a host C++ compiler (g++)")


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    exe = tmp_path_factory.mktemp("cuda_index") / "index_selftest"
    subprocess.run(
        [CXX, "-std=c++17", "-O1", "-Wall", "-Wextra", "-Werror", "-Wno-unknown-pragmas", "-x", "c++",
         str(CSRC / "index_selftest.cpp"), "-I", str(CSRC), "-o", str(exe)],
        check=True, capture_output=True, text=True,
    )

    def ask(queries):
        res = subprocess.run([str(exe)], input="\n".join(queries) + "\n", capture_output=True, text=True,
                             check=True, timeout=60)
        lines = res.stdout.splitlines()
        assert len(lines) == len(queries), res.stdout
        return lines

    return ask


def test_token_offsets_past_int32(driver):
    """Offsets of tensors over 2**31 elements (B*T*L*C = 16*64*197*1024 > 2**31) stay exact."""
    rng = random.Random(0)
    cases = []
    for _ in range(300):
        s_count = rng.choice([1, 7, 196, 256])
        p = rng.choice([0, 1, 2])
        c = rng.choice([24, 768, 1024])
        stride_l = c * rng.choice([1, 2])
        stride_f = (s_count + p) * stride_l + rng.choice([0, 5])
        frames = rng.choice([3, 1024, 2 ** 20])
        n = rng.randrange(frames * s_count)
        cases.append((n, s_count, p, stride_f, stride_l))
    # the largest token of a (16*64, 197, 1024) tensor, and one of a 2**34-element buffer
    cases.append((16 * 64 * 196 - 1, 196, 1, 197 * 1024, 1024))
    cases.append((2 ** 34 // 384 - 1, 196, 0, 196 * 384, 384))
    answers = driver([f"tok {n} {s} {p} {sf} {sl}" for n, s, p, sf, sl in cases])
    big = 0
    for (n, s, p, sf, sl), ans in zip(cases, answers):
        frame, spatial = divmod(n, s)
        want = (frame, spatial, frame * sf + (spatial + p) * sl)
        assert tuple(map(int, ans.split())) == want, (n, s, p, sf, sl)
        big += want[2] >= 2 ** 31
    assert big > 10, "the cases must exercise offsets past int32"


def test_up_residual_row_mapping(driver):
    """Rows of all F*L tokens: prefix rows are not spatial; spatial rows map to token f*S + l - P."""
    cases = []
    for seq_len, p in ((10, 1), (10, 0), (10, 3), (197, 1), (5, 5)):
        s = seq_len - p
        for row in list(range(3 * seq_len)) + [2 ** 33 + 7]:
            cases.append((row, seq_len, p, s))
    answers = driver([f"row {r} {l} {p} {s}" for r, l, p, s in cases])
    for (row, seq_len, p, s), ans in zip(cases, answers):
        frame, l_idx = divmod(row, seq_len)
        spatial = l_idx >= p
        got = tuple(map(int, ans.split()))
        assert got[:2] == (frame, l_idx) and got[3] == int(spatial), (row, seq_len, p)
        if spatial:
            assert got[2] == frame * s + l_idx - p


@pytest.mark.parametrize("kt", [1, 3, 5, 9])
def test_frame_runs_cover_every_frame_once(kt, driver):
    """Runs of fpr frames tile each clip exactly; each run's walk adds KT//2 halo frames per side."""
    queries, expect = [], []
    for t_count in (1, 2, 7, 8, 17, 32):
        for fpr in sorted({min(f, t_count) for f in (1, 2, 3, 5, t_count)}):
            runs_per_clip = math.ceil(t_count / fpr)
            for batch in (1, 3):
                for run in range(batch * runs_per_clip):
                    queries.append(f"run {run} {runs_per_clip} {fpr} {t_count} {kt}")
                    b, i = divmod(run, runs_per_clip)
                    t0, t1 = i * fpr, min(i * fpr + fpr, t_count)
                    expect.append((b, t0, t1, t0 - kt // 2, t1 + kt // 2, t_count, batch, fpr))
    answers = driver(queries)
    covered = {}
    for ans, (b, t0, t1, hb, he, t_count, batch, fpr) in zip(answers, expect):
        assert tuple(map(int, ans.split())) == (b, t0, t1, hb, he)
        for t in range(t0, t1):
            key = (t_count, batch, fpr, b, t)
            covered[key] = covered.get(key, 0) + 1
    assert set(covered.values()) == {1}
    want = {(t_count, batch, fpr, b, t) for (_, _, _, _, _, t_count, batch, fpr) in expect
            for b in range(batch) for t in range(t_count)}
    assert set(covered) == want


def _frames_per_program_py(num_frames, kt, per_run, sms):
    """kernels.adapter_fwd.frames_per_program, restated (both backends split work the same way)."""
    want_runs = max(1, math.ceil(2 * sms / max(per_run, 1)))
    runs = min(want_runs, max(1, num_frames // (2 * kt)))
    return math.ceil(num_frames / runs)


def test_frames_per_run_matches_triton_policy(driver):
    cases = [(t, kt, per, sms) for t in (1, 8, 17, 32, 64) for kt in (1, 3, 9) for per in (1, 24, 500, 3000)
             for sms in (108, 132)]
    answers = driver([f"fpr {t} {kt} {per} {sms}" for t, kt, per, sms in cases])
    for case, ans in zip(cases, answers):
        assert int(ans) == _frames_per_program_py(*case), case
    try:  # the Triton launcher itself, where triton imports
        from st_adapter_fast.kernels.adapter_fwd import frames_per_program
    except ImportError:
        return
    for case, ans in zip(cases, answers):
        assert int(ans) == frames_per_program(*case), case


def test_wgrad_splits(driver):
    block_k, block_m, block_n = 32, 64, 64
    cases = [(n, i, j, sms) for n in (1, 31, 32, 33, 1000, 25088, 2 ** 31 + 5) for i, j in ((768, 384), (24, 40))
             for sms in (4, 132)]
    answers = driver([f"split {n} {i} {j} {sms}" for n, i, j, sms in cases])
    for (n, i, j, sms), ans in zip(cases, answers):
        tiles = math.ceil(i / block_m) * math.ceil(j / block_n)
        splits = max(1, min(math.ceil(2 * sms / tiles), math.ceil(n / (8 * block_k))))
        tps = math.ceil(math.ceil(max(n, 1) / splits) / block_k) * block_k
        want = (max(1, math.ceil(n / tps)), tps)
        got = tuple(map(int, ans.split()))
        assert got == want, (n, i, j, sms)
        # every token in exactly one split, none past N
        assert (got[0] - 1) * got[1] < n <= got[0] * got[1]


def test_flattened_grid_decode(driver):
    cases = [(lin, nx, ny) for nx, ny in ((1, 1), (6, 4), (12, 197)) for lin in (0, 1, 5, 77, 2 ** 31 - 2)]
    answers = driver([f"dec {lin} {nx} {ny}" for lin, nx, ny in cases])
    for (lin, nx, ny), ans in zip(cases, answers):
        x, y, z = map(int, ans.split())
        assert (0 <= x < nx) and (0 <= y < ny) and lin == (z * ny + y) * nx + x


def test_grid_limits(driver):
    """Grid sizes are checked against the hardware limits (x <= 2**31 - 1, y and z <= 65535) as
    int64, so a block count past them is refused instead of wrapping in the cast to unsigned."""
    cases = {
        (1, 1, 1): 1, (2 ** 31 - 1, 1, 1): 1, (2 ** 31, 1, 1): 0, (2 ** 32 + 5, 1, 1): 0, (2 ** 40, 1, 1): 0,
        (0, 1, 1): 0, (-1, 1, 1): 0, (7, 65535, 65535): 1, (7, 65536, 1): 0, (7, 1, 65536): 0,
    }
    answers = driver([f"grid {x} {y} {z}" for x, y, z in cases])
    for (dims, want), ans in zip(cases.items(), answers):
        assert int(ans) == want, dims


def _conv_ref(v, w, t_count, batch, transposed):
    """Zero-padded depthwise temporal conv along each clip (or its transpose), in float64."""
    kt, p = len(w), len(w) // 2
    out = []
    for b in range(batch):
        for t in range(t_count):
            acc = 0.0
            for j in range(kt):
                src = t + j - p if not transposed else t - j + p
                if 0 <= src < t_count:
                    acc += w[j] * v[b * t_count + src]
            out.append(acc)
    return out


@pytest.mark.parametrize("transposed", [False, True], ids=["conv", "conv_transposed"])
def test_sliding_window_stencil(transposed, driver):
    """The register window + run split + halo compute the zero-padded conv (forward: taps
    reversed; backward: the transposed conv) for every odd kt up to 9, T below and above a run."""
    rng = random.Random(1)
    queries, refs = [], []
    for kt in (1, 3, 5, 7, 9):
        for t_count in (1, 2, 4, 8, 17):
            for fpr in sorted({min(f, t_count) for f in (1, 3, t_count)}):
                batch = 2
                v = [round(rng.uniform(-2, 2), 3) for _ in range(batch * t_count)]
                w = [round(rng.uniform(-1, 1), 3) for _ in range(kt)]
                queries.append(f"conv {kt} {t_count} {batch} {fpr} {int(transposed)} "
                               + " ".join(map(str, v + w)))
                ref0 = _conv_ref(v, w, t_count, batch, transposed)
                ref1 = _conv_ref([2 * x + 1 for x in v], w, t_count, batch, transposed)
                refs.append((ref0 + ref1, (kt, t_count, fpr)))
    answers = driver(queries)
    for ans, (ref, case) in zip(answers, refs):
        assert not ans.startswith("ERR"), (case, ans)
        got = list(map(float, ans.split()))
        assert len(got) == len(ref), case
        for g, r in zip(got, ref):
            assert abs(g - r) <= 1e-5 * (1 + abs(r)), (case, got, ref)
