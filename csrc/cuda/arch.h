// Torch-free probe: can the current CUDA device run the kernels of this build (a cubin for its
// architecture, or PTX the driver can JIT)? Answered once per device by asking the runtime for the
// attributes of an empty kernel compiled with the same flags as every other kernel.
#pragma once

#include <cuda_runtime_api.h>

namespace smoe::cuda {

// cudaSuccess when `device` can run this build's kernels; cudaErrorNoKernelImageForDevice (or
// cudaErrorInvalidDeviceFunction) when none of the compiled architectures fits. Clears the
// runtime's last-error state either way. Fills the device's compute capability.
cudaError_t probe_device_arch(int device, int* major, int* minor);

}  // namespace smoe::cuda
