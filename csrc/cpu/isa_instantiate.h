// Compiles cpu/tile_impl.h and the body named by STEINOPS_ISA_BODY once per instruction set:
//
//   namespace avx512   #pragma GCC target("avx512f,avx512dq,avx512vl,avx512bw,avx2,fma")
//   namespace avx2     #pragma GCC target("avx2,fma")
//   namespace generic  the build's baseline (SSE2 on plain x86-64, or whatever the target is)
//
// The binary therefore stays portable (the baseline flags are untouched) and cpu_ops
// dispatches at run time (__builtin_cpu_supports). The AVX namespaces exist only for GCC on
// x86-64; elsewhere only `generic` is built. NO include guard: include once per .cpp after
// defining STEINOPS_ISA_BODY and after every standard / torch header (nothing from those may be
// first defined inside a target region).
//
// Usage:   #define STEINOPS_ISA_BODY "cpu/kmv_impl.h"
//          #include "cpu/isa_instantiate.h"

#ifndef STEINOPS_ISA_BODY
#error "define STEINOPS_ISA_BODY before including cpu/isa_instantiate.h"
#endif

#if STEINOPS_MULTI_ISA

#pragma GCC push_options
#pragma GCC target("avx512f,avx512dq,avx512vl,avx512bw,avx2,fma")
#define STEINOPS_ISA_NS avx512
#define STEINOPS_VBYTES 64
#define STEINOPS_NREGS 32
#include "cpu/tile_impl.h"
#include STEINOPS_ISA_BODY
#undef STEINOPS_ISA_NS
#undef STEINOPS_VBYTES
#undef STEINOPS_NREGS
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define STEINOPS_ISA_NS avx2
#define STEINOPS_VBYTES 32
#define STEINOPS_NREGS 16
#include "cpu/tile_impl.h"
#include STEINOPS_ISA_BODY
#undef STEINOPS_ISA_NS
#undef STEINOPS_VBYTES
#undef STEINOPS_NREGS
#pragma GCC pop_options

#endif  // STEINOPS_MULTI_ISA

#define STEINOPS_ISA_NS generic
#if defined(__AVX512F__)
#define STEINOPS_VBYTES 64
#define STEINOPS_NREGS 32
#elif defined(__AVX__)
#define STEINOPS_VBYTES 32
#define STEINOPS_NREGS 16
#else
#define STEINOPS_VBYTES 16
#define STEINOPS_NREGS 16
#endif
#include "cpu/tile_impl.h"
#include STEINOPS_ISA_BODY
#undef STEINOPS_ISA_NS
#undef STEINOPS_VBYTES
#undef STEINOPS_NREGS
