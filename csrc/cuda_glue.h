// Glue helpers shared by the CUDA glue files (csrc/cuda/*_launch.cpp): the CUDA storage type of
// an ATen dtype, the fp32/fp16/bf16 dispatch, and typed data pointers. Torch headers allowed.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace smoe::ops {

// The CUDA storage type of an ATen scalar type (bit-compatible: the data pointer is cast).
template <typename S>
struct cuda_type {
  using type = S;
};
template <>
struct cuda_type<c10::Half> {
  using type = __half;
};
template <>
struct cuda_type<c10::BFloat16> {
  using type = __nv_bfloat16;
};

// clang-format off
#define SMOE_CUDA_DISPATCH(dtype, name, ...)                 \
  AT_DISPATCH_SWITCH(dtype, name,                            \
      AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)              \
      AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)               \
      AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))
// clang-format on

inline void check_not_double(const char* op, const at::Tensor& t) {
  TORCH_CHECK(t.scalar_type() != at::kDouble, "smoe::", op,
              ": float64 is supported on CPU only, got float64 on cuda");
}

template <typename S>
auto kptr(const at::Tensor& t) {
  return reinterpret_cast<const typename cuda_type<S>::type*>(t.const_data_ptr<S>());
}
template <typename S>
auto kmut(at::Tensor& t) {
  return reinterpret_cast<typename cuda_type<S>::type*>(t.mutable_data_ptr<S>());
}

}  // namespace smoe::ops
