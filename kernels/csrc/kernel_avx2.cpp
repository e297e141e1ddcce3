// AVX2 + FMA + F16C path. A codebook entry widened to fp32 has its low 13 bits zero (fp16 carries 10
// mantissa bits), so its fp32 bits are three bytes: the table is three 16-byte tables (bytes 1, 2 and 3
// of each entry's fp32 bits) in both 128-bit lanes, and three vpshufb and four unpacks per 32 indices
// give 32 exact fp32 entries, with no conversion instruction (the previous design, two vpshufb on the
// fp16 entries' bytes and vcvtph2ps, ran at about two thirds of the rate on a Zen 3, docs/kernels.md).
//   A plane of 32 indices comes out of one register in a fixed order: the four vectors of 8 entries hold
//   two runs of 4 consecutive k each (Runs). The decode kernels read x in that order
//   (decode_order_avx2, once per call); the dequantizer stores each run where it belongs.
//   The decode kernel multiplies a group's partial sums by its |scale| once; the dequantizer multiplies
//   each entry (fp16 x fp16 is exact in fp32: the reference's fp32 weight), rounded to bf16 on request.
#include <immintrin.h>

#include <type_traits>

#include "scalar_convert.h"

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")

namespace aaac {
namespace {

constexpr int kPlane = 32;

// Where the runs of vector v of a plane start, in k from the plane's start: its entries 0-3 are
// k = first[v] + 0..3 and its entries 4-7 k = second[v] + 0..3. In a 128-block the pack of two
// registers of 16 words interleaves their 128-bit lanes; a smaller block's bytes are in k order.
struct Runs {
  int first[4], second[4];
};
constexpr Runs kRuns128 = {{0, 4, 16, 20}, {8, 12, 24, 28}};
constexpr Runs kRunsSmall = {{0, 4, 8, 12}, {16, 20, 24, 28}};

constexpr const Runs& runs_of(int64_t block) { return block == 128 ? kRuns128 : kRunsSmall; }

// A codebook's fp32 bytes 1, 2 and 3, each table in both lanes.
struct Tables {
  __m256i byte1, byte2, byte3;
};

// The tables of the codebook pair of each column, for columns visited in increasing order: made once per
// part of a merged layer (each column's own took 13% of the M = 1 kernel's time at K = 4096).
class PartTables {
 public:
  explicit PartTables(const GemmProblem& p) : p_(p) {}

  const Tables* of(int64_t n) {
    if (n < end_) return pair_;
    while (n >= p_.part_ends[part_]) ++part_;
    end_ = p_.part_ends[part_];
    const uint16_t* pair = codebook_pair(p_, n);
    for (int c = 0; c < 2; ++c) {
      alignas(16) uint8_t bytes[3][16];
      for (int e = 0; e < 16; ++e) {
        const uint32_t bits = float_to_bits(half_to_float(pair[16 * c + e]));
        for (int b = 0; b < 3; ++b) bytes[b][e] = static_cast<uint8_t>(bits >> (8 * (b + 1)));
      }
      const auto lanes = [&](int b) {
        return _mm256_broadcastsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i*>(bytes[b])));
      };
      pair_[c] = {lanes(0), lanes(1), lanes(2)};
    }
    return pair_;
  }

 private:
  const GemmProblem& p_;
  int64_t part_ = 0, end_ = 0;
  Tables pair_[2];
};

struct Column {
  const Tables* tables;  // C0's and C1's
  const uint8_t* qbytes;
  const uint16_t* scales;
};

Column open_column(const GemmProblem& p, int64_t n, PartTables& parts) {
  return {parts.of(n), p.qbytes + n * (p.k / 2), p.scales + n * (p.k / p.group_size)};
}

// The 32 indices of plane j of a block of kSize at q, one per byte, in the register order of Runs.
template <int kSize>
__m256i plane_indices(const uint8_t* q, int j) {
  if constexpr (kSize == 128) {  // word w holds k = w + 32 j in nibble j
    const __m256i nibble = _mm256_set1_epi16(0x0F);
    const __m128i shift = _mm_cvtsi32_si128(4 * j);
    const __m256i* words = reinterpret_cast<const __m256i*>(q);
    const __m256i a = _mm256_and_si256(_mm256_srl_epi16(_mm256_loadu_si256(words), shift), nibble);
    const __m256i b = _mm256_and_si256(_mm256_srl_epi16(_mm256_loadu_si256(words + 1), shift), nibble);
    return _mm256_packus_epi16(a, b);
  } else if constexpr (kSize == 64) {  // byte w holds k = w and 32 + w
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q));
    return _mm256_and_si256(j ? _mm256_srli_epi16(v, 4) : v, _mm256_set1_epi8(0x0F));
  } else {  // 32: byte w holds k = w and 16 + w
    const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q));
    return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(v, 4), v), _mm256_set1_epi8(0x0F));
  }
}

// 32 indices -> their 32 fp32 entries, 4 vectors in the order of Runs.
void lookup(__m256i idx, const Tables& t, __m256* w) {
  const __m256i b1 = _mm256_shuffle_epi8(t.byte1, idx);
  const __m256i b2 = _mm256_shuffle_epi8(t.byte2, idx);
  const __m256i b3 = _mm256_shuffle_epi8(t.byte3, idx);
  const __m256i low0 = _mm256_unpacklo_epi8(_mm256_setzero_si256(), b1);
  const __m256i low1 = _mm256_unpackhi_epi8(_mm256_setzero_si256(), b1);
  const __m256i high0 = _mm256_unpacklo_epi8(b2, b3), high1 = _mm256_unpackhi_epi8(b2, b3);
  w[0] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(low0, high0));
  w[1] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(low0, high0));
  w[2] = _mm256_castsi256_ps(_mm256_unpacklo_epi16(low1, high1));
  w[3] = _mm256_castsi256_ps(_mm256_unpackhi_epi16(low1, high1));
}

// The group of k in a column: its tables and |scale|.
struct Group {
  const Tables* tables;
  float magnitude;
};

Group group_at(const Column& col, int64_t g) {
  const uint16_t scale = col.scales[g];
  return {&col.tables[scale >> 15], _cvtsh_ss(scale & 0x7FFF)};
}

// Calls visit(k, size, w, group, group_ends) for each plane of a column in k order: size is the plane's
// block size, w its 32 entries (unscaled), group its group, and group_ends whether the plane is its
// group's last.
template <class Visit>
void for_each_plane(const GemmProblem& p, const Column& col, Visit visit) {
  const int64_t planes_per_group = p.group_size / kPlane, groups = p.k / p.group_size;
  int64_t g = 0, planes_left = planes_per_group;
  Group group = group_at(col, 0);
  const auto planes = [&](int64_t k0, auto size) {
    constexpr int kSize = decltype(size)::value;
    // The next column streams right behind this one: fetch it a column ahead.
    _mm_prefetch(reinterpret_cast<const char*>(col.qbytes + p.k / 2 + k0 / 2), _MM_HINT_T0);
#pragma GCC unroll 4
    for (int j = 0; j < kSize / kPlane; ++j) {
      __m256 w[4];
      lookup(plane_indices<kSize>(col.qbytes + k0 / 2, j), *group.tables, w);
      const bool group_ends = --planes_left == 0;
      visit(k0 + kPlane * j, kSize, w, group, group_ends);
      if (group_ends && ++g < groups) {
        planes_left = planes_per_group;
        group = group_at(col, g);
      }
    }
  };
  for (int64_t k0 = 0; k0 < p.k;) {
    const int64_t size = block_size(p.k, k0);
    if (size == 128) {
      planes(k0, std::integral_constant<int, 128>());
    } else if (size == 64) {
      planes(k0, std::integral_constant<int, 64>());
    } else {
      planes(k0, std::integral_constant<int, 32>());
    }
    k0 += size;
  }
}

float hsum(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(t, _mm_movehdup_ps(t)));
}

// kM rows of x (in decode order) against column n. Per row, a group's partial sums in kChains chains
// and a running total that takes each group's |scale| when the group ends. Measured on Zen 3 (weights
// in cache): one column at a time with two chains at M = 1 and one per row above it was as fast as or
// faster than two columns at a time (whose 6 tables and 4 registers of words spill) or more chains.
template <int kM>
void gemv_column(const GemmProblem& p, int64_t n, PartTables& parts) {
  constexpr int kChains = kM == 1 ? 2 : 1;
  const float* x = static_cast<const float*>(p.x);
  const Column col = open_column(p, n, parts);
  __m256 total[kM], part[kM][kChains];
  for (int m = 0; m < kM; ++m) {
    total[m] = _mm256_setzero_ps();
    for (int c = 0; c < kChains; ++c) part[m][c] = _mm256_setzero_ps();
  }
  for_each_plane(p, col, [&](int64_t k, int64_t, const __m256* w, const Group& group, bool group_ends) {
    for (int m = 0; m < kM; ++m)
      for (int v = 0; v < 4; ++v)
        part[m][v % kChains] = _mm256_fmadd_ps(w[v], _mm256_load_ps(x + m * p.x_stride + k + 8 * v), part[m][v % kChains]);
    if (!group_ends) return;
    const __m256 magnitude = _mm256_set1_ps(group.magnitude);
    for (int m = 0; m < kM; ++m) {
      __m256 sum = part[m][0];
      for (int c = 1; c < kChains; ++c) sum = _mm256_add_ps(sum, part[m][c]);
      total[m] = _mm256_fmadd_ps(sum, magnitude, total[m]);
      for (int c = 0; c < kChains; ++c) part[m][c] = _mm256_setzero_ps();
    }
  });
  for (int m = 0; m < kM; ++m) store_output(p, m, n, hsum(total[m]));
}

template <int kM>
void gemv_rows(const GemmProblem& p, int64_t n_begin, int64_t n_end) {
  PartTables parts(p);
  for (int64_t n = n_begin; n < n_end; ++n) gemv_column<kM>(p, n, parts);
}

// fp32 -> bf16 bits in the low half of each lane, round to nearest even (no NaN reaches here).
__m256i bf16_bits(__m256 v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  return _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
}

template <bool kBf16>
void dequant_typed(const GemmProblem& p, int64_t n_begin, int64_t n_end, void* out) {
  PartTables parts(p);
  for (int64_t n = n_begin; n < n_end; ++n) {
    const Column col = open_column(p, n, parts);
    const int64_t row = (n - n_begin) * p.k;
    for_each_plane(p, col, [&](int64_t k, int64_t size, const __m256* w, const Group& group, bool) {
      const Runs& runs = runs_of(size);
      const __m256 magnitude = _mm256_set1_ps(group.magnitude);
      for (int v = 0; v < 4; ++v) {
        const __m256 weight = _mm256_mul_ps(w[v], magnitude);
        const int64_t first = row + k + runs.first[v], second = row + k + runs.second[v];
        if constexpr (kBf16) {
          const __m256i bits = bf16_bits(weight);
          const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(bits), _mm256_extracti128_si256(bits, 1));
          uint16_t* dst = static_cast<uint16_t*>(out);
          _mm_storel_epi64(reinterpret_cast<__m128i*>(dst + first), packed);
          _mm_storel_epi64(reinterpret_cast<__m128i*>(dst + second), _mm_unpackhi_epi64(packed, packed));
        } else {
          float* dst = static_cast<float*>(out);
          _mm_storeu_ps(dst + first, _mm256_castps256_ps128(weight));
          _mm_storeu_ps(dst + second, _mm256_extractf128_ps(weight, 1));
        }
      }
    });
  }
}

}  // namespace

void decode_order_avx2(const GemmProblem& p, const void* x, int64_t x_stride, ActDtype dtype, float* out) {
  for (int64_t m = 0; m < p.m; ++m) {
    float* row = out + m * p.k;
    for (int64_t k0 = 0; k0 < p.k;) {
      const int64_t size = block_size(p.k, k0);
      const Runs& runs = runs_of(size);
      for (int64_t k = k0; k < k0 + size; k += kPlane) {
        for (int v = 0; v < 4; ++v) {
          for (int e = 0; e < 8; ++e) {
            const int64_t from = m * x_stride + k + (e < 4 ? runs.first[v] + e : runs.second[v] + e - 4);
            row[k + 8 * v + e] = dtype == ActDtype::kFloat32
                                     ? static_cast<const float*>(x)[from]
                                     : bits_to_float(static_cast<uint32_t>(static_cast<const uint16_t*>(x)[from]) << 16);
          }
        }
      }
      k0 += size;
    }
  }
}

void gemv_avx2(const GemmProblem& p, int64_t n_begin, int64_t n_end) {
  switch (p.m) {
    case 1: return gemv_rows<1>(p, n_begin, n_end);
    case 2: return gemv_rows<2>(p, n_begin, n_end);
    case 3: return gemv_rows<3>(p, n_begin, n_end);
    default: return gemv_rows<4>(p, n_begin, n_end);
  }
}

void dequant_avx2(const GemmProblem& p, int64_t n_begin, int64_t n_end, void* out) {
  if (p.y_dtype == ActDtype::kBFloat16) return dequant_typed<true>(p, n_begin, n_end, out);
  dequant_typed<false>(p, n_begin, n_end, out);
}

}  // namespace aaac

#pragma GCC pop_options
