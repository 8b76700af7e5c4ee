// Skinny matmuls (1 to 8 rows of x) of int8 or int4 weights with *dynamically quantized* int8 activations:
// x is rounded to int8 per block of inputs when the call starts, and every product is an integer one.
//
// Why: with fp32 activations each weight costs an unpack, an int -> float conversion and an FMA (about
// 0.5 vector instructions per weight); with int8 activations 16 to 32 weights share one integer
// multiply-add (vpmaddubsw / vpmaddwd) and the conversion happens once per group. That is how llama.cpp
// computes its Q8_0 and Q4_0 dot products.
//
// Activation blocks follow the weight's scales along the inputs: one block per row of x for per-row int8
// (torchao's Int8DynamicActivationInt8Weight: per-token), one block per weight group otherwise. Per block:
//     scale = max(amax / L, eps),  q = clamp(round_half_even(x * (1 / scale)), -128, 127)
// with L = 127.5 per token (torchao's rule) and L = 127 per group (llama.cpp's Q8_0 rule: the largest
// element lands on +-127 exactly, not on a rounding boundary); lmstack/compress/formats.py
// quantize_activations is the readable twin. The integer dot of a block is exact; the result is the sum
// over blocks of dot * x_scale * w_scale (+ zero-point terms).
#pragma once

#include <immintrin.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "quant_kernels.h"  // LMSTACK_DISPATCH_ROWS
#include "skinny_kernels.h"

namespace lmstack {
namespace quant {

inline int32_t hsum_epi32(__m256i v) {
  const __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  const __m128i t = _mm_add_epi32(s, _mm_unpackhi_epi64(s, s));
  return _mm_cvtsi128_si32(_mm_add_epi32(t, _mm_shuffle_epi32(t, 1)));
}

// L of the rule above: 127.5 per token (block 0), 127 per group.
inline float activation_levels(int64_t block) { return block ? 127.0f : 127.5f; }

// The scale of one block of activations (n a multiple of 8): max(amax / levels, eps).
inline float block_scale(const float* x, int64_t n, float levels) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 top = _mm256_setzero_ps();
  for (int64_t i = 0; i < n; i += 8) top = _mm256_max_ps(top, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + i)));
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(top), _mm256_extractf128_ps(top, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  return std::max(_mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m))) / levels, FLT_EPSILON);
}

// The int8 codes of 8 activations, as floats: round half to even (as torch.round) of x * (1 / scale),
// clamped to [-128, 127].
inline __m256 block_codes(const float* x, __m256 inv) {
  const __m256 v = _mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(x), inv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  return _mm256_min_ps(_mm256_set1_ps(127.0f), _mm256_max_ps(_mm256_set1_ps(-128.0f), v));
}

// x (rows, n) -> y (rows, n): every value replaced by the one its int8 code stands for (code * scale; block 0:
// per row with L = 127.5, else per block of `block` with L = 127), for prompts, which multiply these in
// fp32 over dequantised tiles. Equal to formats.fake_quantize_activations bit for bit.
inline void fake_quantize_activations(const float* x, float* y, int64_t rows, int64_t n, int64_t block, int threads) {
  const float levels = activation_levels(block);
  const int64_t size = block ? block : n, n_blocks = (n + size - 1) / size;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t i = 0; i < rows * n_blocks; ++i) {
    const int64_t r = i / n_blocks, lo = (i % n_blocks) * size, hi = std::min(lo + size, n);
    const float* xr = x + r * n;
    const float scale = block_scale(xr + lo, hi - lo, levels);
    const __m256 inv = _mm256_set1_ps(1.0f / scale), s = _mm256_set1_ps(scale);
    for (int64_t k = lo; k < hi; k += 8) _mm256_storeu_ps(y + r * n + k, _mm256_mul_ps(block_codes(xr + k, inv), s));
  }
}

// x (rows, n) quantized per block of `block` inputs. Codes are stored as int16 (int8 weights are multiplied
// with vpmaddwd) or int8 reordered per run of 32 as [elements 0, 2, ..., 30 | 1, 3, ..., 31] (matching the
// nibbles of the int4 layout, see int4_run_codes); `sums` holds scale * sum(codes) per block (the sum of the
// quantized x, which int4's zero points multiply).
struct QuantizedActivations {
  int64_t rows, n, block, n_blocks;
  std::vector<int16_t> q16;
  std::vector<int8_t> q8;
  std::vector<float> scales, sums;

  // block_ == 0: per token (L = 127.5), else per group of block_ (L = 127).
  QuantizedActivations(const float* x, int64_t rows_, int64_t n_, int64_t block_, bool for_int4)
      : rows(rows_), n(n_), block(block_ ? block_ : n_), n_blocks((n_ + block - 1) / block) {
    const float levels = activation_levels(block_);
    std::vector<int16_t> codes(rows * n);
    scales.resize(rows * n_blocks), sums.resize(rows * n_blocks);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t b = 0; b < n_blocks; ++b) {
        const int64_t lo = b * block, hi = std::min(lo + block, n);  // multiples of 8 (of 32, in fact)
        const float* xr = x + r * n;
        const float scale = block_scale(xr + lo, hi - lo, levels);
        const __m256 inv = _mm256_set1_ps(1.0f / scale);
        __m256i total = _mm256_setzero_si256();
        for (int64_t i = lo; i < hi; i += 8) {
          const __m256i q = _mm256_cvtps_epi32(block_codes(xr + i, inv));  // narrowed to int16 below
          total = _mm256_add_epi32(total, q);
          _mm_storeu_si128(reinterpret_cast<__m128i*>(codes.data() + r * n + i),
                           _mm_packs_epi32(_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1)));
        }
        scales[r * n_blocks + b] = scale;
        sums[r * n_blocks + b] = scale * static_cast<float>(hsum_epi32(total));
      }
    if (!for_int4) {
      q16 = std::move(codes);
      return;
    }
    q8.resize(rows * n);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t c = 0; c < n; c += 32)
        for (int i = 0; i < 16; ++i) {
          q8[r * n + c + i] = static_cast<int8_t>(codes[r * n + c + 2 * i]);
          q8[r * n + c + 16 + i] = static_cast<int8_t>(codes[r * n + c + 2 * i + 1]);
        }
  }
};

// The 32 int4 codes (0..15) of one run, as bytes in the order of QuantizedActivations' int4 layout: the 16
// packed bytes are loaded into both halves; the low half keeps the low nibbles (even elements), the high
// half is shifted right by 4 first (odd elements). Shift + mask only: no shuffle.
inline __m256i int4_run_codes(const uint8_t* p) {
  const __m256i bytes = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  const __m256i shifted = _mm256_srlv_epi32(bytes, _mm256_setr_epi32(0, 0, 0, 0, 4, 4, 4, 4));
  return _mm256_and_si256(shifted, _mm256_set1_epi8(0x0F));
}

// Products of one run of 32: int4 codes (unsigned bytes) times int8 activations as 16 int16 pair sums (each
// at most 2 * 15 * 128 = 3840 in magnitude, so up to 8 runs, a group of 256, add up in int16 without
// overflow and are widened once per group); int8 weights times int16 activations as 8 int32 (vpmaddwd).
struct Int4Products {
  static __m256i run(__m256i codes, const int8_t* x) {
    return _mm256_maddubs_epi16(codes, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x)));
  }
  static __m256i add(__m256i a, __m256i b) { return _mm256_add_epi16(a, b); }
  static __m256i widen(__m256i a) { return _mm256_madd_epi16(a, _mm256_set1_epi16(1)); }
};

struct Int8Products {
  static __m256i run(const int8_t* w, const int16_t* x) {
    const __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w)));
    const __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + 16)));
    const __m256i a = _mm256_madd_epi16(w0, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x)));
    return _mm256_add_epi32(a, _mm256_madd_epi16(w1, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 16))));
  }
  static __m256i add(__m256i a, __m256i b) { return _mm256_add_epi32(a, b); }
  static __m256i widen(__m256i a) { return a; }
};

// The weights of one output row, a run of 32 columns at a time, in the form Products multiplies.
struct Int4Row {
  const uint8_t* p;
  __m256i run(int64_t c) const {
    // 2 KiB ahead (seven 576-wide rows): at half a byte per weight the stream outruns the hardware
    // prefetcher on one thread (measured: 108 -> 116 tokens/s decoding SmolLM2 int4 with int8 activations)
    _mm_prefetch(reinterpret_cast<const char*>(p + (c >> 1) + 2048), _MM_HINT_T0);
    return int4_run_codes(p + (c >> 1));
  }
};
struct Int8Row {
  const int8_t* p;
  const int8_t* run(int64_t c) const { return p + c; }
};

// idot[b] = the integer products of `runs` runs of 32 columns from column c, for each row b of x, as 8 int32.
// Called with a compile-time `runs` for whole blocks (the loop unrolls) and a run-time one for a shorter last.
template <int B, class Products, class Row, class Activations>
inline void block_dot(const Row& row, int64_t c, int runs, const Activations* xs, int64_t n_in, __m256i idot[B]) {
  for (int b = 0; b < B; ++b) idot[b] = _mm256_setzero_si256();
  for (int r = 0; r < runs; ++r, c += 32) {
    const auto w = row.run(c);
    for (int b = 0; b < B; ++b) idot[b] = Products::add(idot[b], Products::run(w, xs + b * n_in + c));
  }
  for (int b = 0; b < B; ++b) idot[b] = Products::widen(idot[b]);
}

// acc[r][b] = sum over blocks g of idot(j + r, g, b) * x_scale(b, g) * w_scale(j + r, g) for R consecutive
// weight rows from j: the exact integer dot of each block (RUNS runs of 32 columns; a last block may be
// shorter) scaled in fp32, still as 8 lanes. Blocks alternate between two accumulators, so that blocks
// of 32 do not wait on one FMA chain; R > 1 (with one row of x) interleaves independent weight rows.
// offsets[r][b] = sum over blocks of offset(j + r, g) * xq.sums (int4's zero points or mins; Offset is
// std::nullptr_t for none), computed here beside the products rather than in a second pass over the row.
template <int B, int R, int RUNS, class Products, class RowOf, class Activations, class WScale, class Offset>
inline void dynamic_row_block(const QuantizedActivations& xq, const Activations* xs, int64_t j, RowOf row_of,
                              WScale w_scale, Offset offset, __m256 out[R][B], float offsets[R][B]) {
  constexpr bool kOffsets = !std::is_same_v<Offset, std::nullptr_t>;
  const float* sums = xq.sums.data();
  const int64_t n_in = xq.n, n_blocks = xq.n_blocks, full = n_in / (32 * RUNS);
  const float* x_scales = xq.scales.data();
  decltype(row_of(j)) rows[R];
  for (int r = 0; r < R; ++r) rows[r] = row_of(j + r);
  __m256 acc[R][B][2];
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < B; ++b) acc[r][b][0] = acc[r][b][1] = _mm256_setzero_ps(), offsets[r][b] = 0.0f;
  auto block = [&](int64_t g, int runs, int k) {
    for (int r = 0; r < R; ++r) {
      __m256i idot[B];
      block_dot<B, Products>(rows[r], g * 32 * RUNS, runs, xs, n_in, idot);
      const float ws = w_scale(j + r, g);
      for (int b = 0; b < B; ++b)
        acc[r][b][k] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(idot[b]), _mm256_set1_ps(ws * x_scales[b * n_blocks + g]),
                                       acc[r][b][k]);
      if constexpr (kOffsets) {
        const float c = offset(j + r, g);
        for (int b = 0; b < B; ++b) offsets[r][b] += c * sums[b * n_blocks + g];
      }
    }
  };
  int64_t g = 0;
  for (; g + 1 < full; g += 2) {
    block(g, RUNS, 0);
    block(g + 1, RUNS, 1);
  }
  for (; g < n_blocks; ++g) block(g, static_cast<int>((std::min((g + 1) * 32 * RUNS, n_in) - g * 32 * RUNS) / 32), 0);
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < B; ++b) out[r][b] = _mm256_add_ps(acc[r][b][0], acc[r][b][1]);
}

// y[b, j] = the dot and offsets of dynamic_row_block + bias[j], through the epilogue. With one row of x,
// weight rows go in pairs (more independent work per iteration, one horizontal reduction for two sums).
template <int B, int RUNS, class Products, class RowOf, class Activations, class WScale, class Offset>
void dynamic_rows(const QuantizedActivations& xq, const Activations* xs, const float* bias, float* y, int64_t n_out,
                  int threads, RowOf row_of, WScale w_scale, Offset offset, Epilogue e) {
  constexpr int R = B == 1 ? 2 : 1;
  auto store = [&](int64_t j, int b, float dot) { finish(y + b * n_out + j, dot + (bias ? bias[j] : 0.0f), e); };
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t i = 0; i < n_out / R; ++i) {
    const int64_t j = i * R;
    __m256 dot[R][B];
    float offsets[R][B];
    dynamic_row_block<B, R, RUNS, Products>(xq, xs, j, row_of, w_scale, offset, dot, offsets);
    if constexpr (R == 2) {
      const __m256 t = _mm256_hadd_ps(dot[0][0], dot[1][0]);  // [a01 a23 b01 b23 | a45 a67 b45 b67]
      const __m128 u = _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
      const __m128 v = _mm_hadd_ps(u, u);  // [a b a b]
      store(j, 0, _mm_cvtss_f32(v) + offsets[0][0]);
      store(j + 1, 0, _mm_cvtss_f32(_mm_movehdup_ps(v)) + offsets[1][0]);
    } else {
      for (int b = 0; b < B; ++b) store(j, b, horizontal_sum(dot[0][b]) + offsets[0][b]);
    }
  }
  for (int64_t j = n_out / R * R; j < n_out; ++j) {  // the last row when R == 2 and n_out is odd
    __m256 dot[1][B];
    float offsets[1][B];
    dynamic_row_block<B, 1, RUNS, Products>(xq, xs, j, row_of, w_scale, offset, dot, offsets);
    for (int b = 0; b < B; ++b) store(j, b, horizontal_sum(dot[0][b]) + offsets[0][b]);
  }
}

// Dispatch on runs of 32 per block (block 32, 64, 128 or 256: RUNS = 1, 2, 4 or 8, a constexpr that CALL(B)
// sees) and on rows of x (B = 1..8).
#define LMSTACK_DISPATCH_RUNS_AND_ROWS(block, rows, CALL)                          \
  switch (block) {                                                                \
    case 32: { constexpr int RUNS = 1; LMSTACK_DISPATCH_ROWS(rows, CALL) } break;  \
    case 64: { constexpr int RUNS = 2; LMSTACK_DISPATCH_ROWS(rows, CALL) } break;  \
    case 128: { constexpr int RUNS = 4; LMSTACK_DISPATCH_ROWS(rows, CALL) } break; \
    case 256: { constexpr int RUNS = 8; LMSTACK_DISPATCH_ROWS(rows, CALL) } break; \
    default: return 1;                                                            \
  }

// Per-row int8 weights with per-token activations: one integer dot per row (at most 2^31 / 128^2 = 131072
// inputs), one scale product at the end.
template <int B>
void int8_dynamic_rows_per_token(const QuantizedActivations& xq, const int8_t* q, const float* scales,
                                 const float* bias, float* y, int64_t n_out, int threads, Epilogue e) {
  const int64_t n_in = xq.n;
  const int16_t* x = xq.q16.data();
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t j = 0; j < n_out; ++j) {
    __m256i idot[B][2];
    for (int b = 0; b < B; ++b) idot[b][0] = idot[b][1] = _mm256_setzero_si256();
    const int8_t* w = q + j * n_in;
    for (int64_t c = 0; c < n_in; c += 32) {
      const __m256i w0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + c)));
      const __m256i w1 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + c + 16)));
      for (int b = 0; b < B; ++b) {
        const int16_t* xb = x + b * n_in + c;
        idot[b][0] = _mm256_add_epi32(idot[b][0], _mm256_madd_epi16(w0, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb))));
        idot[b][1] = _mm256_add_epi32(idot[b][1], _mm256_madd_epi16(w1, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb + 16))));
      }
    }
    for (int b = 0; b < B; ++b) {
      const float dot = static_cast<float>(hsum_epi32(_mm256_add_epi32(idot[b][0], idot[b][1])));
      finish(y + b * n_out + j, dot * xq.scales[b] * scales[j] + (bias ? bias[j] : 0.0f), e);
    }
  }
}

// int8 weights (scales per row: group 0, or per group) times int8 activations.
inline int int8_dynamic_matmul(const float* x, const int8_t* q, const float* scales, const float* bias, float* y,
                               int64_t rows, int64_t n_out, int64_t n_in, int64_t group, int threads,
                               Epilogue e = Epilogue::kStore) {
  if (n_in % 32 || group % 32 || group > 256 || rows < 1 || rows > 8 || n_in > 131072) return 1;
  const QuantizedActivations xq(x, rows, n_in, group, false);
  if (group == 0) {
#define CALL(B) int8_dynamic_rows_per_token<B>(xq, q, scales, bias, y, n_out, threads, e)
    LMSTACK_DISPATCH_ROWS(rows, CALL)
#undef CALL
    return 0;
  }
  const int64_t n_groups = xq.n_blocks;
  auto row_of = [=](int64_t j) { return Int8Row{q + j * n_in}; };
  auto w_scale = [=](int64_t j, int64_t g) { return scales[j * n_groups + g]; };
#define CALL(B) dynamic_rows<B, RUNS, Int8Products>(xq, xq.q16.data(), bias, y, n_out, threads, row_of, w_scale, nullptr, e)
  LMSTACK_DISPATCH_RUNS_AND_ROWS(group, rows, CALL)
#undef CALL
  return 0;
}

// int4 weights (see int4_matmul in quant_kernels.h: integer zeros, or float mins) times int8 activations
// quantized per weight group: a group adds scale * x_scale * idot(codes, x codes) + c * sum(quantized x),
// c = -(8 + zero) * scale or c = min.
inline int int4_dynamic_matmul(const float* x, const uint8_t* q, const float* scales, const int8_t* zeros,
                               const float* mins, const float* bias, float* y, int64_t rows, int64_t n_out,
                               int64_t n_in, int64_t group, int threads, Epilogue e = Epilogue::kStore) {
  if (n_in % 32 || group % 32 || group == 0 || group > 256 || rows < 1 || rows > 8) return 1;
  const QuantizedActivations xq(x, rows, n_in, group, true);
  const int64_t n_groups = xq.n_blocks;
  auto row_of = [=](int64_t j) { return Int4Row{q + j * (n_in / 2)}; };
  auto w_scale = [=](int64_t j, int64_t g) { return scales[j * n_groups + g]; };
  // what a group adds per unit of sum(quantized x): -(8 + zero) * scale, or Q4_1's min
  auto offset = [=](int64_t j, int64_t g) {
    const int64_t i = j * n_groups + g;
    return mins ? mins[i] : -static_cast<float>(8 + zeros[i]) * scales[i];
  };
#define CALL(B) dynamic_rows<B, RUNS, Int4Products>(xq, xq.q8.data(), bias, y, n_out, threads, row_of, w_scale, offset, e)
  LMSTACK_DISPATCH_RUNS_AND_ROWS(group, rows, CALL)
#undef CALL
  return 0;
}

}  // namespace quant
}  // namespace lmstack
