// Included by the .cpp files that instantiate per-ISA code, before cpu/isa_instantiate.h.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__x86_64__) || defined(_M_X64) || defined(__i386__)
#define STEINOPS_X86 1
#include <immintrin.h>
#endif

// Multi-versioning (AVX2 / AVX-512 namespaces next to the baseline) needs GCC's
// `#pragma GCC target` and __builtin_cpu_supports; clang and other targets get the baseline only.
#if defined(STEINOPS_X86) && defined(__GNUC__) && !defined(__clang__) && !defined(STEINOPS_NO_MULTI_ISA)
#define STEINOPS_MULTI_ISA 1
#else
#define STEINOPS_MULTI_ISA 0
#endif

// Vector arguments of always_inline helpers trigger "AVX vector return without AVX enabled
// changes the ABI" notes; they never cross a real call boundary.
#pragma GCC diagnostic ignored "-Wpsabi"

#include "cpu/kernel_math.h"
#include "cpu/cpu_ops.h"
