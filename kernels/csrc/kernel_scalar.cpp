// Portable C++ path: any group size, any CPU. The vector paths are tested against it and against
// the reference dequantizer; it is also what runs for group sizes that are not a multiple of 32.
#include "scalar_convert.h"

namespace aaac {
namespace {

float load_x(const GemmProblem& p, int64_t m, int64_t k) {
  if (p.x_dtype == ActDtype::kFloat32) return static_cast<const float*>(p.x)[m * p.x_stride + k];
  return bits_to_float(static_cast<uint32_t>(static_cast<const uint16_t*>(p.x)[m * p.x_stride + k]) << 16);
}

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
// the activations are bf16, so the weight is the reference's in the activations' dtype.
void group_table(const GemmProblem& p, const Column& col, int64_t g, float* table) {
  const uint16_t scale = col.scales[g];
  const float magnitude = half_to_float(scale & 0x7FFF);
  for (int i = 0; i < 16; ++i) {
    const float weight = col.codebook[scale >> 15][i] * magnitude;
    table[i] = p.y_dtype == ActDtype::kBFloat16 ? bits_to_float(static_cast<uint32_t>(float_to_bf16(weight)) << 16) : weight;
  }
}

// The index of weight j of a chunk whose bytes start at `bytes`.
int index_at(const uint8_t* bytes, int64_t j, int64_t half) {
  return j < half ? bytes[j] & 0xF : bytes[j - half] >> 4;
}

}  // namespace

void gemv_scalar(const GemmProblem& p, int64_t n_begin, int64_t n_end) {
  const int64_t groups = p.k / p.group_size, half = p.chunk / 2;
  for (int64_t n = n_begin; n < n_end; ++n) {
    const Column col = column(p, n);
    for (int64_t m = 0; m < p.m; ++m) {
      float acc = 0.0f;
      for (int64_t g = 0; g < groups; ++g) {
        float table[16];
        group_table(p, col, g, table);
        for (int64_t k = g * p.group_size; k < (g + 1) * p.group_size; k += p.chunk) {
          const uint8_t* bytes = col.qbytes + k / 2;
          for (int64_t j = 0; j < p.chunk; ++j) acc += table[index_at(bytes, j, half)] * load_x(p, m, k + j);
        }
      }
      store_output(p, m, n, acc);
    }
  }
}

void dequant_scalar(const GemmProblem& p, int64_t n_begin, int64_t n_end, void* out) {
  const int64_t half = p.chunk / 2;
  for (int64_t n = n_begin; n < n_end; ++n) {
    const Column col = column(p, n);
    const int64_t row = (n - n_begin) * p.k;
    for (int64_t g = 0; g < p.k / p.group_size; ++g) {
      float table[16];
      group_table(p, col, g, table);
      for (int64_t k = g * p.group_size; k < (g + 1) * p.group_size; k += p.chunk) {
        const uint8_t* bytes = col.qbytes + k / 2;
        for (int64_t j = 0; j < p.chunk; ++j) store_value(p.y_dtype, out, row + k + j, table[index_at(bytes, j, half)]);
      }
    }
  }
}

}  // namespace aaac
