// Torch-free 16-bit float types for the CPU kernels, bit-compatible with c10::Half / c10::BFloat16:
// the glue reinterpret_casts tensor data pointers to these. Conversions round to nearest even,
// exactly as c10 does, so results match torch bit for bit.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace smoe {

struct half_t {
  uint16_t bits;
};
struct bfloat16_t {
  uint16_t bits;
};

namespace detail {
inline float fp32_from_bits(uint32_t w) {
  float f;
  std::memcpy(&f, &w, sizeof f);
  return f;
}
inline uint32_t fp32_to_bits(float f) {
  uint32_t w;
  std::memcpy(&w, &f, sizeof w);
  return w;
}
}  // namespace detail

// Maratyszcza's FP16 conversions (the ones c10 uses).
inline float to_float(half_t h) {
  using detail::fp32_from_bits;
  using detail::fp32_to_bits;
  const uint32_t w = static_cast<uint32_t>(h.bits) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const uint32_t exp_offset = 0xE0u << 23;
  const float exp_scale = 0x1.0p-112f;
  const float normalized = fp32_from_bits((two_w >> 4) + exp_offset) * exp_scale;
  const uint32_t magic_mask = 126u << 23;
  const float denormalized = fp32_from_bits((two_w >> 17) | magic_mask) - 0.5f;
  const uint32_t denormalized_cutoff = 1u << 27;
  const uint32_t result =
      sign | (two_w < denormalized_cutoff ? fp32_to_bits(denormalized) : fp32_to_bits(normalized));
  return fp32_from_bits(result);
}

inline half_t to_half(float f) {
  using detail::fp32_from_bits;
  using detail::fp32_to_bits;
  const float scale_to_inf = 0x1.0p+112f;
  const float scale_to_zero = 0x1.0p-110f;
  float base = (std::fabs(f) * scale_to_inf) * scale_to_zero;
  const uint32_t w = fp32_to_bits(f);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xFF000000u;
  if (bias < 0x71000000u) bias = 0x71000000u;
  base = fp32_from_bits((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = fp32_to_bits(base);
  const uint32_t exp_bits = (bits >> 13) & 0x00007C00u;
  const uint32_t mantissa_bits = bits & 0x00000FFFu;
  const uint32_t nonsign = exp_bits + mantissa_bits;
  return half_t{static_cast<uint16_t>((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign))};
}

inline float to_float(bfloat16_t b) {
  return detail::fp32_from_bits(static_cast<uint32_t>(b.bits) << 16);
}

// Branch-free (NaN by a select, not an early return) so that loops storing bf16 vectorise.
inline bfloat16_t to_bfloat16(float f) {
  const uint32_t u = detail::fp32_to_bits(f);
  const uint32_t rounding_bias = 0x7FFFu + ((u >> 16) & 1u);
  const uint32_t rounded = (u + rounding_bias) >> 16;
  const bool nan = (u & 0x7FFFFFFFu) > 0x7F800000u;
  return bfloat16_t{static_cast<uint16_t>(nan ? 0x7FC0u : rounded)};
}

inline float to_float(float f) { return f; }
inline double to_float(double d) { return d; }

// The type arithmetic happens in: float for every storage type but double.
template <typename T>
struct acc_type {
  using type = float;
};
template <>
struct acc_type<double> {
  using type = double;
};
template <typename T>
using acc_t = typename acc_type<T>::type;

// Store an accumulator value into a storage type.
template <typename T>
inline T from_acc(acc_t<T> v);
template <>
inline float from_acc<float>(float v) {
  return v;
}
template <>
inline double from_acc<double>(double v) {
  return v;
}
template <>
inline half_t from_acc<half_t>(float v) {
  return to_half(v);
}
template <>
inline bfloat16_t from_acc<bfloat16_t>(float v) {
  return to_bfloat16(v);
}

template <typename T>
inline acc_t<T> load(const T& v) {
  return static_cast<acc_t<T>>(to_float(v));
}

}  // namespace smoe
