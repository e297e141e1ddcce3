// The AVX512-BF16 GEMM's products alone, in four register forms, side by side on one core (no weights
// decoded, no threads): how fast `vdpbf16ps` multiplies 16 rows of x by a panel of bf16 weights that sits in
// L2, against the instruction's own peak. docs/kernels.md ("How far the products are from the
// instruction's limit") has the figures.
//
//   g++ -O3 -std=c++17 benchmarks/bf16_products.cpp -o /tmp/bf16_products && /tmp/bf16_products
//
// Needs AVX512-BF16 (per-function target attributes: it builds anywhere, runs only there).
#include <immintrin.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <utility>
#include <vector>

#define BF16 __attribute__((target("avx512f,avx512bw,avx512bf16"), noinline))

namespace {

constexpr uint32_t kOnes = 0x3f803f80;  // a pair of bf16 1.0: sums count the products

// The peak: 24 independent accumulators, operands in registers.
BF16 float peak(long iters) {
  __m512 acc[24];
  for (auto& a : acc) a = _mm512_setzero_ps();
  __m512bh a = (__m512bh)_mm512_set1_epi32(kOnes), b = a;
  for (long it = 0; it < iters; ++it) {
#pragma GCC unroll 24
    for (int i = 0; i < 24; ++i) acc[i] = _mm512_dpbf16_ps(acc[i], a, b);
    asm volatile("" : "+v"(a));
  }
  __m512 s = acc[0];
  for (int i = 1; i < 24; ++i) s = _mm512_add_ps(s, acc[i]);
  alignas(64) float lanes[16];
  _mm512_store_ps(lanes, s);
  return lanes[0];
}

// The GEMM's form (kernel_avx512_bf16.cpp, row block of 16), as the intrinsics compile: x packed per k pair as one vector of 16 rows, each
// of the panel's 16 columns' pairs broadcast: one broadcast per vdpbf16ps. w as the kernel's panel: per
// 128-k block (64 pairs), [16 columns][64 pairs].
BF16 void columns_broadcast(const uint32_t* x, const uint32_t* w, long pairs, float* out) {
  __m512 acc[16];
  for (auto& a : acc) a = _mm512_setzero_ps();
  for (long j = 0; j < pairs; ++j) {
    const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + 16 * j);
#pragma GCC unroll 16
    for (int c = 0; c < 16; ++c)
      acc[c] = _mm512_dpbf16_ps(acc[c], xv, (__m512bh)_mm512_set1_epi32(static_cast<int>(w[j / 64 * 1024 + c * 64 + j % 64])));
  }
  for (int c = 0; c < 16; ++c) _mm512_storeu_ps(out + 16 * c, acc[c]);
}

// The kernel's form today: the same, with each broadcast folded into vdpbf16ps (m32bcst, written as an asm:
// GCC does not emit it from the intrinsics), one instruction per product.
template <int kOffset>
__attribute__((always_inline, target("avx512f,avx512bw,avx512bf16"))) inline __m512 dot_broadcast(__m512 acc, __m512bh xv,
                                                                                                const uint32_t* w) {
  asm volatile("vdpbf16ps %c3(%2)%{1to16%}, %1, %0" : "+v"(acc) : "v"(xv), "r"(w), "i"(kOffset));
  return acc;
}

template <size_t... kColumn>
__attribute__((always_inline, target("avx512f,avx512bw,avx512bf16"))) inline void dot_columns(
    __m512* acc, __m512bh xv, const uint32_t* w, std::index_sequence<kColumn...>) {
  ((acc[kColumn] = dot_broadcast<kColumn * 256>(acc[kColumn], xv, w)), ...);
}

BF16 void columns_embedded(const uint32_t* x, const uint32_t* w, long pairs, float* out) {
  asm volatile("" ::: "memory");  // w is written before the asm reads it
  __m512 acc[16];
  for (auto& a : acc) a = _mm512_setzero_ps();
  for (long j = 0; j < pairs; ++j) {
    const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + 16 * j);
    dot_columns(acc, xv, w + j / 64 * 1024 + j % 64, std::make_index_sequence<16>());
  }
  for (int c = 0; c < 16; ++c) _mm512_storeu_ps(out + 16 * c, acc[c]);
}

// oneDNN's form: rows broadcast from x as it comes (row-major), the panel transposed to [pairs][64 columns]
// so that one k pair of 64 columns is 4 vectors: kRows x 4 accumulators, 4 loads + kRows broadcasts per
// 4 kRows vdpbf16ps.
template <int kRows>
BF16 void rows_broadcast(const uint32_t* x, long ldx, const uint32_t* w, long pairs, float* out) {
  __m512 acc[kRows][4];
  for (auto& row : acc)
    for (auto& a : row) a = _mm512_setzero_ps();
  for (long j = 0; j < pairs; ++j) {
    const __m512bh b0 = (__m512bh)_mm512_loadu_si512(w + 64 * j), b1 = (__m512bh)_mm512_loadu_si512(w + 64 * j + 16);
    const __m512bh b2 = (__m512bh)_mm512_loadu_si512(w + 64 * j + 32), b3 = (__m512bh)_mm512_loadu_si512(w + 64 * j + 48);
#pragma GCC unroll 8
    for (int r = 0; r < kRows; ++r) {
      const __m512bh a = (__m512bh)_mm512_set1_epi32(static_cast<int>(x[r * ldx + j]));
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], a, b0);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], a, b1);
      acc[r][2] = _mm512_dpbf16_ps(acc[r][2], a, b2);
      acc[r][3] = _mm512_dpbf16_ps(acc[r][3], a, b3);
    }
  }
  for (int r = 0; r < kRows; ++r)
    for (int c = 0; c < 4; ++c) _mm512_storeu_ps(out + 64 * r + 16 * c, acc[r][c]);
}

double seconds(const std::chrono::steady_clock::time_point& since) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - since).count();
}

}  // namespace

int main() {
  if (!__builtin_cpu_supports("avx512bf16")) {
    std::puts("this CPU has no AVX512-BF16");
    return 1;
  }
  using clock = std::chrono::steady_clock;
  const long rows = 16;
  for (int round = 0; round < 3; ++round) {
    const long iters = 20000000;
    auto start = clock::now();
    volatile float check = peak(iters);
    std::printf("round %d: peak %.1f G multiply-adds/s\n", round, iters * 24.0 * 32 / seconds(start) / 1e9);
    for (long k : {512L, 2048L, 4096L}) {
      const long pairs = k / 2, reps = 4000000000L / (rows * 64 * k);
      std::vector<uint32_t> x(rows * pairs, kOnes), w(64 * pairs, kOnes);
      std::vector<float> out(rows * 64);
      start = clock::now();
      for (long i = 0; i < reps; ++i)
        for (int p = 0; p < 4; ++p) columns_broadcast(x.data(), w.data() + 16 * pairs * p, pairs, out.data());
      const double separate = reps * double(rows) * 64 * k / seconds(start) / 1e9;
      start = clock::now();
      for (long i = 0; i < reps; ++i)
        for (int p = 0; p < 4; ++p) columns_embedded(x.data(), w.data() + 16 * pairs * p, pairs, out.data());
      const double embedded = reps * double(rows) * 64 * k / seconds(start) / 1e9;
      start = clock::now();
      for (long i = 0; i < reps; ++i) {
        rows_broadcast<6>(x.data(), pairs, w.data(), pairs, out.data());
        rows_broadcast<6>(x.data() + 6 * pairs, pairs, w.data(), pairs, out.data() + 6 * 64);
        rows_broadcast<4>(x.data() + 12 * pairs, pairs, w.data(), pairs, out.data() + 12 * 64);
      }
      const double blocked = reps * double(rows) * 64 * k / seconds(start) / 1e9;
      check = out[0];
      std::printf("  16 rows x 64 columns, k %4ld (panel %3ld KiB): columns broadcast %.1f, columns m32bcst %.1f, "
                  "rows 6+6+4 x 64 columns %.1f G multiply-adds/s\n", k, 64 * pairs * 4 / 1024, separate, embedded,
                  blocked);
    }
    (void)check;
  }
}
