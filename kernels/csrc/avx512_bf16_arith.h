// bf16 weights for the AVX-512 BF16 dequantizer and the AMX kernel (kernel_avx512_bf16.cpp, kernel_amx.cpp): the
// per-group table is the codebook times the scale rounded to bf16 (the reference's bf16 weight bit for
// bit), held twice in one register of 32 words. vpermw reads index bits 4..0, so whatever sits in bit 4
// (the next nibble of a word, or a byte's high nibble) picks the same entry: a 128-block's plane j is
// one shift and one vpermw, 32 weights in k order. Include after the file's `#pragma GCC target`, like
// avx512_gemv.h.
#pragma once

#include "avx512_gemv.h"

namespace aaac {
namespace {

struct Bf16 {
  using Elem = uint16_t;
  using Table = __m512i;

  static Table table(__m512 scaled) { return (__m512i)_mm512_cvtne2ps_pbh(scaled, scaled); }

  template <int kSize>
  struct Weights {
    __m512i w[kSize / kPlane];  // plane j: 32 weights in k order
    Weights(const uint8_t* q, const Table* tables) {
      if constexpr (kSize == 128) {  // word w holds k = w + 32 j in nibble j
        const __m512i v = _mm512_loadu_si512(q);
        for (int j = 0; j < 4; ++j) w[j] = _mm512_permutexvar_epi16(j ? _mm512_srli_epi16(v, 4 * j) : v, tables[j]);
      } else if constexpr (kSize == 64) {  // byte w holds k = w and 32 + w
        const __m512i idx = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q)));
        w[0] = _mm512_permutexvar_epi16(idx, tables[0]);
        w[1] = _mm512_permutexvar_epi16(_mm512_srli_epi16(idx, 4), tables[1]);
      } else {  // 32: byte w holds k = w and 16 + w; the 256-bit vpermw reads index bits 3..0
        const __m256i idx = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q)));
        const __m256i table = _mm512_castsi512_si256(tables[0]);
        const __m256i lo = _mm256_permutexvar_epi16(idx, table);
        const __m256i hi = _mm256_permutexvar_epi16(_mm256_srli_epi16(idx, 4), table);
        w[0] = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
      }
    }
  };

  template <int kSize>
  static void store(const Weights<kSize>& w, uint16_t* out) {
    for (int j = 0; j < kSize / kPlane; ++j) _mm512_storeu_si512(out + kPlane * j, w.w[j]);
  }
};

// A block of fp32 sums, sums[16 n][16 m] (an AMX accumulator tile, or the AVX512-BF16 GEMM's 16
// accumulators) of rows m0 .. m0 + rows and columns n0 .. n0 + columns, into y (bias added): each row of
// y gathers its 16 sums from a column of the block. A scalar loop here took 20% of an AMX M = 512,
// K = 4096 call and 75% at K = 576.
void store_tile(const GemmProblem& p, const float* sums, int64_t m0, int64_t rows, int64_t n0, int64_t columns) {
  const __mmask16 valid = static_cast<__mmask16>((1u << columns) - 1);
  const __m512i column_starts = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                                   _mm512_set1_epi32(16));
  const __m512 bias = p.bias ? _mm512_maskz_loadu_ps(valid, p.bias + n0) : _mm512_setzero_ps();
  for (int64_t r = 0; r < rows; ++r) {
    const __m512 row = _mm512_add_ps(_mm512_i32gather_ps(column_starts, sums + r, 4), bias);
    const int64_t offset = (m0 + r) * p.y_stride + n0;
    if (p.y_dtype == ActDtype::kFloat32) {
      _mm512_mask_storeu_ps(static_cast<float*>(p.y) + offset, valid, row);
    } else {
      _mm256_mask_storeu_epi16(static_cast<uint16_t*>(p.y) + offset, valid, (__m256i)_mm512_cvtneps_pbh(row));
    }
  }
}

}  // namespace
}  // namespace aaac
