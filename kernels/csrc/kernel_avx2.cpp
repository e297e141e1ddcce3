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
// bf16 activations decode in 16-bit integers instead (gemv_int16_avx2): each codebook is 16 int16 entries
// times a power of two (two vpshufb and two unpacks per 32 indices give the entries as words) and x is
// int16 times a power of two per chunk of 64 k (decode_int16_avx2), so vpmaddwd does 16 products and 8
// sums per instruction and a chunk's sums stay exact in int32. The shuffle ports bound these kernels: the
// fp32 lookup spends 11 shuffles per 32 weights, this one 4 (and 2 vpmaddwd), and on a Zen 3 it decoded
// at 1.2-1.5x the rate (docs/kernels.md). The price is two roundings, each at most 2^-14 of the largest
// |x| of the chunk or of the largest |entry| of the codebook: 64 times finer than the rounding of x to bf16.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

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

// The lanes of a 16-byte table, in both 128-bit lanes of a register (vpshufb reads each lane's own).
__m256i both_lanes(const uint8_t* bytes) {
  return _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes)));
}

// A codebook's fp32 bytes 1, 2 and 3, each table in both lanes: the entries themselves (unit 1).
struct Tables {
  __m256i byte1, byte2, byte3;
  float unit;

  explicit Tables(const uint16_t* entries) : unit(1.0f) {
    uint8_t bytes[3][16];
    for (int e = 0; e < 16; ++e) {
      const uint32_t bits = float_to_bits(half_to_float(entries[e]));
      for (int b = 0; b < 3; ++b) bytes[b][e] = static_cast<uint8_t>(bits >> (8 * (b + 1)));
    }
    byte1 = both_lanes(bytes[0]), byte2 = both_lanes(bytes[1]), byte3 = both_lanes(bytes[2]);
  }
  Tables() = default;
};

// A codebook as 16 int16 entries (low and high bytes, each table in both lanes) times unit.
struct Tables16 {
  __m256i low, high;
  float unit;

  explicit Tables16(const uint16_t* entries) {
    int16_t words[16];
    unit = int16_codebook(entries, words);
    uint8_t bytes[2][16];
    for (int e = 0; e < 16; ++e) {
      const auto word = static_cast<uint16_t>(words[e]);
      bytes[0][e] = static_cast<uint8_t>(word), bytes[1][e] = static_cast<uint8_t>(word >> 8);
    }
    low = both_lanes(bytes[0]), high = both_lanes(bytes[1]);
  }
  Tables16() = default;
};

// The tables of the codebook pair of each column, for columns visited in increasing order: made once per
// part of a merged layer (each column's own took 13% of the M = 1 kernel's time at K = 4096).
template <class T>
class PartTables {
 public:
  explicit PartTables(const GemmProblem& p) : groups(p.k / p.group_size), p_(p) {}

  const int64_t groups;  // per column; divided once per call, not once per column (a 64-bit division is
                         // tens of cycles, a column of K = 4096 a few hundred: an estimate, not timed alone)

  const T* of(int64_t n) {
    if (n < end_) return pair_;
    while (n >= p_.part_ends[part_]) ++part_;
    end_ = p_.part_ends[part_];
    const uint16_t* pair = codebook_pair(p_, n);
    pair_[0] = T(pair), pair_[1] = T(pair + 16);
    return pair_;
  }

 private:
  const GemmProblem& p_;
  int64_t part_ = 0, end_ = 0;
  T pair_[2];
};

template <class T>
struct Column {
  const T* tables;  // C0's and C1's
  const uint8_t* qbytes;
  const uint16_t* scales;
  int64_t groups;
};

template <class T>
Column<T> open_column(const GemmProblem& p, int64_t n, PartTables<T>& parts) {
  return {parts.of(n), p.qbytes + n * (p.k / 2), p.scales + n * parts.groups, parts.groups};
}

// Calls visit(k0, size, idx) for each block of a column's qbytes in k order: size an integral_constant
// (128, 64 or 32), idx the 32 indices of each of its size / 32 planes, one per byte, in the register order
// of Runs. A 128-block's four planes come from two packs: word w holds k = w + 32 j in nibble j, so planes
// 0 and 1 are in the words' low bytes, 2 and 3 in their high bytes. Each block fetches the next column's.
template <class Visit>
void for_each_block(const GemmProblem& p, const uint8_t* qbytes, Visit visit) {
  const __m256i nibble = _mm256_set1_epi8(0x0F);
  __m256i idx[4];
  for (int64_t k0 = 0; k0 < p.k;) {
    const int64_t size = block_size(p.k, k0);
    const uint8_t* q = qbytes + k0 / 2;
    _mm_prefetch(reinterpret_cast<const char*>(q + p.k / 2), _MM_HINT_T0);
    if (size == 128) {
      const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q));
      const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + 32));
      const __m256i low = _mm256_set1_epi16(0xFF);
      const __m256i bytes01 = _mm256_packus_epi16(_mm256_and_si256(a, low), _mm256_and_si256(b, low));
      const __m256i bytes23 = _mm256_packus_epi16(_mm256_srli_epi16(a, 8), _mm256_srli_epi16(b, 8));
      idx[0] = _mm256_and_si256(bytes01, nibble), idx[1] = _mm256_and_si256(_mm256_srli_epi16(bytes01, 4), nibble);
      idx[2] = _mm256_and_si256(bytes23, nibble), idx[3] = _mm256_and_si256(_mm256_srli_epi16(bytes23, 4), nibble);
      visit(k0, std::integral_constant<int, 128>(), idx);
    } else if (size == 64) {  // byte w holds k = w and 32 + w
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q));
      idx[0] = _mm256_and_si256(v, nibble), idx[1] = _mm256_and_si256(_mm256_srli_epi16(v, 4), nibble);
      visit(k0, std::integral_constant<int, 64>(), idx);
    } else {  // 32: byte w holds k = w and 16 + w
      const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q));
      idx[0] = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(v, 4), v), nibble);
      visit(k0, std::integral_constant<int, 32>(), idx);
    }
    k0 += size;
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

// 32 indices -> their 32 int16 entries, 2 vectors of 16 words: in a 128-block k = 0-15 and 16-31 of the
// plane, in a smaller block k = 0-7, 16-23 and 8-15, 24-31 (decode_int16_avx2 orders x alike).
void lookup(__m256i idx, const Tables16& t, __m256i* w) {
  const __m256i low = _mm256_shuffle_epi8(t.low, idx), high = _mm256_shuffle_epi8(t.high, idx);
  w[0] = _mm256_unpacklo_epi8(low, high);
  w[1] = _mm256_unpackhi_epi8(low, high);
}

// The group of k in a column: its tables and |scale| times the tables' unit.
template <class T>
struct Group {
  const T* tables;
  float magnitude;
};

template <class T>
Group<T> group_at(const Column<T>& col, int64_t g) {
  const uint16_t scale = col.scales[g];
  const T* tables = &col.tables[scale >> 15];
  return {tables, _cvtsh_ss(scale & 0x7FFF) * tables->unit};
}

// Calls visit(k, size, idx, group, group_ends) for each plane of a column in k order: size is the
// plane's block size, idx its 32 indices (for_each_block), group its group, and group_ends whether the
// plane is its group's last.
template <class T, class Visit>
void for_each_plane(const GemmProblem& p, const Column<T>& col, Visit visit) {
  const int64_t planes_per_group = p.group_size / kPlane;
  int64_t g = 0, planes_left = planes_per_group;
  Group<T> group = group_at(col, 0);
  for_each_block(p, col.qbytes, [&](int64_t k0, auto size, const __m256i* idx) {
    constexpr int kSize = decltype(size)::value;
#pragma GCC unroll 4
    for (int j = 0; j < kSize / kPlane; ++j) {
      const bool group_ends = --planes_left == 0;
      visit(k0 + kPlane * j, kSize, idx[j], group, group_ends);
      if (group_ends && ++g < col.groups) {
        planes_left = planes_per_group;
        group = group_at(col, g);
      }
    }
  });
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
void gemv_column(const GemmProblem& p, int64_t n, PartTables<Tables>& parts) {
  constexpr int kChains = kM == 1 ? 2 : 1;
  const float* x = static_cast<const float*>(p.x);
  const Column<Tables> col = open_column(p, n, parts);
  __m256 total[kM], part[kM][kChains];
  for (int m = 0; m < kM; ++m) {
    total[m] = _mm256_setzero_ps();
    for (int c = 0; c < kChains; ++c) part[m][c] = _mm256_setzero_ps();
  }
  for_each_plane(p, col, [&](int64_t k, int64_t, __m256i idx, const Group<Tables>& group, bool group_ends) {
    __m256 w[4];
    lookup(idx, *group.tables, w);
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

// The int16 kernel's row of x (decode_int16_avx2): K int16 values, then the unit of each chunk of 64 k.
struct Int16Row {
  const int16_t* values;
  const float* units;
};

Int16Row int16_row(const GemmProblem& p, int64_t m) {
  const float* row = static_cast<const float*>(p.x) + m * p.x_stride;
  return {reinterpret_cast<const int16_t*>(row), row + p.k / 2};
}

// The int16 kernel, kM rows against column n: per row, the products of a chunk of 64 k (or of a group,
// when groups are 32) summed in int32 by vpmaddwd, widened once per chunk and scaled by the chunk's unit
// x the group's |scale| x the codebook's unit. Each plane's lookup is shared by the rows.
template <int kM>
void gemv_int16_column(const GemmProblem& p, int64_t n, PartTables<Tables16>& parts, float* magnitudes) {
  const Column<Tables16> col = open_column(p, n, parts);
  // Every group's |scale| x unit, 8 at a time (the sign bits choose the unit), and its tables.
  const __m256 unit0 = _mm256_set1_ps(col.tables[0].unit), unit1 = _mm256_set1_ps(col.tables[1].unit);
  int64_t g = 0;
  for (; g + 8 <= col.groups; g += 8) {
    const __m128i scales = _mm_loadu_si128(reinterpret_cast<const __m128i*>(col.scales + g));
    const __m256 units = _mm256_blendv_ps(unit0, unit1, _mm256_castsi256_ps(_mm256_cvtepi16_epi32(scales)));
    const __m256 magnitude = _mm256_cvtph_ps(_mm_and_si128(scales, _mm_set1_epi16(0x7FFF)));
    _mm256_storeu_ps(magnitudes + g, _mm256_mul_ps(magnitude, units));
  }
  for (; g < col.groups; ++g) magnitudes[g] = group_at(col, g).magnitude;

  Int16Row x[kM];
  __m256 total[kM];
  for (int m = 0; m < kM; ++m) x[m] = int16_row(p, m), total[m] = _mm256_setzero_ps();
  const int64_t planes_per_group = p.group_size / kPlane;
  // Products of the planes of one chunk and one group, in int32 (below 2^31: at most 2 planes).
  __m256i dot[kM];
  for (int m = 0; m < kM; ++m) dot[m] = _mm256_setzero_si256();
  // The group's counters, not divisions: a division per plane took half the kernel's time.
  int64_t group = 0, planes_left = planes_per_group;
  const auto visit = [&](int64_t k, __m256i idx) {
    __m256i w[2];
    lookup(idx, col.tables[col.scales[group] >> 15], w);
    for (int m = 0; m < kM; ++m) {
      const __m256i* xs = reinterpret_cast<const __m256i*>(x[m].values + k);
      dot[m] = _mm256_add_epi32(dot[m], _mm256_add_epi32(_mm256_madd_epi16(w[0], _mm256_load_si256(xs)),
                                                         _mm256_madd_epi16(w[1], _mm256_load_si256(xs + 1))));
    }
    const bool group_ends = --planes_left == 0;
    if (!group_ends && (k + kPlane) % kInt16Chunk != 0 && k + kPlane != p.k) return;
    // Broadcasts from memory: loads, where a broadcast from a register would take a shuffle port.
    const __m256 magnitude = _mm256_broadcast_ss(magnitudes + group);
    for (int m = 0; m < kM; ++m) {
      const __m256 scale = _mm256_mul_ps(magnitude, _mm256_broadcast_ss(x[m].units + k / kInt16Chunk));
      total[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot[m]), scale, total[m]);
      dot[m] = _mm256_setzero_si256();
    }
    if (group_ends) ++group, planes_left = planes_per_group;
  };
  for_each_block(p, col.qbytes, [&](int64_t k0, auto size, const __m256i* idx) {
#pragma GCC unroll 4
    for (int j = 0; j < decltype(size)::value / kPlane; ++j) visit(k0 + kPlane * j, idx[j]);
  });
  for (int m = 0; m < kM; ++m) store_output(p, m, n, hsum(total[m]));
}

template <int kM>
void gemv_rows(const GemmProblem& p, int64_t n_begin, int64_t n_end) {
  PartTables<Tables> parts(p);
  for (int64_t n = n_begin; n < n_end; ++n) gemv_column<kM>(p, n, parts);
}

template <int kM>
void gemv_int16_rows(const GemmProblem& p, int64_t n_begin, int64_t n_end) {
  PartTables<Tables16> parts(p);
  std::vector<float> magnitudes(parts.groups);
  for (int64_t n = n_begin; n < n_end; ++n) gemv_int16_column<kM>(p, n, parts, magnitudes.data());
}

// fp32 -> bf16 bits in the low half of each lane, round to nearest even (no NaN reaches here).
__m256i bf16_bits(__m256 v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  return _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
}

template <bool kBf16>
void dequant_typed(const GemmProblem& p, int64_t n_begin, int64_t n_end, void* out) {
  PartTables<Tables> parts(p);
  for (int64_t n = n_begin; n < n_end; ++n) {
    const Column<Tables> col = open_column(p, n, parts);
    const int64_t row = (n - n_begin) * p.k;
    for_each_plane(p, col, [&](int64_t k, int64_t size, __m256i idx, const Group<Tables>& group, bool) {
      __m256 w[4];
      lookup(idx, *group.tables, w);
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

void decode_int16_avx2(const GemmProblem& p, const void* x, int64_t x_stride, ActDtype dtype, float* out) {
  const auto load8 = [&](int64_t at) {  // 8 values of x as fp32
    if (dtype == ActDtype::kFloat32) return _mm256_loadu_ps(static_cast<const float*>(x) + at);
    const __m128i bf16 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(x) + at));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(bf16), 16));
  };
  const __m256i magnitude_bits = _mm256_set1_epi32(0x7FFFFFFF);
  const __m256i limit = _mm256_set1_epi32(kInt16Limit), minus_limit = _mm256_set1_epi32(-kInt16Limit);
  for (int64_t m = 0; m < p.m; ++m) {
    int16_t* values = reinterpret_cast<int16_t*>(out + m * p.k);
    float* units = out + m * p.k + p.k / 2;
    for (int64_t k0 = 0; k0 < p.k; k0 += kInt16Chunk) {
      const int64_t size = std::min(kInt16Chunk, p.k - k0), vectors = size / 8;
      __m256 v[kInt16Chunk / 8];
      __m256i largest = _mm256_setzero_si256();  // of the |x| bits, which order as the values (NaN last)
      for (int i = 0; i < vectors; ++i) {
        v[i] = load8(m * x_stride + k0 + 8 * i);
        largest = _mm256_max_epu32(largest, _mm256_and_si256(_mm256_castps_si256(v[i]), magnitude_bits));
      }
      largest = _mm256_max_epu32(largest, _mm256_permute2x128_si256(largest, largest, 1));
      largest = _mm256_max_epu32(largest, _mm256_shuffle_epi32(largest, 0x4E));
      largest = _mm256_max_epu32(largest, _mm256_shuffle_epi32(largest, 0xB1));
      const Int16Unit unit = int16_unit(static_cast<int>(static_cast<uint32_t>(_mm256_cvtsi256_si32(largest)) >> 23));
      units[k0 / kInt16Chunk] = unit.unit;
      if (std::isnan(unit.unit)) {
        std::fill(values + k0, values + k0 + size, 0);
        continue;
      }
      const __m256 scale = _mm256_set1_ps(unit.inverse);
      __m256i words[kInt16Chunk / 8];
      for (int i = 0; i < vectors; ++i) {  // round to nearest even (the MXCSR default), then clamp
        const __m256i rounded = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], scale));
        words[i] = _mm256_max_epi32(minus_limit, _mm256_min_epi32(limit, rounded));
      }
      // Per plane (4 vectors of 8 k): a 128-block's lookup gives k in order, a smaller block's k = 0-7,
      // 16-23, 8-15, 24-31. The pack interleaves 128-bit lanes; the permute undoes it.
      const bool in_order = block_size(p.k, k0) == 128;
      for (int i = 0; i < vectors; i += 4) {
        const __m256i first = _mm256_packs_epi32(words[i], words[in_order ? i + 1 : i + 2]);
        const __m256i second = _mm256_packs_epi32(words[in_order ? i + 2 : i + 1], words[i + 3]);
        __m256i* to = reinterpret_cast<__m256i*>(values + k0 + 8 * i);
        _mm256_store_si256(to, _mm256_permute4x64_epi64(first, 0xD8));
        _mm256_store_si256(to + 1, _mm256_permute4x64_epi64(second, 0xD8));
      }
    }
  }
}

void gemv_int16_avx2(const GemmProblem& p, int64_t n_begin, int64_t n_end) {
  switch (p.m) {
    case 1: return gemv_int16_rows<1>(p, n_begin, n_end);
    case 2: return gemv_int16_rows<2>(p, n_begin, n_end);
    case 3: return gemv_int16_rows<3>(p, n_begin, n_end);
    default: return gemv_int16_rows<4>(p, n_begin, n_end);
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
