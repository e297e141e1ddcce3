// torch bindings of the CPU kernels: the CPU kernel of torch.ops.aaac.linear, the instruction-set
// dispatch, the helpers aaac_kernels.cpu uses (ISA choice, the dequantizer the tests compare) and the
// encoder's nearest-entry search and group errors (nearest.cpp, for aaac_kernels.encode).
//
// The op's schema, its fake and its CUDA kernel are defined in aaac_kernels/linear.py; this file only
// adds the CPU kernel, so the op has one definition whether or not the extension was built.
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <cpuid.h>
#include <sys/syscall.h>
#include <torch/extension.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <string>
#include <tuple>
#include <vector>

#include "cpu_kernels.h"

namespace aaac {

// nearest.cpp
std::tuple<at::Tensor, at::Tensor> nearest(const at::Tensor& u, const at::Tensor& midpoints,
                                           const at::Tensor& codebook);
std::tuple<at::Tensor, at::Tensor> group_errors(const at::Tensor& w, const at::Tensor& u, const at::Tensor& mean_square,
                                                const at::Tensor& scale, const at::Tensor& codebooks, bool vector);

const uint16_t* codebook_pair(const GemmProblem& p, int64_t n) {
  int64_t part = 0;
  while (n >= p.part_ends[part]) ++part;
  return p.codebooks + 32 * part;
}

namespace {

// A decode kernel: x put in its order once per call, then the weights streamed once per kMaxDecodeRows rows.
struct DecodeKernel {
  DecodeOrderFn order;
  GemvFn gemv;
  int64_t max_rows;  // batches up to this size run it, kMaxDecodeRows rows a pass
};

struct IsaKernels {
  const char* name;
  DecodeKernel decode;
  DecodeKernel decode_bf16;  // for bf16 activations where the path has its own (gemv nullptr elsewhere)
  DequantFn dequant;         // larger M without gemm_bf16: dequantized tiles and at::mm
  GemmFn gemm_bf16;          // bf16 activations from gemm_min_rows to gemm_max_rows rows, or nullptr
  PackFn gemm_pack;          // x as gemm_bf16 reads it
  int64_t gemm_min_rows, gemm_max_rows;
  int64_t (*gemm_workspace_bytes)(const GemmProblem&);  // per thread
  // bf16 activations meet bf16 tiles only where the CPU multiplies bf16 (AVX512-BF16): elsewhere at::mm
  // in bf16 runs several times slower than in fp32 (docs/kernels.md), so the tiles and x are fp32.
  bool bf16_tiles;
};

constexpr DecodeKernel kNoDecode = {nullptr, nullptr, 0};
constexpr int64_t kAnyRows = INT64_MAX;

// Ordered from the most portable to the fastest. With AMX, the decode kernel still serves M = 1; from 2
// rows on the AMX tiles were as fast or faster (benchmarks/cpu_kernels.py, docs/benchmarks.md). On AVX2
// (a 2-core Zen 3, K = N = 4096, 1 and 2 threads) the decode kernels' passes beat the fp32 tiles and
// at::mm up to M = 16 (fp32 kernel; M = 5: 2x; M = 16: 1.06-1.14x; M = 24: 0.87-0.98x) and M = 24 (int16
// kernel for bf16; M = 24: 1.19-1.24x; M = 32: 0.98-1.13x). On AVX-512 (a 2-core Zen 5, one thread, 8B o
// and down streamed from memory; docs/benchmarks.md and docs/kernels.md) the int16 kernel for bf16 ran
// M = 2 to 8 1.3-1.7x as fast as the fp32 kernel or the bf16 tiles, and at M = 16 2.5x as fast as the
// avx512 path's fp32 tiles; its one-row kernel ran M = 1 1.34-1.43x as fast as the exact fp32 kernel with the
// weights in cache (8B qkv and o) and 0.9-1.33x streamed from memory (8B qkv, o, gate_up, down). With
// AVX512-BF16, panels of 16 columns decoded to bf16 and multiplied by vdpbf16ps (gemm_avx512_bf16) take
// M = 5 to 64: in row blocks of 16 they beat the int16 kernel from 10 rows (M = 10: 1886.7 against
// 2049.8 us on 8B o) and the bf16 tiles + at::mm up to 32 (1.2-1.3x at 16, about 1.15x at 32), and were
// level with them at 64; in row blocks of 8 (two k pairs per vector) they ran M = 8 1.47x as fast as the
// int16 kernel's two passes (8B o from memory: 1102.0 against 1621.5 us), M = 5 level (1036.8 against
// 1068.1 us in cache), and M = 4 slower (995.1 against 748.2), so the int16 kernel keeps 2 to 4 rows.
constexpr IsaKernels kIsas[] = {
    {"scalar", {natural_order, gemv_scalar, 4}, kNoDecode, dequant_scalar, nullptr, nullptr, 0, 0, nullptr, false},
    {"avx2", {decode_order_avx2, gemv_avx2, 16}, {decode_int16_avx2, gemv_int16_avx2, 24}, dequant_avx2, nullptr,
     nullptr, 0, 0, nullptr, false},
    {"avx512", {decode_order_avx512, gemv_avx512, 4}, {decode_int16_avx512, gemv_int16_avx512, 16},
     dequant_avx512, nullptr, nullptr, 0, 0, nullptr, false},
    {"avx512_bf16", {decode_order_avx512, gemv_avx512, 4}, {decode_int16_avx512, gemv_int16_avx512_vnni, 4},
     dequant_avx512_bf16, gemm_avx512_bf16, pack_avx512_bf16_activations, 5, kAmxSweepRows,
     avx512_bf16_gemm_workspace_bytes, true},
    {"amx_bf16", {decode_order_avx512, gemv_avx512, 4}, kNoDecode, dequant_avx512_bf16, gemm_amx,
     pack_amx_activations, 2, kAnyRows, amx_workspace_bytes, true},
};

enum class Path { kDecode, kGemm, kTiled };
constexpr int kNumIsas = sizeof(kIsas) / sizeof(kIsas[0]);

bool cpu_has(int isa) {
  unsigned a, b, c, d;
  if (isa == 0) return true;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return false;
  const bool osxsave = c & (1u << 27), avx = c & (1u << 28), fma = c & (1u << 12), f16c = c & (1u << 29);
  if (!(osxsave && avx && fma && f16c)) return false;
  unsigned xcr0_lo, xcr0_hi;
  __asm__("xgetbv" : "=a"(xcr0_lo), "=d"(xcr0_hi) : "c"(0));
  if ((xcr0_lo & 0x6) != 0x6) return false;  // the OS saves the YMM state
  __cpuid_count(7, 0, a, b, c, d);
  const bool avx2 = b & (1u << 5), vnni = c & (1u << 11);
  if (isa == 1) return avx2;
  const bool avx512 = (b & (1u << 16)) && (b & (1u << 17)) && (b & (1u << 30)) && (b & (1u << 31));  // F DQ BW VL
  if (!(avx2 && avx512 && (xcr0_lo & 0xE6) == 0xE6)) return false;   // and the ZMM / mask state
  if (isa == 2) return true;
  const bool amx = (d & (1u << 22)) && (d & (1u << 24)) && (xcr0_lo & (3u << 17)) == (3u << 17);  // BF16, TILE
  __cpuid_count(7, 1, a, b, c, d);
  if (!(a & (1u << 5) && vnni)) return false;  // AVX512_BF16 (every such CPU has AVX512_VNNI too)
  if (isa == 3) return true;
  // Linux hands out the AMX tile state only to processes that ask (ARCH_REQ_XCOMP_PERM, XTILEDATA).
  return amx && syscall(SYS_arch_prctl, 0x1023, 18) == 0;
}

int best_isa() {
  int best = 0;
  for (int i = 0; i < kNumIsas; ++i)
    if (cpu_has(i)) best = i;
  return best;
}

std::atomic<int> g_isa{best_isa()};

int isa_index(const std::string& name) {
  for (int i = 0; i < kNumIsas; ++i)
    if (name == kIsas[i].name) return i;
  return -1;
}

ActDtype act_dtype(at::ScalarType t) {
  return t == at::kBFloat16 ? ActDtype::kBFloat16 : ActDtype::kFloat32;
}

// The problem without x and y, checked: the layer's tensors as aaac_kernels.cpu.prepare made them.
GemmProblem layer_problem(const at::Tensor& qbytes, const at::Tensor& scales, const at::Tensor& codebooks,
                          const std::vector<int64_t>& part_ends) {
  TORCH_CHECK(qbytes.dim() == 2 && qbytes.scalar_type() == at::kByte && qbytes.is_contiguous(),
              "aaac::linear: qbytes must be a contiguous uint8 [N, K / 2] tensor, got ", qbytes.sizes(), " ",
              qbytes.scalar_type());
  const int64_t n = qbytes.size(0), k = 2 * qbytes.size(1);
  TORCH_CHECK(scales.dim() == 2 && scales.size(0) == n && scales.size(1) > 0 && k % scales.size(1) == 0 &&
                  scales.scalar_type() == at::kHalf && scales.is_contiguous(),
              "aaac::linear: scales must be a contiguous fp16 [N, K / group_size] tensor, got ", scales.sizes());
  TORCH_CHECK(codebooks.dim() == 3 && codebooks.size(0) == static_cast<int64_t>(part_ends.size()) &&
                  codebooks.size(1) == 2 && codebooks.size(2) == 16 && codebooks.scalar_type() == at::kHalf &&
                  codebooks.is_contiguous(),
              "aaac::linear: codebooks must be a contiguous fp16 [parts, 2, 16] tensor, got ", codebooks.sizes());
  TORCH_CHECK(!part_ends.empty() && part_ends.back() == n, "aaac::linear: part_sizes sum to ",
              part_ends.empty() ? 0 : part_ends.back(), ", the layer has ", n, " output columns");
  GemmProblem p{};
  p.qbytes = qbytes.data_ptr<uint8_t>();
  p.scales = reinterpret_cast<const uint16_t*>(scales.data_ptr<at::Half>());
  p.codebooks = reinterpret_cast<const uint16_t*>(codebooks.data_ptr<at::Half>());
  p.part_ends = part_ends.data();
  p.n = n;
  p.k = k;
  p.group_size = k / scales.size(1);
  return p;
}

// The vector kernels read planes of 32 k, each in one group; other group sizes (multiples of 8) take
// the scalar path.
const IsaKernels& kernels_for(const GemmProblem& p) {
  return p.group_size % 32 == 0 ? kIsas[g_isa.load(std::memory_order_relaxed)] : kIsas[0];
}

std::vector<int64_t> part_ends_of(c10::IntArrayRef part_sizes) {
  std::vector<int64_t> ends;
  int64_t end = 0;
  for (int64_t size : part_sizes) ends.push_back(end += size);
  return ends;
}

// Columns per thread task: big enough to amortize the task, small enough to balance the threads.
constexpr int64_t kColumnGrain = 16;
// Bytes of one dequantized weight tile of the large-M path: it stays in L2 while the GEMM reads it,
// where K leaves it kMinTileColumns wide.
constexpr int64_t kTileBytes = 1024 * 1024;
// At least this many columns per tile, whatever K: each at::mm call reads all of x, so narrow tiles
// read x many times over (Llama-3.2-1B's down, K = 8192, at M = 1384 on the Zen 5: 1 MiB tiles of 64
// columns ran at 0.72x of vLLM's bf16, tiles of 256 columns at 0.91x; docs/kernels.md).
constexpr int64_t kMinTileColumns = 256;
// Bytes of 4-bit weights the decode kernel's passes share: they stay in L2 from one pass to the next.
constexpr int64_t kDecodeBlockBytes = 256 * 1024;

// Small M: x put once in the kernel's order (fp32 in its k order, or for the avx2 int16 kernel int16
// and a unit per chunk), then the weights streamed once per pass of kMaxDecodeRows rows. The passes run
// over a block of columns at a time, so that from the second pass on the block's weights come from L2.
void decode(const DecodeKernel& kernel, GemmProblem p, const at::Tensor& x, at::Tensor& y) {
  // The caller's buffer (the worker threads see only the pointer), 64-byte aligned: the kernels' x
  // loads must not straddle cache lines.
  thread_local std::vector<float> buffer;
  buffer.resize(p.m * p.k + 16);
  float* ordered = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(buffer.data()) + 63) & ~uintptr_t{63});
  kernel.order(p, x.data_ptr(), p.k, act_dtype(x.scalar_type()), ordered);
  const int64_t block = std::max<int64_t>(1, kDecodeBlockBytes / (p.k / 2) / kColumnGrain) * kColumnGrain;
  at::parallel_for(0, p.n, kColumnGrain, [&](int64_t n_begin, int64_t n_end) {
    GemmProblem rows = p;
    rows.x_stride = p.k;
    for (int64_t n0 = n_begin; n0 < n_end; n0 += block) {
      for (int64_t m0 = 0; m0 < p.m; m0 += kMaxDecodeRows) {
        rows.m = std::min(kMaxDecodeRows, p.m - m0);
        rows.x = ordered + m0 * p.k;
        rows.y = static_cast<char*>(y.data_ptr()) + m0 * p.y_stride * y.element_size();
        kernel.gemv(rows, n0, std::min(n_end, n0 + block));
      }
    }
  });
}

// Larger M: dequantize a tile of columns into an L2-sized buffer (the reference's weight, bit for
// bit, in the dtype of the multiply) and hand it to at::mm, so each weight is decoded once per call,
// not once per row of x. y is in x's dtype.
void tiled(const IsaKernels& isa, GemmProblem p, const at::Tensor& x_in, const std::optional<at::Tensor>& bias,
           at::Tensor& y) {
  const at::Tensor x = isa.bf16_tiles ? x_in : x_in.to(at::kFloat);
  const at::Tensor bias_x = bias ? bias->to(x.scalar_type()) : at::Tensor();
  p.y_dtype = act_dtype(x.scalar_type());  // the dtype dequant writes
  const int64_t tile_n = std::max<int64_t>(kMinTileColumns, kTileBytes / (p.k * x.element_size()) / 16 * 16);
  const int64_t tiles = (p.n + tile_n - 1) / tile_n;
  // at::parallel_for's threads do not inherit the caller's thread-local state: without it, a thread
  // outside the caller's inference mode may not write into y (an inference tensor when vLLM calls).
  const at::ThreadLocalState caller;
  at::parallel_for(0, tiles, 1, [&](int64_t t_begin, int64_t t_end) {
    const at::ThreadLocalStateGuard guard(caller);
    at::Tensor tile = at::empty({tile_n, p.k}, x.options());
    for (int64_t t = t_begin; t < t_end; ++t) {
      const int64_t n0 = t * tile_n, width = std::min(tile_n, p.n - n0);
      isa.dequant(p, n0, n0 + width, tile.data_ptr());
      const at::Tensor weight_t = tile.narrow(0, 0, width).t();
      // addmm adds the bias before the one rounding of the output.
      y.narrow(1, n0, width).copy_(bias ? at::addmm(bias_x.narrow(0, n0, width), x, weight_t) : at::mm(x, weight_t));
    }
  });
}

// bf16 batches on the path's GEMM (AMX tiles, or AVX512-BF16 panels): x packed once by the path's
// gemm_pack (pair-interleaved tiles of 16 rows, or the AVX512-BF16 GEMM's blocks of 8), each weight
// decoded once per call. The workspace (decoded panels and
// their fp32 sums) is kept per thread: it is reused call after call.
void gemm(const IsaKernels& isa, GemmProblem p, const at::Tensor& x) {
  at::Tensor packed = at::empty({amx_packed_elements(p.m, p.k)}, x.options());
  isa.gemm_pack(reinterpret_cast<const uint16_t*>(x.data_ptr()), p.m, p.k, p.x_stride,
                reinterpret_cast<uint16_t*>(packed.data_ptr()));
  p.x = packed.data_ptr();
  at::parallel_for(0, (p.n + kAmxPanelColumns - 1) / kAmxPanelColumns, 1, [&](int64_t b, int64_t e) {
    thread_local std::vector<char> workspace;
    workspace.resize(std::max<size_t>(workspace.size(), isa.gemm_workspace_bytes(p)));
    isa.gemm_bf16(p, kAmxPanelColumns * b, std::min(p.n, kAmxPanelColumns * e), workspace.data());
  });
}

at::Tensor linear_cpu(const at::Tensor& x_in, const at::Tensor& qbytes, const at::Tensor& scales,
                      const at::Tensor& codebooks, c10::IntArrayRef part_sizes, const std::optional<at::Tensor>& bias) {
  const std::vector<int64_t> part_ends = part_ends_of(part_sizes);
  GemmProblem p = layer_problem(qbytes, scales, codebooks, part_ends);
  TORCH_CHECK(x_in.size(-1) == p.k, "aaac::linear: x has ", x_in.size(-1), " features, the layer takes ", p.k);
  const IsaKernels& isa = kernels_for(p);
  const at::ScalarType out_dtype = x_in.scalar_type();
  const bool bf16 = out_dtype == at::kBFloat16;
  at::Tensor x = x_in.reshape({-1, p.k});
  p.m = x.size(0);
  const DecodeKernel& decoder = bf16 && isa.decode_bf16.gemv ? isa.decode_bf16 : isa.decode;
  const Path path = isa.gemm_bf16 && bf16 && p.m >= isa.gemm_min_rows && p.m <= isa.gemm_max_rows ? Path::kGemm
                    : p.m <= decoder.max_rows                          ? Path::kDecode
                                                                       : Path::kTiled;
  // fp16 activations are widened to fp32 once per call (bf16 and fp32 ones are read as they are); the
  // output keeps the activations' dtype.
  x = x.to(bf16 ? at::kBFloat16 : at::kFloat).contiguous();
  at::Tensor y = at::empty({p.m, p.n}, x.options().dtype(bf16 ? at::kBFloat16 : at::kFloat));
  at::Tensor bias_f32;
  if (bias.has_value() && path != Path::kTiled) {
    bias_f32 = bias->to(at::kFloat).contiguous();
    p.bias = bias_f32.data_ptr<float>();
  }
  p.x = x.data_ptr();
  p.x_stride = p.k;
  p.y = y.data_ptr();
  p.y_stride = p.n;
  p.y_dtype = act_dtype(y.scalar_type());
  if (p.m > 0) {
    switch (path) {
      case Path::kDecode: decode(decoder, p, x, y); break;
      case Path::kGemm: gemm(isa, p, x); break;
      case Path::kTiled: tiled(isa, p, x, bias, y); break;
    }
  }
  std::vector<int64_t> shape(x_in.sizes().begin(), x_in.sizes().end());
  shape.back() = p.n;
  return y.to(out_dtype).view(shape);
}

at::Tensor dequantize(const at::Tensor& qbytes, const at::Tensor& scales, const at::Tensor& codebooks,
                      std::vector<int64_t> part_sizes, at::ScalarType dtype) {
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "aaac dequantize: dtype must be float32 or bfloat16");
  const std::vector<int64_t> part_ends = part_ends_of(part_sizes);
  GemmProblem p = layer_problem(qbytes, scales, codebooks, part_ends);
  p.y_dtype = act_dtype(dtype);
  at::Tensor out = at::empty({p.n, p.k}, qbytes.options().dtype(dtype));
  const IsaKernels& isa = kernels_for(p);
  at::parallel_for(0, p.n, kColumnGrain, [&](int64_t b, int64_t e) {
    isa.dequant(p, b, e, static_cast<char*>(out.data_ptr()) + b * p.k * out.element_size());
  });
  return out;
}

std::vector<std::string> supported_isas() {
  std::vector<std::string> names;
  for (int i = 0; i < kNumIsas; ++i)
    if (cpu_has(i)) names.emplace_back(kIsas[i].name);
  return names;
}

void set_isa(const std::string& name) {
  const int i = isa_index(name);
  std::string known;
  for (const IsaKernels& isa : kIsas) known += std::string(known.empty() ? "" : ", ") + isa.name;
  TORCH_CHECK_VALUE(i >= 0, "unknown AAAC CPU kernel path '", name, "' (known: ", known, ")");
  TORCH_CHECK_VALUE(cpu_has(i), "this CPU cannot run the AAAC '", name, "' kernels (it supports: ",
                    c10::Join(", ", supported_isas()), ")");
  g_isa.store(i);
}

std::string current_isa() { return kIsas[g_isa.load()].name; }

// The encoder's group errors on the current path: the AVX2 loop on every vector path (each of their CPUs
// runs AVX2), the generic loop on `scalar`; both give the same errors and indices.
std::tuple<at::Tensor, at::Tensor> group_errors_on_path(const at::Tensor& w, const at::Tensor& u,
                                                        const at::Tensor& mean_square, const at::Tensor& scale,
                                                        const at::Tensor& codebooks) {
  return group_errors(w, u, mean_square, scale, codebooks, g_isa.load() > 0);
}

}  // namespace
}  // namespace aaac

TORCH_LIBRARY_IMPL(aaac, CPU, m) { m.impl("linear", &aaac::linear_cpu); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "AAAC CPU kernels (see aaac_kernels.cpu)";
  m.def("supported_isas", &aaac::supported_isas, "Kernel paths this CPU can run, most portable first");
  m.def("set_isa", &aaac::set_isa, "Use the kernel path of this name (ValueError if unknown or unsupported)");
  m.def("isa", &aaac::current_isa, "The kernel path in use");
  m.def("dequantize", &aaac::dequantize, "The dense [N, K] weight of a layer in the CPU layout, by the current path");
  m.def("nearest", &aaac::nearest, "(index, value) of each element's nearest entry of a sorted 16-entry codebook");
  m.def("group_errors", &aaac::group_errors_on_path,
        "(errors [C, N, groups], indices [C, N, groups, G]) of every group under each sorted 16-entry codebook");
}
