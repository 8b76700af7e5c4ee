// One decoding step of a whole decoder in one call: the new tokens' embeddings in, next-token logits out.
//
// The same arithmetic as lmstack.models.Decoder (pre-norm blocks, GQA attention over a static KV cache,
// plain or gated MLP), for 1 to 8 rows in fp32. Fusing the step removes what eager PyTorch spends
// between the weight reads of a memory-bound step (~150 operator calls for a 12-layer model), so the
// memory bus is kept busy streaming weights. Embeddings, positions and RoPE angles are computed in Python
// (they vary by family and are cheap); lmstack/generate/fused_step.py builds the arguments and checks that
// a model is one this step can run. A linear may hold fp32 weights or low-bit ones (int8, int4, NF4:
// quant_kernels.h), described per linear by `formats` and `aux`. A layer's feed-forward may be a mixture of
// experts (lmstack.nn.moe.MoE): the router picks each row's top-k experts, and only those experts' weights
// are read (rows that chose the same expert share one pass over its weights).
#include <ATen/core/Tensor.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <initializer_list>
#include <limits>
#include <vector>

#include "dynamic_kernels.h"
#include "quant_kernels.h"
#include "skinny_kernels.h"

namespace {

using lmstack::Epilogue;

// The order of each layer's tensors in `weights` (an absent bias or norm bias is an empty tensor).
// kQNormW, kKNormW: the per-head RMSNorm weights (D) of queries and keys (Qwen3), or empty.
enum LayerSlot {
  kAttnNormW, kAttnNormB, kQW, kQB, kKW, kKB, kVW, kVB, kOW, kOB,
  kMlpNormW, kMlpNormB, kInW, kInB, kUpW, kUpB, kOutW, kOutB, kQNormW, kQNormB, kKNormW, kKNormB, kPerLayer
};

struct Shape {
  int64_t rows, dim, n_heads, n_kv_heads, head_dim, vocab, max_len;
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

// RMSNorm of each of the `heads` vectors of width D per row, in place (weight w of width D).
void normalize_heads(float* x, int64_t heads, const float* w, const Shape& s) {
  const int64_t D = s.head_dim;
  for (int64_t i = 0; i < s.rows * heads; ++i) {
    float* v = x + i * D;
    double sq = 0.0;
    for (int64_t j = 0; j < D; ++j) sq += static_cast<double>(v[j]) * v[j];
    const float inv = 1.0f / std::sqrt(static_cast<float>(sq / D) + s.eps);
    for (int64_t j = 0; j < D; ++j) v[j] = v[j] * inv * w[j];
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

// One query head over keys [lo, n) of its key/value head (kr, vr: (max_len, D)) into o (D): scores into p,
// their softmax, the weighted sum of values. D8 = D / 8 is a compile-time count of vectors, so that the query
// stays in registers while the keys stream past, four at a time (one horizontal reduction for four scores), and
// the output stays in registers while the values stream past.
template <int D8>
void attend_head(const float* qv, const float* kr, const float* vr, const int64_t* mask_row, float* p, float* o,
                 int64_t lo, int64_t n, float scale) {
  constexpr int64_t D = 8 * D8;
  __m256 qr[D8];
  for (int i = 0; i < D8; ++i) qr[i] = _mm256_loadu_ps(qv + 8 * i);
  int64_t j = lo;
  for (; j + 4 <= n; j += 4) {
    __m256 a[4];
    for (int t = 0; t < 4; ++t) {
      a[t] = _mm256_mul_ps(qr[0], _mm256_loadu_ps(kr + (j + t) * D));
      for (int i = 1; i < D8; ++i) a[t] = _mm256_fmadd_ps(qr[i], _mm256_loadu_ps(kr + (j + t) * D + 8 * i), a[t]);
    }
    const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
    const __m128 dots = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));  // keys j .. j + 3
    _mm_storeu_ps(p + j, _mm_mul_ps(dots, _mm_set1_ps(scale)));
  }
  for (; j < n; ++j) {
    __m256 a = _mm256_mul_ps(qr[0], _mm256_loadu_ps(kr + j * D));
    for (int i = 1; i < D8; ++i) a = _mm256_fmadd_ps(qr[i], _mm256_loadu_ps(kr + j * D + 8 * i), a);
    p[j] = lmstack::horizontal_sum(a) * scale;
  }
  if (mask_row)
    for (j = lo; j < n; ++j)
      if (mask_row[j] == 0) p[j] = -std::numeric_limits<float>::infinity();
  const float top = *std::max_element(p + lo, p + n);
  // vectorised exp (std::exp per score was ~10% of a decode step at 256 keys); a padding slot's -inf
  // becomes e^-87 there, never read: the value loop skips it
  const float total = lmstack::exp_and_sum(p + lo, n - lo, top);
  __m256 acc[D8];
  for (int i = 0; i < D8; ++i) acc[i] = _mm256_setzero_ps();
  for (j = lo; j < n; ++j) {
    if (mask_row && mask_row[j] == 0) continue;
    const __m256 w = _mm256_set1_ps(p[j]);
    for (int i = 0; i < D8; ++i) acc[i] = _mm256_fmadd_ps(w, _mm256_loadu_ps(vr + j * D + 8 * i), acc[i]);
  }
  const __m256 t = _mm256_set1_ps(total);  // the new token sees itself, so total > 0
  for (int i = 0; i < D8; ++i) _mm256_storeu_ps(o + 8 * i, _mm256_div_ps(acc[i], t));
}

// The same for any head width: dot products and value sums through memory.
void attend_head_any(const float* qv, const float* kr, const float* vr, const int64_t* mask_row, float* p, float* o,
                     int64_t lo, int64_t n, float scale, int64_t D) {
  for (int64_t j = lo; j < n; ++j)
    p[j] = mask_row && mask_row[j] == 0 ? -std::numeric_limits<float>::infinity() : lmstack::dot(qv, kr + j * D, D) * scale;
  const float top = *std::max_element(p + lo, p + n);
  const float total = lmstack::exp_and_sum(p + lo, n - lo, top);
  std::fill(o, o + D, 0.0f);
  for (int64_t j = lo; j < n; ++j) {
    if (mask_row && mask_row[j] == 0) continue;
    lmstack::axpy(p[j], vr + j * D, o, D);
  }
  for (int64_t i = 0; i < D; ++i) o[i] /= total;
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
      const int64_t* mask_row = key_mask ? key_mask + r * mask_stride : nullptr;
      float* p = scores + (r * H + h) * n;
      float* o = out + (r * H + h) * D;
      switch (D) {
        case 32: attend_head<4>(qv, kr, vr, mask_row, p, o, lo, n, scale); break;
        case 64: attend_head<8>(qv, kr, vr, mask_row, p, o, lo, n, scale); break;
        case 128: attend_head<16>(qv, kr, vr, mask_row, p, o, lo, n, scale); break;
        default: attend_head_any(qv, kr, vr, mask_row, p, o, lo, n, scale, D);
      }
    }
}

// How one linear's weight is stored: kFp32 (w is the fp32 matrix) or a low-bit format whose extra tensors
// are in aux (six per linear, an absent one empty): int8 [scales (per row, or per group: group > 0), -, -, -,
// -, input_scale]; int4 [scales, zeros, mins (instead of zeros: weight = code * scale + min), -, -,
// input_scale]; nf4 [absmax_codes, absmax_scales (or the plain absmax without double
// quantization), absmax_code, levels, offset, input_scale]. kInt8Dynamic and kInt4Dynamic store weights as
// kInt8 and kInt4 do and quantize the input to int8 first (dynamic_kernels.h). kSparse24: w holds the kept
// half of a 2:4-sparse fp32 weight (n_out, n_in / 2) and aux[0] its position codes (quant_kernels.h).
enum Format : int64_t { kFp32 = 0, kInt8 = 1, kInt4 = 2, kNf4 = 3, kInt8Dynamic = 4, kInt4Dynamic = 5, kSparse24 = 6 };
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
  const int64_t n_in = int8 ? L.w->size(1) : 2 * L.w->size(1);  // 4-bit: two codes a byte; 2:4: half the inputs
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
  } else if (L.format == kSparse24) {
    failed = lmstack::quant::sparse24_matmul(x, ptr<float>(*L.w), ptr<uint8_t>(L.aux[0]), bias, y, s.rows, n_out, n_in,
                                             threads, e);
  } else if (L.format == kNf4) {
    const float offset = L.aux[4].numel() ? L.aux[4].item<float>() : 0.0f;
    failed = lmstack::quant::nf4_matmul(x, ptr<uint8_t>(*L.w), ptr<float>(L.aux[3]), ptr<uint8_t>(L.aux[0]),
                                        ptr<float>(L.aux[2]) ? ptr<float>(L.aux[2]) : ptr<float>(L.aux[1]),
                                        ptr<float>(L.aux[1]), offset, bias, y, s.rows, n_out, n_in, threads, e);
  }
  TORCH_CHECK(!failed, "decode_step: unsupported weight format ", L.format, " or shape");
}

// y_i = L_i x for linears that read the same x: one call (x quantized once, one parallel region) where all are
// int8 or all int4 with int8 activations, of one group size and without AWQ's input scale; else one by one.
void matmuls(const float* x, std::initializer_list<const Linear*> linears, std::initializer_list<float*> outputs,
             std::initializer_list<Epilogue> epilogues, const Shape& s) {
  const Linear& first = **linears.begin();
  bool together = first.format == kInt8Dynamic || first.format == kInt4Dynamic;
  for (const Linear* L : linears)
    together = together && L->format == first.format && L->group == first.group && !L->aux[5].numel();
  if (together) {
    lmstack::quant::DynamicPart parts[3];  // q, k, v at most: no allocation per layer and step
    TORCH_CHECK(linears.size() <= 3, "decode_step: matmuls takes at most 3 linears");
    int n = 0;
    auto y = outputs.begin();
    auto e = epilogues.begin();
    for (const Linear* L : linears)
      parts[n++] = {L->w->data_ptr(), ptr<float>(L->aux[0]), ptr<int8_t>(L->aux[1]), ptr<float>(L->aux[2]),
                    data(*L->b), *y++, L->w->size(0), *e++};
    const bool int8 = first.format == kInt8Dynamic;
    const int64_t n_in = int8 ? first.w->size(1) : 2 * first.w->size(1);
    const int threads = at::get_num_threads();
    const int failed = int8 ? lmstack::quant::int8_dynamic_matmuls(x, s.rows, n_in, first.group, parts, n, threads)
                            : lmstack::quant::int4_dynamic_matmuls(x, s.rows, n_in, first.group, parts, n, threads);
    TORCH_CHECK(!failed, "decode_step: unsupported weight format ", first.format, " or shape");
    return;
  }
  auto y = outputs.begin();
  auto e = epilogues.begin();
  for (const Linear* L : linears) matmul(x, *L, *y++, s, *e++);
}

// The feed-forward block of the rows of x (s.rows, C): out(act(in x) [* up x]), stored into or added to y.
// mid, up: scratch of at least s.rows * the hidden width.
void feed_forward(const float* x, const Linear& in, const Linear& up_proj, const Linear& out, float* y, Epilogue mode,
                  const Shape& s, float* mid, float* up) {
  const int64_t width = in.w->size(0);
  if (s.gated) {
    matmuls(x, {&in, &up_proj}, {mid, up}, {s.activation, Epilogue::kStore}, s);
    for (int64_t i = 0; i < s.rows * width; ++i) mid[i] *= up[i];
  } else {
    matmul(x, in, mid, s, s.activation);
  }
  matmul(mid, out, y, s, mode);
}

// One layer's mixture of experts (lmstack.nn.moe.MoE): `linears` holds 3 per expert (in, up, out), then the
// shared expert's 3 and its gate when present.
struct Experts {
  int64_t count = 0, top_k = 0;
  bool normalize = false, sigmoid = false, shared = false, shared_gate = false;
  const at::Tensor* router = nullptr;  // (E, C) fp32
  std::vector<Linear> linears;
};

// Scratch of the mixture-of-experts layers, made once per step (mid, up: sized for the widest expert).
struct ExpertScratch {
  std::vector<float> logits, rows_in, rows_out, gate, mid, up;
};

// Adds the mixture's output for every row of h (s.rows, C) to stream: sum over the row's top-k experts of
// weight * expert(h) (+ [sigmoid(gate . h) *] shared(h)). The weights are those of lmstack.nn.moe.TopKRouter:
// softmax (or sigmoid) scores of the router logits, the k best, divided by their sum if `normalize`.
void mixture(const float* h, const Experts& m, float* stream, const Shape& s, ExpertScratch& t) {
  const int64_t E = m.count, C = s.dim, K = m.top_k;
  t.logits.resize(s.rows * E);
  lmstack::skinny_matmul(h, m.router->data_ptr<float>(), nullptr, t.logits.data(), s.rows, E, C, Epilogue::kStore);
  std::vector<int64_t> chosen(s.rows * K);
  std::vector<float> weight(s.rows * K);
  std::vector<int64_t> order(E);
  for (int64_t r = 0; r < s.rows; ++r) {
    float* p = t.logits.data() + r * E;
    if (m.sigmoid) {
      for (int64_t e = 0; e < E; ++e) p[e] = 1.0f / (1.0f + std::exp(-p[e]));
    } else {
      const float top = *std::max_element(p, p + E);
      float total = 0.0f;
      for (int64_t e = 0; e < E; ++e) total += (p[e] = std::exp(p[e] - top));
      for (int64_t e = 0; e < E; ++e) p[e] /= total;
    }
    for (int64_t e = 0; e < E; ++e) order[e] = e;
    std::partial_sort(order.begin(), order.begin() + K, order.end(),
                      [p](int64_t a, int64_t b) { return p[a] > p[b] || (p[a] == p[b] && a < b); });
    float kept = 0.0f;
    for (int64_t j = 0; j < K; ++j) kept += p[order[j]];
    for (int64_t j = 0; j < K; ++j) {
      chosen[r * K + j] = order[j];
      weight[r * K + j] = m.normalize ? p[order[j]] / kept : p[order[j]];
    }
  }
  std::vector<int64_t> rows;
  std::vector<float> row_weights;
  for (int64_t e = 0; e < E; ++e) {  // each chosen expert once, on the rows that chose it
    rows.clear(), row_weights.clear();
    for (int64_t i = 0; i < s.rows * K; ++i)
      if (chosen[i] == e) rows.push_back(i / K), row_weights.push_back(weight[i]);
    if (rows.empty()) continue;  // its weights are not read
    Shape sub = s;
    sub.rows = static_cast<int64_t>(rows.size());
    for (int64_t i = 0; i < sub.rows; ++i) std::copy_n(h + rows[i] * C, C, t.rows_in.data() + i * C);
    feed_forward(t.rows_in.data(), m.linears[3 * e], m.linears[3 * e + 1], m.linears[3 * e + 2], t.rows_out.data(),
                 Epilogue::kStore, sub, t.mid.data(), t.up.data());
    for (int64_t i = 0; i < sub.rows; ++i)
      lmstack::axpy(row_weights[i], t.rows_out.data() + i * C, stream + rows[i] * C, C);
  }
  if (!m.shared) return;
  const Linear* shared = m.linears.data() + 3 * E;
  feed_forward(h, shared[0], shared[1], shared[2], t.rows_out.data(), Epilogue::kStore, s, t.mid.data(), t.up.data());
  if (m.shared_gate) {
    t.gate.resize(s.rows);
    matmul(h, shared[3], t.gate.data(), s);
  }
  for (int64_t r = 0; r < s.rows; ++r) {
    const float g = m.shared_gate ? 1.0f / (1.0f + std::exp(-t.gate[r])) : 1.0f;
    lmstack::axpy(g, t.rows_out.data() + r * C, stream + r * C, C);
  }
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
// moe_shape: 6 entries per layer: experts E (0: the layer's MLP is dense), top_k, normalize (0/1), sigmoid
//   scores (0/1), shared expert (0/1), shared-expert gate (0/1). A mixture layer's MLP slots in `weights` are
//   empty (and its 3 MLP linear descriptions empty fp32 ones); instead moe_weights holds, layer after layer, the
//   router (E, C) and then weight and bias of each of its linears (Experts' order), described by moe_formats
//   and moe_aux as `formats` and `aux` describe the others.
at::Tensor decode_step(at::Tensor x, const std::vector<at::Tensor>& weights, at::Tensor k_cache, at::Tensor v_cache,
                       int64_t slot, at::Tensor cos, at::Tensor sin, at::Tensor key_mask,
                       const std::vector<int64_t>& windows, const std::vector<int64_t>& shape, double norm_eps,
                       const std::vector<at::Tensor>& aux, const std::vector<int64_t>& formats,
                       const std::vector<at::Tensor>& moe_weights, const std::vector<at::Tensor>& moe_aux,
                       const std::vector<int64_t>& moe_formats, const std::vector<int64_t>& moe_shape) {
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

  TORCH_CHECK(static_cast<int64_t>(moe_shape.size()) == 6 * n_layers,
              "decode_step: moe_shape takes 6 entries per layer");
  std::vector<Experts> mixtures(n_layers);
  size_t next_tensor = 0, next_linear = 0;
  int64_t widest = 0;  // the widest feed-forward hidden layer (scratch size)
  for (int64_t l = 0; l < n_layers; ++l) {
    const int64_t* m = moe_shape.data() + 6 * l;
    Experts& mix = mixtures[l];
    mix.count = m[0], mix.top_k = m[1], mix.normalize = m[2], mix.sigmoid = m[3], mix.shared = m[4],
    mix.shared_gate = m[5];
    if (!mix.count) {
      widest = std::max(widest, weights[l * kPerLayer + kInW].size(0));
      continue;
    }
    TORCH_CHECK(mix.top_k >= 1 && mix.top_k <= mix.count, "decode_step: layer ", l, ": top_k outside 1..experts");
    const size_t n_lin = 3 * (mix.count + mix.shared) + mix.shared_gate;
    TORCH_CHECK(next_tensor + 1 + 2 * n_lin <= moe_weights.size() && 2 * (next_linear + n_lin) <= moe_formats.size() &&
                    kAux * (next_linear + n_lin) <= moe_aux.size(), "decode_step: too few mixture-of-experts tensors");
    mix.router = &moe_weights[next_tensor++];
    check_fp32(*mix.router, "a router weight");
    TORCH_CHECK(mix.router->dim() == 2 && mix.router->size(0) == mix.count && mix.router->size(1) == x.size(1),
                "decode_step: layer ", l, ": router weight must be (experts, dim)");
    for (size_t j = 0; j < n_lin; ++j, ++next_linear, next_tensor += 2) {
      const Linear L{&moe_weights[next_tensor], &moe_weights[next_tensor + 1], moe_aux.data() + kAux * next_linear,
                     moe_formats[2 * next_linear], moe_formats[2 * next_linear + 1]};
      if (L.format == kFp32) check_fp32(*L.w, "every fp32 weight");
      check_fp32(*L.b, "every bias");
      if (j % 3 == 0 && j < 3 * (mix.count + mix.shared)) widest = std::max(widest, L.w->size(0));
      mix.linears.push_back(L);
    }
  }
  TORCH_CHECK(next_tensor == moe_weights.size() && 2 * next_linear == moe_formats.size() &&
                  kAux * next_linear == moe_aux.size(), "decode_step: more mixture-of-experts tensors than layers use");
  check_fp32(x, "x"), check_fp32(k_cache, "k_cache"), check_fp32(v_cache, "v_cache");
  check_fp32(cos, "cos"), check_fp32(sin, "sin");
  TORCH_CHECK(!key_mask.numel() || (key_mask.scalar_type() == at::kLong && key_mask.is_contiguous() &&
                                    key_mask.size(1) > slot), "decode_step: key_mask must be contiguous int64 (B, > slot)");

  const at::Tensor& head = weights.back();
  Shape s{x.size(0), x.size(1), shape[0], shape[1], k_cache.size(4), head.size(0),
          k_cache.size(3), shape[2] != 0, shape[3] != 0, cos.numel() > 0, static_cast<Epilogue>(shape[4]),
          static_cast<float>(norm_eps)};
  TORCH_CHECK(slot >= 0 && slot < s.max_len, "decode_step: slot ", slot, " outside the cache of ", s.max_len);
  const int64_t HD = s.n_heads * s.head_dim, KD = s.n_kv_heads * s.head_dim;

  std::vector<float> h(s.rows * s.dim), q(s.rows * HD), k(s.rows * KD), v(s.rows * KD), attn(s.rows * HD),
      mid(s.rows * widest), up(s.gated ? s.rows * widest : 0), scores(s.rows * s.n_heads * (slot + 1));
  ExpertScratch scratch;
  scratch.rows_in.resize(s.rows * s.dim), scratch.rows_out.resize(s.rows * s.dim);
  scratch.mid.resize(s.rows * widest), scratch.up.resize(s.gated ? s.rows * widest : 0);
  float* stream = x.data_ptr<float>();
  const int64_t* mask = key_mask.numel() ? key_mask.data_ptr<int64_t>() : nullptr;
  const int64_t layer_stride = k_cache.stride(0);

  for (int64_t l = 0; l < n_layers; ++l) {
    const at::Tensor* w = weights.data() + l * kPerLayer;
    normalize(stream, h.data(), data(w[kAttnNormW]), data(w[kAttnNormB]), s);
    const Linear lq = linear(l, 0), lk = linear(l, 1), lv = linear(l, 2);
    matmuls(h.data(), {&lq, &lk, &lv}, {q.data(), k.data(), v.data()},
            {Epilogue::kStore, Epilogue::kStore, Epilogue::kStore}, s);
    if (const float* q_norm = data(w[kQNormW])) normalize_heads(q.data(), s.n_heads, q_norm, s);
    if (const float* k_norm = data(w[kKNormW])) normalize_heads(k.data(), s.n_kv_heads, k_norm, s);
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
    if (mixtures[l].count) {
      mixture(h.data(), mixtures[l], stream, s, scratch);
    } else {
      feed_forward(h.data(), linear(l, 4), linear(l, 5), linear(l, 6), stream, Epilogue::kAccumulate, s, mid.data(),
                   up.data());
    }
  }
  const at::Tensor* final_norm = weights.data() + n_layers * kPerLayer;
  normalize(stream, h.data(), data(final_norm[0]), data(final_norm[1]), s);
  auto logits = at::empty({s.rows, s.vocab}, x.options());
  matmul(h.data(), linear(n_layers, 0), logits.data_ptr<float>(), s);
  return logits;
}
