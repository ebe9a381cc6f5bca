// Blocked distance scan for one ISA level; see knn_block.h. Compiled with ARRAG_ISA = generic, v3
// (AVX2 + FMA + F16C) or v4 (AVX-512). Everything here is written as fixed-trip-count loops over
// contiguous floats so that the compiler vectorises it for the target of this translation unit.
#include "knn_block.h"

#ifndef ARRAG_ISA
#error "compile knn_block.cpp with -DARRAG_ISA=<generic|v3|v4>"
#endif

namespace arrag {
namespace ARRAG_ISA {
namespace {

constexpr int BK = kKeyBlock;
// One native vector register of floats for this translation unit's ISA; GCC/Clang vector
// extensions keep the tile below identical (and vectorised) on every target.
#if defined(__AVX512F__)
constexpr int VW = 16;
#elif defined(__AVX__)
constexpr int VW = 8;
#else
constexpr int VW = 4;
#endif
typedef float vecf __attribute__((vector_size(VW * sizeof(float)), aligned(sizeof(float))));

// fp16 vectors of the same lane count, converted on load (vcvtph2ps with F16C / AVX-512).
typedef _Float16 vech __attribute__((vector_size(VW * sizeof(_Float16)), aligned(sizeof(_Float16))));
static_assert(BK % (4 * VW) == 0, "key block must be a multiple of four vectors");

inline vecf load(const float* p) { return *reinterpret_cast<const vecf*>(p); }
inline vecf load(const _Float16* p) { return __builtin_convertvector(*reinterpret_cast<const vech*>(p), vecf); }
inline void store(float* p, vecf v) { *reinterpret_cast<vecf*>(p) = v; }

// out[j][b] = <q_j, y_b> for 4 queries (rows of q) and all BK keys of the transposed block kt
// (dim x BK). The 4 x 2 vector accumulators are named variables so they stay in registers; each
// key row is loaded once for the 4 queries.
template <class T>
inline void dot_tile4(const T* __restrict kt, int64_t dim, const float* __restrict q, float* __restrict out) {
  const float *q0 = q, *q1 = q + dim, *q2 = q + 2 * dim, *q3 = q + 3 * dim;
  for (int b0 = 0; b0 < BK; b0 += 2 * VW) {
    vecf a0{}, a1{}, a2{}, a3{}, c0{}, c1{}, c2{}, c3{};
    for (int64_t d = 0; d < dim; ++d) {
      const vecf x = load(kt + d * BK + b0), y = load(kt + d * BK + b0 + VW);
      a0 += q0[d] * x;
      c0 += q0[d] * y;
      a1 += q1[d] * x;
      c1 += q1[d] * y;
      a2 += q2[d] * x;
      c2 += q2[d] * y;
      a3 += q3[d] * x;
      c3 += q3[d] * y;
    }
    store(out + b0, a0);
    store(out + b0 + VW, c0);
    store(out + BK + b0, a1);
    store(out + BK + b0 + VW, c1);
    store(out + 2 * BK + b0, a2);
    store(out + 2 * BK + b0 + VW, c2);
    store(out + 3 * BK + b0, a3);
    store(out + 3 * BK + b0 + VW, c3);
  }
}

// One query: four independent accumulators, so the FMA latency chain over dim does not bound it.
template <class T>
inline void dot_tile1(const T* __restrict kt, int64_t dim, const float* __restrict q, float* __restrict out) {
  for (int b0 = 0; b0 < BK; b0 += 4 * VW) {
    vecf a0{}, a1{}, a2{}, a3{};
    for (int64_t d = 0; d < dim; ++d) {
      const T* row = kt + d * BK + b0;
      a0 += q[d] * load(row);
      a1 += q[d] * load(row + VW);
      a2 += q[d] * load(row + 2 * VW);
      a3 += q[d] * load(row + 3 * VW);
    }
    store(out + b0, a0);
    store(out + b0 + VW, a1);
    store(out + b0 + 2 * VW, a2);
    store(out + b0 + 3 * VW, a3);
  }
}

template <class T>
inline void prepare(const T* __restrict keys, int64_t dim, int count, T* __restrict kt, float* __restrict knorm) {
  for (int b = 0; b < count; ++b)
    for (int64_t d = 0; d < dim; ++d) kt[d * BK + b] = keys[b * dim + d];
  for (int64_t d = 0; d < dim; ++d)
    for (int b = count; b < BK; ++b) kt[d * BK + b] = T(0);
  float norm[BK] = {};
  for (int64_t d = 0; d < dim; ++d)
    for (int b0 = 0; b0 < BK; b0 += VW) {
      const vecf x = load(kt + d * BK + b0);
      store(norm + b0, load(norm + b0) + x * x);
    }
  for (int b = 0; b < BK; ++b) knorm[b] = norm[b];
}

inline void select_row(const float* __restrict dots, const float* __restrict knorm, float qn, float thr, int count,
                       float* __restrict dist, float* __restrict cand_dist, int32_t* __restrict cand_off,
                       int32_t* __restrict cand_count) {
  int hits = 0;
  for (int b = 0; b < BK; ++b) {
    float v = (qn + knorm[b]) - 2.0f * dots[b];
    v = v < 0.0f ? 0.0f : v;
    v = v == v ? v : __builtin_inff();
    dist[b] = v;
    hits += (v <= thr) & (b < count);
  }
  int n = 0;
  if (hits > 0) {
    for (int b = 0; b < count; ++b) {
      if (dist[b] <= thr) {
        cand_dist[n] = dist[b];
        cand_off[n] = b;
        ++n;
      }
    }
  }
  *cand_count = n;
}

template <class T>
void scan(const float* queries, const float* qnorm, int64_t num_queries, int64_t dim, const T* kt, const float* knorm,
          int count, const float* threshold, float* dist, float* cand_dist, int32_t* cand_off, int32_t* cand_count) {
  constexpr int QB = 4;
  float dots[QB * BK];
  int64_t j0 = 0;
  for (; j0 + QB <= num_queries; j0 += QB) {
    dot_tile4(kt, dim, queries + j0 * dim, dots);
    for (int j = 0; j < QB; ++j)
      select_row(dots + j * BK, knorm, qnorm[j0 + j], threshold[j0 + j], count, dist, cand_dist + (j0 + j) * BK,
                 cand_off + (j0 + j) * BK, cand_count + j0 + j);
  }
  for (; j0 < num_queries; ++j0) {
    dot_tile1(kt, dim, queries + j0 * dim, dots);
    select_row(dots, knorm, qnorm[j0], threshold[j0], count, dist, cand_dist + j0 * BK, cand_off + j0 * BK,
               cand_count + j0);
  }
}

}  // namespace

void prepare_block(const void* keys, int key_dtype, int64_t dim, int count, void* kt, float* knorm) {
  if (key_dtype == ARRAG_FLOAT16)
    prepare(static_cast<const _Float16*>(keys), dim, count, static_cast<_Float16*>(kt), knorm);
  else
    prepare(static_cast<const float*>(keys), dim, count, static_cast<float*>(kt), knorm);
}

void scan_block(const float* queries, const float* qnorm, int64_t num_queries, int64_t dim, const void* kt,
                const float* knorm, int key_dtype, int count, const float* threshold, float* scratch,
                float* cand_dist, int32_t* cand_off, int32_t* cand_count) {
  if (key_dtype == ARRAG_FLOAT16)
    scan(queries, qnorm, num_queries, dim, static_cast<const _Float16*>(kt), knorm, count, threshold, scratch,
         cand_dist, cand_off, cand_count);
  else
    scan(queries, qnorm, num_queries, dim, static_cast<const float*>(kt), knorm, count, threshold, scratch,
         cand_dist, cand_off, cand_count);
}

}  // namespace ARRAG_ISA
}  // namespace arrag
