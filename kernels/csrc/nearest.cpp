// The encoder's inner loops: every weight's nearest entry of a sorted 16-entry codebook, and the
// activation-weighted error of every group under each codebook. The quantizer calls them ~100 times per
// layer (Lloyd iterations, scale search); torch.bucketize took ~20 ns per weight on the 2-core test
// machine, this loop well under 1 ns, and the errors computed here instead of in torch took the
// quantizer's own work about a third faster (docs/method.md). Generic x86-64 code (no fused multiply-add:
// each product and sum rounds as torch's do); the group errors have an AVX2 loop as well
// (encode_avx2.cpp), which gives the same bits.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <vector>

#include "cpu_kernels.h"

namespace aaac {
namespace {

// The number of the 15 sorted midpoints below v: the index of v's nearest entry (a tie goes to the lower).
inline int32_t count_below(const float* bounds, float v) {
  int32_t count = 0;
  for (int j = 0; j < 15; ++j) count += bounds[j] < v ? 1 : 0;
  return count;
}

}  // namespace

// (index, codebook[index]) for each element of u: index = the number of midpoints below the element,
// exactly torch.bucketize(u, midpoints) (right=False) for sorted midpoints.
std::tuple<at::Tensor, at::Tensor> nearest(const at::Tensor& u, const at::Tensor& midpoints,
                                           const at::Tensor& codebook) {
  TORCH_CHECK(u.device().is_cpu() && u.scalar_type() == at::kFloat, "nearest: u must be a float32 CPU tensor");
  TORCH_CHECK(midpoints.numel() == 15 && codebook.numel() == 16, "nearest: takes 15 midpoints and 16 entries");
  const at::Tensor x = u.contiguous();
  const at::Tensor mid = midpoints.to(at::kFloat).contiguous(), table = codebook.to(at::kFloat).contiguous();
  at::Tensor index = at::empty(x.sizes(), x.options().dtype(at::kLong));
  at::Tensor value = at::empty(x.sizes(), x.options());
  const float* in = x.data_ptr<float>();
  const float* m = mid.data_ptr<float>();
  const float* t = table.data_ptr<float>();
  int64_t* out_index = index.data_ptr<int64_t>();
  float* out_value = value.data_ptr<float>();
  float bounds[15], entries[16];
  for (int j = 0; j < 15; ++j) bounds[j] = m[j];
  for (int j = 0; j < 16; ++j) entries[j] = t[j];
  at::parallel_for(0, x.numel(), 1 << 14, [&](int64_t begin, int64_t end) {
    constexpr int64_t kTile = 256;
    int32_t below[kTile];
    for (int64_t start = begin; start < end; start += kTile) {
      const int64_t count = std::min(kTile, end - start);
      // Counting in its own loop lets the compiler compare a vector of elements against each midpoint.
      for (int64_t i = 0; i < count; ++i) below[i] = count_below(bounds, in[start + i]);
      for (int64_t i = 0; i < count; ++i) {
        out_index[start + i] = below[i];
        out_value[start + i] = entries[below[i]];
      }
    }
  });
  return {index, value};
}

// The generic loop: each weight's count of midpoints (a vector compare per midpoint, in its own loop),
// then the errors with one of 8 partial sums per weight (partial[i % 8]), added in order.
void group_errors_generic(const GroupErrorProblem& p, int64_t begin, int64_t end) {
  std::vector<int32_t> below(p.g);
  for (int64_t group = begin; group < end; ++group) {
    const float* uv = p.u + group * p.g;
    for (int64_t i = 0; i < p.g; ++i) below[i] = count_below(p.bounds, uv[i]);
    const float* wv = p.w + group * p.g;
    const float* ms = p.mean_square + (group % p.groups) * p.g;
    const float s = p.scale[group];
    uint8_t* out = p.indices + group * p.g;
    float partial[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    for (int64_t i = 0; i < p.g; ++i) {
      const float product = p.entries[below[i]] * s;
      const float diff = wv[i] - product;
      partial[i % 8] += diff * diff * ms[i];
      out[i] = static_cast<uint8_t>(below[i]);
    }
    float sum = 0.0f;
    for (float value : partial) sum += value;
    p.errors[group] = sum;
  }
}

// Per codebook (a sorted [16] row of codebooks [C, 16]) and group of G weights (w, and u = w / scale,
// [N, Gn, G]; mean_square [Gn, G]; scale [N, Gn, 1]): each weight's nearest entry of u, and the group's
// error sum mean_square (w - entry * scale)^2. Returns (errors [C, N, Gn] fp32, indices [C, N, Gn, G]
// uint8), as encode.group_errors's torch code computes them (the sums in another order). ``vector``
// takes the AVX2 loop where G is a multiple of 8: the same errors, bit for bit (encode_avx2.cpp).
std::tuple<at::Tensor, at::Tensor> group_errors(const at::Tensor& w_in, const at::Tensor& u_in,
                                                const at::Tensor& mean_square_in, const at::Tensor& scale_in,
                                                const at::Tensor& codebooks_in, bool vector) {
  for (const at::Tensor* t : {&w_in, &u_in, &mean_square_in, &scale_in, &codebooks_in})
    TORCH_CHECK(t->device().is_cpu() && t->scalar_type() == at::kFloat, "group_errors: takes float32 CPU tensors");
  TORCH_CHECK(w_in.dim() == 3 && u_in.sizes() == w_in.sizes(), "group_errors: w and u must be [N, groups, G]");
  const int64_t n = w_in.size(0), groups = w_in.size(1), g = w_in.size(2);
  TORCH_CHECK(mean_square_in.numel() == groups * g && scale_in.numel() == n * groups,
              "group_errors: mean_square must be [groups, G] and scale [N, groups, 1]");
  TORCH_CHECK(codebooks_in.dim() == 2 && codebooks_in.size(1) == 16, "group_errors: codebooks must be [C, 16]");
  const at::Tensor w = w_in.contiguous(), u = u_in.contiguous(), mean_square = mean_square_in.contiguous();
  const at::Tensor scale = scale_in.contiguous(), codebooks = codebooks_in.contiguous();
  const int64_t books = codebooks.size(0);
  at::Tensor errors = at::empty({books, n, groups}, w.options());
  at::Tensor indices = at::empty({books, n, groups, g}, w.options().dtype(at::kByte));
  const GroupErrorFn run = vector && g % 8 == 0 ? group_errors_avx2 : group_errors_generic;
  for (int64_t c = 0; c < books; ++c) {
    const float* entries = codebooks.data_ptr<float>() + 16 * c;
    float bounds[15];
    for (int j = 0; j < 15; ++j) bounds[j] = (entries[j + 1] + entries[j]) * 0.5f;  // as encode.nearest's
    const GroupErrorProblem problem{w.data_ptr<float>(),
                                    u.data_ptr<float>(),
                                    mean_square.data_ptr<float>(),
                                    scale.data_ptr<float>(),
                                    entries,
                                    bounds,
                                    groups,
                                    g,
                                    errors.data_ptr<float>() + c * n * groups,
                                    indices.data_ptr<uint8_t>() + c * n * groups * g};
    at::parallel_for(0, n * groups, std::max<int64_t>(1, (1 << 14) / g),
                     [&](int64_t begin, int64_t end) { run(problem, begin, end); });
  }
  return {errors, indices};
}

}  // namespace aaac
