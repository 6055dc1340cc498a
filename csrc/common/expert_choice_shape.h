// The plan geometry of expert_choice, shared by the CPU kernel and the CUDA glue (torch-free).
#pragma once

#include <algorithm>
#include <cstdint>

namespace smoe {

// Groups of S consecutive tokens (the last one possibly shorter); capacity C per group, clamped
// to the group's size. Plan rows of expert e: [e * total, (e + 1) * total).
struct ExpertChoiceShape {
  int64_t T, E, S, C;
  int64_t groups() const { return S == 0 ? 0 : (T + S - 1) / S; }
  int64_t per_group(int64_t g) const { return std::min(C, std::min(S, T - g * S)); }
  int64_t total() const {
    const int64_t G = groups();
    return G == 0 ? 0 : (G - 1) * std::min(C, S) + per_group(G - 1);
  }
};

}  // namespace smoe
