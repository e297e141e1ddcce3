// The per-ISA CPU kernels of aaac::linear and what they share.
//
// This header is included by translation units compiled for different instruction sets
// (each ISA file switches its target with `#pragma GCC target` after its includes), so it
// holds only plain declarations: no inline functions, no templates, nothing from the C++
// standard library. An inline function compiled for AVX-512 in one file could otherwise be
// the copy the linker keeps for the whole library and crash an AVX2-only machine.
//
// The layout (made at load time by aaac_kernels.format.serving.cpu_layout, docs/kernels.md):
//   qbytes    uint8  [N, K / 2]: per column, blocks of 128 k, 64 bytes each read as 32 little-endian
//                    16-bit words, word w holding k = w + 32 j in nibble j; then the rest of K
//                    (K mod 128, a multiple of 8) in blocks of 64, 32, 16 and 8, its binary digits,
//                    byte w of a block of B holding k = w in its low nibble and w + B / 2 in its high.
//                    A plane is 32 consecutive k: nibble j of a 128-block, or the low or high half of
//                    a smaller block; with group sizes that are multiples of 32 (the vector paths)
//                    each plane lies in one group.
//   scales    fp16   [N, K / G]: |scale| with the codebook choice in the sign bit, as in the checkpoint.
//   codebooks fp16   [parts, 2, 16]: one pair per part of a merged layer (q, k, v or gate, up);
//                    part_ends[i] is the first column after part i.
#pragma once

#include <cstdint>

namespace aaac {

enum class ActDtype : int { kFloat32 = 0, kBFloat16 = 1 };

struct GemmProblem {
  const void* x;              // [M, K] activations, row stride x_stride (fp32 elements): the DecodeOrderFn's
  int64_t x_stride;           // output for the gemv kernels, packed tiles for the AMX kernel
  ActDtype y_dtype;           // of y, and of the dequantized tile
  const uint8_t* qbytes;      // [N, K / 2]
  const uint16_t* scales;     // [N, K / G]
  const uint16_t* codebooks;  // [parts, 2, 16] fp16 bits
  const int64_t* part_ends;   // [parts]
  const float* bias;          // [N] or nullptr
  void* y;                    // [M, N] in y_dtype, row stride y_stride
  int64_t y_stride;
  int64_t m, n, k, group_size;
};

// y[0:M, n_begin:n_end] = x @ W[n_begin:n_end]^T (+ bias): the weights streamed once, M rows at a time
// (M <= kMaxDecodeRows), with the exact fp32 weights (entry x |scale|) and fp32 accumulation (the
// int16 kernel: int16 x and entries, each scaled by a power of two, exact int32 sums per chunk of 64 k,
// fp32 across chunks); p.x is the DecodeOrderFn's output.
using GemvFn = void (*)(const GemmProblem&, int64_t n_begin, int64_t n_end);
// x ([p.m, K], row stride x_stride, fp32 or bf16) -> out ([p.m, K] fp32 rows) in the k order the path's
// gemv kernel reads: k order itself (scalar), runs of 4 k in a plane's register order (AVX2), or the even
// and odd k of each plane (AVX-512); for the int16 kernels each row holds K int16 values (in the AVX2
// kernel's order, or in k order for AVX-512) and then the fp32 unit (a power of two) of each chunk of 64 k.
using DecodeOrderFn = void (*)(const GemmProblem&, const void* x, int64_t x_stride, ActDtype dtype, float* out);
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
// Bf16 batches of up to kAmxSweepRows rows past the decode kernel on AVX512-BF16 without AMX
// (kernel_avx512_bf16.cpp): x packed by pack_avx512_bf16_activations, panels of 16 columns decoded to
// bf16 and multiplied by vdpbf16ps while the next is decoded, a workspace of
// avx512_bf16_gemm_workspace_bytes(p) per thread.
void gemm_avx512_bf16(const GemmProblem&, int64_t, int64_t, void*);
int64_t avx512_bf16_gemm_workspace_bytes(const GemmProblem&);
// x ([m, K] bf16, row stride `stride`) packed for a path's GEMM, into amx_packed_elements(m, K) values.
using PackFn = void (*)(const uint16_t* x, int64_t m, int64_t k, int64_t stride, uint16_t* out);
int64_t amx_packed_elements(int64_t m, int64_t k);
void pack_amx_activations(const uint16_t* x, int64_t m, int64_t k, int64_t stride, uint16_t* out);
// As pack_amx_activations, but batches of up to 8 rows in the GEMM's 8-row blocks (in half the space).
void pack_avx512_bf16_activations(const uint16_t* x, int64_t m, int64_t k, int64_t stride, uint16_t* out);

// The codebook pair (C0, C1) of column n: 32 fp16 values.
const uint16_t* codebook_pair(const GemmProblem& p, int64_t n);

void natural_order(const GemmProblem&, const void*, int64_t, ActDtype, float*);
void gemv_scalar(const GemmProblem&, int64_t, int64_t);
void dequant_scalar(const GemmProblem&, int64_t, int64_t, void*);
void decode_order_avx2(const GemmProblem&, const void*, int64_t, ActDtype, float*);
void gemv_avx2(const GemmProblem&, int64_t, int64_t);
void decode_int16_avx2(const GemmProblem&, const void*, int64_t, ActDtype, float*);
void gemv_int16_avx2(const GemmProblem&, int64_t, int64_t);
void dequant_avx2(const GemmProblem&, int64_t, int64_t, void*);
void decode_order_avx512(const GemmProblem&, const void*, int64_t, ActDtype, float*);
void gemv_avx512(const GemmProblem&, int64_t, int64_t);
void dequant_avx512(const GemmProblem&, int64_t, int64_t, void*);
void decode_int16_avx512(const GemmProblem&, const void*, int64_t, ActDtype, float*);
void gemv_int16_avx512(const GemmProblem&, int64_t, int64_t);
void gemv_int16_avx512_vnni(const GemmProblem&, int64_t, int64_t);
void dequant_avx512_bf16(const GemmProblem&, int64_t, int64_t, void*);

// The encoder's group errors (nearest.cpp): for groups [begin, end) of G weights (w and u = w / scale,
// [N, groups, G] contiguous), each weight's nearest entry of one sorted 16-entry codebook (the number
// of the 15 midpoints below u) and the group's error sum mean_square (w - entry * scale)^2.
struct GroupErrorProblem {
  const float* w;
  const float* u;
  const float* mean_square;  // [groups, G]
  const float* scale;        // [N * groups]
  const float* entries;      // [16]
  const float* bounds;       // [15]: the midpoints of consecutive entries
  int64_t groups, g;
  float* errors;     // [N * groups]
  uint8_t* indices;  // [N * groups * G]
};
using GroupErrorFn = void (*)(const GroupErrorProblem&, int64_t begin, int64_t end);
void group_errors_generic(const GroupErrorProblem&, int64_t, int64_t);
void group_errors_avx2(const GroupErrorProblem&, int64_t, int64_t);  // G a multiple of 8

}  // namespace aaac
