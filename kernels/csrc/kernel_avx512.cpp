// AVX-512 (F/BW/VL/DQ) path, fp32 arithmetic: the per-group table is 16 fp32 weights (the
// reference's weight in the activations' dtype, bit for bit) and vpermps turns 16 indices into 16
// weights; it reads index bits 3..0, so a widened byte needs no mask for its low nibble and one
// shift for its high nibble.
#include <immintrin.h>

#include "scalar_convert.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")

#include "avx512_gemv.h"

namespace aaac {
namespace {

struct Fp32 {
  using Elem = float;
  using Table = __m512;

  static Table table(__m512 scaled) { return scaled; }

  template <int kChunk>
  struct Weights {
    __m512 w[kChunk / 16];  // k order, 16 per register
    Weights(const uint8_t* b, Table table) {
      const __m512i i0 = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b)));
      if constexpr (kChunk == 64) {
        const __m512i i1 = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 16)));
        w[0] = _mm512_permutexvar_ps(i0, table);
        w[1] = _mm512_permutexvar_ps(i1, table);
        w[2] = _mm512_permutexvar_ps(_mm512_srli_epi32(i0, 4), table);
        w[3] = _mm512_permutexvar_ps(_mm512_srli_epi32(i1, 4), table);
      } else {
        w[0] = _mm512_permutexvar_ps(i0, table);
        w[1] = _mm512_permutexvar_ps(_mm512_srli_epi32(i0, 4), table);
      }
    }
  };

  template <int kChunk>
  static void dot(__m512* acc, int slot, const Weights<kChunk>& w, const float* x) {
    for (int i = 0; i < kChunk / 16; ++i) {
      const int s = kChunk == 64 ? i & 1 : slot;  // a chunk of 32 alternates across chunks
      acc[s] = _mm512_fmadd_ps(w.w[i], _mm512_loadu_ps(x + 16 * i), acc[s]);
    }
  }

  template <int kChunk>
  static void store(const Weights<kChunk>& w, float* out) {
    for (int i = 0; i < kChunk / 16; ++i) _mm512_storeu_ps(out + 16 * i, w.w[i]);
  }
};

// fp32 -> the nearest bf16 value (ties to even, as torch's .to(torch.bfloat16)), kept in fp32 lanes
// (no NaN reaches here: codebooks and scales are checked at load).
__m512i round_to_bf16_bits(__m512 v) {
  const __m512i bits = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  return _mm512_and_si512(_mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))),
                          _mm512_set1_epi32(static_cast<int>(0xFFFF0000u)));
}

// bf16 activations (widened to fp32 once per call): the table is the reference's bf16 weight, the
// arithmetic stays fp32.
struct Bf16Weights : Fp32 {
  static Table table(__m512 scaled) { return _mm512_castsi512_ps(round_to_bf16_bits(scaled)); }
};

// bf16 weights for the large-M path: the same weights, stored as bf16.
struct Bf16Store : Fp32 {
  using Elem = uint16_t;

  template <int kChunk>
  static void store(const Weights<kChunk>& w, uint16_t* out) {
    for (int i = 0; i < kChunk / 16; ++i) {
      const __m256i high_halves = _mm512_cvtepi32_epi16(_mm512_srli_epi32(round_to_bf16_bits(w.w[i]), 16));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 16 * i), high_halves);
    }
  }
};

}  // namespace

void gemv_avx512(const GemmProblem& p, int64_t n_begin, int64_t n_end) {
  if (p.y_dtype == ActDtype::kBFloat16) return gemv<Bf16Weights>(p, n_begin, n_end);
  gemv<Fp32>(p, n_begin, n_end);
}

void dequant_avx512(const GemmProblem& p, int64_t n_begin, int64_t n_end, void* out) {
  if (p.y_dtype == ActDtype::kFloat32) return dequant<Fp32>(p, n_begin, n_end, out);
  dequant<Bf16Store>(p, n_begin, n_end, out);
}

}  // namespace aaac

#pragma GCC pop_options
