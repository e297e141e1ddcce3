// The AVX-512 decode kernels for bf16 activations (M = 1 to 16 on avx512, 1 to 4 on avx512_bf16; ops.cpp):
// int16 products, as the AVX2 path's (kernel_avx2.cpp), with a 16-bit lookup. x is rounded once per call
// to int16 times a power of two per chunk of 64 k (decode_int16_avx512, in k order), each codebook to
// int16 words times a power of two (its largest |entry| below 2^14), and a `Dot` multiplies 32 weights by
// 32 values of x into 16 int32 sums: vpdpwssd with AVX512-VNNI, vpmaddwd and vpaddd without. A chunk's
// sums stay exact in int32 (2 planes: 4 products of at most (2^14 - 1)^2 per lane). A plane of 32 k is
// one vpermw: 32 weights in k order, so x needs no reordering. Two kernels:
// - Rows 2 to 4 (gemv_int16_block): a layer part's codebook pair is one register of 32 int16 words, C0's
//   in words 0-15 and C1's in 16-31, and vpermw reads index bits 4..0, so bit 4 is the codebook choice:
//   a 128-block's plane j is a shift, one vpternlogd ((words >> 4 j) & 0xF | the group's choice bit) and
//   one vpermw, shared by the rows; each chunk's sum is widened once and multiplied by the chunk's unit
//   and by the group's |scale| x its codebook's unit.
// - One row (gemv_one_row_block): a shift, one vpermw whose table is read from memory and one product
//   per 32 weights, about half the instructions per weight of the fp32 kernel (avx512_gemv.h), for one
//   row decodes at the rate the core issues instructions (docs/kernels.md). Rows 2 to 4 in this form
//   ran level or slower than in the other (docs/kernels.md), so each count keeps its kernel.
//
// Include after the file's `#pragma GCC target`, like avx512_gemv.h: everything here has internal
// linkage, so each file compiles its own copy for its own instruction set.
#pragma once

#include <immintrin.h>

#include <type_traits>
#include <vector>  // of Int16Table only: a type of this file's own, so each file's copy is its own

#include "scalar_convert.h"

namespace aaac {
namespace {

constexpr int kInt16Plane = 32;  // k per plane (one vpermw)

// A codebook pair as int16 words: C0's 16 entries times unit[0] in words 0-15, C1's times unit[1] in
// words 16-31, so that index bit 4 (vpermw reads bits 4..0) is the codebook choice.
struct Int16Table {
  __m512i words;
  float unit[2];
};

Int16Table int16_table(const uint16_t* pair) {
  Int16Table table;
  alignas(64) int16_t words[32];
  for (int c = 0; c < 2; ++c) table.unit[c] = int16_codebook(pair + 16 * c, words + 16 * c);
  table.words = _mm512_load_si512(words);
  return table;
}

// The int16 kernel's row of x (decode_int16_avx512): K int16 values, then the unit of each chunk of 64 k.
struct Int16Row {
  const int16_t* values;
  const float* units;
};

// A block's index words, 32 per register: plane j's indices are the words shifted right by 4 j and
// masked to their low nibble. In a 128-block word w holds k = w + 32 j in nibble j; in a block of 64 byte
// w holds k = w and 32 + w (planes 0 and 1 from its zero-extended bytes), in a block of 32 k = w and
// 16 + w (one plane: the low nibbles' words, then the high ones').
template <int kSize>
__m512i block_words(const uint8_t* q) {
  if constexpr (kSize == 128) {
    return _mm512_loadu_si512(q);
  } else if constexpr (kSize == 64) {
    return _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q)));
  } else {
    const __m256i b = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q)));
    return _mm512_inserti64x4(_mm512_castsi256_si512(b), _mm256_srli_epi16(b, 4), 1);
  }
}

// How far ahead of its reads (in bytes along the weights) the one-row decode kernel asks for them, into
// L2 (_MM_HINT_T1): the same k of a later block of columns (`span` bytes a block, the columns lying one
// after another), the nearest such block at least kStreamAhead on. On a Zen 4 fetching 16 KiB ahead ran
// one token 1.17-1.56x faster than fetching the next block of columns (8B shapes, one thread; 32 KiB was
// no better), and keeping to the same k, which for columns over 4 KiB is not 16 KiB on (8B down: 7 KiB
// columns, 28 KiB on), ran 8B down 1.12-1.16x faster (docs/benchmarks.md, "The one-row kernel's fetch").
constexpr int64_t kStreamAhead = 16 * 1024;

constexpr int64_t stream_ahead(int64_t span) { return (kStreamAhead + span - 1) / span * span; }

// The index words of kN columns' blocks at k0, each fetching the weights `ahead` bytes on with kHint.
template <int kSize, int kN, int kHint>
void column_words(const uint8_t* const* qbytes, int64_t ahead, int64_t k0, __m512i* words) {
  for (int c = 0; c < kN; ++c) {
    _mm_prefetch(reinterpret_cast<const char*>(qbytes[c] + ahead + k0 / 2), static_cast<_mm_hint>(kHint));
    words[c] = block_words<kSize>(qbytes[c] + k0 / 2);
  }
}

// block(k0, size) for each block of the layout in k order, size an integral_constant (128, 64 or 32).
template <class Block>
void for_each_block(const GemmProblem& p, Block block) {
  for (int64_t k0 = 0; k0 < p.k;) {
    const int64_t size = block_size(p.k, k0);
    if (size == 128) block(k0, std::integral_constant<int, 128>());
    else if (size == 64) block(k0, std::integral_constant<int, 64>());
    else block(k0, std::integral_constant<int, 32>());
    k0 += size;
  }
}

// The table of every part's codebook pair, made once per call.
std::vector<Int16Table> int16_tables(const GemmProblem& p) {
  std::vector<Int16Table> tables;
  for (int64_t part = 0; tables.empty() || p.part_ends[part - 1] < p.n; ++part)
    tables.push_back(int16_table(p.codebooks + 32 * part));
  return tables;
}

// What the kernel reads per group of a block of kN columns, interleaved ([groups][kN]) so that one
// pointer serves every column: |scale| x the chosen codebook's unit, and the choice as index bit 4 of
// both words of a 32-bit lane (0x00100010 for C1, 0 for C0). Plain new[] rather than std::vector<float>,
// whose functions, compiled here for AVX-512, could be the copy the linker keeps for every file
// (cpu_kernels.h).
struct GroupParams {
  float* magnitude;
  uint32_t* choice;
  explicit GroupParams(int64_t size) : magnitude(new float[size]), choice(new uint32_t[size]) {}
  ~GroupParams() {
    delete[] magnitude;
    delete[] choice;
  }
  GroupParams(const GroupParams&) = delete;
  GroupParams& operator=(const GroupParams&) = delete;
};

// kN vectors (one per column, 16 groups each) stored interleaved: out[16 kN] = v[0][0], v[1][0], ...,
// v[kN - 1][15]. Two-source permutes: pairs of columns as 32-bit pairs, then pairs of pairs as 64-bit.
template <int kN>
void store_interleaved(const __m512* v, float* out) {
  if constexpr (kN == 1) {
    _mm512_storeu_ps(out, v[0]);
  } else {
    const __m512i low = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    const __m512i high = _mm512_add_epi32(low, _mm512_set1_epi32(8));
    __m512 pairs[kN];
    for (int c = 0; c < kN; c += 2) {
      pairs[c] = _mm512_permutex2var_ps(v[c], low, v[c + 1]);
      pairs[c + 1] = _mm512_permutex2var_ps(v[c], high, v[c + 1]);
    }
    if constexpr (kN == 2) {
      _mm512_storeu_ps(out, pairs[0]);
      _mm512_storeu_ps(out + 16, pairs[1]);
    } else {
      static_assert(kN == 4, "blocks of 1, 2 or 4 columns");
      const __m512i first = _mm512_setr_epi64(0, 8, 1, 9, 2, 10, 3, 11);
      const __m512i second = _mm512_setr_epi64(4, 12, 5, 13, 6, 14, 7, 15);
      for (int h = 0; h < 2; ++h) {
        const __m512d ab = _mm512_castps_pd(pairs[h]), cd = _mm512_castps_pd(pairs[2 + h]);
        _mm512_storeu_pd(reinterpret_cast<double*>(out + 32 * h), _mm512_permutex2var_pd(ab, first, cd));
        _mm512_storeu_pd(reinterpret_cast<double*>(out + 32 * h + 16), _mm512_permutex2var_pd(ab, second, cd));
      }
    }
  }
}

// The tables of kN columns from n into table, and their groups' parameters into params, 16 groups at a time.
template <int kN>
void int16_columns(const GemmProblem& p, const std::vector<Int16Table>& tables, int64_t n, __m512i* table,
                   const GroupParams& params) {
  const int64_t groups = p.k / p.group_size;
  __m512 unit0[kN], unit1[kN];
  for (int c = 0; c < kN; ++c) {
    const Int16Table& t = tables[(codebook_pair(p, n + c) - p.codebooks) / 32];
    table[c] = t.words, unit0[c] = _mm512_set1_ps(t.unit[0]), unit1[c] = _mm512_set1_ps(t.unit[1]);
  }
  for (int64_t g = 0; g < groups; g += 16) {
    const __mmask16 valid = static_cast<__mmask16>(groups - g >= 16 ? 0xFFFF : (1u << (groups - g)) - 1);
    __m512 magnitude[kN], choice[kN];
    for (int c = 0; c < kN; ++c) {
      const __m256i raw = _mm256_maskz_loadu_epi16(valid, p.scales + (n + c) * groups + g);
      const __mmask16 c1 = _mm256_movepi16_mask(raw);
      magnitude[c] = _mm512_mul_ps(_mm512_cvtph_ps(_mm256_and_si256(raw, _mm256_set1_epi16(0x7FFF))),
                                   _mm512_mask_blend_ps(c1, unit0[c], unit1[c]));
      choice[c] = _mm512_castsi512_ps(_mm512_maskz_mov_epi32(c1, _mm512_set1_epi32(0x00100010)));
    }
    store_interleaved<kN>(magnitude, params.magnitude + g * kN);
    store_interleaved<kN>(choice, reinterpret_cast<float*>(params.choice + g * kN));
  }
}

// kM rows of x against kN columns from n. Per (row, column), the int32 sums of the current chunk and an
// fp32 total that takes them, scaled, at each chunk's end (every second plane) and each group's.
template <class Dot, int kM, int kN>
void gemv_int16_block(const GemmProblem& p, int64_t n, const std::vector<Int16Table>& tables,
                      const GroupParams& params) {
  const int64_t row_bytes = p.k / 2;
  prefetch_scales(p, n + kN, kN);
  __m512i table[kN];
  int16_columns<kN>(p, tables, n, table, params);
  const uint8_t* qbytes[kN];
  for (int c = 0; c < kN; ++c) qbytes[c] = p.qbytes + (n + c) * row_bytes;
  Int16Row x[kM];
  for (int m = 0; m < kM; ++m) {
    const float* row = static_cast<const float*>(p.x) + m * p.x_stride;
    x[m] = {reinterpret_cast<const int16_t*>(row), row + p.k / 2};
  }
  __m512i dot[kM][kN];
  __m512 total[kM][kN];
  for (int m = 0; m < kM; ++m)
    for (int c = 0; c < kN; ++c) dot[m][c] = _mm512_setzero_si512(), total[m][c] = _mm512_setzero_ps();
  const __m512i nibble = _mm512_set1_epi16(0x0F);
  const float* magnitude = params.magnitude;  // of the current group, per column
  const uint32_t* choice = params.choice;
  int64_t group_end = p.group_size;  // in k: no division per plane
  const auto block = [&](int64_t k0, auto size) {
    constexpr int kPlanes = decltype(size)::value / kInt16Plane;
    __m512i words[kN];
    // The next block of columns streams right behind this one: fetch it a block ahead. (Fetching kStreamAhead
    // on, as the one-row kernel did before it kept to the same k, ran up to 11% slower here: 8B shapes,
    // M = 2 and 4, a Zen 4.)
    column_words<decltype(size)::value, kN, _MM_HINT_T0>(qbytes, kN * row_bytes, k0, words);
#pragma GCC unroll 4
    for (int j = 0; j < kPlanes; ++j) {
      const int64_t k = k0 + kInt16Plane * j;
      for (int c = 0; c < kN; ++c) {
        // (words >> 4 j) & 0xF | choice in one vpternlogd; the choice is a broadcast from memory.
        const __m512i shifted = j ? _mm512_srli_epi16(words[c], 4 * j) : words[c];
        const __m512i idx = _mm512_ternarylogic_epi32(shifted, nibble, _mm512_set1_epi32(choice[c]), 0xEA);
        const __m512i w = _mm512_permutexvar_epi16(idx, table[c]);
        for (int m = 0; m < kM; ++m) dot[m][c] = Dot::add(dot[m][c], w, _mm512_load_si512(x[m].values + k));
      }
      // A chunk ends with every odd plane and with the block; a group may end inside one (G = 32, 96, ...).
      const bool group_ends = k + kInt16Plane == group_end;
      if (j % 2 == 0 && j + 1 < kPlanes && !group_ends) continue;
      // Broadcasts from memory are loads; from a register they would take the shuffle port vpermw needs.
      for (int m = 0; m < kM; ++m) {
        const __m512 unit = _mm512_set1_ps(x[m].units[k / kInt16Chunk]);
        for (int c = 0; c < kN; ++c) {
          const __m512 sums = _mm512_mul_ps(_mm512_cvtepi32_ps(dot[m][c]), unit);
          total[m][c] = _mm512_fmadd_ps(sums, _mm512_set1_ps(magnitude[c]), total[m][c]);
          dot[m][c] = _mm512_setzero_si512();
        }
      }
      if (group_ends) magnitude += kN, choice += kN, group_end += p.group_size;
    }
  };
  for_each_block(p, block);
  for (int m = 0; m < kM; ++m)
    for (int c = 0; c < kN; ++c) store_output(p, m, n + c, _mm512_reduce_add_ps(total[m][c]));
}

template <class Dot, int kM>
void gemv_int16_rows(const GemmProblem& p, int64_t n_begin, int64_t n_end) {
  constexpr int kN = kM <= 2 ? 4 : 2;
  const std::vector<Int16Table> tables = int16_tables(p);
  const GroupParams params(kN * (p.k / p.group_size + 16));  // whole batches of 16 groups
  int64_t n = n_begin;
  for (; n + kN <= n_end; n += kN) gemv_int16_block<Dot, kM, kN>(p, n, tables, params);
  for (; n < n_end; ++n) gemv_int16_block<Dot, kM, 1>(p, n, tables, params);
}

// The one-row kernel. A part's codebooks are held twice over in 32 words each (OneRowTable), so index bit
// 4 (nibble j + 1's low bit after the shift) picks the same entry and needs no mask, and the group's
// choice picks the table's address. Each segment (a chunk of 64 k, or one plane of 32 k where the group
// size is not a multiple of 64: it lies in one chunk and one group) starts its int32 sums with vpmaddwd
// and ends with one conversion and one FMA by its factor, |scale| x the codebook's unit x the chunk's
// unit of x, made 16 segments at a time per block of columns.

// A part's codebook Cc as 32 int16 words: its 16 entries times unit[c], twice.
struct OneRowTable {
  __m512i words[2];
  float unit[2];
};

std::vector<OneRowTable> one_row_tables(const GemmProblem& p) {
  std::vector<OneRowTable> tables;
  for (int64_t part = 0; tables.empty() || p.part_ends[part - 1] < p.n; ++part) {
    OneRowTable table;
    for (int c = 0; c < 2; ++c) {
      alignas(64) int16_t words[32];
      table.unit[c] = int16_codebook(p.codebooks + 32 * part + 16 * c, words);
      for (int e = 0; e < 16; ++e) words[16 + e] = words[e];
      table.words[c] = _mm512_load_si512(words);
    }
    tables.push_back(table);
  }
  return tables;
}

// What a call's segments share across columns: each segment's group and its chunk's unit of x, and per
// block of kN columns each segment's factor and table offset (0 for C0, 64 bytes for C1), interleaved
// ([segments][kN]). Plain new[], as GroupParams.
struct OneRowSegments {
  int64_t count, length;  // length in k: 64 where the group size is a multiple of 64, else 32
  int32_t* group;
  float* x_unit;
  float* factor;
  int32_t* offset;
  OneRowSegments(const GemmProblem& p, const float* x_units, int kN)
      : length(p.group_size % 64 == 0 ? 64 : 32) {
    count = (p.k + length - 1) / length;
    const int64_t padded = (count + 15) / 16 * 16;
    group = new int32_t[padded]();
    x_unit = new float[padded]();
    factor = new float[padded * kN];
    offset = new int32_t[padded * kN];
    for (int64_t s = 0; s < count; ++s) {
      group[s] = static_cast<int32_t>(s * length / p.group_size);
      x_unit[s] = x_units[s * length / kInt16Chunk];
    }
  }
  ~OneRowSegments() {
    delete[] group;
    delete[] x_unit;
    delete[] factor;
    delete[] offset;
  }
  OneRowSegments(const OneRowSegments&) = delete;
  OneRowSegments& operator=(const OneRowSegments&) = delete;
};

// The factors and table offsets of kN columns from n, 16 segments at a time: their (at most 16) groups'
// scales widened once, then spread to the segments with one permute.
template <int kN>
void one_row_columns(const GemmProblem& p, const OneRowTable* const* table, int64_t n, OneRowSegments& seg) {
  const int64_t groups = p.k / p.group_size;
  for (int64_t s = 0; s < seg.count; s += 16) {
    const int32_t g0 = seg.group[s];
    const int64_t left = groups - g0;
    const __mmask16 valid = static_cast<__mmask16>(left >= 16 ? 0xFFFF : (1u << left) - 1);
    const __m512i which = _mm512_sub_epi32(_mm512_loadu_si512(seg.group + s), _mm512_set1_epi32(g0));
    const __m512 x_unit = _mm512_loadu_ps(seg.x_unit + s);
    __m512 factor[kN], offset[kN];
    for (int c = 0; c < kN; ++c) {
      const __m256i raw = _mm256_maskz_loadu_epi16(valid, p.scales + (n + c) * groups + g0);
      const __mmask16 c1 = _mm256_movepi16_mask(raw);
      const __m512 unit = _mm512_mask_blend_ps(c1, _mm512_set1_ps(table[c]->unit[0]), _mm512_set1_ps(table[c]->unit[1]));
      const __m512 magnitude = _mm512_mul_ps(_mm512_cvtph_ps(_mm256_and_si256(raw, _mm256_set1_epi16(0x7FFF))), unit);
      factor[c] = _mm512_mul_ps(_mm512_permutexvar_ps(which, magnitude), x_unit);
      const __m512i bytes = _mm512_maskz_mov_epi32(c1, _mm512_set1_epi32(64));
      offset[c] = _mm512_castsi512_ps(_mm512_permutexvar_epi32(which, bytes));
    }
    store_interleaved<kN>(factor, seg.factor + s * kN);
    store_interleaved<kN>(offset, reinterpret_cast<float*>(seg.offset + s * kN));
  }
}

// One row of x against kN columns from n; kPairs: segments of two planes (a chunk), else of one.
template <class Dot, int kN, bool kPairs>
void gemv_one_row_block(const GemmProblem& p, int64_t n, const OneRowTable* const* table, const int16_t* x,
                        OneRowSegments& seg) {
  const int64_t row_bytes = p.k / 2;
  prefetch_scales(p, n + kN, kN);
  one_row_columns<kN>(p, table, n, seg);
  const uint8_t* qbytes[kN];
  const char* words_of[kN];  // the column's part's C0 table; C1's is 64 bytes on
  for (int c = 0; c < kN; ++c) {
    qbytes[c] = p.qbytes + (n + c) * row_bytes;
    words_of[c] = reinterpret_cast<const char*>(table[c]->words);
  }
  __m512i dot[kN];
  __m512 total[kN];
  for (int c = 0; c < kN; ++c) total[c] = _mm512_setzero_ps();
  const float* factor = seg.factor;
  const int32_t* offset = seg.offset;
  const int64_t ahead = stream_ahead(kN * row_bytes);
  const auto block = [&](int64_t k0, auto size) {
    constexpr int kPlanes = decltype(size)::value / kInt16Plane;
    __m512i words[kN];
    column_words<decltype(size)::value, kN, _MM_HINT_T1>(qbytes, ahead, k0, words);
#pragma GCC unroll 4
    for (int j = 0; j < kPlanes; ++j) {
      const __m512i xv = _mm512_load_si512(x + k0 + kInt16Plane * j);
      const bool first = !kPairs || j % 2 == 0;
      for (int c = 0; c < kN; ++c) {
        const __m512i idx = j ? _mm512_srli_epi16(words[c], 4 * j) : words[c];
        const __m512i codebook = _mm512_load_si512(words_of[c] + offset[c]);
        const __m512i w = _mm512_permutexvar_epi16(idx, codebook);
        dot[c] = first ? _mm512_madd_epi16(w, xv) : Dot::add(dot[c], w, xv);
      }
      if (kPairs && j % 2 == 0 && j + 1 < kPlanes) continue;
      for (int c = 0; c < kN; ++c)
        total[c] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[c]), _mm512_set1_ps(factor[c]), total[c]);
      factor += kN, offset += kN;
    }
  };
  for_each_block(p, block);
  for (int c = 0; c < kN; ++c) store_output(p, 0, n + c, _mm512_reduce_add_ps(total[c]));
}

template <class Dot, bool kPairs>
void gemv_one_row_columns(const GemmProblem& p, int64_t n_begin, int64_t n_end) {
  constexpr int kN = 4;
  const std::vector<OneRowTable> tables = one_row_tables(p);
  const float* row = static_cast<const float*>(p.x);
  const int16_t* x = reinterpret_cast<const int16_t*>(row);
  OneRowSegments seg(p, row + p.k / 2, kN);
  const auto tables_of = [&](int64_t n, const OneRowTable** out, int columns) {
    for (int c = 0; c < columns; ++c) out[c] = &tables[(codebook_pair(p, n + c) - p.codebooks) / 32];
  };
  const OneRowTable* table[kN];
  int64_t n = n_begin;
  for (; n + kN <= n_end; n += kN) {
    tables_of(n, table, kN);
    gemv_one_row_block<Dot, kN, kPairs>(p, n, table, x, seg);
  }
  for (; n < n_end; ++n) {
    tables_of(n, table, 1);
    gemv_one_row_block<Dot, 1, kPairs>(p, n, table, x, seg);
  }
}

// Up to 4 rows a pass (ops.cpp's decode passes); a pass of one row (a batch of one, or the rest of a batch
// of 5 to 13 on avx512) runs the one-row kernel.
template <class Dot>
void gemv_int16(const GemmProblem& p, int64_t n_begin, int64_t n_end) {
  switch (p.m) {
    case 1:
      if (p.group_size % 64 == 0) return gemv_one_row_columns<Dot, true>(p, n_begin, n_end);
      return gemv_one_row_columns<Dot, false>(p, n_begin, n_end);
    case 2: return gemv_int16_rows<Dot, 2>(p, n_begin, n_end);
    case 3: return gemv_int16_rows<Dot, 3>(p, n_begin, n_end);
    default: return gemv_int16_rows<Dot, 4>(p, n_begin, n_end);
  }
}

}  // namespace
}  // namespace aaac
