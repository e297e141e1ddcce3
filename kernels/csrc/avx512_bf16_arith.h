// bf16 arithmetic for the AVX-512 kernels (kernel_avx512_bf16.cpp, kernel_amx.cpp): the per-group
// table is the codebook times the scale rounded to bf16 (the reference's bf16 weight bit for bit),
// held twice in one register of 32 words: vpermw reads index bits 4..0, so a widened byte (high
// nibble above bit 3) picks the same entry and its low nibble needs no mask. Include after the
// file's `#pragma GCC target`, like avx512_gemv.h.
#pragma once

#include "avx512_gemv.h"

namespace aaac {
namespace {

struct Bf16 {
  using Elem = uint16_t;
  using Table = __m512i;

  static Table table(__m512 scaled) { return (__m512i)_mm512_cvtne2ps_pbh(scaled, scaled); }

  template <int kChunk>
  struct Weights {
    __m512i w[kChunk / 32];  // k order, 32 per register
    Weights(const uint8_t* b, Table table) {
      if constexpr (kChunk == 64) {
        const __m512i idx = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b)));
        w[0] = _mm512_permutexvar_epi16(idx, table);
        w[1] = _mm512_permutexvar_epi16(_mm512_srli_epi16(idx, 4), table);
      } else {
        // 16 bytes: low nibbles k = 0..15, high k = 16..31; the 256-bit vpermw reads bits 3..0.
        const __m256i idx = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b)));
        const __m256i half_table = _mm512_castsi512_si256(table);
        const __m256i lo = _mm256_permutexvar_epi16(idx, half_table);
        const __m256i hi = _mm256_permutexvar_epi16(_mm256_srli_epi16(idx, 4), half_table);
        w[0] = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
      }
    }
  };

  template <int kChunk>
  static void dot(__m512* acc, int slot, const Weights<kChunk>& w, const uint16_t* x) {
    for (int i = 0; i < kChunk / 32; ++i) {
      const int s = kChunk == 64 ? i : slot;
      acc[s] = _mm512_dpbf16_ps(acc[s], (__m512bh)w.w[i], (__m512bh)_mm512_loadu_si512(x + 32 * i));
    }
  }

  template <int kChunk>
  static void store(const Weights<kChunk>& w, uint16_t* out) {
    for (int i = 0; i < kChunk / 32; ++i) _mm512_storeu_si512(out + 32 * i, w.w[i]);
  }
};

}  // namespace
}  // namespace aaac
