// AVX2 + FMA + F16C path (activations widened to fp32 once per call). A 16-entry table is held as two
// 16-byte tables, the low and the high bytes of its 16-bit values: two vpshufb and an unpack give 16
// 16-bit weights, widened exactly to fp32.
//   The decode kernel: the table is the codebook itself (fp16, widened by vcvtph2ps), and the group's
//     |scale| multiplies the group's partial sums once (C x |scale| is exact in fp32: the exact weight,
//     up to the summation order), for every activation dtype.
//   The bf16 dequantizer: the table is the reference's bf16 weight of each index, C x |scale| rounded
//     to bf16, made once per group.
#include <immintrin.h>

#include "scalar_convert.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")

namespace aaac {
namespace {

struct Column {
  alignas(32) float codebook[2][16];  // fp32, for the bf16 tables
  __m128i fp16_lo[2], fp16_hi[2];     // bytes of the fp16 codebooks
  const uint8_t* qbytes;
  const uint16_t* scales;
};

// 16 sixteen-bit values (two registers of 8 words, in order) -> their low bytes and their high bytes.
void split_bytes(__m128i first, __m128i second, __m128i* lo, __m128i* hi) {
  const __m128i even = _mm_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, -1, -1, -1, -1, -1, -1, -1, -1);
  const __m128i odd = _mm_setr_epi8(1, 3, 5, 7, 9, 11, 13, 15, -1, -1, -1, -1, -1, -1, -1, -1);
  *lo = _mm_unpacklo_epi64(_mm_shuffle_epi8(first, even), _mm_shuffle_epi8(second, even));
  *hi = _mm_unpacklo_epi64(_mm_shuffle_epi8(first, odd), _mm_shuffle_epi8(second, odd));
}

Column open_column(const GemmProblem& p, int64_t n) {
  Column col;
  const uint16_t* pair = codebook_pair(p, n);
  for (int c = 0; c < 2; ++c) {
    const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(pair + 16 * c));
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(pair + 16 * c + 8));
    split_bytes(a, b, &col.fp16_lo[c], &col.fp16_hi[c]);
    _mm256_store_ps(col.codebook[c], _mm256_cvtph_ps(a));
    _mm256_store_ps(col.codebook[c] + 8, _mm256_cvtph_ps(b));
  }
  col.qbytes = p.qbytes + n * (p.k / 2);
  col.scales = p.scales + n * (p.k / p.group_size);
  return col;
}

// fp32 -> bf16 bits in the low half of each lane, round to nearest even (no NaN reaches here).
__m256i bf16_bits(__m256 v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  return _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
}

// The lookup tables of one group and the factor its partial sums take.
struct GroupTables {
  __m128i lo, hi;
  float magnitude;
};

template <bool kBf16>
GroupTables group_tables(const Column& col, uint16_t scale) {
  const int choice = scale >> 15;
  const float magnitude = _cvtsh_ss(scale & 0x7FFF);
  if constexpr (!kBf16) return {col.fp16_lo[choice], col.fp16_hi[choice], magnitude};
  const __m256 s = _mm256_set1_ps(magnitude);
  const __m256i first = bf16_bits(_mm256_mul_ps(_mm256_load_ps(col.codebook[choice]), s));
  const __m256i second = bf16_bits(_mm256_mul_ps(_mm256_load_ps(col.codebook[choice] + 8), s));
  GroupTables t;
  t.magnitude = 1.0f;
  split_bytes(_mm_packus_epi32(_mm256_castsi256_si128(first), _mm256_extracti128_si256(first, 1)),
              _mm_packus_epi32(_mm256_castsi256_si128(second), _mm256_extracti128_si256(second, 1)), &t.lo, &t.hi);
  return t;
}

// 16 indices (one per byte of idx) -> 16 fp32 table values, k order.
template <bool kBf16>
void lookup16(__m128i idx, const GroupTables& t, __m256* w) {
  const __m128i bl = _mm_shuffle_epi8(t.lo, idx), bh = _mm_shuffle_epi8(t.hi, idx);
  const __m128i first = _mm_unpacklo_epi8(bl, bh), second = _mm_unpackhi_epi8(bl, bh);
  if constexpr (kBf16) {
    w[0] = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(first), 16));
    w[1] = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(second), 16));
  } else {
    w[0] = _mm256_cvtph_ps(first);
    w[1] = _mm256_cvtph_ps(second);
  }
}

// The 32 indices of plane j of the block at q (32 consecutive k, in order) as two sets of 16 bytes. A
// 128-block's word w holds k = w + 32 j in nibble j: a shift and a mask per 16 words, then one pack
// (which interleaves the 128-bit lanes) and one qword permute to undo it. A smaller block's byte w
// holds k = w and w + size / 2.
void plane_indices(const uint8_t* q, int64_t size, int j, __m128i* idx) {
  const __m128i mask = _mm_set1_epi8(0x0F);
  if (size == 128) {
    const __m256i nibble = _mm256_set1_epi16(0x0F);
    const __m128i shift = _mm_cvtsi32_si128(4 * j);
    const __m256i* words = reinterpret_cast<const __m256i*>(q);
    const __m256i a = _mm256_and_si256(_mm256_srl_epi16(_mm256_loadu_si256(words), shift), nibble);
    const __m256i b = _mm256_and_si256(_mm256_srl_epi16(_mm256_loadu_si256(words + 1), shift), nibble);
    const __m256i bytes = _mm256_permute4x64_epi64(_mm256_packus_epi16(a, b), 0xD8);
    idx[0] = _mm256_castsi256_si128(bytes);
    idx[1] = _mm256_extracti128_si256(bytes, 1);
  } else if (size == 64) {
    for (int h = 0; h < 2; ++h) {
      const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + 16 * h));
      idx[h] = _mm_and_si128(j ? _mm_srli_epi16(v, 4) : v, mask);
    }
  } else {
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q));
    idx[0] = _mm_and_si128(v, mask);
    idx[1] = _mm_and_si128(_mm_srli_epi16(v, 4), mask);
  }
}

// Calls visit(k, tables, w, group_ends) for each plane of a column in k order: w its 32 table values
// (4 x 8 fp32), tables those of its group (loaded when a plane enters a new group), group_ends whether
// it is its group's last plane.
template <bool kBf16, class Visit>
void for_each_plane(const GemmProblem& p, const Column& col, Visit visit) {
  const int64_t planes_per_group = p.group_size / 32;
  int64_t group = 0, planes_left = planes_per_group;
  GroupTables tables = group_tables<kBf16>(col, col.scales[0]);
  for (int64_t k0 = 0; k0 < p.k;) {
    const int64_t size = block_size(p.k, k0);
    // The next column streams right behind this one: fetch it a column ahead.
    _mm_prefetch(reinterpret_cast<const char*>(col.qbytes + p.k / 2 + k0 / 2), _MM_HINT_T0);
    for (int j = 0; j < size / 32; ++j) {
      __m128i idx[2];
      plane_indices(col.qbytes + k0 / 2, size, j, idx);
      __m256 w[4];
      lookup16<kBf16>(idx[0], tables, w);
      lookup16<kBf16>(idx[1], tables, w + 2);
      const bool group_ends = --planes_left == 0;
      visit(k0 + 32 * j, tables, w, group_ends);
      if (group_ends && k0 + 32 * (j + 1) < p.k) {
        planes_left = planes_per_group;
        tables = group_tables<kBf16>(col, col.scales[++group]);
      }
    }
    k0 += size;
  }
}

float hsum(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
}

// kM rows against column n. Per row, kSlots partial sums of the group (enough chains to hide the
// FMA latency at M = 1) and one running total that takes each group's factor when the group ends.
template <int kM>
void gemv_column(const GemmProblem& p, int64_t n) {
  constexpr int kSlots = kM <= 2 ? 4 : 2;
  const float* x = static_cast<const float*>(p.x);
  const Column col = open_column(p, n);
  __m256 total[kM], part[kM][kSlots];
  for (int m = 0; m < kM; ++m) {
    total[m] = _mm256_setzero_ps();
    for (int s = 0; s < kSlots; ++s) part[m][s] = _mm256_setzero_ps();
  }
  for_each_plane<false>(p, col, [&](int64_t k, const GroupTables& tables, const __m256* w, bool group_ends) {
    for (int m = 0; m < kM; ++m)
      for (int i = 0; i < 4; ++i)
        part[m][i % kSlots] =
            _mm256_fmadd_ps(w[i], _mm256_loadu_ps(x + m * p.x_stride + k + 8 * i), part[m][i % kSlots]);
    if (!group_ends) return;
    const __m256 factor = _mm256_set1_ps(tables.magnitude);
    for (int m = 0; m < kM; ++m) {
      __m256 sum = part[m][0];
      for (int s = 1; s < kSlots; ++s) sum = _mm256_add_ps(sum, part[m][s]);
      total[m] = _mm256_fmadd_ps(sum, factor, total[m]);
      for (int s = 0; s < kSlots; ++s) part[m][s] = _mm256_setzero_ps();
    }
  });
  for (int m = 0; m < kM; ++m) store_output(p, m, n, hsum(total[m]));
}

void gemv_columns(const GemmProblem& p, int64_t n_begin, int64_t n_end) {
  for (int64_t n = n_begin; n < n_end; ++n) {
    switch (p.m) {
      case 1: gemv_column<1>(p, n); break;
      case 2: gemv_column<2>(p, n); break;
      case 3: gemv_column<3>(p, n); break;
      default: gemv_column<4>(p, n); break;
    }
  }
}

template <bool kBf16>
void dequant_typed(const GemmProblem& p, int64_t n_begin, int64_t n_end, void* out) {
  for (int64_t n = n_begin; n < n_end; ++n) {
    const Column col = open_column(p, n);
    const int64_t row = (n - n_begin) * p.k;
    for_each_plane<kBf16>(p, col, [&](int64_t k, const GroupTables& tables, const __m256* w, bool) {
      for (int i = 0; i < 4; ++i) {
        if constexpr (kBf16) {
          const __m256i bits = _mm256_srli_epi32(_mm256_castps_si256(w[i]), 16);
          _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(out) + row + k + 8 * i),
                           _mm_packus_epi32(_mm256_castsi256_si128(bits), _mm256_extracti128_si256(bits, 1)));
        } else {
          // fp16 x fp16 is exact in fp32: the product is the reference's fp32 weight.
          _mm256_storeu_ps(static_cast<float*>(out) + row + k + 8 * i,
                           _mm256_mul_ps(w[i], _mm256_set1_ps(tables.magnitude)));
        }
      }
    });
  }
}

}  // namespace

void gemv_avx2(const GemmProblem& p, int64_t n_begin, int64_t n_end) { gemv_columns(p, n_begin, n_end); }

void dequant_avx2(const GemmProblem& p, int64_t n_begin, int64_t n_end, void* out) {
  if (p.y_dtype == ActDtype::kBFloat16) return dequant_typed<true>(p, n_begin, n_end, out);
  dequant_typed<false>(p, n_begin, n_end, out);
}

}  // namespace aaac

#pragma GCC pop_options
