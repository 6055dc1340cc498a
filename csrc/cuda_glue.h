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

#include <atomic>

#include "cuda/arch.h"

#ifndef SMOE_CUDA_ARCHS
#define SMOE_CUDA_ARCHS ""
#endif

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

// Every CUDA glue function calls this right after its device guard: a GPU whose architecture is not
// compiled in gets one clear sentence instead of "no kernel image" from inside a launch. The answer
// is cached per device, so the steady-state cost is one relaxed atomic load.
inline void check_device_arch(const at::Device& device) {
  static std::atomic<int> state[64] = {};  // per device index: 0 unknown, 1 runs, 2 does not
  const int index = device.index() < 0 ? 0 : device.index();
  if (index < 64 && state[index].load(std::memory_order_relaxed) == 1) return;
  int major = 0, minor = 0;
  const cudaError_t err = cuda::probe_device_arch(index, &major, &minor);
  const bool runs = err == cudaSuccess;
  if (index < 64) state[index].store(runs ? 1 : 2, std::memory_order_relaxed);
  TORCH_CHECK(
      runs || (err != cudaErrorNoKernelImageForDevice && err != cudaErrorInvalidDeviceFunction),
      "smoe: CUDA error while probing device ", index, ": ", cudaGetErrorString(err));
  TORCH_CHECK(runs, "smoe: this GPU (cuda:", index, ", sm_", major, minor,
              ") is not among the CUDA architectures smoe was compiled for (TORCH_CUDA_ARCH_LIST='",
              SMOE_CUDA_ARCHS, "'); rebuild with TORCH_CUDA_ARCH_LIST=\"", major, ".", minor,
              "\" pip install --no-build-isolation .");
}

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
