// The sm_80 warp-level instructions the 16-bit GEMMs run on, as thin wrappers over inline PTX,
// or over their CPU emulation (cpu_emulation.h) under STA_CPU_EMULATION:
// - cp.async (16-byte global -> shared copies, zero-filled past src_size) with commit / wait
//   groups, so several K steps' loads fly while the tensor cores work;
// - ldmatrix (8x8 b16 matrices from shared memory into mma fragments, optionally transposed);
// - mma.sync m16n8k16 with fp32 accumulation, fp16 or bf16 operands.
// Fragment layouts (PTX ISA, "Matrix Fragments for mma.m16n8k16"), g = lane / 4, t = lane % 4:
//   A (16x16, row): a[0] = (g, 2t..2t+1), a[1] = (g+8, 2t..), a[2] = (g, 2t+8..), a[3] = (g+8, 2t+8..)
//   B (16x8, col):  b[0] = (k 2t..2t+1, n g), b[1] = (k 2t+8.., n g)
//   C (16x8 fp32):  c[0], c[1] = (g, 2t), (g, 2t+1); c[2], c[3] = (g+8, 2t), (g+8, 2t+1)
#pragma once

#include <stdint.h>

#include <type_traits>

namespace st_adapter {

// 16 bytes from gmem to smem; src_size < 16 bytes are read and the rest zero-filled (0: all zeros,
// gmem is not read but must still be a valid address).
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, int src_size) {
#ifdef STA_CPU_EMULATION
  sta_emu_cp_async16(smem, gmem, src_size);
#else
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem), "r"(src_size));
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#ifdef STA_CPU_EMULATION
  sta_emu_cp_async_commit();
#else
  asm volatile("cp.async.commit_group;\n" ::);
#endif
}

// Waits until at most PENDING of this thread's committed groups are in flight.
template <int PENDING>
__device__ __forceinline__ void cp_async_wait() {
#ifdef STA_CPU_EMULATION
  sta_emu_cp_async_wait(PENDING);
#else
  asm volatile("cp.async.wait_group %0;\n" ::"n"(PENDING));
#endif
}

// Four 8x8 b16 matrices; lanes 8i..8i+7 give the row addresses of matrix i (16-byte aligned).
template <bool TRANS>
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
#ifdef STA_CPU_EMULATION
  sta_emu_ldmatrix<4, TRANS>(r, row);
#else
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(row));
  if constexpr (TRANS)
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
  else
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
#endif
}

// d += a b on one 16x8x16 tile (T = __half or __nv_bfloat16).
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  constexpr bool kBf16 = std::is_same<T, __nv_bfloat16>::value;
#ifdef STA_CPU_EMULATION
  sta_emu_mma16816(d, a, b, d, kBf16);
#else
  if constexpr (kBf16)
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
}

}  // namespace st_adapter
