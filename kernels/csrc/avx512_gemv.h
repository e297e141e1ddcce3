// The AVX-512 decode kernel, shared by the fp32 (kernel_avx512.cpp) and bf16 (kernel_avx512_bf16.cpp)
// paths. Include it after the file's `#pragma GCC target`: everything here has internal linkage, so
// each file compiles its own copy for its own instruction set.
//
// An `Arith` type supplies what differs: the per-group table (the codebook times the group's scale,
// the reference's weight in the compute dtype), the chunk's weights in k order, and the dot step.
#pragma once

#include <immintrin.h>

#include "scalar_convert.h"

namespace aaac {
namespace {

// Groups whose scales are decoded together: 16 fp16 scales widen in one instruction, and their
// codebook choices come out of the sign bits as one mask.
constexpr int kScaleBatch = 16;

struct ColumnStream {
  alignas(64) float codebook[2][16];
  const uint8_t* qbytes;
  const uint16_t* scales;
  alignas(64) float magnitude[kScaleBatch];
  uint32_t choices;  // bit j: group j of the batch uses C1

  void open(const GemmProblem& p, int64_t n) {
    const uint16_t* pair = codebook_pair(p, n);
    for (int c = 0; c < 2; ++c)
      _mm512_store_ps(codebook[c], _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(pair + 16 * c))));
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

// kM rows of x against kN columns from n; two accumulators per (row, column) hide the dot latency.
template <class Arith, int kM, int kN, int kChunk>
void gemv_block(const GemmProblem& p, int64_t n) {
  using Elem = typename Arith::Elem;
  const Elem* x = static_cast<const Elem*>(p.x);
  const int64_t groups = p.k / p.group_size, row_bytes = p.k / 2;
  ColumnStream col[kN];
  for (int c = 0; c < kN; ++c) col[c].open(p, n + c);
  __m512 acc[kM][kN][2];
  for (int m = 0; m < kM; ++m)
    for (int c = 0; c < kN; ++c) acc[m][c][0] = acc[m][c][1] = _mm512_setzero_ps();

  int slot = 0;
  for (int64_t g0 = 0; g0 < groups; g0 += kScaleBatch) {
    const int64_t batch = groups - g0 < kScaleBatch ? groups - g0 : kScaleBatch;
    for (int c = 0; c < kN; ++c) col[c].load_scales(g0, batch);
    for (int j = 0; j < batch; ++j) {
      typename Arith::Table table[kN];
      for (int c = 0; c < kN; ++c) table[c] = Arith::table(col[c].scaled(j));
      const int64_t k_end = (g0 + j + 1) * p.group_size;
      for (int64_t k = (g0 + j) * p.group_size; k < k_end; k += kChunk, slot ^= 1) {
        for (int c = 0; c < kN; ++c) {
          // The next block of columns streams right behind this one: fetch it a block ahead.
          _mm_prefetch(reinterpret_cast<const char*>(col[c].qbytes + kN * row_bytes + k / 2), _MM_HINT_T0);
          const typename Arith::template Weights<kChunk> w(col[c].qbytes + k / 2, table[c]);
          for (int m = 0; m < kM; ++m) Arith::dot(acc[m][c], slot, w, x + m * p.x_stride + k);
        }
      }
    }
  }
  for (int m = 0; m < kM; ++m)
    for (int c = 0; c < kN; ++c) store_output(p, m, n + c, _mm512_reduce_add_ps(_mm512_add_ps(acc[m][c][0], acc[m][c][1])));
}

template <class Arith, int kM, int kChunk>
void gemv_rows(const GemmProblem& p, int64_t n_begin, int64_t n_end) {
  constexpr int kN = kM <= 2 ? 4 : 2;
  int64_t n = n_begin;
  for (; n + kN <= n_end; n += kN) gemv_block<Arith, kM, kN, kChunk>(p, n);
  for (; n < n_end; ++n) gemv_block<Arith, kM, 1, kChunk>(p, n);
}

template <class Arith, int kChunk>
void gemv_chunked(const GemmProblem& p, int64_t n_begin, int64_t n_end) {
  switch (p.m) {
    case 1: return gemv_rows<Arith, 1, kChunk>(p, n_begin, n_end);
    case 2: return gemv_rows<Arith, 2, kChunk>(p, n_begin, n_end);
    case 3: return gemv_rows<Arith, 3, kChunk>(p, n_begin, n_end);
    default: return gemv_rows<Arith, 4, kChunk>(p, n_begin, n_end);
  }
}

template <class Arith>
void gemv(const GemmProblem& p, int64_t n_begin, int64_t n_end) {
  if (p.chunk == 64) return gemv_chunked<Arith, 64>(p, n_begin, n_end);
  gemv_chunked<Arith, 32>(p, n_begin, n_end);
}

// W[n_begin:n_end] into out, in Arith's element type: the same tables and weights as the kernel.
template <class Arith, int kChunk>
void dequant_chunked(const GemmProblem& p, int64_t n_begin, int64_t n_end, typename Arith::Elem* out) {
  const int64_t groups = p.k / p.group_size;
  for (int64_t n = n_begin; n < n_end; ++n) {
    ColumnStream col;
    col.open(p, n);
    typename Arith::Elem* row = out + (n - n_begin) * p.k;
    for (int64_t g0 = 0; g0 < groups; g0 += kScaleBatch) {
      const int64_t batch = groups - g0 < kScaleBatch ? groups - g0 : kScaleBatch;
      col.load_scales(g0, batch);
      for (int j = 0; j < batch; ++j) {
        const typename Arith::Table table = Arith::table(col.scaled(j));
        for (int64_t k = (g0 + j) * p.group_size; k < (g0 + j + 1) * p.group_size; k += kChunk)
          Arith::store(typename Arith::template Weights<kChunk>(col.qbytes + k / 2, table), row + k);
      }
    }
  }
}

template <class Arith>
void dequant(const GemmProblem& p, int64_t n_begin, int64_t n_end, void* out) {
  auto* typed = static_cast<typename Arith::Elem*>(out);
  if (p.chunk == 64) return dequant_chunked<Arith, 64>(p, n_begin, n_end, typed);
  dequant_chunked<Arith, 32>(p, n_begin, n_end, typed);
}

}  // namespace
}  // namespace aaac
