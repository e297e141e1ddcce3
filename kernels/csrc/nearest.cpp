// The encoder's inner loop: every weight's nearest entry of a sorted 16-entry codebook. The quantizer
// calls it ~100 times per layer (Lloyd iterations, scale search); torch.bucketize took ~20 ns per weight
// on the 2-core test machine, this loop well under 1 ns. Generic x86-64 code (no ISA-specific path): the
// compiler vectorizes the count over the 15 midpoints.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cstdint>
#include <tuple>

namespace aaac {

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
      for (int64_t i = 0; i < count; ++i) {
        const float v = in[start + i];
        int32_t c = 0;
        for (int j = 0; j < 15; ++j) c += bounds[j] < v ? 1 : 0;
        below[i] = c;
      }
      for (int64_t i = 0; i < count; ++i) {
        out_index[start + i] = below[i];
        out_value[start + i] = entries[below[i]];
      }
    }
  });
  return {index, value};
}

}  // namespace aaac
