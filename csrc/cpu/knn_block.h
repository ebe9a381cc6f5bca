// Blocked squared-L2 distance scan, compiled once per ISA level (knn_block.cpp with ARRAG_ISA set)
// and selected at run time by knn.cpp.
//
// Only plain C types cross this interface: the per-ISA translation units must not instantiate
// inline or template code that the linker could share with (and run on) a CPU lacking the ISA.
#pragma once

#include <cstdint>

#include "arrag_kernels/arrag.h"

namespace arrag {

constexpr int kKeyBlock = 256;  // keys per block: D x 256 fp32 transposed keys stay in L1/L2

// For keys [start, start + count) (count <= kKeyBlock) and queries q (num_queries x dim, fp32, with
// squared norms qnorm), computes d = max((||q||^2 + ||y||^2) - 2 q.y, 0) (NaN read as +inf) and,
// for each query j, appends the keys with d <= threshold[j] to cand_dist / cand_off
// (row j, kKeyBlock entries each; offsets relative to start), setting cand_count[j].
// scratch holds (dim + 2) * kKeyBlock floats.
using ScanBlockFn = void (*)(const float* queries, const float* qnorm, int64_t num_queries, int64_t dim,
                             const void* keys, int key_dtype, int64_t start, int count, const float* threshold,
                             float* scratch, float* cand_dist, int32_t* cand_off, int32_t* cand_count);

namespace generic { void scan_block(const float*, const float*, int64_t, int64_t, const void*, int, int64_t, int,
                                    const float*, float*, float*, int32_t*, int32_t*); }
namespace v3 { void scan_block(const float*, const float*, int64_t, int64_t, const void*, int, int64_t, int,
                               const float*, float*, float*, int32_t*, int32_t*); }
namespace v4 { void scan_block(const float*, const float*, int64_t, int64_t, const void*, int, int64_t, int,
                               const float*, float*, float*, int32_t*, int32_t*); }

}  // namespace arrag
