// The CPU glue's check of a plan's index values (permute, combine, gather_mm, expert_mlp and their
// backwards): the gathers trust their indices, so each public op first reads them once (a cheap
// pass over n ints) and a bad plan is an error naming the argument, never a read past the end. On
// CUDA the kernels' device asserts do this.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>

#include "cpu/permute_kernel.h"

namespace smoe::ops {

// Every entry of idx (int32, contiguous) lies in [-1, hi); else "smoe::<op>: <name> entry i is v,
// outside [-1, <bound> = hi)" for the first entry that does not.
inline void check_index_range(const char* op, const char* name, const at::Tensor& idx, int64_t hi,
                              const char* bound) {
  const int32_t* p = idx.const_data_ptr<int32_t>();
  const int64_t bad = cpu::first_out_of_range(p, idx.numel(), hi);
  TORCH_CHECK(bad < 0, "smoe::", op, ": ", name, " entry ", bad, " is ", bad < 0 ? 0 : p[bad],
              ", outside [-1, ", bound, " = ", hi, ")");
}

}  // namespace smoe::ops
