// Torch-free scalar math that the compiler can vectorise (no branches, no libm calls).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace smoe {

// exp(x) for float with max relative error < 1e-7 on [-87, 88] (Cephes' expf polynomial, with
// branch-free clamping and round-to-nearest by the 1.5 * 2^23 trick so that -O3 vectorises it;
// needs -fno-trapping-math, which setup.py sets as torch does). Outside that range it returns 0
// and +inf (as expf does, up to 1.2e-38 and 1.7e38): a value saturated at exp(88) made
// sigmoid(x) >= 6e-39, so silu(x) = x * sigmoid(x) grew without bound for x < -88 instead of -> 0.
#if defined(__GNUC__)
__attribute__((always_inline))
#endif
inline float
exp_approx(float x_in) {
  float x = x_in < -87.0f ? -87.0f : x_in;
  x = x > 88.0f ? 88.0f : x;
  const float fx = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  x = x - fx * 0.693359375f + fx * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * x + 1.3981999507e-3f;
  p = p * x + 8.3334519073e-3f;
  p = p * x + 4.1665795894e-2f;
  p = p * x + 1.6666665459e-1f;
  p = p * x + 5.0000001201e-1f;
  p = p * x * x + x + 1.0f;
  const int32_t bits = (static_cast<int32_t>(fx) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  const float r = x_in < -87.0f ? 0.0f : p * scale;
  return x_in > 88.0f ? INFINITY : r;
}

// exp in a kernel's accumulation type: the vectorisable polynomial above for float, libm's for
// double (the float64 path, whose results the tests hold to float64 accuracy).
inline float exp_acc(float x) { return exp_approx(x); }
inline double exp_acc(double x) { return std::exp(x); }

inline float sigmoid(float x) { return 1.0f / (1.0f + exp_approx(-x)); }
inline double sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }

}  // namespace smoe
