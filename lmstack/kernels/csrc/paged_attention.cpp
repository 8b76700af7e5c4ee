// Decode attention over a paged KV cache: each row's one new query attends to its keys and values where
// they lie in the block pool, read in place through the row's slot list (no gathered copy).
//
// The arithmetic of lmstack.serve.paged_kv.PackedBatch's eager path (gather the slots, then softmax(q k^T *
// scale) v with the row's causal / sliding-window mask), which stands beside it as the reference.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "skinny_kernels.h"

namespace {

// Keys and values sit 768 bytes apart per head (slot-major pool) in blocks scattered over memory: the hardware
// prefetcher loses the stream at every block, so the rows a few keys ahead are requested explicitly.
constexpr int64_t kAhead = 6;
inline void prefetch(const float* row, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) _mm_prefetch(reinterpret_cast<const char*>(row + i), _MM_HINT_T0);
}

}  // namespace

// q: (G, H, D) the rows' queries; k_pool, v_pool: (slots, Hkv, D) one layer's pool; slots: (G, Kmax) int64, the
// pool slot of each row's key 0, 1, ...; lengths: (G,) int64, keys per row (its query sits at position
// length - 1); window > 0 keeps only the last `window` keys. All fp32 / int64, contiguous. Returns (G, H, D).
// Work is split over (row, key/value head); the query heads that share a key/value head read each key and
// value once, while it is in L1.
at::Tensor paged_decode_attention(at::Tensor q, at::Tensor k_pool, at::Tensor v_pool, at::Tensor slots,
                                  at::Tensor lengths, int64_t window, double scale) {
  TORCH_CHECK(q.dim() == 3 && k_pool.dim() == 3 && v_pool.sizes() == k_pool.sizes() && slots.dim() == 2,
              "paged_decode_attention: shape mismatch");
  TORCH_CHECK(q.is_contiguous() && k_pool.is_contiguous() && v_pool.is_contiguous() && slots.is_contiguous() &&
                  lengths.is_contiguous(), "paged_decode_attention takes contiguous tensors");
  TORCH_CHECK(q.scalar_type() == at::kFloat && k_pool.scalar_type() == at::kFloat &&
                  slots.scalar_type() == at::kLong && lengths.scalar_type() == at::kLong,
              "paged_decode_attention takes fp32 values and int64 slots");
  const int64_t G = q.size(0), H = q.size(1), D = q.size(2), Hkv = k_pool.size(1), Kmax = slots.size(1);
  TORCH_CHECK(k_pool.size(2) == D && H % Hkv == 0 && lengths.size(0) == G && slots.size(0) == G,
              "paged_decode_attention: shape mismatch");
  const int64_t group = H / Hkv;
  auto out = at::empty({G, H, D}, q.options());
  const float *qd = q.data_ptr<float>(), *kd = k_pool.data_ptr<float>(), *vd = v_pool.data_ptr<float>();
  const int64_t *sd = slots.data_ptr<int64_t>(), *ld = lengths.data_ptr<int64_t>();
  float* od = out.data_ptr<float>();
  const float s = static_cast<float>(scale);
#pragma omp parallel
  {
    std::vector<float> p(group * Kmax);
#pragma omp for collapse(2) schedule(static)
    for (int64_t g = 0; g < G; ++g)
      for (int64_t kv = 0; kv < Hkv; ++kv) {
        const int64_t n = std::min(ld[g], Kmax), lo = window > 0 ? std::max<int64_t>(0, n - window) : 0;
        const int64_t* row = sd + g * Kmax;
        const float* qv = qd + (g * H + kv * group) * D;  // the group's query heads, one after another
        float* o = od + (g * H + kv * group) * D;
        for (int64_t j = lo; j < n; ++j) {
          if (j + kAhead < n) prefetch(kd + (row[j + kAhead] * Hkv + kv) * D, D);
          const float* key = kd + (row[j] * Hkv + kv) * D;
          for (int64_t h = 0; h < group; ++h) p[h * Kmax + j] = lmstack::dot(qv + h * D, key, D) * s;
        }
        std::vector<float> inv(group);
        for (int64_t h = 0; h < group; ++h) {
          float* ph = p.data() + h * Kmax + lo;
          const float top = *std::max_element(ph, ph + (n - lo));
          const float total = lmstack::exp_and_sum(ph, n - lo, top);
          inv[h] = total > 0.0f ? 1.0f / total : 0.0f;
        }
        std::fill(o, o + group * D, 0.0f);
        for (int64_t j = lo; j < n; ++j) {
          if (j + kAhead < n) prefetch(vd + (row[j + kAhead] * Hkv + kv) * D, D);
          const float* value = vd + (row[j] * Hkv + kv) * D;
          for (int64_t h = 0; h < group; ++h) lmstack::axpy(p[h * Kmax + j], value, o + h * D, D);
        }
        for (int64_t h = 0; h < group; ++h)
          for (int64_t i = 0; i < D; ++i) o[h * D + i] *= inv[h];
      }
  }
  return out;
}
