// Large CPU op outputs from a small cache of freed blocks. glibc serves every allocation above
// 32 MiB with a fresh mmap and unmaps it on free, and trims the top of its heap when more than
// twice its (adaptive) mmap threshold is free there, so the kernel zero-fills the pages of the
// expert intermediates (x_sorted, the hidden, their gradients) again on first touch, every step
// (RESULTS.md "Allocator": the fine-grained fp32 fwd+bwd 164 vs 130 ms; a 16 MiB bf16
// combine_backward output 5.2 ms inside a training step against 1.2 ms alone). The ops take their
// outputs of at least kMinBytes from here instead: a freed block goes back to the cache (up to a
// cap) and the next request of about its size gets it with its pages already resident. Smaller
// outputs, which glibc recycles well, are plain at::empty tensors.
//
// The cap is SMOE_CPU_CACHE_MB (default 2048 MB; 0 turns the cache off); smoe.release_cpu_cache()
// hands every cached block back to the OS. The cache only ever holds blocks no tensor uses.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/TensorOptions.h>
#include <c10/util/ArrayRef.h>

#include <cstdint>

namespace smoe::ops::workspace {

// Outputs smaller than this are plain at::empty tensors. 4 MiB, not glibc's 32 MiB mmap ceiling:
// the fine-grained bf16 layer's 16 MiB intermediates were page-faulted too (fwd+bwd 50-60 ms with
// 32 MiB here, 41-44 ms with 4 MiB; RESULTS.md "CPU output cache").
constexpr int64_t kMinBytes = int64_t{4} << 20;

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
