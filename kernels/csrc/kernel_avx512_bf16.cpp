// AVX-512 with BF16 (and VNNI, which every CPU with AVX512-BF16 has): the bf16 dequantizer of the large-M
// path where there is no AMX (vpermw on the bf16 tables of avx512_bf16_arith.h; fp32 output takes the
// AVX-512 one), and the int16 decode kernel for bf16 activations with vpdpwssd (avx512_int16.h; this path
// and amx_bf16 run it). fp32 activations decode with the AVX-512 kernel.
#include <immintrin.h>

#include "scalar_convert.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx512vnni,fma,f16c")

#include "avx512_bf16_arith.h"
#include "avx512_int16.h"

namespace aaac {
namespace {

// The int16 kernel's products: vpdpwssd, 32 products and 16 sums added in one instruction.
struct VnniDot {
  static __m512i add(__m512i sums, __m512i w, __m512i x) { return _mm512_dpwssd_epi32(sums, w, x); }
};

}  // namespace

void gemv_int16_avx512_vnni(const GemmProblem& p, int64_t n_begin, int64_t n_end) {
  gemv_int16<VnniDot>(p, n_begin, n_end);
}

void dequant_avx512_bf16(const GemmProblem& p, int64_t n_begin, int64_t n_end, void* out) {
  if (p.y_dtype == ActDtype::kFloat32) return dequant_avx512(p, n_begin, n_end, out);
  dequant<Bf16>(p, n_begin, n_end, out);
}

}  // namespace aaac

#pragma GCC pop_options
