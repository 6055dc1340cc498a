// SMOE_INLINE: forced inlining for the CPU kernels' inner loops, so that each ISA clone of a
// kernel (SMOE_ISA_CLONES below) compiles its own copy of them.
//
// SMOE_ISA_CLONES: a kernel entry point compiled once per x86 vector ISA and chosen at load time
// (GCC target_clones), so one portable build still runs AVX2/AVX-512 code. The AVX-512 tier is
// x86-64-v4 (F + BW + DQ + VL), not plain avx512f: without BW the 16-bit loads and stores of the
// half/bfloat16 kernels cannot use 512-bit registers, and GCC vectorised them at 256 bits with
// slow 16-bit shuffles (bf16 SwiGLU ran 2.7x slower than with BW, forward and backward).
#pragma once

#if defined(__GNUC__)
#define SMOE_INLINE inline __attribute__((always_inline))
#else
#define SMOE_INLINE inline
#endif

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define SMOE_ISA_CLONES __attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
#else
#define SMOE_ISA_CLONES
#endif
