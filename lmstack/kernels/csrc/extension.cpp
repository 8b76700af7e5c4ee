// Python bindings of lmstack's CPU decoding kernels (built on first use by lmstack.nn.skinny_linear.load_kernel).
#include <torch/extension.h>

at::Tensor skinny_linear(at::Tensor x, at::Tensor weight, at::Tensor bias);
at::Tensor decode_step(at::Tensor x, const std::vector<at::Tensor>& weights, at::Tensor k_cache, at::Tensor v_cache,
                       int64_t slot, at::Tensor cos, at::Tensor sin, at::Tensor key_mask,
                       const std::vector<int64_t>& windows, const std::vector<int64_t>& shape, double norm_eps,
                       const std::vector<at::Tensor>& aux, const std::vector<int64_t>& formats,
                       const std::vector<at::Tensor>& moe_weights, const std::vector<at::Tensor>& moe_aux,
                       const std::vector<int64_t>& moe_formats, const std::vector<int64_t>& moe_shape);

// decode_step's model arguments, converted from Python once (about 300 tensors for a 30-layer model: their
// conversion on every call was ~5% of a quantized decoding step). They are tensor handles, so weights whose
// data is swapped in place are still the ones read; every call checks them as decode_step always does.
struct DecodeStepModel {
  std::vector<at::Tensor> weights;
  std::vector<int64_t> windows, shape;
  double norm_eps;
  std::vector<at::Tensor> aux;
  std::vector<int64_t> formats;
  std::vector<at::Tensor> moe_weights, moe_aux;
  std::vector<int64_t> moe_formats, moe_shape;

  at::Tensor step(at::Tensor x, at::Tensor k_cache, at::Tensor v_cache, int64_t slot, at::Tensor cos, at::Tensor sin,
                  at::Tensor key_mask) const {
    return decode_step(x, weights, k_cache, v_cache, slot, cos, sin, key_mask, windows, shape, norm_eps, aux, formats,
                       moe_weights, moe_aux, moe_formats, moe_shape);
  }
};
at::Tensor paged_decode_attention(at::Tensor q, at::Tensor k_pool, at::Tensor v_pool, at::Tensor slots,
                                  at::Tensor lengths, int64_t window, double scale);

// The kernels release the GIL while they run (their arguments are converted first): a server's event loop
// keeps answering while the engine thread computes.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using release = py::call_guard<py::gil_scoped_release>;
  m.def("skinny_linear", &skinny_linear, "x @ w^T + b for x with 1 to 64 rows", release());
  py::class_<DecodeStepModel>(m, "DecodeStepModel")
      .def(py::init<std::vector<at::Tensor>, std::vector<int64_t>, std::vector<int64_t>, double, std::vector<at::Tensor>,
                    std::vector<int64_t>, std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<int64_t>,
                    std::vector<int64_t>>(),
           "decode_step's model arguments (weights, windows, shape, norm_eps, aux, formats, moe_weights, moe_aux, "
           "moe_formats, moe_shape), kept for every step")
      .def("step", &DecodeStepModel::step,
           "one decoding step of the whole decoder (new-token embeddings -> logits) with the kept model arguments",
           release());
  m.def("paged_decode_attention", &paged_decode_attention, "one query per row over its keys in a paged KV pool",
        release());
}
