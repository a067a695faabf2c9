"""Host-side check of the CUDA kernels' index arithmetic (csrc/st_adapter_index.cuh).

The token -> (frame, s) mapping, prefix offsets, int64 offsets past 2**31, the up-residual row
mapping, the B*S flattened (clip, spatial) row tiles, window grids of whole clips and frame runs
with their halo, the launch plan, flattened grids and their hardware limits, work splits and the sliding-window
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


def test_flattened_rows(driver):
    """Row r of the B*S flattened (clip, spatial) rows is (b, s) = divmod(r, S); its token at frame 0
    is b*T*S + s and its element offset b*T*stride_f + (s + P)*stride_l (int64, past 2**31)."""
    cases = [(r, s, t, p, 197 * 768 + pad, 768) for s in (1, 7, 196) for t in (1, 8, 32) for p in (0, 1)
             for pad in (0, 5) for r in (0, 1, s - 1, s, 3 * s + 2, 64 * s + 63)]
    cases.append((16 * 196 - 1, 196, 1024, 1, 197 * 1024, 1024))  # offset 3.1e9
    answers = driver([f"flat {r} {s} {t} {p} {sf} {sl}" for r, s, t, p, sf, sl in cases])
    big = 0
    for (r, s, t, p, sf, sl), ans in zip(cases, answers):
        b, sp = divmod(r, s)
        want = (b, sp, b * t * s + sp, b * t * sf + (sp + p) * sl)
        assert tuple(map(int, ans.split())) == want, (r, s, t, p)
        big += want[3] >= 2 ** 31
    assert big >= 1


def _window_blocks(driver, n_rows, t_count, ca, bm, bn, fpr, n_whole, kt):
    """Every block of one window grid, as the kernels decode it."""
    first = driver([f"win 0 {n_rows} {t_count} {ca} {bm} {bn} {fpr} {n_whole} {kt}"])[0]
    blocks = int(first.split()[7])
    answers = driver([f"win {i} {n_rows} {t_count} {ca} {bm} {bn} {fpr} {n_whole} {kt}" for i in range(blocks)])
    return [tuple(map(int, a.split())) for a in answers]


# (B, S, T, Ca, BLOCK_M, frames_per_run, n_whole_rows): B*S off the tile (ragged last row block),
# tiles spanning clips, whole clips, runs with halos, and mixed grids (whole rows, then split rows)
WINDOW_GRIDS = [
    (2, 9, 3, 40, 64, 3, 0), (3, 25, 5, 40, 32, 2, 1), (8, 196, 8, 384, 64, 8, 0), (4, 196, 32, 384, 64, 6, 0),
    (4, 196, 32, 384, 64, 11, 5), (1, 7, 17, 136, 32, 3, 0), (5, 13, 9, 64, 64, 4, 9), (2, 3, 11, 24, 32, 2, 0),
]


@pytest.mark.parametrize("kt", [1, 3, 9])
@pytest.mark.parametrize("grid", WINDOW_GRIDS, ids=lambda g: "B{}S{}T{}Ca{}bm{}fpr{}whole{}".format(*g))
def test_window_grid_covers_every_row_frame_and_channel_once(grid, kt, driver):
    """The down-conv / conv-backward window grid over B*S flattened rows: every (clip, spatial,
    frame, Ca block) owned by exactly one block, none past B*S; each block walks a KT//2 halo on
    both sides of its frames; one dwc/dbc partial per (row block, run), shared only by the Ca
    blocks of that (row block, run); and the decode matches kernels/_common.py's _window_program."""
    batch, s, t_count, ca, bm, fpr, n_whole = grid
    n_rows = batch * s
    blocks = _window_blocks(driver, n_rows, t_count, ca, bm, 64, fpr, n_whole, kt)
    g_ca, g_r = math.ceil(ca / 64), math.ceil(n_rows / bm)
    fpr_c = min(max(fpr, 1), t_count)
    runs = math.ceil(t_count / fpr_c)
    whole = g_r if runs == 1 else min(n_whole, g_r)
    parts = whole + (g_r - whole) * runs
    assert len(blocks) == g_ca * parts and all(b[7] == len(blocks) and b[8] == parts for b in blocks)
    owned = {}
    part_owner = {}
    for lin, (ca_b, row_b, t0, t1, part, hb, he, _, _) in enumerate(blocks):
        # _window_program, restated
        if lin < whole * g_ca:
            want = (lin % g_ca, lin // g_ca, 0, t_count, lin // g_ca)
        else:
            q = lin - whole * g_ca
            rr, rem = divmod(q, g_ca * runs)
            j, pid_ca = divmod(rem, g_ca)
            want = (pid_ca, whole + rr, j * fpr_c, min(j * fpr_c + fpr_c, t_count), whole + rr * runs + j)
        assert (ca_b, row_b, t0, t1, part) == want, lin
        assert (hb, he) == (t0 - kt // 2, t1 + kt // 2)
        assert 0 <= part < parts
        assert part_owner.setdefault(part, (row_b, t0)) == (row_b, t0)
        for r in range(row_b * bm, min(row_b * bm + bm, n_rows)):
            b, sp = divmod(r, s)
            for t in range(t0, t1):
                key = (b, sp, t, ca_b)
                owned[key] = owned.get(key, 0) + 1
    assert set(owned.values()) == {1}
    assert set(owned) == {(b, sp, t, c) for b in range(batch) for sp in range(s) for t in range(t_count)
                          for c in range(g_ca)}
    assert len(part_owner) == parts


def test_conv_plan_matches_the_backend_mirror(driver):
    """binding.cpp's plan (conv_plan: the frames_per_run policy over the flattened grid, or a
    requested run length) equals st_adapter_fast.backends.cuda.conv_plan, which the work model
    uses; and its grid's blocks and partials are what the launch and the finalize size."""
    from st_adapter_fast.backends import cuda as cuda_backend

    shapes = ((8, 8, 196), (16, 8, 196), (4, 32, 196), (1, 17, 7), (2, 3, 9))
    cases = [(bm, kt, b, t, s, ca, req, sms) for kt in (1, 3, 5, 9) for bm in {cuda_backend.conv_block_m(kt), 32}
             for b, t, s in shapes for ca in (40, 384) for req in (0, 2, 5) for sms in (4, 132)]
    answers = driver([f"plan {bm} {kt} {b} {t} {s} {ca} {req} {sms}" for bm, kt, b, t, s, ca, req, sms in cases])
    for (bm, kt, b, t, s, ca, req, sms), ans in zip(cases, answers):
        fpr, whole, blocks, parts = map(int, ans.split())
        assert (fpr, whole) == cuda_backend.conv_plan(bm, kt, b, t, s, ca, req, sms), (bm, kt, b, t, s, ca, req, sms)
        runs = math.ceil(t / fpr)
        g_r = math.ceil(b * s / bm)
        assert parts == (g_r if runs == 1 else whole + (g_r - whole) * runs)
        assert blocks == math.ceil(ca / cuda_backend.CONV_BLOCK_N) * parts


def test_frames_per_run_policy(driver):
    """The frame-run policy (st_adapter_index.cuh frames_per_run) against its Python home,
    st_adapter_fast.backends.cuda.frames_per_run, and the policy written out."""
    from st_adapter_fast.backends import cuda as cuda_backend

    cases = [(t, kt, per, sms) for t in (1, 8, 17, 32, 64) for kt in (1, 3, 9) for per in (1, 24, 500, 3000)
             for sms in (108, 132)]
    answers = driver([f"fpr {t} {kt} {per} {sms}" for t, kt, per, sms in cases])
    for (t, kt, per, sms), ans in zip(cases, answers):
        runs = min(max(1, math.ceil(2 * sms / max(per, 1))), max(1, t // (2 * kt)))
        assert int(ans) == math.ceil(t / runs) == cuda_backend.frames_per_run(t, kt, per, sms), (t, kt, per, sms)


def test_wgrad_splits(driver):
    """The CUDA wgrad token splits are the Triton launchers' policy (kernels/_common.py
    token_splits) for 2 resident blocks per SM; every token in exactly one split."""
    from st_adapter_fast.kernels._common import token_splits

    block_k, block_m, block_n = 32, 64, 64
    cases = [(n, i, j, sms) for n in (1, 31, 32, 33, 1000, 25088, 50176, 2 ** 24 + 5) for i, j in ((768, 384), (24, 40))
             for sms in (4, 132)]
    answers = driver([f"split {n} {i} {j} {sms}" for n, i, j, sms in cases])
    for (n, i, j, sms), ans in zip(cases, answers):
        tiles = math.ceil(i / block_m) * math.ceil(j / block_n)
        splits = token_splits(n, block_k, tiles, 2 * sms)
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
    """The register window + window grid (whole clips, runs with halos, or both) compute the
    zero-padded conv (forward: taps reversed; backward: the transposed conv) for every odd kt up
    to 9, T below and above a run."""
    rng = random.Random(1)
    queries, refs = [], []
    for kt in (1, 3, 5, 7, 9):
        for t_count in (1, 2, 4, 8, 17):
            for fpr, n_whole in sorted({(min(f, t_count), w) for f in (1, 3, t_count) for w in (0, 1)}):
                batch = 2
                v = [round(rng.uniform(-2, 2), 3) for _ in range(batch * t_count)]
                w = [round(rng.uniform(-1, 1), 3) for _ in range(kt)]
                queries.append(f"conv {kt} {t_count} {batch} {fpr} {n_whole} {int(transposed)} "
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
