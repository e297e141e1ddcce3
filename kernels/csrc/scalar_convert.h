// Scalar conversions and layout arithmetic shared by the kernel files. They have internal linkage on purpose: each
// translation unit, whatever ISA it targets, gets its own copy, so no copy compiled for AVX-512
// can be the one an AVX2 machine runs (see cpu_kernels.h). Include before any `#pragma GCC target`.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "cpu_kernels.h"

namespace aaac {
namespace {

inline float bits_to_float(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

inline uint32_t float_to_bits(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  return bits;
}

// IEEE half -> float, subnormals included (small group scales are fp16 subnormals).
inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16;
  const uint32_t exponent = (h >> 10) & 0x1F;
  uint32_t mantissa = h & 0x3FF;
  if (exponent == 0x1F) return bits_to_float(sign | 0x7F800000 | (mantissa << 13));
  if (exponent != 0) return bits_to_float(sign | ((exponent + 112) << 23) | (mantissa << 13));
  if (mantissa == 0) return bits_to_float(sign);
  int shift = 0;
  while (!(mantissa & 0x400)) {
    mantissa <<= 1;
    ++shift;
  }
  return bits_to_float(sign | static_cast<uint32_t>(113 - shift) << 23 | ((mantissa & 0x3FF) << 13));
}

// Round to nearest even, as torch's .to(torch.bfloat16).
inline uint16_t float_to_bf16(float f) {
  const uint32_t bits = float_to_bits(f);
  if ((bits & 0x7FFFFFFF) > 0x7F800000) return static_cast<uint16_t>((bits >> 16) | 0x40);
  return static_cast<uint16_t>((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16);
}

inline void store_value(ActDtype dtype, void* base, int64_t offset, float value) {
  if (dtype == ActDtype::kFloat32) {
    static_cast<float*>(base)[offset] = value;
  } else {
    static_cast<uint16_t*>(base)[offset] = float_to_bf16(value);
  }
}

// The output of column n for row m, bias added: every gemv kernel ends here.
inline void store_output(const GemmProblem& p, int64_t m, int64_t n, float value) {
  if (p.bias) value += p.bias[n];
  store_value(p.y_dtype, p.y, m * p.y_stride + n, value);
}

// The int16 kernels (kernel_avx2.cpp, avx512_int16.h) round x per chunk of kInt16Chunk k and each codebook
// to int16 times a power of two, |x| and |entry| below 2^14: a chunk's int32 sums (at most 4 products
// per lane) stay below 2^31.
constexpr int kInt16Limit = (1 << 14) - 1;
constexpr int64_t kInt16Chunk = 64;

// A codebook's 16 fp16 entries as int16 words, each rounded to nearest: entry = word x the returned unit,
// a power of two that puts the largest |entry| below 2^14.
inline float int16_codebook(const uint16_t* entries, int16_t* words) {
  float largest = 0.0f;
  for (int e = 0; e < 16; ++e) largest = std::fmax(largest, std::fabs(half_to_float(entries[e])));
  int exponent = 0;
  std::frexp(largest, &exponent);  // largest < 2^exponent
  for (int e = 0; e < 16; ++e) {
    const long entry = std::lrint(std::ldexp(half_to_float(entries[e]), 14 - exponent));
    words[e] = static_cast<int16_t>(entry > kInt16Limit ? kInt16Limit : entry < -kInt16Limit ? -kInt16Limit : entry);
  }
  return std::ldexp(1.0f, exponent - 14);
}

// The unit of a chunk of x whose largest |x| has the biased exponent `biased` (its fp32 bits >> 23):
// unit = 2^(e - 14) for largest < 2^e, and inverse = 1 / unit, which rounds the chunk to int16. An Inf or
// NaN makes the unit NaN (the chunk's outputs NaN, as a product would make them).
struct Int16Unit {
  float unit, inverse;
};

inline Int16Unit int16_unit(int biased) {
  if (biased == 0xFF) return {NAN, 0.0f};
  const int exponent = biased - 126 > -113 ? biased - 126 : -113;  // below 2^-113 the inverse stays 2^127
  return {bits_to_float(static_cast<uint32_t>(exponent - 14 + 127) << 23),
          bits_to_float(static_cast<uint32_t>(14 - exponent + 127) << 23)};
}

// Size of the block of the layout (cpu_kernels.h) at k0 for the vector kernels (K a multiple of 32):
// 128 up to the last K mod 128, which is a block of 64 and/or one of 32.
inline int64_t block_size(int64_t k, int64_t k0) { return k0 < k / 128 * 128 ? 128 : k - k0 >= 64 ? 64 : 32; }

}  // namespace
}  // namespace aaac
