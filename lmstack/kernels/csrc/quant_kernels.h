// Skinny matmuls (1 to 8 rows of x) over low-bit weights: int8, int4 and NF4 (layouts in
// lmstack/compress/formats.py), without a dequantised copy of the weight. Used by quant_matmul.cpp (ctypes,
// QuantizedLinear) and by decode_step.cpp (the fused decoding step).
//
// Decoding streams every weight once per token, so fewer bytes per weight is the only way to decode
// faster. Each weight row is read once for all rows of x: its codes are unpacked in registers
// (nibbles -> int32 -> float, or a 16-entry table for NF4), multiplied into fp32 accumulators, and the
// group scale is applied once per group (a vector multiply-add, not per weight). int4's zero point
// enters as zero * scale * sum(x over the group), with the sums computed once per call.
//
// 4-bit layouts pack elements 2i and 2i+1 of each run of 32 into byte i of 16; the kernels unpack codes
// with shifts and masks only (see unpack_codes) in an order of their own, so x is first reordered per
// run of 32 to match: one pass over x per call instead of a shuffle per weight.
// Each output is written through an Epilogue (skinny_kernels.h): stored, added to a residual, activated.
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "skinny_kernels.h"

namespace lmstack {
namespace quant {

inline float hsum(__m256 v) { return horizontal_sum(v); }

// Where the 4-bit codes of a run of 32 land. The 16 bytes are read as 4 little-endian dwords, broadcast
// to both halves of a ymm register; vector k (0..3) shifts lanes 0-3 right by 8k and lanes 4-7 by 8k + 4
// and masks 4 bits, so lane j holds nibble i = 2k + (j >= 4) of dword L = j % 4. Only shifts and masks:
// no shuffles, which are the scarce instructions when unpacking. Nibble i of dword L is element
// 8L + i (low nibble first) or 8L + (i ^ 1) (high nibble first, NF4); x is reordered to match, once.
inline int64_t code_element(int k, int j, bool high_first) {
  const int nibble = 2 * k + (j >= 4), dword = j % 4;
  return 8 * dword + (high_first ? nibble ^ 1 : nibble);
}

std::vector<float> reorder_for_codes(const float* x, int64_t rows, int64_t n, bool high_first) {
  std::vector<float> out(rows * n);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t c = 0; c < n; c += 32)
      for (int k = 0; k < 4; ++k)
        for (int j = 0; j < 8; ++j) out[r * n + c + 8 * k + j] = x[r * n + c + code_element(k, j, high_first)];
  return out;
}

// The 4 int32 vectors of codes (0..15) of one run of 32 (16 bytes at p).
inline void unpack_codes(const uint8_t* p, __m256i codes[4]) {
  const __m256i dwords = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  const __m256i mask = _mm256_set1_epi32(0x0F);
  for (int k = 0; k < 4; ++k) {
    const __m256i shift = _mm256_setr_epi32(8 * k, 8 * k, 8 * k, 8 * k, 8 * k + 4, 8 * k + 4, 8 * k + 4, 8 * k + 4);
    codes[k] = _mm256_and_si256(_mm256_srlv_epi32(dwords, shift), mask);
  }
}

// The 32 codes (0..15) of one run of 4-bit codes (16 bytes, elements 2i and 2i + 1 in byte i, the low nibble
// first unless `high_first`) as bytes in element order: the nibbles interleaved back into bytes.
inline __m256i nibbles_in_order(const uint8_t* p, bool high_first) {
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m128i mask = _mm_set1_epi8(0x0F);
  const __m128i low = _mm_and_si128(bytes, mask), high = _mm_and_si128(_mm_srli_epi16(bytes, 4), mask);
  const __m128i a = high_first ? high : low, b = high_first ? low : high;
  return _mm256_set_m128i(_mm_unpackhi_epi8(a, b), _mm_unpacklo_epi8(a, b));  // elements 16-31 | 0-15
}

// The same codes as 4 vectors of 8 int32, in element order.
inline void codes_in_order(const uint8_t* p, bool high_first, __m256i out[4]) {
  const __m256i bytes = nibbles_in_order(p, high_first);
  const __m128i first = _mm256_castsi256_si128(bytes), second = _mm256_extracti128_si256(bytes, 1);
  out[0] = _mm256_cvtepu8_epi32(first);
  out[1] = _mm256_cvtepu8_epi32(_mm_unpackhi_epi64(first, first));
  out[2] = _mm256_cvtepu8_epi32(second);
  out[3] = _mm256_cvtepu8_epi32(_mm_unpackhi_epi64(second, second));
}

// to[0, m) = the even elements of from[0, 2m), to[m, 2m) = the odd ones: x laid out in the order 4-bit codes
// leave their bytes as low and high nibbles (converted to To on the way).
template <class From, class To>
inline void evens_then_odds(const From* from, To* to, int64_t m) {
  for (int64_t i = 0; i < m; ++i) {
    to[i] = static_cast<To>(from[2 * i]);
    to[m + i] = static_cast<To>(from[2 * i + 1]);
  }
}

// 16-entry float table lookup of int32 indices in [0, 16): two 8-wide permutes, blended on bit 3.
inline __m256 lookup16(__m256 lo, __m256 hi, __m256i idx) {
  const __m256 a = _mm256_permutevar8x32_ps(lo, idx), b = _mm256_permutevar8x32_ps(hi, idx);
  return _mm256_blendv_ps(a, b, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
}

// Accumulators per input row: with one row, four independent chains (one per vector of a run) keep the
// FMA units busy instead of waiting on one chain's latency; with more rows, the rows are the chains.
template <int B>
constexpr int kChains = B == 1 ? 4 : (B <= 3 ? 2 : 1);

// The weights of one run of 32 as 4 float vectors.
struct Int8Weights {
  const int8_t* q;
  inline void get(int64_t offset, __m256 w[4]) const {
    const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + offset));
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + offset + 16));
    w[0] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(a));
    w[1] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_unpackhi_epi64(a, a)));
    w[2] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
    w[3] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_unpackhi_epi64(b, b)));
  }
};

struct Int4Weights {  // codes as floats; the zero point is applied per group (see int4 `shift`)
  const uint8_t* q;
  inline void get(int64_t offset, __m256 w[4]) const {
    __m256i codes[4];
    unpack_codes(q + offset / 2, codes);
    for (int k = 0; k < 4; ++k) w[k] = _mm256_cvtepi32_ps(codes[k]);
  }
};

struct Nf4Weights {  // NF4 levels; the block absmax is applied per group
  const uint8_t* q;
  __m256 lo, hi;
  inline void get(int64_t offset, __m256 w[4]) const {
    __m256i codes[4];
    unpack_codes(q + offset / 2, codes);
    for (int k = 0; k < 4; ++k) w[k] = lookup16(lo, hi, codes[k]);
  }
};

// dot[b] = sum over columns [begin, end) of row `row` (weights at flat offset row * n_in) times x row b.
template <int B, class W>
inline void dot_rows(const W& weights, const float* x, int64_t n_in, int64_t row, int64_t begin, int64_t end,
                     __m256 dot[B]) {
  constexpr int P = kChains<B>;
  __m256 acc[B][P];
  for (int b = 0; b < B; ++b)
    for (int p = 0; p < P; ++p) acc[b][p] = _mm256_setzero_ps();
  for (int64_t c = begin; c < end; c += 32) {
    __m256 w[4];
    weights.get(row * n_in + c, w);
    for (int k = 0; k < 4; ++k)
      for (int b = 0; b < B; ++b)
        acc[b][k % P] = _mm256_fmadd_ps(w[k], _mm256_loadu_ps(x + b * n_in + c + 8 * k), acc[b][k % P]);
  }
  for (int b = 0; b < B; ++b) {
    dot[b] = acc[b][0];
    for (int p = 1; p < P; ++p) dot[b] = _mm256_add_ps(dot[b], acc[b][p]);
  }
}

template <int B>
void int8_rows(const float* x, const int8_t* q, const float* scales, const float* bias, float* y, int64_t n_out,
               int64_t n_in, int threads, Epilogue e) {
  const Int8Weights weights{q};
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t j = 0; j < n_out; ++j) {
    __m256 dot[B];
    dot_rows<B>(weights, x, n_in, j, 0, n_in, dot);
    for (int b = 0; b < B; ++b) finish(y + b * n_out + j, hsum(dot[b]) * scales[j] + (bias ? bias[j] : 0.0f), e);
  }
}

// Grouped formats: y = sum over groups of scale(j, g) * dot(group) + shift(j, b), plus bias.
template <int B, class W, class Scale, class Shift>
void grouped_rows(const W& weights, const float* xs, const float* bias, float* y, int64_t n_out, int64_t n_in,
                  int64_t group, int threads, Scale scale, Shift shift, Epilogue e) {
  const int64_t n_groups = (n_in + group - 1) / group;  // the last group may be shorter
  if (group == 32) {  // one run per group: scale the run's weights instead of closing a dot product per group
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t j = 0; j < n_out; ++j) {
      constexpr int P = kChains<B>;
      __m256 acc[B][P];
      for (int b = 0; b < B; ++b)
        for (int p = 0; p < P; ++p) acc[b][p] = _mm256_setzero_ps();
      for (int64_t g = 0; g < n_groups; ++g) {
        __m256 w[4];
        weights.get(j * n_in + 32 * g, w);
        const __m256 sv = _mm256_set1_ps(scale(j, g));
        for (int k = 0; k < 4; ++k) {
          const __m256 wk = _mm256_mul_ps(w[k], sv);
          for (int b = 0; b < B; ++b)
            acc[b][k % P] = _mm256_fmadd_ps(wk, _mm256_loadu_ps(xs + b * n_in + 32 * g + 8 * k), acc[b][k % P]);
        }
      }
      for (int b = 0; b < B; ++b) {
        __m256 sum = acc[b][0];
        for (int p = 1; p < P; ++p) sum = _mm256_add_ps(sum, acc[b][p]);
        finish(y + b * n_out + j, hsum(sum) + shift(j, b) + (bias ? bias[j] : 0.0f), e);
      }
    }
    return;
  }
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t j = 0; j < n_out; ++j) {
    __m256 total[B];
    for (int b = 0; b < B; ++b) total[b] = _mm256_setzero_ps();
    for (int64_t g = 0; g < n_groups; ++g) {
      __m256 dot[B];
      dot_rows<B>(weights, xs, n_in, j, g * group, std::min((g + 1) * group, n_in), dot);
      const __m256 s = _mm256_set1_ps(scale(j, g));
      for (int b = 0; b < B; ++b) total[b] = _mm256_fmadd_ps(dot[b], s, total[b]);
    }
    for (int b = 0; b < B; ++b) finish(y + b * n_out + j, hsum(total[b]) + shift(j, b) + (bias ? bias[j] : 0.0f), e);
  }
}

#define LMSTACK_DISPATCH_ROWS(rows, CALL) \
  switch (rows) {                         \
    case 1: CALL(1); break;               \
    case 2: CALL(2); break;               \
    case 3: CALL(3); break;               \
    case 4: CALL(4); break;               \
    case 5: CALL(5); break;               \
    case 6: CALL(6); break;               \
    case 7: CALL(7); break;               \
    case 8: CALL(8); break;               \
    default: return 1;                    \
  }

// int8: scales per row (group 0), or per group of `group` inputs (GGUF's Q8_0: 32).
inline int int8_matmul(const float* x, const int8_t* q, const float* scales, const float* bias, float* y, int64_t rows,
                       int64_t n_out, int64_t n_in, int64_t group, int threads, Epilogue e = Epilogue::kStore) {
  if (n_in % 32 || group % 32 || rows < 1 || rows > 8) return 1;
  if (group == 0) {
#define CALL(B) int8_rows<B>(x, q, scales, bias, y, n_out, n_in, threads, e)
    LMSTACK_DISPATCH_ROWS(rows, CALL)
#undef CALL
    return 0;
  }
  const int64_t n_groups = (n_in + group - 1) / group;
  auto scale = [=](int64_t j, int64_t g) { return scales[j * n_groups + g]; };
  auto no_shift = [](int64_t, int) { return 0.0f; };
#define CALL(B) grouped_rows<B>(Int8Weights{q}, x, bias, y, n_out, n_in, group, threads, scale, no_shift, e)
  LMSTACK_DISPATCH_ROWS(rows, CALL)
#undef CALL
  return 0;
}

// int4: weight = (code - 8 - zero) * scale (code in [0, 16), integer zero points), or with `mins` non-null
// weight = code * scale + min (GGUF's Q4_1). Either way a group adds scale * sum(code * x) + c * sum(x), with
// c = -(8 + zero) * scale or c = min, and the sums of x per group computed once per call.
inline int int4_matmul(const float* x, const uint8_t* q, const float* scales, const int8_t* zeros, const float* mins,
                       const float* bias, float* y, int64_t rows, int64_t n_out, int64_t n_in, int64_t group,
                       int threads, Epilogue e = Epilogue::kStore) {
  if (n_in % 32 || group % 32 || group == 0 || rows < 1 || rows > 8) return 1;
  const std::vector<float> xs = reorder_for_codes(x, rows, n_in, false);
  const int64_t n_groups = (n_in + group - 1) / group;
  std::vector<float> xsum(rows * n_groups, 0.0f);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t k = 0; k < n_in; ++k) xsum[r * n_groups + k / group] += x[r * n_in + k];
  auto scale = [=](int64_t j, int64_t g) { return scales[j * n_groups + g]; };
  auto shift = [=, &xsum](int64_t j, int b) {
    float s = 0.0f;
    for (int64_t g = 0; g < n_groups; ++g) {
      const int64_t i = j * n_groups + g;
      s += (mins ? mins[i] : -(8.0f + zeros[i]) * scales[i]) * xsum[b * n_groups + g];
    }
    return s;
  };
#define CALL(B) grouped_rows<B>(Int4Weights{q}, xs.data(), bias, y, n_out, n_in, group, threads, scale, shift, e)
  LMSTACK_DISPATCH_ROWS(rows, CALL)
#undef CALL
  return 0;
}

#ifdef __AVX512F__
// NF4 with AVX-512: one vpermps looks up 16 levels (the table is one zmm and the index's low 4 bits pick the
// entry), against two permutes and a blend per 8 on AVX2. A run of 32 codes (16 bytes) widens to 16 int32 lanes,
// one byte each: the byte's low 4 bits index the odd elements (NF4 packs the first element of a pair in the high
// nibble), the byte shifted right by 4 the even ones, so x is laid out per run as [evens | odds]
// (nf4_evens_then_odds). Each block's absmax scales its 64 weights before the multiply-adds.
inline std::vector<float> nf4_evens_then_odds(const float* x, int64_t rows, int64_t n) {
  std::vector<float> out(rows * n);
  for (int64_t i = 0; i < rows * n; i += 32) evens_then_odds(x + i, out.data() + i, 16);  // n % 64 == 0
  return out;
}

template <int B, class Scale>
void nf4_rows_avx512(const float* xs, const uint8_t* q, const float* levels, const float* bias, float* y,
                     int64_t n_out, int64_t n_in, int threads, Scale scale, Epilogue e) {
  const __m512 table = _mm512_loadu_ps(levels);
  const int64_t blocks = n_in / 64;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t j = 0; j < n_out; ++j) {
    const uint8_t* row = q + j * (n_in / 2);
    __m512 acc[B][2];
    for (int b = 0; b < B; ++b) acc[b][0] = acc[b][1] = _mm512_setzero_ps();
    for (int64_t g = 0; g < blocks; ++g) {
      _mm_prefetch(reinterpret_cast<const char*>(row + 32 * g) + 8192, _MM_HINT_T1);  // as dynamic_kernels.h does
      const __m512 absmax = _mm512_set1_ps(scale(j, g));
      for (int run = 0; run < 2; ++run) {
        const int64_t c = 64 * g + 32 * run;
        const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + c / 2)));
        const __m512 evens = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(bytes, 4), table), absmax);
        const __m512 odds = _mm512_mul_ps(_mm512_permutexvar_ps(bytes, table), absmax);
        for (int b = 0; b < B; ++b) {
          acc[b][0] = _mm512_fmadd_ps(evens, _mm512_loadu_ps(xs + b * n_in + c), acc[b][0]);
          acc[b][1] = _mm512_fmadd_ps(odds, _mm512_loadu_ps(xs + b * n_in + c + 16), acc[b][1]);
        }
      }
    }
    for (int b = 0; b < B; ++b)
      finish(y + b * n_out + j, _mm512_reduce_add_ps(_mm512_add_ps(acc[b][0], acc[b][1])) + (bias ? bias[j] : 0.0f), e);
  }
}
#endif

inline int nf4_matmul(const float* x, const uint8_t* q, const float* levels, const uint8_t* absmax_codes,
                      const float* absmax_code, const float* absmax_scales, float offset, const float* bias, float* y,
                      int64_t rows, int64_t n_out, int64_t n_in, int threads, Epilogue e = Epilogue::kStore) {
  if (n_in % 64 || rows < 1 || rows > 8) return 1;
  const int64_t blocks_per_row = n_in / 64;
  // absmax of block i = code[absmax_codes[i]] * absmax_scales[i / 256] + offset (double quantization);
  // with absmax_codes null, absmax_code holds the plain absmaxes.
  auto scale = [=](int64_t j, int64_t g) {
    const int64_t block = j * blocks_per_row + g;
    return absmax_codes ? absmax_code[absmax_codes[block]] * absmax_scales[block / 256] + offset : absmax_code[block];
  };
#ifdef __AVX512F__
  const std::vector<float> xs = nf4_evens_then_odds(x, rows, n_in);
#define CALL(B) nf4_rows_avx512<B>(xs.data(), q, levels, bias, y, n_out, n_in, threads, scale, e)
  LMSTACK_DISPATCH_ROWS(rows, CALL)
#undef CALL
#else
  const std::vector<float> xs = reorder_for_codes(x, rows, n_in, true);
  auto no_shift = [](int64_t, int) { return 0.0f; };
  const Nf4Weights weights{q, _mm256_loadu_ps(levels), _mm256_loadu_ps(levels + 8)};
#define CALL(B) grouped_rows<B>(weights, xs.data(), bias, y, n_out, n_in, 64, threads, scale, no_shift, e)
  LMSTACK_DISPATCH_ROWS(rows, CALL)
#undef CALL
#endif
  return 0;
}

// 2:4 semi-structured fp32 weights (lmstack/compress/semi_sparse.py): of every 4 consecutive inputs of a row,
// the 2 kept weights are stored in element order (values: (n_out, n_in / 2)) with their positions as a
// 4-bit code (bits 0-1: the first kept position, bits 2-3: the second); two groups share a byte, the first
// in the low nibble (codes: (n_out, n_in / 8)). A run of 32 inputs reads 64 bytes of values and 4 of codes,
// 0.53x the dense row's 128. Each code byte covers 8 columns, expanded in registers by one permute of its 4
// values: the source's lanes 4-7 are zero and a dropped column's index points there.
struct Sparse24Table {
  alignas(32) int32_t index[256][8];
  Sparse24Table() {
    for (int code = 0; code < 256; ++code)
      for (int j = 0; j < 8; ++j) {
        const int group = j / 4, position = j % 4, nibble = (code >> (4 * group)) & 0xF;
        index[code][j] = position == (nibble & 3) ? 2 * group : position == (nibble >> 2) ? 2 * group + 1 : 4;
      }
  }
};

inline const Sparse24Table& sparse24_table() {
  static const Sparse24Table table;
  return table;
}

struct Sparse24Weights {  // get(): the dense weights of the run of 32 at flat dense offset row * n_in + c
  const float* values;
  const uint8_t* codes;
  const Sparse24Table* table;
  inline void get(int64_t offset, __m256 w[4]) const {
    const float* v = values + offset / 2;
    const uint8_t* c = codes + offset / 8;
    for (int k = 0; k < 4; ++k) {
      const __m256 four = _mm256_insertf128_ps(_mm256_setzero_ps(), _mm_loadu_ps(v + 4 * k), 0);
      const __m256i index = _mm256_load_si256(reinterpret_cast<const __m256i*>(table->index[c[k]]));
      w[k] = _mm256_permutevar8x32_ps(four, index);
    }
  }
};

template <int B>
void sparse24_rows(const float* x, const Sparse24Weights& weights, const float* bias, float* y, int64_t n_out,
                   int64_t n_in, int threads, Epilogue e) {
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t j = 0; j < n_out; ++j) {
    __m256 dot[B];
    dot_rows<B>(weights, x, n_in, j, 0, n_in, dot);
    for (int b = 0; b < B; ++b) finish(y + b * n_out + j, hsum(dot[b]) + (bias ? bias[j] : 0.0f), e);
  }
}

inline int sparse24_matmul(const float* x, const float* values, const uint8_t* codes, const float* bias, float* y,
                           int64_t rows, int64_t n_out, int64_t n_in, int threads, Epilogue e = Epilogue::kStore) {
  if (n_in % 32 || rows < 1 || rows > 8 || !values || !codes) return 1;
  const Sparse24Weights weights{values, codes, &sparse24_table()};
#define CALL(B) sparse24_rows<B>(x, weights, bias, y, n_out, n_in, threads, e)
  LMSTACK_DISPATCH_ROWS(rows, CALL)
#undef CALL
  return 0;
}

}  // namespace quant
}  // namespace lmstack
