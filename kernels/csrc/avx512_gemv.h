// What the AVX-512 kernels share: a column's per-group tables, the walk over the layout's blocks that
// hands each block its planes' tables, and the decode kernel (M <= 4). Include it after the file's
// `#pragma GCC target`: everything here has internal linkage, so each file compiles its own copy for
// its own instruction set.
//
// An `Arith` type supplies what differs: the table (the codebook times the group's scale, in a
// register), a block's weights, the dot step of the decode kernel, and the dequantizer's store.
//
// The vector paths take group sizes that are multiples of 32 (others run the scalar kernel), so each
// plane (32 consecutive k) lies in one group, and the rest of K (K mod 128) is a block of 64 and/or 32.
#pragma once

#include <immintrin.h>

#include "scalar_convert.h"

namespace aaac {
namespace {

// Groups whose scales are decoded together: 16 fp16 scales widen in one instruction, and their
// codebook choices come out of the sign bits as one mask.
constexpr int kScaleBatch = 16;
constexpr int kPlane = 32;  // k per plane: nibble j of a 128-block's words, or half of a smaller block

// A block's size as a type, so that each size gets its own unrolled code.
template <int kSize>
struct BlockSize {
  static constexpr int value = kSize;
};

struct ColumnStream {
  alignas(64) float codebook[2][16];
  const uint8_t* qbytes;
  const uint16_t* scales;
  alignas(64) float magnitude[kScaleBatch];
  uint32_t choices;  // bit j: group j of the batch uses C1

  void open(const GemmProblem& p, int64_t n) {
    const uint16_t* pair = codebook_pair(p, n);
    for (int c = 0; c < 2; ++c) {
      const __m256i entries = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pair + 16 * c));
      _mm512_store_ps(codebook[c], _mm512_cvtph_ps(entries));
    }
    qbytes = p.qbytes + n * (p.k / 2);
    scales = p.scales + n * (p.k / p.group_size);
  }

  void load_scales(int64_t g0, int64_t count) {
    const __mmask16 valid = static_cast<__mmask16>((1u << count) - 1);
    const __m256i raw = _mm256_maskz_loadu_epi16(valid, scales + g0);
    choices = _mm256_movepi16_mask(raw);
    _mm512_store_ps(magnitude, _mm512_cvtph_ps(_mm256_and_si256(raw, _mm256_set1_epi16(0x7FFF))));
  }

  // C[choice] * |scale| in fp32 for group j of the batch: exact, as fp16 x fp16 fits in fp32.
  __m512 scaled(int j) const {
    return _mm512_mul_ps(_mm512_load_ps(codebook[(choices >> j) & 1]), _mm512_set1_ps(magnitude[j]));
  }
};

// One block's tables, made for one column at a time where the visitor decodes it (so that a column's
// tables live in registers next to its weights): block.weights<kSize>(c, q) decodes column c's block
// at q. kGroups as in walk_columns.
template <class Arith, int kGroups>
struct BlockTables {
  using Table = typename Arith::Table;
  const ColumnStream* col;
  int group[4];  // of each plane, within the batch of the columns' scales

  template <int kSize>
  typename Arith::template Weights<kSize> weights(int c, const uint8_t* q) const {
    Table t[kSize / kPlane];
    for (int j = 0; j < kSize / kPlane; ++j) {
      // A group of 64 or more spans planes: their table is made once.
      const bool shared = kGroups != 0 && kGroups < 4 && j % (4 / kGroups) != 0;
      t[j] = shared ? t[j - 1] : Arith::table(col[c].scaled(group[j]));
    }
    return typename Arith::template Weights<kSize>(q, t);
  }
};

// Groups g_begin .. g_end of the columns (g_begin * G on a 128-block boundary), block by block in k
// order: visit(k0, BlockSize<size>(), block) with block the block's BlockTables. kGroups is the
// number of groups per 128-block: 4 (G = 32), 2 (G = 64), 1 (G a multiple of 128, whose table serves
// G / 128 blocks), or 0 for the other multiples of 32 (96, 160, ...: blocks straddle groups, each
// plane gets its group's table). A batch of 16 groups is whole blocks, so only the last one can end
// in a block of 64 and/or 32.
template <class Arith, int kGroups, class Visit>
void walk_columns(const GemmProblem& p, ColumnStream* col, int columns, int64_t g_begin, int64_t g_end,
                  Visit visit) {
  BlockTables<Arith, kGroups> block{col, {}};
  const int64_t g = p.group_size;
  for (int64_t g0 = g_begin; g0 < g_end; g0 += kScaleBatch) {
    const int64_t count = g_end - g0 < kScaleBatch ? g_end - g0 : kScaleBatch;
    for (int c = 0; c < columns; ++c) col[c].load_scales(g0, count);
    for (int64_t k0 = g0 * g; k0 < (g0 + count) * g;) {
      const int64_t size = block_size(p.k, k0);
      for (int plane = 0; plane < 4; ++plane)
        block.group[plane] = static_cast<int>((k0 + kPlane * plane) / g - g0);
      if (size == 128) {
        visit(k0, BlockSize<128>(), block);
      } else if (size == 64) {
        visit(k0, BlockSize<64>(), block);
      } else {
        visit(k0, BlockSize<32>(), block);
      }
      k0 += size;
    }
  }
}

// walk_columns for the group size of p.
template <class Arith, class Visit>
void walk(const GemmProblem& p, ColumnStream* col, int columns, int64_t g_begin, int64_t g_end, Visit visit) {
  if (p.group_size == 32) return walk_columns<Arith, 4>(p, col, columns, g_begin, g_end, visit);
  if (p.group_size == 64) return walk_columns<Arith, 2>(p, col, columns, g_begin, g_end, visit);
  if (p.group_size % 128 == 0) return walk_columns<Arith, 1>(p, col, columns, g_begin, g_end, visit);
  walk_columns<Arith, 0>(p, col, columns, g_begin, g_end, visit);
}

// The scales of `columns` columns from n, which the next block of columns reads first. The weights'
// prefetches keep them streaming, but without fetching the scales a block ahead too, each block began
// with a miss (8B o streamed from memory, one thread, one row, the int16 kernel: 483 against 337 us; the
// fp32 kernel: 547-583 against 388-395). A hint: past the tensor's end it does nothing.
void prefetch_scales(const GemmProblem& p, int64_t n, int columns) {
  const int64_t groups = p.k / p.group_size;
  const char* scales = reinterpret_cast<const char*>(p.scales + n * groups);
  for (int64_t b = 0; b < columns * groups * 2; b += 64) _mm_prefetch(scales + b, _MM_HINT_T0);
}

// kM rows of x (fp32, in Arith's k order) against kN columns from n; two accumulators per (row,
// column) hide the FMA latency.
template <class Arith, int kM, int kN>
void gemv_block(const GemmProblem& p, int64_t n) {
  const float* x = static_cast<const float*>(p.x);
  const int64_t row_bytes = p.k / 2;
  prefetch_scales(p, n + kN, kN);
  ColumnStream col[kN];
  for (int c = 0; c < kN; ++c) col[c].open(p, n + c);
  __m512 acc[kM][kN][2];
  for (int m = 0; m < kM; ++m)
    for (int c = 0; c < kN; ++c) acc[m][c][0] = acc[m][c][1] = _mm512_setzero_ps();
  walk<Arith>(p, col, kN, 0, p.k / p.group_size, [&](int64_t k0, auto size, const auto& block) {
    constexpr int kSize = decltype(size)::value;
    for (int c = 0; c < kN; ++c) {
      // The next block of columns streams right behind this one: fetch it a block ahead.
      _mm_prefetch(reinterpret_cast<const char*>(col[c].qbytes + kN * row_bytes + k0 / 2), _MM_HINT_T0);
      const auto w = block.template weights<kSize>(c, col[c].qbytes + k0 / 2);
      for (int m = 0; m < kM; ++m) Arith::dot(acc[m][c], w, x + m * p.x_stride + k0);
    }
  });
  for (int m = 0; m < kM; ++m)
    for (int c = 0; c < kN; ++c)
      store_output(p, m, n + c, _mm512_reduce_add_ps(_mm512_add_ps(acc[m][c][0], acc[m][c][1])));
}

template <class Arith, int kM>
void gemv_rows(const GemmProblem& p, int64_t n_begin, int64_t n_end) {
  // Columns per block, measured (K = 4096, weights in cache): at M = 3 one column ran 1.13-1.24x faster
  // than two; at M = 4 one and two were level.
  constexpr int kN = kM <= 2 ? 4 : kM == 3 ? 1 : 2;
  int64_t n = n_begin;
  for (; n + kN <= n_end; n += kN) gemv_block<Arith, kM, kN>(p, n);
  for (; n < n_end; ++n) gemv_block<Arith, kM, 1>(p, n);
}

template <class Arith>
void gemv(const GemmProblem& p, int64_t n_begin, int64_t n_end) {
  switch (p.m) {
    case 1: return gemv_rows<Arith, 1>(p, n_begin, n_end);
    case 2: return gemv_rows<Arith, 2>(p, n_begin, n_end);
    case 3: return gemv_rows<Arith, 3>(p, n_begin, n_end);
    default: return gemv_rows<Arith, 4>(p, n_begin, n_end);
  }
}

// W[n_begin:n_end] into out ([n, K] row-major, Arith's element type): the kernel's weights in k order.
template <class Arith>
void dequant(const GemmProblem& p, int64_t n_begin, int64_t n_end, void* out) {
  for (int64_t n = n_begin; n < n_end; ++n) {
    ColumnStream col;
    col.open(p, n);
    typename Arith::Elem* row = static_cast<typename Arith::Elem*>(out) + (n - n_begin) * p.k;
    walk<Arith>(p, &col, 1, 0, p.k / p.group_size, [&](int64_t k0, auto size, const auto& block) {
      constexpr int kSize = decltype(size)::value;
      Arith::store(block.template weights<kSize>(0, col.qbytes + k0 / 2), row + k0);
    });
  }
}

}  // namespace
}  // namespace aaac
