// y = x @ w^T + bias for a *skinny* x (at most 8 rows), the shape of one decoding step.
//
// Decoding is memory-bound: every weight is read once per step, so speed is set by how fast the
// weights stream from memory. BLAS libraries pack and tile for large GEMMs and fall short here (on
// AMD CPUs MKL also takes a generic path). This kernel streams each weight row once, multiplies it
// with all B input rows while it sits in registers, and splits output rows across OpenMP threads.
#include <torch/extension.h>
#include <immintrin.h>

namespace {

inline float horizontal_sum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_hadd_ps(s, s);
  s = _mm_hadd_ps(s, s);
  return _mm_cvtss_f32(s);
}

// B input rows, R weight rows per iteration: R * B accumulators stay within the 16 AVX registers,
// and R > 1 gives a single input row several independent FMA chains.
template <int B, int R>
void skinny_kernel(const float* x, const float* w, const float* bias, float* y, int64_t n_out, int64_t n_in) {
  const int64_t n_blocks = n_out / R;
#pragma omp parallel for schedule(static)
  for (int64_t blk = 0; blk < n_blocks; ++blk) {
    const int64_t j0 = blk * R;
    __m256 acc[R][B];
    for (int r = 0; r < R; ++r)
      for (int b = 0; b < B; ++b) acc[r][b] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 <= n_in; k += 8) {
      __m256 xv[B];
      for (int b = 0; b < B; ++b) xv[b] = _mm256_loadu_ps(x + b * n_in + k);
      for (int r = 0; r < R; ++r) {
        const __m256 wv = _mm256_loadu_ps(w + (j0 + r) * n_in + k);
        for (int b = 0; b < B; ++b) acc[r][b] = _mm256_fmadd_ps(wv, xv[b], acc[r][b]);
      }
    }
    for (int r = 0; r < R; ++r) {
      const float* wr = w + (j0 + r) * n_in;
      for (int b = 0; b < B; ++b) {
        float s = horizontal_sum(acc[r][b]);
        for (int64_t kk = k; kk < n_in; ++kk) s += wr[kk] * x[b * n_in + kk];
        y[b * n_out + j0 + r] = s + (bias ? bias[j0 + r] : 0.0f);
      }
    }
  }
  for (int64_t j = n_blocks * R; j < n_out; ++j) {  // the last n_out % R rows
    for (int b = 0; b < B; ++b) {
      float s = 0.0f;
      for (int64_t kk = 0; kk < n_in; ++kk) s += w[j * n_in + kk] * x[b * n_in + kk];
      y[b * n_out + j] = s + (bias ? bias[j] : 0.0f);
    }
  }
}

// One input row: stream each weight row front to back with four accumulators split over k, so all
// reads are sequential (measured ~95% of a plain streaming read, a little above the R = 4 layout).
void single_row_kernel(const float* x, const float* w, const float* bias, float* y, int64_t n_out, int64_t n_in) {
#pragma omp parallel for schedule(static)
  for (int64_t j = 0; j < n_out; ++j) {
    const float* wr = w + j * n_in;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    int64_t k = 0;
    for (; k + 32 <= n_in; k += 32) {
      a0 = _mm256_fmadd_ps(_mm256_loadu_ps(wr + k), _mm256_loadu_ps(x + k), a0);
      a1 = _mm256_fmadd_ps(_mm256_loadu_ps(wr + k + 8), _mm256_loadu_ps(x + k + 8), a1);
      a2 = _mm256_fmadd_ps(_mm256_loadu_ps(wr + k + 16), _mm256_loadu_ps(x + k + 16), a2);
      a3 = _mm256_fmadd_ps(_mm256_loadu_ps(wr + k + 24), _mm256_loadu_ps(x + k + 24), a3);
    }
    float s = horizontal_sum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    for (; k < n_in; ++k) s += wr[k] * x[k];
    y[j] = s + (bias ? bias[j] : 0.0f);
  }
}

}  // namespace

// x: (B, n_in) with B in {1, 2, 4, 8}; weight: (n_out, n_in); bias: (n_out,) or empty. All fp32, contiguous.
torch::Tensor skinny_linear(torch::Tensor x, torch::Tensor weight, torch::Tensor bias) {
  const int64_t B = x.size(0), n_in = x.size(1), n_out = weight.size(0);
  auto y = torch::empty({B, n_out}, x.options());
  const float* b = bias.numel() ? bias.data_ptr<float>() : nullptr;
  const float *xp = x.data_ptr<float>(), *wp = weight.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  switch (B) {
    case 1: single_row_kernel(xp, wp, b, yp, n_out, n_in); break;
    case 2: skinny_kernel<2, 2>(xp, wp, b, yp, n_out, n_in); break;
    case 4: skinny_kernel<4, 2>(xp, wp, b, yp, n_out, n_in); break;
    case 8: skinny_kernel<8, 1>(xp, wp, b, yp, n_out, n_in); break;
    default: TORCH_CHECK(false, "skinny_linear takes 1, 2, 4 or 8 rows, got ", B);
  }
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) { m.def("skinny_linear", &skinny_linear, "x @ w^T + b for x with <= 8 rows"); }
