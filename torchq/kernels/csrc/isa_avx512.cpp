// AVX-512 (F, BW, VL, DQ, VNNI) build of the generic kernels; selected only on hosts with
// all of these (see ops.cpp). The unit is compiled with AVX512-BF16 enabled for the one
// intrinsic that uses it (VecAVX512::dot2bf16, the bf16 GEMM path), which ops.cpp runs
// only on CPUs that have it. No torch or standard C++ headers here (see kernel_api.h).
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx512bf16,avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx512bf16,avx2,fma,f16c")
#endif
#define TQ_VEC_BITS 512
#include "vec_x86.h"
typedef VecAVX512 V;
#define TQ_TABLE_FN table_avx512
#define TQ_TABLE_NAME "avx512"
#include "kernels_impl.h"
#if defined(__clang__)
#pragma clang attribute pop
#endif
