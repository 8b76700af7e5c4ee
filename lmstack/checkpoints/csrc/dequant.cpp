// GGML block dequantisation to float32, the fast path beside lmstack/checkpoints/gguf_quants.py (numpy, the
// reference; both are tested equal bit for bit). Same formulas and the same order of float32 operations,
// compiled with -ffp-contract=off so no multiply-add is fused. OpenMP over blocks. Plain C ABI (ctypes).
#include <cstdint>
#include <cstring>

namespace {
float half_to_float(uint16_t h) {
  uint32_t sign = static_cast<uint32_t>(h & 0x8000) << 16, exponent = (h >> 10) & 0x1F, mantissa = h & 0x3FF, bits;
  if (exponent == 0x1F) {
    bits = sign | 0x7F800000 | (mantissa << 13);  // inf / nan
  } else if (exponent != 0) {
    bits = sign | ((exponent + 112) << 23) | (mantissa << 13);
  } else if (mantissa == 0) {
    bits = sign;  // signed zero
  } else {  // subnormal: normalise
    int shift = 0;
    while (!(mantissa & 0x400)) { mantissa <<= 1; ++shift; }
    bits = sign | static_cast<uint32_t>(113 - shift) << 23 | ((mantissa & 0x3FF) << 13);
  }
  float out;
  std::memcpy(&out, &bits, 4);
  return out;
}

float f16(const uint8_t* p) { return half_to_float(static_cast<uint16_t>(p[0] | (p[1] << 8))); }

// get_scale_min_k4 of ggml: 6-bit scale and min j (0..7) from 12 packed bytes
void scale_min_k4(int j, const uint8_t* q, float* scale, float* min) {
  if (j < 4) {
    *scale = q[j] & 63;
    *min = q[j + 4] & 63;
  } else {
    *scale = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
    *min = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
  }
}

void q8_0(const uint8_t* b, float* y) {
  float d = f16(b);
  for (int i = 0; i < 32; ++i) y[i] = d * static_cast<float>(static_cast<int8_t>(b[2 + i]));
}
void q4_0(const uint8_t* b, float* y) {
  float d = f16(b);
  for (int i = 0; i < 16; ++i) {
    y[i] = d * static_cast<float>(static_cast<int8_t>(b[2 + i] & 0xF) - 8);
    y[i + 16] = d * static_cast<float>(static_cast<int8_t>(b[2 + i] >> 4) - 8);
  }
}
void q4_1(const uint8_t* b, float* y) {
  float d = f16(b), m = f16(b + 2);
  for (int i = 0; i < 16; ++i) {
    y[i] = d * static_cast<float>(b[4 + i] & 0xF) + m;
    y[i + 16] = d * static_cast<float>(b[4 + i] >> 4) + m;
  }
}
uint32_t u32(const uint8_t* p) { return p[0] | (p[1] << 8) | (p[2] << 16) | (static_cast<uint32_t>(p[3]) << 24); }
void q5_0(const uint8_t* b, float* y) {
  float d = f16(b);
  uint32_t qh = u32(b + 2);
  for (int i = 0; i < 16; ++i) {
    int lo = (b[6 + i] & 0xF) | (((qh >> i) & 1) << 4), hi = (b[6 + i] >> 4) | (((qh >> (i + 16)) & 1) << 4);
    y[i] = d * static_cast<float>(static_cast<int8_t>(lo - 16));
    y[i + 16] = d * static_cast<float>(static_cast<int8_t>(hi - 16));
  }
}
void q5_1(const uint8_t* b, float* y) {
  float d = f16(b), m = f16(b + 2);
  uint32_t qh = u32(b + 4);
  for (int i = 0; i < 16; ++i) {
    int lo = (b[8 + i] & 0xF) | (((qh >> i) & 1) << 4), hi = (b[8 + i] >> 4) | (((qh >> (i + 16)) & 1) << 4);
    y[i] = d * static_cast<float>(lo) + m;
    y[i + 16] = d * static_cast<float>(hi) + m;
  }
}
void q2_k(const uint8_t* b, float* y) {
  const uint8_t *scales = b, *q = b + 16;
  float d = f16(b + 80), dmin = f16(b + 82);
  int is = 0;
  for (int n = 0; n < 256; n += 128, q += 32) {
    for (int shift = 0; shift < 8; shift += 2) {
      for (int half = 0; half < 2; ++half) {
        uint8_t sc = scales[is++];
        float dl = d * static_cast<float>(sc & 0xF), ml = dmin * static_cast<float>(sc >> 4);
        for (int l = 0; l < 16; ++l) *y++ = dl * static_cast<float>((q[l + 16 * half] >> shift) & 3) - ml;
      }
    }
  }
}
void q3_k(const uint8_t* b, float* y) {
  const uint8_t *hmask = b, *q = b + 32, *packed = b + 96;
  float d = f16(b + 108);
  int8_t scales[16];
  for (int j = 0; j < 16; ++j) {
    int low = j < 8 ? packed[j] & 0xF : packed[j - 8] >> 4;
    int high = (packed[8 + (j % 4)] >> (2 * (j / 4))) & 3;
    scales[j] = static_cast<int8_t>((low | (high << 4)) - 32);
  }
  int is = 0;
  uint8_t m = 1;
  for (int n = 0; n < 256; n += 128, q += 32) {
    for (int shift = 0; shift < 8; shift += 2, m <<= 1) {
      for (int half = 0; half < 2; ++half) {
        float dl = d * static_cast<float>(scales[is++]);
        for (int l = 0; l < 16; ++l) {
          int k = l + 16 * half;
          int code = static_cast<int8_t>(((q[k] >> shift) & 3) - ((hmask[k] & m) ? 0 : 4));
          *y++ = dl * static_cast<float>(code);
        }
      }
    }
  }
}
void q4_k(const uint8_t* b, float* y) {
  float d = f16(b), dmin = f16(b + 2);
  const uint8_t *packed = b + 4, *q = b + 16;
  for (int j = 0; j < 8; j += 2, q += 32) {
    float s1, m1, s2, m2;
    scale_min_k4(j, packed, &s1, &m1);
    scale_min_k4(j + 1, packed, &s2, &m2);
    float d1 = d * s1, dm1 = dmin * m1, d2 = d * s2, dm2 = dmin * m2;
    for (int l = 0; l < 32; ++l) *y++ = d1 * static_cast<float>(q[l] & 0xF) - dm1;
    for (int l = 0; l < 32; ++l) *y++ = d2 * static_cast<float>(q[l] >> 4) - dm2;
  }
}
void q5_k(const uint8_t* b, float* y) {
  float d = f16(b), dmin = f16(b + 2);
  const uint8_t *packed = b + 4, *qh = b + 16, *ql = b + 48;
  for (int j = 0; j < 8; j += 2, ql += 32) {
    float s1, m1, s2, m2;
    scale_min_k4(j, packed, &s1, &m1);
    scale_min_k4(j + 1, packed, &s2, &m2);
    float d1 = d * s1, dm1 = dmin * m1, d2 = d * s2, dm2 = dmin * m2;
    for (int l = 0; l < 32; ++l) *y++ = d1 * static_cast<float>((ql[l] & 0xF) | (((qh[l] >> j) & 1) << 4)) - dm1;
    for (int l = 0; l < 32; ++l) *y++ = d2 * static_cast<float>((ql[l] >> 4) | (((qh[l] >> (j + 1)) & 1) << 4)) - dm2;
  }
}
void q6_k(const uint8_t* b, float* y) {
  const uint8_t *ql = b, *qh = b + 128;
  const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);
  float d = f16(b + 208);
  for (int n = 0; n < 256; n += 128, ql += 64, qh += 32, sc += 8, y += 128) {
    for (int l = 0; l < 32; ++l) {
      int is = l / 16;
      int q1 = static_cast<int8_t>(((ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32);
      int q2 = static_cast<int8_t>(((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32);
      int q3 = static_cast<int8_t>(((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32);
      int q4 = static_cast<int8_t>(((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32);
      y[l] = (d * static_cast<float>(sc[is])) * static_cast<float>(q1);
      y[l + 32] = (d * static_cast<float>(sc[is + 2])) * static_cast<float>(q2);
      y[l + 64] = (d * static_cast<float>(sc[is + 4])) * static_cast<float>(q3);
      y[l + 96] = (d * static_cast<float>(sc[is + 6])) * static_cast<float>(q4);
    }
  }
}

typedef void (*BlockFn)(const uint8_t*, float*);
struct Format { const char* name; int elements, bytes; BlockFn fn; };
const Format FORMATS[] = {{"Q8_0", 32, 34, q8_0}, {"Q4_0", 32, 18, q4_0}, {"Q4_1", 32, 20, q4_1},
                          {"Q5_0", 32, 22, q5_0}, {"Q5_1", 32, 24, q5_1}, {"Q2_K", 256, 84, q2_k},
                          {"Q3_K", 256, 110, q3_k}, {"Q4_K", 256, 144, q4_k}, {"Q5_K", 256, 176, q5_k},
                          {"Q6_K", 256, 210, q6_k}};
}  // namespace

extern "C" {
// Returns 0 on success, -1 for an unknown format name.
int dequantize(const char* format, const uint8_t* blocks, int64_t n_blocks, float* out) {
  for (const Format& f : FORMATS) {
    if (std::strcmp(f.name, format) != 0) continue;
#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n_blocks; ++i) f.fn(blocks + i * f.bytes, out + i * f.elements);
    return 0;
  }
  return -1;
}
}
