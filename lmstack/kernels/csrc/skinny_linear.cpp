// torch entry point for the skinny matmul kernels (skinny_kernels.h): SkinnyLinear's forward.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include "skinny_kernels.h"

// x: (B, n_in) with 1 <= B <= 64; weight: (n_out, n_in); bias: (n_out,) or empty. All fp32, contiguous.
at::Tensor skinny_linear(at::Tensor x, at::Tensor weight, at::Tensor bias) {
  TORCH_CHECK(x.dim() == 2 && weight.dim() == 2 && x.size(1) == weight.size(1), "skinny_linear: shape mismatch");
  TORCH_CHECK(x.is_contiguous() && weight.is_contiguous() && (!bias.numel() || bias.is_contiguous()),
              "skinny_linear takes contiguous tensors");
  TORCH_CHECK(x.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat, "skinny_linear takes fp32");
  const int64_t B = x.size(0), n_in = x.size(1), n_out = weight.size(0);
  auto y = at::empty({B, n_out}, x.options());
  const float* b = bias.numel() ? bias.data_ptr<float>() : nullptr;
  const bool ok = lmstack::skinny_matmul(x.data_ptr<float>(), weight.data_ptr<float>(), b, y.data_ptr<float>(), B,
                                         n_out, n_in);
  TORCH_CHECK(ok, "skinny_linear takes 1 to 64 rows, got ", B);
  return y;
}
