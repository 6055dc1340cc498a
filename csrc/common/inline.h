// SMOE_INLINE: forced inlining for the CPU kernels' inner loops, so that each ISA clone of a
// kernel (target_clones in the glue) compiles its own copy of them.
#pragma once

#if defined(__GNUC__)
#define SMOE_INLINE inline __attribute__((always_inline))
#else
#define SMOE_INLINE inline
#endif
