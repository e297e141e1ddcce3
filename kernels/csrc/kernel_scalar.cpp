// Portable C++ path: any group size, any CPU. The vector paths are tested against it and against
// the reference dequantizer; it is also what runs for group sizes that are not a multiple of 32.
#include <vector>

#include "scalar_convert.h"

namespace aaac {
namespace {

struct Column {
  float codebook[2][16];
  const uint8_t* qbytes;
  const uint16_t* scales;
};

Column column(const GemmProblem& p, int64_t n) {
  Column col;
  const uint16_t* pair = codebook_pair(p, n);
  for (int i = 0; i < 32; ++i) col.codebook[i / 16][i % 16] = half_to_float(pair[i]);
  col.qbytes = p.qbytes + n * (p.k / 2);
  col.scales = p.scales + n * (p.k / p.group_size);
  return col;
}

// The 16 weights of group g: C[choice] * |scale| (exact in fp32: fp16 x fp16), rounded to bf16 when
// asked (the reference's bf16 weight).
void group_table(const Column& col, int64_t g, bool to_bf16, float* table) {
  const uint16_t scale = col.scales[g];
  const float magnitude = half_to_float(scale & 0x7FFF);
  for (int i = 0; i < 16; ++i) {
    const float weight = col.codebook[scale >> 15][i] * magnitude;
    table[i] = to_bf16 ? bits_to_float(static_cast<uint32_t>(float_to_bf16(weight)) << 16) : weight;
  }
}

// A column's K indices in k order, from its bytes in the layout of cpu_kernels.h.
void column_indices(const uint8_t* bytes, int64_t k, uint8_t* out) {
  const int64_t full = k / 128 * 128;
  for (int64_t k0 = 0; k0 < full; k0 += 128, bytes += 64)
    for (int64_t w = 0; w < 32; ++w)
      for (int j = 0; j < 4; ++j) out[k0 + 32 * j + w] = (bytes[2 * w + j / 2] >> (4 * (j % 2))) & 0xF;
  for (int64_t size = 64, k0 = full; size >= 8; size /= 2) {
    if (!((k - full) & size)) continue;
    for (int64_t w = 0; w < size / 2; ++w) {
      out[k0 + w] = bytes[w] & 0xF;
      out[k0 + size / 2 + w] = bytes[w] >> 4;
    }
    k0 += size;
    bytes += size / 2;
  }
}

}  // namespace

void gemv_scalar(const GemmProblem& p, int64_t n_begin, int64_t n_end) {
  const float* x = static_cast<const float*>(p.x);
  std::vector<uint8_t> indices(p.k);
  for (int64_t n = n_begin; n < n_end; ++n) {
    const Column col = column(p, n);
    column_indices(col.qbytes, p.k, indices.data());
    for (int64_t m = 0; m < p.m; ++m) {
      float acc = 0.0f;
      for (int64_t g = 0; g < p.k / p.group_size; ++g) {
        float table[16];
        group_table(col, g, false, table);  // the decode kernels take the exact weights
        for (int64_t k = g * p.group_size; k < (g + 1) * p.group_size; ++k)
          acc += table[indices[k]] * x[m * p.x_stride + k];
      }
      store_output(p, m, n, acc);
    }
  }
}

void dequant_scalar(const GemmProblem& p, int64_t n_begin, int64_t n_end, void* out) {
  std::vector<uint8_t> indices(p.k);
  for (int64_t n = n_begin; n < n_end; ++n) {
    const Column col = column(p, n);
    column_indices(col.qbytes, p.k, indices.data());
    const int64_t row = (n - n_begin) * p.k;
    for (int64_t g = 0; g < p.k / p.group_size; ++g) {
      float table[16];
      group_table(col, g, p.y_dtype == ActDtype::kBFloat16, table);
      for (int64_t k = g * p.group_size; k < (g + 1) * p.group_size; ++k)
        store_value(p.y_dtype, out, row + k, table[indices[k]]);
    }
  }
}

// x in k order, widened to fp32: the scalar and AVX2 decode kernels read it as it is.
void natural_order(const GemmProblem& p, const void* x, int64_t x_stride, ActDtype dtype, float* out) {
  for (int64_t m = 0; m < p.m; ++m) {
    float* row = out + m * p.k;
    if (dtype == ActDtype::kFloat32) {
      std::memcpy(row, static_cast<const float*>(x) + m * x_stride, p.k * sizeof(float));
      continue;
    }
    const uint16_t* src = static_cast<const uint16_t*>(x) + m * x_stride;
    for (int64_t k = 0; k < p.k; ++k) row[k] = bits_to_float(static_cast<uint32_t>(src[k]) << 16);
  }
}

}  // namespace aaac
