// Torch-free probe of whether the current GPU's architecture is compiled into this build.
#include "cuda/arch.h"

namespace smoe::cuda {
namespace {

__global__ void arch_probe_kernel() {}

}  // namespace

cudaError_t probe_device_arch(int device, int* major, int* minor) {
  cudaError_t err = cudaDeviceGetAttribute(major, cudaDevAttrComputeCapabilityMajor, device);
  if (err == cudaSuccess) {
    err = cudaDeviceGetAttribute(minor, cudaDevAttrComputeCapabilityMinor, device);
  }
  if (err != cudaSuccess) return err;
  int previous = 0;
  err = cudaGetDevice(&previous);
  if (err != cudaSuccess) return err;
  if (previous != device) err = cudaSetDevice(device);
  cudaFuncAttributes attributes;
  if (err == cudaSuccess) err = cudaFuncGetAttributes(&attributes, arch_probe_kernel);
  if (previous != device) cudaSetDevice(previous);
  // The probe's own failure is an answer, not an error for the next launch: clear it (and only
  // then, so that an unrelated error pending from earlier work still reaches its checker).
  if (err != cudaSuccess) cudaGetLastError();
  return err;
}

}  // namespace smoe::cuda
