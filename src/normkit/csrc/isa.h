// The instruction sets the kernels are compiled for, as function attributes: one header, so that
// every file that compiles a kernel or asks which code a CPU runs sees the same choice.
#pragma once

// Everything here is inlined into the kernels that use it: they are compiled once per
// instruction set (target_clones), and a call out of a clone would run baseline code.
#define NORMKIT_INLINE inline __attribute__((always_inline))
// The same for a lambda handed to a loop template (block_sums): in a large clone GCC may stop
// inlining it, and the out-of-line copy is baseline code called once per vector.
#define NORMKIT_INLINE_LAMBDA __attribute__((always_inline))

// The kernels' hot functions, compiled once per instruction set (AVX-512, AVX2, baseline x86-64);
// the dynamic loader picks the clone this CPU runs, so one build runs on every x86-64 machine.
// (-DNORMKIT_NO_CLONES, the sanitizer build: one baseline copy, a third of the compile time.)
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(NORMKIT_NO_CLONES)
#define NORMKIT_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define NORMKIT_CLONES
#endif

// The wide loop (write_row_sums_next<..., 64>: 16 float lanes a vector), compiled once more for
// AVX-512 (x86-64-v4) and run where the CPU has it (cpu_runtime.h wide_vectors). GCC on x86-64 only.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define NORMKIT_WIDE 1
#define NORMKIT_WIDE_TARGET __attribute__((target("arch=x86-64-v4")))
// The option loop with a bfloat16 output rounded by AVX-512 BF16's vcvtneps2bf16
// (row_math.h store_bf16_cvt), run where the CPU has it (cpu_runtime.h bf16_vectors).
#define NORMKIT_BF16_TARGET __attribute__((target("arch=x86-64-v4,avx512bf16")))
#endif
