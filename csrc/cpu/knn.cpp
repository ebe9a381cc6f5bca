// Exact k-NN: each thread scans a contiguous range of key blocks (knn_block.cpp), read from the
// blocked layout prepared once per database or transposed block by block, and keeps, per
// query, a buffer of candidates no worse than its current k-th best; the buffers are merged and
// sorted per query at the end. Candidates are ordered by (distance, id), which gives the
// reference's "ties by smaller id" whatever order the threads visit the keys in.
#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "common.h"
#include "knn_block.h"

namespace arrag {
namespace {

struct Cand {
  float d;
  int64_t i;
};

inline bool cand_less(const Cand& a, const Cand& b) { return a.d < b.d || (a.d == b.d && a.i < b.i); }

// Candidates of one query within one thread's key range. The threshold is the k-th best distance
// seen so far once `cap` candidates have been collected; keys beyond it are never pushed.
struct TopK {
  std::vector<Cand> buf;
  size_t k = 0, cap = 0;
  float threshold = std::numeric_limits<float>::infinity();

  void init(int64_t k_) {
    k = static_cast<size_t>(k_);
    cap = std::max<size_t>(2 * k, k + kKeyBlock);
    buf.reserve(cap + kKeyBlock);
  }
  void shrink() {
    std::nth_element(buf.begin(), buf.begin() + (k - 1), buf.end(), cand_less);
    buf.resize(k);
    threshold = buf[k - 1].d;
  }
};

bool cpu_has(const char* feature_set) {
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  if (feature_set[0] == '3')
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
         __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#else
  (void)feature_set;
  return false;
#endif
}

struct Isa {
  ScanBlockFn scan;
  PrepareBlockFn prepare;
  const char* name;
};

Isa pick_isa() {
#ifdef ARRAG_HAVE_X86_VARIANTS
  if (cpu_has("4")) return {v4::scan_block, v4::prepare_block, "avx512"};
  if (cpu_has("3")) return {v3::scan_block, v3::prepare_block, "avx2"};
#endif
  return {generic::scan_block, generic::prepare_block, "generic"};
}

const Isa& isa() {
  static const Isa chosen = pick_isa();
  return chosen;
}

constexpr int64_t kQueryGroup = 64;  // queries scanned together; bounds per-thread buffers

size_t elem_size(arrag_dtype dtype) { return dtype == ARRAG_FLOAT16 ? 2 : 4; }

// The keys of a search: row-major (`rows`), or already in the blocked layout (`blocked`, `norms`).
struct Keys {
  const void* rows;
  const void* blocked;
  const float* norms;
  arrag_dtype dtype;
  int64_t num_keys, dim;
};

void knn_group(const float* queries, int64_t nq, const Keys& keys, int64_t k, float* dist_out, int64_t* ids_out) {
  const int64_t num_keys = keys.num_keys, dim = keys.dim;
  const size_t block_bytes = elem_size(keys.dtype) * dim * kKeyBlock;
  std::vector<float> qnorm(nq);
  for (int64_t j = 0; j < nq; ++j) {
    float s = 0.0f;
    for (int64_t d = 0; d < dim; ++d) s += queries[j * dim + d] * queries[j * dim + d];
    qnorm[j] = s;
  }
  const int64_t num_blocks = (num_keys + kKeyBlock - 1) / kKeyBlock;
  int threads = 1;
#ifdef _OPENMP
  // At least 8 blocks per thread, so small searches do not pay for idle threads.
  threads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(omp_get_max_threads(), num_blocks / 8)));
#endif
  std::vector<std::vector<TopK>> sel(threads, std::vector<TopK>(nq));
  const Isa& fns = isa();

#pragma omp parallel num_threads(threads)
  {
    int t = 0;
#ifdef _OPENMP
    t = omp_get_thread_num();
#endif
    std::vector<TopK>& mine = sel[t];
    for (auto& s : mine) s.init(k);
    // Blocks transposed here when the keys are row-major (floats, so fp16 blocks fit too).
    std::vector<float> kt(keys.blocked ? 0 : dim * kKeyBlock), knorm(keys.blocked ? 0 : kKeyBlock);
    std::vector<float> scratch(kKeyBlock), thr(nq), cand_dist(nq * kKeyBlock);
    std::vector<int32_t> cand_off(nq * kKeyBlock), cand_count(nq);
    const int64_t b_begin = num_blocks * t / threads, b_end = num_blocks * (t + 1) / threads;
    for (int64_t blk = b_begin; blk < b_end; ++blk) {
      const int64_t start = blk * kKeyBlock;
      const int count = static_cast<int>(std::min<int64_t>(kKeyBlock, num_keys - start));
      const void* block;
      const float* norms;
      if (keys.blocked) {
        block = static_cast<const char*>(keys.blocked) + blk * block_bytes;
        norms = keys.norms + blk * kKeyBlock;
      } else {
        fns.prepare(static_cast<const char*>(keys.rows) + start * dim * elem_size(keys.dtype), keys.dtype, dim, count,
                    kt.data(), knorm.data());
        block = kt.data();
        norms = knorm.data();
      }
      for (int64_t j = 0; j < nq; ++j) thr[j] = mine[j].threshold;
      fns.scan(queries, qnorm.data(), nq, dim, block, norms, keys.dtype, count, thr.data(), scratch.data(),
               cand_dist.data(), cand_off.data(), cand_count.data());
      for (int64_t j = 0; j < nq; ++j) {
        TopK& s = mine[j];
        for (int32_t c = 0; c < cand_count[j]; ++c)
          s.buf.push_back({cand_dist[j * kKeyBlock + c], start + cand_off[j * kKeyBlock + c]});
        if (s.buf.size() >= s.cap) s.shrink();
      }
    }
  }

#pragma omp parallel for schedule(static)
  for (int64_t j = 0; j < nq; ++j) {
    std::vector<Cand> all;
    for (int t = 0; t < threads; ++t) all.insert(all.end(), sel[t][j].buf.begin(), sel[t][j].buf.end());
    std::nth_element(all.begin(), all.begin() + (k - 1), all.end(), cand_less);
    std::sort(all.begin(), all.begin() + k, cand_less);
    for (int64_t c = 0; c < k; ++c) {
      dist_out[j * k + c] = all[c].d;
      ids_out[j * k + c] = all[c].i;
    }
  }
}

void knn_search(const float* queries, int64_t num_queries, const Keys& keys, int64_t k, float* dist_out,
                int64_t* ids_out) {
  for (int64_t j0 = 0; j0 < num_queries; j0 += kQueryGroup) {
    const int64_t nq = std::min(kQueryGroup, num_queries - j0);
    knn_group(queries + j0 * keys.dim, nq, keys, k, dist_out + j0 * k, ids_out + j0 * k);
  }
}

}  // namespace

const char* cpu_isa_name() { return isa().name; }

int64_t knn_blocked_rows(int64_t num_keys) { return (num_keys + kKeyBlock - 1) / kKeyBlock * kKeyBlock; }

void knn(const float* queries, int64_t num_queries, const void* keys, arrag_dtype key_dtype, int64_t num_keys,
         int64_t dim, int64_t k, float* dist_out, int64_t* ids_out) {
  knn_search(queries, num_queries, Keys{keys, nullptr, nullptr, key_dtype, num_keys, dim}, k, dist_out, ids_out);
}

void knn_prepare(const void* keys, arrag_dtype key_dtype, int64_t num_keys, int64_t dim, void* blocked,
                 float* norms) {
  const int64_t num_blocks = knn_blocked_rows(num_keys) / kKeyBlock;
  const size_t row_bytes = elem_size(key_dtype) * dim;
  const PrepareBlockFn prepare = isa().prepare;
#pragma omp parallel for schedule(static)
  for (int64_t blk = 0; blk < num_blocks; ++blk) {
    const int64_t start = blk * kKeyBlock;
    const int count = static_cast<int>(std::min<int64_t>(kKeyBlock, num_keys - start));
    prepare(static_cast<const char*>(keys) + start * row_bytes, key_dtype, dim, count,
            static_cast<char*>(blocked) + start * row_bytes, norms + start);
  }
}

void knn_blocked(const float* queries, int64_t num_queries, const void* blocked, const float* norms,
                 arrag_dtype key_dtype, int64_t num_keys, int64_t dim, int64_t k, float* dist_out, int64_t* ids_out) {
  knn_search(queries, num_queries, Keys{nullptr, blocked, norms, key_dtype, num_keys, dim}, k, dist_out, ids_out);
}

}  // namespace arrag
