// The check of the size-rule argument of expert_mlp (fuse_min_bytes) and gather_mm
// (gather_min_bytes): at most that many bytes of the rows the op would otherwise not materialise,
// the op runs its unfused chain; 0 never does. Mirrored for the fakes in smoe/ops/_checks.py.
#pragma once

#include <c10/util/Exception.h>

#include <cstdint>

namespace smoe::ops {

inline void check_min_bytes(const char* op, const char* name, int64_t value, const char* zero) {
  TORCH_CHECK(value >= 0, "smoe::", op, ": ", name, " must be >= 0 (0: always ", zero, "), got ",
              value);
}

}  // namespace smoe::ops
