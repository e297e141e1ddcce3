// AVX-512 (F/BW/VL/DQ) path, and the decode kernel (M <= 4) of every AVX-512 path. fp32 arithmetic: the
// per-group table is 16 fp32 weights and vpermps turns 16 indices into 16 weights. The decode kernel's
// tables are the exact weights, C x |scale| (fp16 x fp16 fits in fp32), whatever the activations'
// dtype: only the output is rounded (in a timing loop here, tables rounded to bf16 took an M = 1 call
// at group size 64 from 24.2 to 20.0 G weights/s, and vdpbf16ps on bf16 tables ran at 21.3). vpermps
// reads index bits 3..0 of each 32-bit lane, so in a 128-block (32 words of 4 nibbles) a shift by 4 j
// picks nibble j of each lane's low word and a shift by 4 j + 16 nibble j of its high word: the 16 even
// and the 16 odd k of plane j. x is widened once per call in that order (decode_order_avx512); the
// smaller blocks give their k in order.
#include <immintrin.h>

#include "scalar_convert.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")

#include "avx512_gemv.h"
#include "avx512_int16.h"

namespace aaac {
namespace {

struct Fp32 {
  using Elem = float;
  using Table = __m512;

  static Table table(__m512 scaled) { return scaled; }

  template <int kSize>
  struct Weights {
    __m512 w[kSize / 16];  // a 128-block: plane j's even k, then its odd k; else k order
    Weights(const uint8_t* q, const Table* tables) {
      if constexpr (kSize == 128) {
        const __m512i v = _mm512_loadu_si512(q);
        for (int j = 0; j < 4; ++j) {
          w[2 * j] = _mm512_permutexvar_ps(j ? _mm512_srli_epi32(v, 4 * j) : v, tables[j]);
          w[2 * j + 1] = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4 * j + 16), tables[j]);
        }
      } else if constexpr (kSize == 64) {  // byte w holds k = w and 32 + w
        const __m512i i0 = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q)));
        const __m512i i1 = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + 16)));
        w[0] = _mm512_permutexvar_ps(i0, tables[0]);
        w[1] = _mm512_permutexvar_ps(i1, tables[0]);
        w[2] = _mm512_permutexvar_ps(_mm512_srli_epi32(i0, 4), tables[1]);
        w[3] = _mm512_permutexvar_ps(_mm512_srli_epi32(i1, 4), tables[1]);
      } else {  // 32: byte w holds k = w and 16 + w
        const __m512i i0 = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q)));
        w[0] = _mm512_permutexvar_ps(i0, tables[0]);
        w[1] = _mm512_permutexvar_ps(_mm512_srli_epi32(i0, 4), tables[0]);
      }
    }
  };

  template <int kSize>
  static void dot(__m512* acc, const Weights<kSize>& w, const float* x) {
    for (int i = 0; i < kSize / 16; ++i) acc[i & 1] = _mm512_fmadd_ps(w.w[i], _mm512_loadu_ps(x + 16 * i), acc[i & 1]);
  }

  // The weights in k order: a 128-block's planes re-interleaved.
  template <int kSize>
  static void in_order(const Weights<kSize>& w, __m512* out) {
    const __m512i first = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    const __m512i second = _mm512_add_epi32(first, _mm512_set1_epi32(8));
    for (int i = 0; i < kSize / 16; i += 2) {
      out[i] = kSize == 128 ? _mm512_permutex2var_ps(w.w[i], first, w.w[i + 1]) : w.w[i];
      out[i + 1] = kSize == 128 ? _mm512_permutex2var_ps(w.w[i], second, w.w[i + 1]) : w.w[i + 1];
    }
  }

  template <int kSize>
  static void store(const Weights<kSize>& w, float* out) {
    __m512 ordered[kSize / 16];
    in_order(w, ordered);
    for (int i = 0; i < kSize / 16; ++i) _mm512_storeu_ps(out + 16 * i, ordered[i]);
  }
};

// The dequantizer's bf16 weights: the reference's, fp32 rounded to the nearest bf16 (ties to even, as
// torch's .to(torch.bfloat16); no NaN reaches here: codebooks and scales are checked at load), stored
// as bf16.
struct Bf16Store : Fp32 {
  using Elem = uint16_t;

  static Table table(__m512 scaled) {
    const __m512i bits = _mm512_castps_si512(scaled);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
    const __m512i rounded = _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
    return _mm512_castsi512_ps(_mm512_and_si512(rounded, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
  }

  template <int kSize>
  static void store(const Weights<kSize>& w, uint16_t* out) {
    __m512 ordered[kSize / 16];
    in_order(w, ordered);
    for (int i = 0; i < kSize / 16; ++i) {
      const __m256i high_halves = _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(ordered[i]), 16));
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 16 * i), high_halves);
    }
  }
};

// The int16 kernel's products without AVX512-VNNI: vpmaddwd, then vpaddd.
struct MaddDot {
  static __m512i add(__m512i sums, __m512i w, __m512i x) { return _mm512_add_epi32(sums, _mm512_madd_epi16(w, x)); }
};

}  // namespace

void gemv_avx512(const GemmProblem& p, int64_t n_begin, int64_t n_end) { gemv<Fp32>(p, n_begin, n_end); }

void dequant_avx512(const GemmProblem& p, int64_t n_begin, int64_t n_end, void* out) {
  if (p.y_dtype == ActDtype::kBFloat16) return dequant<Bf16Store>(p, n_begin, n_end, out);
  dequant<Fp32>(p, n_begin, n_end, out);
}

void gemv_int16_avx512(const GemmProblem& p, int64_t n_begin, int64_t n_end) { gemv_int16<MaddDot>(p, n_begin, n_end); }

// x as the int16 kernels read it (avx512_int16.h): per row K int16 values in k order, then the unit of
// each chunk of 64 k (int16_unit); a chunk's values are x / unit rounded to nearest even.
void decode_int16_avx512(const GemmProblem& p, const void* x, int64_t x_stride, ActDtype dtype, float* out) {
  const auto load16 = [&](int64_t at) {  // 16 values of x as fp32
    if (dtype == ActDtype::kFloat32) return _mm512_loadu_ps(static_cast<const float*>(x) + at);
    const __m256i bf16 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(x) + at));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bf16), 16));
  };
  const __m512i magnitude_bits = _mm512_set1_epi32(0x7FFFFFFF);
  const __m512i limit = _mm512_set1_epi32(kInt16Limit), minus_limit = _mm512_set1_epi32(-kInt16Limit);
  for (int64_t m = 0; m < p.m; ++m) {
    int16_t* values = reinterpret_cast<int16_t*>(out + m * p.k);
    float* units = out + m * p.k + p.k / 2;
    for (int64_t k0 = 0; k0 < p.k; k0 += kInt16Chunk) {
      const int vectors = static_cast<int>((p.k - k0 < kInt16Chunk ? p.k - k0 : kInt16Chunk) / 16);
      __m512 v[kInt16Chunk / 16];
      __m512i largest = _mm512_setzero_si512();  // of the |x| bits, which order as the values (NaN last)
      for (int i = 0; i < vectors; ++i) {
        v[i] = load16(m * x_stride + k0 + 16 * i);
        largest = _mm512_max_epu32(largest, _mm512_and_si512(_mm512_castps_si512(v[i]), magnitude_bits));
      }
      const Int16Unit unit = int16_unit(static_cast<int>(_mm512_reduce_max_epu32(largest) >> 23));
      units[k0 / kInt16Chunk] = unit.unit;
      if (std::isnan(unit.unit)) {
        for (int i = 0; i < vectors; ++i)
          _mm256_store_si256(reinterpret_cast<__m256i*>(values + k0 + 16 * i), _mm256_setzero_si256());
        continue;
      }
      const __m512 scale = _mm512_set1_ps(unit.inverse);
      for (int i = 0; i < vectors; ++i) {  // round to nearest even (the MXCSR default), then clamp
        const __m512i rounded = _mm512_cvtps_epi32(_mm512_mul_ps(v[i], scale));
        const __m512i clamped = _mm512_max_epi32(minus_limit, _mm512_min_epi32(limit, rounded));
        _mm256_store_si256(reinterpret_cast<__m256i*>(values + k0 + 16 * i), _mm512_cvtepi32_epi16(clamped));
      }
    }
  }
}

// x in the k order of Fp32::Weights: in each 128-block the even then the odd k of each plane. A bf16
// pair read as 32 bits splits with a shift and a mask; fp32 takes two two-source permutes.
void decode_order_avx512(const GemmProblem& p, const void* x, int64_t x_stride, ActDtype dtype, float* out) {
  const int64_t full = p.k / 128 * 128;
  const __m512i evens = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odds = _mm512_add_epi32(evens, _mm512_set1_epi32(1));
  for (int64_t m = 0; m < p.m; ++m) {
    float* row = out + m * p.k;
    if (dtype == ActDtype::kBFloat16) {
      const uint16_t* src = static_cast<const uint16_t*>(x) + m * x_stride;
      for (int64_t k = 0; k < full; k += 32) {
        const __m512i pairs = _mm512_loadu_si512(src + k);
        _mm512_storeu_si512(row + k, _mm512_slli_epi32(pairs, 16));
        _mm512_storeu_si512(row + k + 16, _mm512_and_si512(pairs, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))));
      }
      for (int64_t k = full; k < p.k; k += 16) {
        const __m256i halves = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + k));
        _mm512_storeu_si512(row + k, _mm512_slli_epi32(_mm512_cvtepu16_epi32(halves), 16));
      }
    } else {
      const float* src = static_cast<const float*>(x) + m * x_stride;
      for (int64_t k = 0; k < full; k += 32) {
        const __m512 a = _mm512_loadu_ps(src + k), b = _mm512_loadu_ps(src + k + 16);
        _mm512_storeu_ps(row + k, _mm512_permutex2var_ps(a, evens, b));
        _mm512_storeu_ps(row + k + 16, _mm512_permutex2var_ps(a, odds, b));
      }
      for (int64_t k = full; k < p.k; k += 16) _mm512_storeu_ps(row + k, _mm512_loadu_ps(src + k));
    }
  }
}

}  // namespace aaac

#pragma GCC pop_options
