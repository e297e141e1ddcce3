// The encoder's group errors (nearest.cpp) on AVX2: 8 weights at a time, their nearest entries counted
// by 15 vector compares against the midpoints and looked up by two vpermps, and the same products and
// sums in the same order as the generic loop (lane i of the accumulator is its partial[i % 8]), so both
// give the same errors bit for bit. Compiled for AVX2 alone, without FMA, so that no multiply and add can
// be fused: each product and sum rounds as the generic loop's do.
#include <immintrin.h>

#include <cstdint>

#include "cpu_kernels.h"

#pragma GCC push_options
#pragma GCC target("avx2")

namespace aaac {

void group_errors_avx2(const GroupErrorProblem& p, int64_t begin, int64_t end) {
  __m256 bounds[15];
  for (int j = 0; j < 15; ++j) bounds[j] = _mm256_set1_ps(p.bounds[j]);
  const __m256 low_entries = _mm256_loadu_ps(p.entries), high_entries = _mm256_loadu_ps(p.entries + 8);
  const __m256i seven = _mm256_set1_epi32(7);
  for (int64_t group = begin; group < end; ++group) {
    const float* u = p.u + group * p.g;
    const float* w = p.w + group * p.g;
    const float* mean_square = p.mean_square + (group % p.groups) * p.g;
    const __m256 scale = _mm256_set1_ps(p.scale[group]);
    uint8_t* out = p.indices + group * p.g;
    __m256 partial = _mm256_setzero_ps();
    for (int64_t i = 0; i < p.g; i += 8) {
      const __m256 v = _mm256_loadu_ps(u + i);
      __m256i below = _mm256_setzero_si256();  // minus one per midpoint below v
      for (int j = 0; j < 15; ++j)
        below = _mm256_add_epi32(below, _mm256_castps_si256(_mm256_cmp_ps(bounds[j], v, _CMP_LT_OQ)));
      const __m256i index = _mm256_sub_epi32(_mm256_setzero_si256(), below);
      const __m256 entry = _mm256_blendv_ps(_mm256_permutevar8x32_ps(low_entries, index),
                                            _mm256_permutevar8x32_ps(high_entries, index),
                                            _mm256_castsi256_ps(_mm256_cmpgt_epi32(index, seven)));
      const __m256 diff = _mm256_sub_ps(_mm256_loadu_ps(w + i), _mm256_mul_ps(entry, scale));
      partial = _mm256_add_ps(partial, _mm256_mul_ps(_mm256_mul_ps(diff, diff), _mm256_loadu_ps(mean_square + i)));
      const __m128i words = _mm_packs_epi32(_mm256_castsi256_si128(index), _mm256_extracti128_si256(index, 1));
      _mm_storel_epi64(reinterpret_cast<__m128i*>(out + i), _mm_packus_epi16(words, words));
    }
    float lanes[8];
    _mm256_storeu_ps(lanes, partial);
    float sum = 0.0f;
    for (float lane : lanes) sum += lane;
    p.errors[group] = sum;
  }
}

}  // namespace aaac

#pragma GCC pop_options
