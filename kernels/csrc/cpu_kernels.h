// The per-ISA CPU kernels of aaac::linear and what they share.
//
// This header is included by translation units compiled for different instruction sets
// (each ISA file switches its target with `#pragma GCC target` after its includes), so it
// holds only plain declarations: no inline functions, no templates, nothing from the C++
// standard library. An inline function compiled for AVX-512 in one file could otherwise be
// the copy the linker keeps for the whole library and crash an AVX2-only machine.
//
// The layout (made at load time by aaac_kernels.cpu_layout, docs/kernels.md):
//   qbytes    uint8  [N, K / 2]: per column, per chunk of C consecutive k (C = 64 when the group
//                    size is a multiple of 64, else 32 when it is a multiple of 32, else the group
//                    size), C / 2 bytes whose low nibbles hold k = 0 .. C/2-1 of the chunk and whose
//                    high nibbles hold k = C/2 .. C-1: a 32-byte load, a widening and one shift give
//                    the indices of 64 consecutive k, with no interleaving to undo.
//   scales    fp16   [N, K / G]: |scale| with the codebook choice in the sign bit, as in the checkpoint.
//   codebooks fp16   [parts, 2, 16]: one pair per part of a merged layer (q, k, v or gate, up);
//                    part_ends[i] is the first column after part i.
#pragma once

#include <cstdint>

namespace aaac {

enum class ActDtype : int { kFloat32 = 0, kBFloat16 = 1 };

struct GemmProblem {
  const void* x;              // [M, K] activations, row stride x_stride (elements)
  int64_t x_stride;
  ActDtype x_dtype;           // the gemv kernels of fp32-only ISAs take fp32 x
  ActDtype y_dtype;           // of y, and of the dequantized tile
  const uint8_t* qbytes;      // [N, K / 2]
  const uint16_t* scales;     // [N, K / G]
  const uint16_t* codebooks;  // [parts, 2, 16] fp16 bits
  const int64_t* part_ends;   // [parts]
  const float* bias;          // [N] or nullptr
  void* y;                    // [M, N] in y_dtype, row stride y_stride
  int64_t y_stride;
  int64_t m, n, k, group_size, chunk;
};

// y[0:M, n_begin:n_end] = x @ W[n_begin:n_end]^T (+ bias): the weights streamed once, M rows at a time
// (M <= kMaxDecodeRows), fp32 accumulation.
using GemvFn = void (*)(const GemmProblem&, int64_t n_begin, int64_t n_end);
// W[n_begin:n_end] dequantized into out ([n_end - n_begin, K] row-major, y_dtype), bit for bit the
// reference dequantizer's weight in that dtype.
using DequantFn = void (*)(const GemmProblem&, int64_t n_begin, int64_t n_end, void* out);

constexpr int64_t kMaxDecodeRows = 4;

// Batches above kMaxDecodeRows with bf16 activations on CPUs with AMX (kernel_amx.cpp): p.x points
// to the activations packed by pack_amx_activations (amx_packed_elements(M, K) bf16 values), and each
// thread passes its own workspace of amx_workspace_bytes(p) and a range of whole panels.
constexpr int64_t kAmxPanelColumns = 128;
constexpr int64_t kAmxSweepRows = 64;     // rows of x one streaming sweep serves (4 accumulator tiles)
constexpr int64_t kAmxPanelDepth = 2048;  // k per decoded panel beyond one sweep
using GemmFn = void (*)(const GemmProblem&, int64_t n_begin, int64_t n_end, void* workspace);
void gemm_amx(const GemmProblem&, int64_t, int64_t, void*);
int64_t amx_workspace_bytes(const GemmProblem&);
int64_t amx_packed_elements(int64_t m, int64_t k);
void pack_amx_activations(const uint16_t* x, int64_t m, int64_t k, int64_t stride, uint16_t* out);

// The codebook pair (C0, C1) of column n: 32 fp16 values.
const uint16_t* codebook_pair(const GemmProblem& p, int64_t n);

void gemv_scalar(const GemmProblem&, int64_t, int64_t);
void dequant_scalar(const GemmProblem&, int64_t, int64_t, void*);
void gemv_avx2(const GemmProblem&, int64_t, int64_t);
void dequant_avx2(const GemmProblem&, int64_t, int64_t, void*);
void gemv_avx512(const GemmProblem&, int64_t, int64_t);
void dequant_avx512(const GemmProblem&, int64_t, int64_t, void*);
void gemv_avx512_bf16(const GemmProblem&, int64_t, int64_t);
void dequant_avx512_bf16(const GemmProblem&, int64_t, int64_t, void*);

}  // namespace aaac
