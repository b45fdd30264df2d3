// AVX2 + FMA + F16C build of the generic kernels. Everything in this unit is compiled for
// that target; it includes no torch or standard C++ headers (see kernel_api.h).
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC target("avx2,fma,f16c")
#endif
#define TQ_VEC_BITS 256
#include "vec_x86.h"
typedef VecAVX2 V;
#define TQ_TABLE_FN table_avx2
#define TQ_TABLE_NAME "avx2"
#include "kernels_impl.h"
#if defined(__clang__)
#pragma clang attribute pop
#endif
