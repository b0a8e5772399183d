// Scalar helpers for the CPU kernels: 16-bit float storage and an exp that vectorises.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

namespace skd::cpu {

struct Half { uint16_t bits; };
struct BFloat16 { uint16_t bits; };

inline float bits_to_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
inline uint32_t float_to_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }

template <typename T> inline float to_acc(T v) { return static_cast<float>(v); }
inline double to_acc(double v) { return v; }
inline float to_acc(BFloat16 v) { return bits_to_float(uint32_t(v.bits) << 16); }
inline float to_acc(Half v) {
  // IEEE binary16 -> binary32, subnormals included.
  uint32_t sign = uint32_t(v.bits & 0x8000) << 16, exp = (v.bits >> 10) & 0x1f, man = v.bits & 0x3ff;
  if (exp == 0x1f) return bits_to_float(sign | 0x7f800000u | (man << 13));
  if (exp == 0) {
    float f = std::ldexp(float(man), -24);
    return sign ? -f : f;
  }
  return bits_to_float(sign | ((exp + 112) << 23) | (man << 13));
}

template <typename T> inline void store(T* p, float v) { *p = static_cast<T>(v); }
inline void store(double* p, double v) { *p = v; }
inline void store(BFloat16* p, float v) {
  uint32_t u = float_to_bits(v);
  if (std::isnan(v)) { p->bits = 0x7fc0; return; }
  u += 0x7fff + ((u >> 16) & 1);  // round to nearest, ties to even
  p->bits = uint16_t(u >> 16);
}
inline void store(Half* p, float v) {
  // binary32 -> binary16, round to nearest even, with overflow to inf and gradual underflow.
  uint32_t u = float_to_bits(v), sign = (u >> 16) & 0x8000;
  float a = std::fabs(v);
  if (std::isnan(v)) { p->bits = uint16_t(sign | 0x7e00); return; }
  if (a >= 65520.f) { p->bits = uint16_t(sign | 0x7c00); return; }
  if (a < 6.103515625e-05f) {  // subnormal half: quantise to multiples of 2^-24
    p->bits = uint16_t(sign | uint32_t(std::nearbyint(a * 16777216.f)));
    return;
  }
  uint32_t au = float_to_bits(a);
  au += 0x0fff + ((au >> 13) & 1);
  p->bits = uint16_t(sign | (((au >> 23) - 112) << 10) | ((au >> 13) & 0x3ff));
}

// exp(x) for x <= 0 (all our arguments are logit - max). Plain arithmetic and an int cast, so
// GCC vectorises loops calling it (with -fno-trapping-math), unlike std::exp; relative error about
// 2 ulp.
inline float exp_nonpositive(float x) {
  // Below -87 the result underflows: return exactly 0 (a -inf logit must weigh nothing), computing
  // on a clamped x meanwhile; a NaN fails both tests and stays NaN.
  const float underflow = x < -87.0f ? 0.0f : 1.0f;
  x = x < -87.0f ? -87.0f : x;
  const float y = x * 1.44269504088896341f;
  const int n = static_cast<int>(y - 0.5f);  // round to nearest for y <= 0
  const float nf = static_cast<float>(n);
  const float r = (x - nf * 0.693359375f) + nf * 2.12194440e-4f;  // Cody-Waite ln2 split
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  return underflow * p * bits_to_float(uint32_t(n + 127) << 23);
}
inline double exp_nonpositive(double x) { return std::exp(x); }

}  // namespace skd::cpu
