// y = x @ w^T + bias for a *skinny* x (at most 8 rows), the shape of one decoding step, and the small
// vector helpers a fused decode step needs.
//
// Decoding is memory-bound: every weight is read once per step, so speed is set by how fast the
// weights stream from memory. BLAS libraries pack and tile for large GEMMs and fall short here (on
// AMD CPUs MKL also takes a generic path). These kernels stream each weight row once, multiply it
// with all B input rows while it sits in registers, and split output rows across OpenMP threads.
// An epilogue applied as each output is written (an activation, or adding into a residual stream)
// saves a separate pass over the outputs.
#pragma once

#include <immintrin.h>

#include <algorithm>

#include <cmath>
#include <cstdint>

namespace lmstack {

enum class Epilogue : int64_t { kStore = 0, kAccumulate = 1, kGelu = 2, kGeluTanh = 3, kSilu = 4, kRelu = 5 };

inline float activate(float v, Epilogue e) {
  switch (e) {
    case Epilogue::kGelu: return 0.5f * v * (1.0f + std::erf(v * 0.70710678118654752f));
    case Epilogue::kGeluTanh:
      return 0.5f * v * (1.0f + std::tanh(0.79788456080286536f * (v + 0.044715f * v * v * v)));
    case Epilogue::kSilu: return v / (1.0f + std::exp(-v));
    case Epilogue::kRelu: return v > 0.0f ? v : 0.0f;
    default: return v;
  }
}

inline void finish(float* dst, float v, Epilogue e) {
  if (e == Epilogue::kAccumulate) *dst += v;
  else *dst = activate(v, e);
}

inline float horizontal_sum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_hadd_ps(s, s);
  s = _mm_hadd_ps(s, s);
  return _mm_cvtss_f32(s);
}

// sum_i a[i] * b[i]
inline float dot(const float* a, const float* b, int64_t n) {
  __m256 acc0 = _mm256_setzero_ps(), acc1 = acc0;
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
    acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), acc1);
  }
  for (; i + 8 <= n; i += 8) acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc0);
  float s = horizontal_sum(_mm256_add_ps(acc0, acc1));
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// e^x for 8 lanes (Cephes' expf: x = n ln2 + r, a degree-6 polynomial for e^r, 2^n from the exponent bits);
// relative error ~2e-7 over the softmax's range x <= 0. std::exp per score was a third of this kernel's time.
inline __m256 exp8(__m256 x) {
  x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.3762626647949f)), _mm256_set1_ps(-87.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

// p[0..n) <- exp(p - top); returns their sum.
inline float exp_and_sum(float* p, int64_t n, float top) {
  const __m256 t = _mm256_set1_ps(top);
  __m256 acc = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p + j), t));
    _mm256_storeu_ps(p + j, e);
    acc = _mm256_add_ps(acc, e);
  }
  float total = lmstack::horizontal_sum(acc);
  for (; j < n; ++j) total += (p[j] = std::exp(p[j] - top));
  return total;
}

// y += alpha * x
inline void axpy(float alpha, const float* x, float* y, int64_t n) {
  const __m256 a = _mm256_set1_ps(alpha);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(a, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
  for (; i < n; ++i) y[i] += alpha * x[i];
}

// B input rows, R weight rows per iteration: R * B accumulators stay within the 16 AVX registers,
// and R > 1 gives a single input row several independent FMA chains.
template <int B, int R>
void skinny_kernel(const float* x, const float* w, const float* bias, float* y, int64_t n_out, int64_t n_in,
                   Epilogue e) {
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
        finish(y + b * n_out + j0 + r, s + (bias ? bias[j0 + r] : 0.0f), e);
      }
    }
  }
  for (int64_t j = n_blocks * R; j < n_out; ++j)  // the last n_out % R rows
    for (int b = 0; b < B; ++b)
      finish(y + b * n_out + j, dot(w + j * n_in, x + b * n_in, n_in) + (bias ? bias[j] : 0.0f), e);
}

// One input row: stream each weight row front to back with four accumulators split over k, so all
// reads are sequential (measured ~95% of a plain streaming read, a little above the R = 4 layout).
inline void single_row_kernel(const float* x, const float* w, const float* bias, float* y, int64_t n_out,
                              int64_t n_in, Epilogue e) {
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
    finish(y + j, s + (bias ? bias[j] : 0.0f), e);
  }
}

// Weight rows [j0, j1) times B rows of x (one chunk of a taller x), one weight row at a time.
template <int B>
inline void chunk_rows(const float* x, const float* w, const float* bias, float* y, int64_t j0, int64_t j1,
                       int64_t n_out, int64_t n_in, Epilogue e) {
  for (int64_t j = j0; j < j1; ++j) {
    const float* wr = w + j * n_in;
    __m256 acc[B];
    for (int b = 0; b < B; ++b) acc[b] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 <= n_in; k += 8) {
      const __m256 wv = _mm256_loadu_ps(wr + k);
      for (int b = 0; b < B; ++b) acc[b] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + b * n_in + k), acc[b]);
    }
    for (int b = 0; b < B; ++b) {
      float s = horizontal_sum(acc[b]);
      for (int64_t kk = k; kk < n_in; ++kk) s += wr[kk] * x[b * n_in + kk];
      finish(y + b * n_out + j, s + (bias ? bias[j] : 0.0f), e);
    }
  }
}

constexpr int64_t kMediumRows = 64;  // the most rows medium_matmul takes
constexpr int64_t kTileRows = 16;    // weight rows per tile: 16 x 4 KiB-wide rows stay in L1/L2 for every chunk

// 9 to 64 rows of x: the weight matrix is walked once in tiles of kTileRows rows, and every 8-row chunk
// of x multiplies a tile while it is in cache. BLAS GEMM at these shapes re-streams a wide matrix (an LM
// head of 49152 x 576) and runs at a third of the FMA peak; this runs near it and reads each weight once.
inline void medium_matmul(const float* x, const float* w, const float* bias, float* y, int64_t rows,
                          int64_t n_out, int64_t n_in, Epilogue e) {
  const int64_t n_tiles = (n_out + kTileRows - 1) / kTileRows;
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < n_tiles; ++t) {
    const int64_t j0 = t * kTileRows, j1 = std::min(j0 + kTileRows, n_out);
    for (int64_t b0 = 0; b0 < rows; b0 += 8) {
      const float* xc = x + b0 * n_in;
      float* yc = y + b0 * n_out;
      switch (std::min<int64_t>(8, rows - b0)) {
        case 1: chunk_rows<1>(xc, w, bias, yc, j0, j1, n_out, n_in, e); break;
        case 2: chunk_rows<2>(xc, w, bias, yc, j0, j1, n_out, n_in, e); break;
        case 3: chunk_rows<3>(xc, w, bias, yc, j0, j1, n_out, n_in, e); break;
        case 4: chunk_rows<4>(xc, w, bias, yc, j0, j1, n_out, n_in, e); break;
        case 5: chunk_rows<5>(xc, w, bias, yc, j0, j1, n_out, n_in, e); break;
        case 6: chunk_rows<6>(xc, w, bias, yc, j0, j1, n_out, n_in, e); break;
        case 7: chunk_rows<7>(xc, w, bias, yc, j0, j1, n_out, n_in, e); break;
        default: chunk_rows<8>(xc, w, bias, yc, j0, j1, n_out, n_in, e); break;
      }
    }
  }
}

// x: (rows, n_in), w: (n_out, n_in), bias: (n_out,) or null, y: (rows, n_out); 1 <= rows <= 8 (the
// skinny kernels) or up to kMediumRows (medium_matmul). Returns false for other row counts.
inline bool skinny_matmul(const float* x, const float* w, const float* bias, float* y, int64_t rows,
                          int64_t n_out, int64_t n_in, Epilogue e = Epilogue::kStore) {
  switch (rows) {
    case 1: single_row_kernel(x, w, bias, y, n_out, n_in, e); return true;
    case 2: skinny_kernel<2, 2>(x, w, bias, y, n_out, n_in, e); return true;
    case 3: skinny_kernel<3, 2>(x, w, bias, y, n_out, n_in, e); return true;
    case 4: skinny_kernel<4, 2>(x, w, bias, y, n_out, n_in, e); return true;
    case 5: skinny_kernel<5, 1>(x, w, bias, y, n_out, n_in, e); return true;
    case 6: skinny_kernel<6, 1>(x, w, bias, y, n_out, n_in, e); return true;
    case 7: skinny_kernel<7, 1>(x, w, bias, y, n_out, n_in, e); return true;
    case 8: skinny_kernel<8, 1>(x, w, bias, y, n_out, n_in, e); return true;
    default:
      if (rows < 1 || rows > kMediumRows) return false;
      medium_matmul(x, w, bias, y, rows, n_out, n_in, e);
      return true;
  }
}

}  // namespace lmstack
