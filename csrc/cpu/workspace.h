// Large CPU op outputs from a small cache of freed blocks. glibc serves every allocation above
// 32 MB with a fresh mmap and unmaps it on free, so the kernel zero-fills its pages again on first
// touch: a training step that allocates the same expert intermediates (x_sorted, the hidden, their
// gradients) every step pays those page faults every step (RESULTS.md "Allocator": the
// fine-grained fp32 fwd+bwd 164 vs 130 ms). The ops take their outputs of at least kMinBytes from
// here instead: a freed block goes back to the cache (up to a cap) and the next request of about
// its size gets it with its pages already resident. Smaller outputs, which glibc recycles itself,
// are plain at::empty tensors.
//
// The cap is SMOE_CPU_CACHE_MB (default 2048 MB; 0 turns the cache off); smoe.release_cpu_cache()
// hands every cached block back to the OS. The cache only ever holds blocks no tensor uses.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/TensorOptions.h>
#include <c10/util/ArrayRef.h>

#include <cstdint>

namespace smoe::ops::workspace {

// Outputs smaller than this are plain at::empty tensors (glibc's mmap threshold ceiling).
constexpr int64_t kMinBytes = int64_t{32} << 20;

// An uninitialised CPU tensor of `sizes` (contiguous), or of `sizes` with `strides` when given.
at::Tensor empty(c10::IntArrayRef sizes, const at::TensorOptions& options);
at::Tensor empty_strided(c10::IntArrayRef sizes, c10::IntArrayRef strides,
                         const at::TensorOptions& options);

// Bytes held in the cache now (blocks no tensor uses), and its cap.
int64_t cached_bytes();
int64_t cap_bytes();

// Frees every cached block; returns the bytes freed.
int64_t release();

}  // namespace smoe::ops::workspace
