// Python bindings of lmstack's CPU decoding kernels (built on first use by lmstack.nn.skinny_linear.load_kernel).
#include <torch/extension.h>

at::Tensor skinny_linear(at::Tensor x, at::Tensor weight, at::Tensor bias);
at::Tensor decode_step(at::Tensor x, std::vector<at::Tensor> weights, at::Tensor k_cache,
                          at::Tensor v_cache, int64_t slot, at::Tensor cos, at::Tensor sin,
                          at::Tensor key_mask, std::vector<int64_t> windows, std::vector<int64_t> shape,
                          double norm_eps, std::vector<at::Tensor> aux, std::vector<int64_t> formats,
                          std::vector<at::Tensor> moe_weights, std::vector<at::Tensor> moe_aux,
                          std::vector<int64_t> moe_formats, std::vector<int64_t> moe_shape);
at::Tensor paged_decode_attention(at::Tensor q, at::Tensor k_pool, at::Tensor v_pool, at::Tensor slots,
                                  at::Tensor lengths, int64_t window, double scale);

// The kernels release the GIL while they run (their arguments are converted first): a server's event loop
// keeps answering while the engine thread computes.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using release = py::call_guard<py::gil_scoped_release>;
  m.def("skinny_linear", &skinny_linear, "x @ w^T + b for x with 1 to 64 rows", release());
  m.def("decode_step", &decode_step, "one decoding step of a whole decoder: new-token embeddings -> logits",
        release());
  m.def("paged_decode_attention", &paged_decode_attention, "one query per row over its keys in a paged KV pool",
        release());
}
