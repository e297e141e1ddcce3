// AVX-512 with BF16 (and VNNI, which every CPU with AVX512-BF16 has), where there is no AMX: bf16 batches
// of 9 to 64 rows on a GEMM of its own (panels of 16 columns decoded to the reference's bf16 weights,
// vdpbf16ps against x packed as for AMX), the bf16 dequantizer of the tiles beyond (vpermw on the bf16
// tables of avx512_bf16_arith.h; fp32 output takes the AVX-512 one), and the int16 decode kernel for bf16
// activations with vpdpwssd (avx512_int16.h; 2 to 8 rows). fp32 activations and one row decode with the
// AVX-512 kernel.
#include <immintrin.h>

#include "scalar_convert.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx512vnni,fma,f16c")

#include "avx512_bf16_arith.h"
#include "avx512_int16.h"

namespace aaac {
namespace {

// The int16 kernel's products: vpdpwssd, 32 products and 16 sums added in one instruction.
struct VnniDot {
  static __m512i add(__m512i sums, __m512i w, __m512i x) { return _mm512_dpwssd_epi32(sums, w, x); }
};

}  // namespace

void gemv_int16_avx512_vnni(const GemmProblem& p, int64_t n_begin, int64_t n_end) {
  gemv_int16<VnniDot>(p, n_begin, n_end);
}

namespace {

constexpr int kGemmColumns = 16;  // a panel: one accumulator per column, its 16 lanes 16 rows of x
constexpr int kBlockK = 128;      // the layout's blocks; the panel holds each column's 128 k side by side

// Columns n0 .. n0 + 16 (the last column repeated past n_end) into panel[K / 128][16][128]: the
// reference's bf16 weights, so that the 16 columns' k pair j of a block lie in one 64-byte line.
void decode_gemm_panel(const GemmProblem& p, int64_t n0, int64_t n_end, uint16_t* panel) {
  for (int c = 0; c < kGemmColumns; ++c) {
    ColumnStream col;
    col.open(p, n0 + c < n_end ? n0 + c : n_end - 1);
    uint16_t* out = panel + c * kBlockK;
    walk<Bf16>(p, &col, 1, 0, p.k / p.group_size, [&](int64_t k0, auto size, const auto& block) {
      constexpr int kSize = decltype(size)::value;
      // The next column streams right behind this one: fetch its block ahead.
      _mm_prefetch(reinterpret_cast<const char*>(col.qbytes + p.k / 2 + k0 / 2), _MM_HINT_T0);
      Bf16::store(block.template weights<kSize>(0, col.qbytes + k0 / 2),
                  out + k0 / kBlockK * kGemmColumns * kBlockK + k0 % kBlockK);
    });
  }
}

// sums[16 n][16 m] of row block mb (x packed as pack_amx_activations packs it: per 32 k and row block,
// 16 k pairs x 16 rows as 32-bit lanes) against the panel: vdpbf16ps of a row block's k pair with each
// column's k pair, broadcast from the panel.
void multiply_gemm_panel(const GemmProblem& p, const uint16_t* panel, int64_t mb, int64_t m_blocks, float* sums) {
  __m512 acc[kGemmColumns];
  for (int c = 0; c < kGemmColumns; ++c) acc[c] = _mm512_setzero_ps();
  const uint16_t* x = static_cast<const uint16_t*>(p.x);
  for (int64_t k0 = 0; k0 < p.k; k0 += kBlockK) {
    const uint32_t* w = reinterpret_cast<const uint32_t*>(panel + k0 * kGemmColumns);  // [16][64] pairs
    const int64_t pairs = (p.k - k0 < kBlockK ? p.k - k0 : kBlockK) / 2;
    for (int64_t j0 = 0; j0 < pairs; j0 += 16) {  // one packed tile of x: 16 k pairs
      const uint16_t* tile = x + ((k0 + 2 * j0) / 32 * m_blocks + mb) * 512;
#pragma GCC unroll 16
      for (int j = 0; j < 16; ++j) {
        const __m512bh xv = (__m512bh)_mm512_loadu_si512(tile + 32 * j);
        for (int c = 0; c < kGemmColumns; ++c)
          acc[c] = _mm512_dpbf16_ps(acc[c], xv, (__m512bh)_mm512_set1_epi32(static_cast<int>(w[c * 64 + j0 + j])));
      }
    }
  }
  for (int c = 0; c < kGemmColumns; ++c) _mm512_store_ps(sums + 16 * c, acc[c]);
}

}  // namespace

int64_t avx512_bf16_gemm_workspace_bytes(const GemmProblem& p) {
  return ((p.k + kBlockK - 1) / kBlockK) * kGemmColumns * kBlockK * 2 + kGemmColumns * 16 * 4 + 128;
}

void gemm_avx512_bf16(const GemmProblem& p, int64_t n_begin, int64_t n_end, void* workspace) {
  auto* panel = reinterpret_cast<uint16_t*>((reinterpret_cast<uintptr_t>(workspace) + 63) & ~uintptr_t{63});
  float* sums = reinterpret_cast<float*>(panel + ((p.k + kBlockK - 1) / kBlockK) * kGemmColumns * kBlockK);
  const int64_t m_blocks = (p.m + 15) / 16;
  for (int64_t n0 = n_begin; n0 < n_end; n0 += kGemmColumns) {
    const int64_t columns = n_end - n0 < kGemmColumns ? n_end - n0 : kGemmColumns;
    decode_gemm_panel(p, n0, n_end, panel);
    for (int64_t mb = 0; mb < m_blocks; ++mb) {
      multiply_gemm_panel(p, panel, mb, m_blocks, sums);
      store_tile(p, sums, 16 * mb, p.m - 16 * mb < 16 ? p.m - 16 * mb : 16, n0, columns);
    }
  }
}

void dequant_avx512_bf16(const GemmProblem& p, int64_t n_begin, int64_t n_end, void* out) {
  if (p.y_dtype == ActDtype::kFloat32) return dequant_avx512(p, n_begin, n_end, out);
  dequant<Bf16>(p, n_begin, n_end, out);
}

}  // namespace aaac

#pragma GCC pop_options
