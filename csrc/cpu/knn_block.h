// Blocked squared-L2 distance scan, compiled once per ISA level (knn_block.cpp with ARRAG_ISA set)
// and selected at run time by knn.cpp.
//
// Keys are scanned in blocks of kKeyBlock rows, each transposed (dim x kKeyBlock, key dtype,
// zero-padded) with its squared norms (kKeyBlock floats): the "blocked layout". It is either built
// once per database (arrag_knn_prepare) or block by block during a search.
//
// Only plain C types cross this interface: the per-ISA translation units must not instantiate
// inline or template code that the linker could share with (and run on) a CPU lacking the ISA.
#pragma once

#include <cstdint>

#include "arrag_kernels/arrag.h"

namespace arrag {

constexpr int kKeyBlock = 256;  // keys per block: D x 256 transposed keys stay in L1/L2

// Writes rows [0, count) (count <= kKeyBlock) of the row-major keys (dim columns, key_dtype)
// transposed into kt (dim x kKeyBlock, key_dtype, zero-padded) and their fp32 squared norms into
// knorm (kKeyBlock floats, zero-padded).
using PrepareBlockFn = void (*)(const void* keys, int key_dtype, int64_t dim, int count, void* kt, float* knorm);

// For the keys of one block (kt, knorm as written by PrepareBlockFn; the first `count` are real)
// and queries q (num_queries x dim, fp32, with squared norms qnorm), computes
// d = max((||q||^2 + ||y||^2) - 2 q.y, 0) (NaN read as +inf) and, for each query j, appends the
// keys with d <= threshold[j] to cand_dist / cand_off (row j, kKeyBlock entries each; offsets
// within the block), setting cand_count[j]. scratch holds kKeyBlock floats.
using ScanBlockFn = void (*)(const float* queries, const float* qnorm, int64_t num_queries, int64_t dim,
                             const void* kt, const float* knorm, int key_dtype, int count, const float* threshold,
                             float* scratch, float* cand_dist, int32_t* cand_off, int32_t* cand_count);

#define ARRAG_DECLARE_ISA(ns)                                                                               \
  namespace ns {                                                                                            \
  void prepare_block(const void*, int, int64_t, int, void*, float*);                                       \
  void scan_block(const float*, const float*, int64_t, int64_t, const void*, const float*, int, int,       \
                  const float*, float*, float*, int32_t*, int32_t*);                                        \
  }
ARRAG_DECLARE_ISA(generic)
ARRAG_DECLARE_ISA(v3)
ARRAG_DECLARE_ISA(v4)
#undef ARRAG_DECLARE_ISA

}  // namespace arrag
