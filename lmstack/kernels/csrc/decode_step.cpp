// One decoding step of a whole decoder in one call: the new tokens' embeddings in, next-token logits out.
//
// The same arithmetic as lmstack.models.Decoder (pre-norm blocks, GQA attention over a static KV cache,
// plain or gated MLP), for 1 to 8 rows in fp32. Fusing the step removes what eager PyTorch spends
// between the weight reads of a memory-bound step (~150 operator calls for a 12-layer model), so the
// memory bus is kept busy streaming weights. Embeddings, positions and RoPE angles are computed in Python
// (they vary by family and are cheap); lmstack/generate/fused_step.py builds the arguments and checks that
// a model is one this step can run. A linear may hold fp32 weights or low-bit ones (int8, int4, NF4:
// quant_kernels.h), described per linear by `formats` and `aux`.
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "dynamic_kernels.h"
#include "quant_kernels.h"
#include "skinny_kernels.h"

namespace {

using lmstack::Epilogue;

// The order of each layer's tensors in `weights` (an absent bias or norm bias is an empty tensor).
enum LayerSlot {
  kAttnNormW, kAttnNormB, kQW, kQB, kKW, kKB, kVW, kVB, kOW, kOB,
  kMlpNormW, kMlpNormB, kInW, kInB, kUpW, kUpB, kOutW, kOutB, kPerLayer
};

struct Shape {
  int64_t rows, dim, n_heads, n_kv_heads, head_dim, ffn_dim, vocab, max_len;
  bool rmsnorm, gated, rope;
  Epilogue activation;
  float eps;
};

const float* data(const at::Tensor& t) { return t.defined() && t.numel() ? t.data_ptr<float>() : nullptr; }

// LayerNorm ((x - mean) / std * w + b) or RMSNorm (x / rms * w) of each row of x (rows, C) into y.
void normalize(const float* x, float* y, const float* w, const float* b, const Shape& s) {
  const int64_t C = s.dim;
  for (int64_t r = 0; r < s.rows; ++r) {
    const float* xr = x + r * C;
    float* yr = y + r * C;
    double mean = 0.0, sq = 0.0;
    if (!s.rmsnorm) {
      for (int64_t i = 0; i < C; ++i) mean += xr[i];
      mean /= C;
    }
    for (int64_t i = 0; i < C; ++i) sq += (xr[i] - mean) * (xr[i] - mean);
    const float inv = 1.0f / std::sqrt(static_cast<float>(sq / C) + s.eps);
    for (int64_t i = 0; i < C; ++i) yr[i] = (xr[i] - static_cast<float>(mean)) * inv * w[i] + (b ? b[i] : 0.0f);
  }
}

// Rotate-half RoPE of `heads` vectors of width D per row, in place; cos, sin: (rows, D).
void rotate(float* x, int64_t heads, const float* cos, const float* sin, const Shape& s) {
  const int64_t D = s.head_dim, half = D / 2;
  for (int64_t r = 0; r < s.rows; ++r)
    for (int64_t h = 0; h < heads; ++h) {
      float* v = x + (r * heads + h) * D;
      const float *c = cos + r * D, *sn = sin + r * D;
      for (int64_t i = 0; i < half; ++i) {
        const float a = v[i], b = v[i + half];
        v[i] = a * c[i] - b * sn[i];
        v[i + half] = b * c[i + half] + a * sn[i + half];
      }
    }
}

// Attention of each row's new query (H heads) over cache slots [lo, slot] of its layer's keys and values
// (rows, Hkv, max_len, D); slots whose key_mask entry is 0 (left padding) are skipped.
void attend_cached(const float* q, const float* k, const float* v, const int64_t* key_mask, int64_t mask_stride,
                   float* out, float* scores, int64_t slot, int64_t window, const Shape& s) {
  const int64_t H = s.n_heads, D = s.head_dim, group = s.n_heads / s.n_kv_heads;
  const int64_t lo = window > 0 ? std::max<int64_t>(0, slot - window + 1) : 0, n = slot + 1;
  const float scale = 1.0f / std::sqrt(static_cast<float>(D));
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t r = 0; r < s.rows; ++r)
    for (int64_t h = 0; h < H; ++h) {
      const float* qv = q + (r * H + h) * D;
      const int64_t kv_offset = (r * s.n_kv_heads + h / group) * s.max_len * D;
      const float *kr = k + kv_offset, *vr = v + kv_offset;
      float* p = scores + (r * H + h) * n;
      float* o = out + (r * H + h) * D;
      float top = -std::numeric_limits<float>::infinity();
      for (int64_t j = lo; j < n; ++j) {
        const bool hidden = key_mask && key_mask[r * mask_stride + j] == 0;
        p[j] = hidden ? -std::numeric_limits<float>::infinity() : lmstack::dot(qv, kr + j * D, D) * scale;
        top = std::max(top, p[j]);
      }
      float total = 0.0f;
      std::fill(o, o + D, 0.0f);
      for (int64_t j = lo; j < n; ++j) {
        if (p[j] == -std::numeric_limits<float>::infinity()) continue;
        const float e = std::exp(p[j] - top);
        total += e;
        lmstack::axpy(e, vr + j * D, o, D);
      }
      for (int64_t i = 0; i < D; ++i) o[i] /= total;  // the new token sees itself, so total > 0
    }
}

// How one linear's weight is stored: kFp32 (w is the fp32 matrix) or a low-bit format whose extra tensors
// are in aux (six per linear, an absent one empty): int8 [scales (per row, or per group: group > 0), -, -, -,
// -, input_scale]; int4 [scales, zeros, mins (instead of zeros: weight = code * scale + min), -, -,
// input_scale]; nf4 [absmax_codes, absmax_scales (or the plain absmax without double
// quantization), absmax_code, levels, offset, input_scale]. kInt8Dynamic and kInt4Dynamic store weights as
// kInt8 and kInt4 do and quantize the input to int8 first (dynamic_kernels.h).
enum Format : int64_t { kFp32 = 0, kInt8 = 1, kInt4 = 2, kNf4 = 3, kInt8Dynamic = 4, kInt4Dynamic = 5 };
constexpr int kAux = 6;

struct Linear {
  const at::Tensor* w;
  const at::Tensor* b;
  const at::Tensor* aux;
  int64_t format, group;
};

template <class T>
const T* ptr(const at::Tensor& t) { return t.defined() && t.numel() ? t.data_ptr<T>() : nullptr; }

void matmul(const float* x, const Linear& L, float* y, const Shape& s, Epilogue e = Epilogue::kStore) {
  const int64_t n_out = L.w->size(0);
  if (L.format == kFp32) {
    lmstack::skinny_matmul(x, L.w->data_ptr<float>(), data(*L.b), y, s.rows, n_out, L.w->size(1), e);
    return;
  }
  const bool int8 = L.format == kInt8 || L.format == kInt8Dynamic;
  const int64_t n_in = int8 ? L.w->size(1) : 2 * L.w->size(1);
  std::vector<float> scaled;
  if (const float* input_scale = ptr<float>(L.aux[5])) {  // AWQ: x * input_scale per input channel
    scaled.assign(x, x + s.rows * n_in);
    for (int64_t r = 0; r < s.rows; ++r)
      for (int64_t k = 0; k < n_in; ++k) scaled[r * n_in + k] *= input_scale[k];
    x = scaled.data();
  }
  const int threads = at::get_num_threads();
  const float* bias = data(*L.b);
  int failed = 1;
  if (L.format == kInt8) {
    failed = lmstack::quant::int8_matmul(x, ptr<int8_t>(*L.w), ptr<float>(L.aux[0]), bias, y, s.rows, n_out, n_in,
                                         L.group, threads, e);
  } else if (L.format == kInt4) {
    failed = lmstack::quant::int4_matmul(x, ptr<uint8_t>(*L.w), ptr<float>(L.aux[0]), ptr<int8_t>(L.aux[1]),
                                         ptr<float>(L.aux[2]), bias, y, s.rows, n_out, n_in, L.group, threads, e);
  } else if (L.format == kInt8Dynamic) {
    failed = lmstack::quant::int8_dynamic_matmul(x, ptr<int8_t>(*L.w), ptr<float>(L.aux[0]), bias, y, s.rows, n_out,
                                                 n_in, L.group, threads, e);
  } else if (L.format == kInt4Dynamic) {
    failed = lmstack::quant::int4_dynamic_matmul(x, ptr<uint8_t>(*L.w), ptr<float>(L.aux[0]), ptr<int8_t>(L.aux[1]),
                                                 ptr<float>(L.aux[2]), bias, y, s.rows, n_out, n_in, L.group, threads,
                                                 e);
  } else if (L.format == kNf4) {
    const float offset = L.aux[4].numel() ? L.aux[4].item<float>() : 0.0f;
    failed = lmstack::quant::nf4_matmul(x, ptr<uint8_t>(*L.w), ptr<float>(L.aux[3]), ptr<uint8_t>(L.aux[0]),
                                        ptr<float>(L.aux[2]) ? ptr<float>(L.aux[2]) : ptr<float>(L.aux[1]),
                                        ptr<float>(L.aux[1]), offset, bias, y, s.rows, n_out, n_in, threads, e);
  }
  TORCH_CHECK(!failed, "decode_step: unsupported weight format ", L.format, " or shape");
}

void check_fp32(const at::Tensor& t, const char* what) {
  TORCH_CHECK(!t.numel() || (t.scalar_type() == at::kFloat && t.is_contiguous() && t.device().is_cpu()),
              "decode_step: ", what, " must be a contiguous fp32 CPU tensor");
}

}  // namespace

// x: (B, C) embeddings of the new tokens (positions added), overwritten as the residual stream.
// weights: kPerLayer tensors per layer (LayerSlot order), then the final norm's weight and bias and the
//   LM head (V, C). k_cache, v_cache: (L, B, Hkv, max_len, D); the new keys/values go to slot `slot`.
// cos, sin: (B, D) RoPE factors, or empty without RoPE. key_mask: (B, >= slot + 1) int64, 0 = padding,
//   or empty. windows: per layer, the sliding-window size or 0. shape: n_heads, n_kv_heads, rmsnorm (0/1),
//   gated (0/1), activation (an Epilogue). formats: (format, group size) per linear, in the order q, k, v,
//   o, mlp in, mlp up, mlp out of each layer, then the LM head; aux: kAux tensors per linear, same order
//   (see Format). Returns logits (B, V).
at::Tensor decode_step(at::Tensor x, std::vector<at::Tensor> weights, at::Tensor k_cache,
                          at::Tensor v_cache, int64_t slot, at::Tensor cos, at::Tensor sin,
                          at::Tensor key_mask, std::vector<int64_t> windows, std::vector<int64_t> shape,
                          double norm_eps, std::vector<at::Tensor> aux, std::vector<int64_t> formats) {
  const int64_t n_layers = static_cast<int64_t>(windows.size());
  TORCH_CHECK(shape.size() == 5, "decode_step: shape takes 5 entries");
  TORCH_CHECK(static_cast<int64_t>(weights.size()) == n_layers * kPerLayer + 3, "decode_step: expected ",
              n_layers * kPerLayer + 3, " weight tensors, got ", weights.size());
  TORCH_CHECK(x.dim() == 2 && x.size(0) >= 1 && x.size(0) <= 8, "decode_step takes 1 to 8 rows");
  TORCH_CHECK(k_cache.dim() == 5 && k_cache.size(0) == n_layers && k_cache.size(1) == x.size(0) &&
                  k_cache.sizes() == v_cache.sizes(), "decode_step: cache shape does not match the model/batch");
  const int64_t n_linears = n_layers * 7 + 1;
  TORCH_CHECK(static_cast<int64_t>(formats.size()) == 2 * n_linears && static_cast<int64_t>(aux.size()) == kAux * n_linears,
              "decode_step: expected ", n_linears, " linear descriptions");
  static const LayerSlot kLinearSlots[7] = {kQW, kKW, kVW, kOW, kInW, kUpW, kOutW};
  auto linear = [&](int64_t l, int i) {  // linear i of layer l (l == n_layers: the LM head)
    const int64_t index = l * 7 + i;
    const at::Tensor* w = l < n_layers ? &weights[l * kPerLayer + kLinearSlots[i]] : &weights.back();
    static const at::Tensor kNone;
    const at::Tensor* b = l < n_layers ? w + 1 : &kNone;
    return Linear{w, b, aux.data() + kAux * index, formats[2 * index], formats[2 * index + 1]};
  };
  std::vector<bool> low_bit(weights.size(), false);  // low-bit weights are checked by their kernels' shapes
  for (int64_t l = 0; l <= n_layers; ++l)
    for (int i = 0; i < (l < n_layers ? 7 : 1); ++i) {
      const Linear L = linear(l, i);
      if (L.format != kFp32) low_bit[L.w - weights.data()] = true;
    }
  for (size_t i = 0; i < weights.size(); ++i)
    if (!low_bit[i]) check_fp32(weights[i], "every fp32 weight");
  check_fp32(x, "x"), check_fp32(k_cache, "k_cache"), check_fp32(v_cache, "v_cache");
  check_fp32(cos, "cos"), check_fp32(sin, "sin");
  TORCH_CHECK(!key_mask.numel() || (key_mask.scalar_type() == at::kLong && key_mask.is_contiguous() &&
                                    key_mask.size(1) > slot), "decode_step: key_mask must be contiguous int64 (B, > slot)");

  const at::Tensor& head = weights.back();
  Shape s{x.size(0), x.size(1), shape[0], shape[1], k_cache.size(4), weights[kInW].size(0), head.size(0),
          k_cache.size(3), shape[2] != 0, shape[3] != 0, cos.numel() > 0, static_cast<Epilogue>(shape[4]),
          static_cast<float>(norm_eps)};
  TORCH_CHECK(slot >= 0 && slot < s.max_len, "decode_step: slot ", slot, " outside the cache of ", s.max_len);
  const int64_t HD = s.n_heads * s.head_dim, KD = s.n_kv_heads * s.head_dim;

  std::vector<float> h(s.rows * s.dim), q(s.rows * HD), k(s.rows * KD), v(s.rows * KD), attn(s.rows * HD),
      mid(s.rows * s.ffn_dim), up(s.gated ? s.rows * s.ffn_dim : 0), scores(s.rows * s.n_heads * (slot + 1));
  float* stream = x.data_ptr<float>();
  const int64_t* mask = key_mask.numel() ? key_mask.data_ptr<int64_t>() : nullptr;
  const int64_t layer_stride = k_cache.stride(0);

  for (int64_t l = 0; l < n_layers; ++l) {
    const at::Tensor* w = weights.data() + l * kPerLayer;
    normalize(stream, h.data(), data(w[kAttnNormW]), data(w[kAttnNormB]), s);
    matmul(h.data(), linear(l, 0), q.data(), s);
    matmul(h.data(), linear(l, 1), k.data(), s);
    matmul(h.data(), linear(l, 2), v.data(), s);
    if (s.rope) {
      rotate(q.data(), s.n_heads, data(cos), data(sin), s);
      rotate(k.data(), s.n_kv_heads, data(cos), data(sin), s);
    }
    float* k_layer = k_cache.data_ptr<float>() + l * layer_stride;
    float* v_layer = v_cache.data_ptr<float>() + l * layer_stride;
    for (int64_t r = 0; r < s.rows; ++r)
      for (int64_t g = 0; g < s.n_kv_heads; ++g) {
        const int64_t at = ((r * s.n_kv_heads + g) * s.max_len + slot) * s.head_dim;
        std::copy_n(k.data() + (r * s.n_kv_heads + g) * s.head_dim, s.head_dim, k_layer + at);
        std::copy_n(v.data() + (r * s.n_kv_heads + g) * s.head_dim, s.head_dim, v_layer + at);
      }
    attend_cached(q.data(), k_layer, v_layer, mask, key_mask.numel() ? key_mask.size(1) : 0, attn.data(),
                  scores.data(), slot, windows[l], s);
    matmul(attn.data(), linear(l, 3), stream, s, Epilogue::kAccumulate);

    normalize(stream, h.data(), data(w[kMlpNormW]), data(w[kMlpNormB]), s);
    matmul(h.data(), linear(l, 4), mid.data(), s, s.activation);
    if (s.gated) {
      matmul(h.data(), linear(l, 5), up.data(), s);
      for (size_t i = 0; i < mid.size(); ++i) mid[i] *= up[i];
    }
    matmul(mid.data(), linear(l, 6), stream, s, Epilogue::kAccumulate);
  }
  const at::Tensor* final_norm = weights.data() + n_layers * kPerLayer;
  normalize(stream, h.data(), data(final_norm[0]), data(final_norm[1]), s);
  auto logits = at::empty({s.rows, s.vocab}, x.options());
  matmul(h.data(), linear(n_layers, 0), logits.data_ptr<float>(), s);
  return logits;
}
