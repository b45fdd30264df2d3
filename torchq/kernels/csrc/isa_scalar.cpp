// Portable build of the generic kernels (baseline x86-64 / any target), 16-lane emulated
// vectors. Runs everywhere; the reference for what the SIMD units must compute.
#include "vec_scalar.h"
typedef VecScalar V;
#define TQ_TABLE_FN table_scalar
#define TQ_TABLE_NAME "scalar"
#include "kernels_impl.h"
