// AVX-512 with BF16: the bf16 dequantizer of the large-M path where there is no AMX (vpermw on the bf16
// tables of avx512_bf16_arith.h); fp32 output takes the AVX-512 one. Decoding runs the AVX-512 kernel.
#include <immintrin.h>

#include "scalar_convert.h"

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,fma,f16c")

#include "avx512_bf16_arith.h"

namespace aaac {

void dequant_avx512_bf16(const GemmProblem& p, int64_t n_begin, int64_t n_end, void* out) {
  if (p.y_dtype == ActDtype::kFloat32) return dequant_avx512(p, n_begin, n_end, out);
  dequant<Bf16>(p, n_begin, n_end, out);
}

}  // namespace aaac

#pragma GCC pop_options
