// ctypes entry points of the low-bit skinny matmuls (quant_kernels.h) and row-range dequantisation.
// Plain C ABI; OpenMP over output rows (torch's own libgomp, loaded first, is reused).
#include <cstdint>

#include "dynamic_gemm.h"
#include "dynamic_kernels.h"
#include "quant_kernels.h"

using lmstack::Epilogue;

extern "C" {

// All return 0 on success, 1 for an unsupported shape (rows outside 1..8, widths not multiples of 32).
// x: (rows, n_in) fp32; y: (rows, n_out) fp32; bias: (n_out,) or null.

int lmstack_int8_matmul(const float* x, const int8_t* q, const float* scales, const float* bias, float* y,
                        int64_t rows, int64_t n_out, int64_t n_in, int64_t group, int threads) {
  return lmstack::quant::int8_matmul(x, q, scales, bias, y, rows, n_out, n_in, group, threads);
}

int lmstack_int4_matmul(const float* x, const uint8_t* q, const float* scales, const int8_t* zeros, const float* mins,
                        const float* bias, float* y, int64_t rows, int64_t n_out, int64_t n_in, int64_t group,
                        int threads) {
  return lmstack::quant::int4_matmul(x, q, scales, zeros, mins, bias, y, rows, n_out, n_in, group, threads);
}

int lmstack_nf4_matmul(const float* x, const uint8_t* q, const float* levels, const uint8_t* absmax_codes,
                       const float* absmax_code, const float* absmax_scales, float offset, const float* bias, float* y,
                       int64_t rows, int64_t n_out, int64_t n_in, int threads) {
  return lmstack::quant::nf4_matmul(x, q, levels, absmax_codes, absmax_code, absmax_scales, offset, bias, y, rows,
                                    n_out, n_in, threads);
}

// 2:4 semi-structured fp32 weights: values (n_out, n_in / 2), position codes (n_out, n_in / 8) (quant_kernels.h).
int lmstack_sparse24_matmul(const float* x, const float* values, const uint8_t* codes, const float* bias, float* y,
                            int64_t rows, int64_t n_out, int64_t n_in, int threads) {
  return lmstack::quant::sparse24_matmul(x, values, codes, bias, y, rows, n_out, n_in, threads);
}

// The same with x quantized to int8 on the fly (dynamic_kernels.h).
int lmstack_int8_dynamic_matmul(const float* x, const int8_t* q, const float* scales, const float* bias, float* y,
                                int64_t rows, int64_t n_out, int64_t n_in, int64_t group, int threads) {
  return lmstack::quant::int8_dynamic_matmul(x, q, scales, bias, y, rows, n_out, n_in, group, threads);
}

int lmstack_int4_dynamic_matmul(const float* x, const uint8_t* q, const float* scales, const int8_t* zeros,
                                const float* mins, const float* bias, float* y, int64_t rows, int64_t n_out,
                                int64_t n_in, int64_t group, int threads) {
  return lmstack::quant::int4_dynamic_matmul(x, q, scales, zeros, mins, bias, y, rows, n_out, n_in, group, threads);
}

// Prompts (any number of rows) of the same formats, on AVX-512 VNNI (dynamic_gemm.h): returns 1 where this build
// or the shape has no such kernel (the caller then multiplies over dequantised tiles). int4: q packed codes.
int lmstack_dynamic_gemm(const float* x, const void* q, int int4, const float* scales, const int8_t* zeros,
                         const float* mins, const float* bias, float* y, int64_t rows, int64_t n_out, int64_t n_in,
                         int64_t group, int threads) {
  return lmstack::quant::dynamic_gemm_matmul(x, q, int4 != 0, scales, zeros, mins, bias, y, rows, n_out, n_in, group,
                                             threads);
}

// x (rows, n_in) -> y: each value as its int8 code times the code's scale (n_in a multiple of 32; block 0:
// per row, else per block of `block` inputs).
void lmstack_fake_quantize_activations(const float* x, float* y, int64_t rows, int64_t n_in, int64_t block,
                                       int threads) {
  lmstack::quant::fake_quantize_activations(x, y, rows, n_in, block, threads);
}

// Row-range dequantisation to fp32 (out: (stop - start, n_in)), for the tiled prompt-processing path.
void lmstack_int8_dequant(const int8_t* q, const float* scales, float* out, int64_t start, int64_t stop, int64_t n_in,
                          int64_t group, int threads) {
  const int64_t n_groups = group ? (n_in + group - 1) / group : 1;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t j = start; j < stop; ++j)
    for (int64_t c = 0; c < n_in; c += 8) {  // n_in and group are multiples of 32
      const __m256 s = _mm256_set1_ps(scales[j * n_groups + (group ? c / group : 0)]);
      const __m128i codes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + j * n_in + c));
      _mm256_storeu_ps(out + (j - start) * n_in + c, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(codes)), s));
    }
}

void lmstack_int4_dequant(const uint8_t* q, const float* scales, const int8_t* zeros, const float* mins, float* out,
                          int64_t start, int64_t stop, int64_t n_in, int64_t group, int threads) {
  const int64_t n_groups = (n_in + group - 1) / group;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t j = start; j < stop; ++j)
    for (int64_t c = 0; c < n_in; c += 32) {  // a run of 32 never straddles two groups (group % 32 == 0)
      const int64_t g = j * n_groups + c / group;
      // The reference's arithmetic exactly: (code - 8 - zero) * scale (an integer, then one product), or
      // code * scale + min (a product, then a sum; no fused multiply-add).
      const __m256 s = _mm256_set1_ps(scales[g]);
      __m256i codes[4];
      lmstack::quant::codes_in_order(q + j * (n_in / 2) + c / 2, false, codes);
      for (int v = 0; v < 4; ++v) {
        float* dst = out + (j - start) * n_in + c + 8 * v;
        if (mins) {
          _mm256_storeu_ps(dst, _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(codes[v]), s), _mm256_set1_ps(mins[g])));
        } else {
          const __m256i shifted = _mm256_sub_epi32(codes[v], _mm256_set1_epi32(8 + zeros[g]));
          _mm256_storeu_ps(dst, _mm256_mul_ps(_mm256_cvtepi32_ps(shifted), s));
        }
      }
    }
}

void lmstack_nf4_dequant(const uint8_t* q, const float* levels, const float* absmax, float* out, int64_t start,
                         int64_t stop, int64_t n_in, int threads) {
  const __m256 lo = _mm256_loadu_ps(levels), hi = _mm256_loadu_ps(levels + 8);
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t j = start; j < stop; ++j)
    for (int64_t c = 0; c < n_in; c += 32) {
      const __m256 a = _mm256_set1_ps(absmax[(j * n_in + c) / 64]);
      __m256i codes[4];
      lmstack::quant::codes_in_order(q + j * (n_in / 2) + c / 2, true, codes);
      for (int v = 0; v < 4; ++v)
        _mm256_storeu_ps(out + (j - start) * n_in + c + 8 * v, _mm256_mul_ps(lmstack::quant::lookup16(lo, hi, codes[v]), a));
    }
}

}  // extern "C"
