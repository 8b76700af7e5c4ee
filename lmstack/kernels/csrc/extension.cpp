// Python bindings of lmstack's CPU decoding kernels (built on first use by lmstack.nn.skinny_linear.load_kernel).
#include <torch/extension.h>

at::Tensor skinny_linear(at::Tensor x, at::Tensor weight, at::Tensor bias);
at::Tensor decode_step(at::Tensor x, std::vector<at::Tensor> weights, at::Tensor k_cache,
                          at::Tensor v_cache, int64_t slot, at::Tensor cos, at::Tensor sin,
                          at::Tensor key_mask, std::vector<int64_t> windows, std::vector<int64_t> shape,
                          double norm_eps, std::vector<at::Tensor> aux, std::vector<int64_t> formats);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("skinny_linear", &skinny_linear, "x @ w^T + b for x with 1 to 8 rows");
  m.def("decode_step", &decode_step, "one decoding step of a whole decoder: new-token embeddings -> logits");
}
