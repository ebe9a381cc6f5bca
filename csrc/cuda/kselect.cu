// CUDA k-selection: the k smallest (distance, id) pairs of each row of a candidate matrix, sorted.
//
// One thread block per row keeps the best P (P = k rounded up to a power of two) entries in shared
// memory in [0, P), loads the next P candidates into [P, 2P) and bitonic-sorts the 2P entries, so
// after every chunk [0, P) holds the best P seen so far. (distance, id) is a strict order, so ties
// come out by smaller id. With P = 2048 the buffer is 2P * 12 B = 48 KiB of shared memory.
#include <cuda_runtime.h>

#include <cstdint>
#include <string>

#include "common.h"

namespace {

constexpr int64_t kSentinelId = INT64_MAX;

__device__ __forceinline__ bool pair_less(float da, int64_t ia, float db, int64_t ib) {
  return da < db || (da == db && ia < ib);
}

__global__ void kselect_kernel(const float* __restrict__ dist, const int64_t* __restrict__ ids, int64_t num_cand,
                               int64_t k, int p, float* __restrict__ dist_out, int64_t* __restrict__ ids_out) {
  extern __shared__ int64_t smem_ids[];  // 2P ids, then 2P distances
  float* smem_d = reinterpret_cast<float*>(smem_ids + 2 * p);
  const int64_t row = blockIdx.x;
  const float* drow = dist + row * num_cand;
  const int64_t* irow = ids != nullptr ? ids + row * num_cand : nullptr;
  const int n = 2 * p;

  for (int t = threadIdx.x; t < p; t += blockDim.x) {
    smem_d[t] = __int_as_float(0x7f800000);
    smem_ids[t] = kSentinelId;
  }
  for (int64_t c0 = 0; c0 < num_cand; c0 += p) {
    for (int t = threadIdx.x; t < p; t += blockDim.x) {
      const int64_t c = c0 + t;
      float d = __int_as_float(0x7f800000);
      int64_t id = kSentinelId;
      if (c < num_cand) {
        d = drow[c];
        d = isnan(d) ? __int_as_float(0x7f800000) : d;
        id = irow != nullptr ? irow[c] : c;
      }
      smem_d[p + t] = d;
      smem_ids[p + t] = id;
    }
    __syncthreads();
    for (int size = 2; size <= n; size <<= 1) {
      for (int stride = size >> 1; stride > 0; stride >>= 1) {
        for (int t = threadIdx.x; t < n / 2; t += blockDim.x) {
          const int i = 2 * t - (t & (stride - 1));
          const int j = i + stride;
          const bool ascending = (i & size) == 0;
          const float di = smem_d[i], dj = smem_d[j];
          const int64_t ii = smem_ids[i], ij = smem_ids[j];
          const bool swap = ascending ? pair_less(dj, ij, di, ii) : pair_less(di, ii, dj, ij);
          if (swap) {
            smem_d[i] = dj;
            smem_d[j] = di;
            smem_ids[i] = ij;
            smem_ids[j] = ii;
          }
        }
        __syncthreads();
      }
    }
  }
  for (int t = threadIdx.x; t < k; t += blockDim.x) {
    dist_out[row * k + t] = smem_d[t];
    ids_out[row * k + t] = smem_ids[t];
  }
}

}  // namespace

extern "C" arrag_status arrag_cuda_kselect(const float* dist, const int64_t* ids, int64_t num_rows,
                                           int64_t num_candidates, int64_t k, float* dist_out, int64_t* ids_out,
                                           void* stream) {
  using arrag::fail;
  const std::string op = "arrag_cuda_kselect: ";
  if (num_rows < 0 || num_rows > INT32_MAX)
    return fail(ARRAG_ERROR_INVALID_ARGUMENT, op + "num_rows must be in [0, 2^31), got " + std::to_string(num_rows));
  if (k < 1 || k > ARRAG_MAX_K || k > num_candidates)
    return fail(ARRAG_ERROR_INVALID_ARGUMENT, op + "k must be in [1, min(" + std::to_string(ARRAG_MAX_K) +
                                                  ", num_candidates = " + std::to_string(num_candidates) +
                                                  ")], got " + std::to_string(k));
  if (num_rows == 0) return arrag::ok();
  if (dist == nullptr || dist_out == nullptr || ids_out == nullptr)
    return fail(ARRAG_ERROR_INVALID_ARGUMENT, op + "dist, dist_out and ids_out must be non-NULL device pointers");
  int p = 32;
  while (p < k) p <<= 1;
  const int threads = p < 1024 ? p : 1024;
  const size_t smem = static_cast<size_t>(2 * p) * (sizeof(int64_t) + sizeof(float));
  kselect_kernel<<<static_cast<unsigned>(num_rows), threads, smem, static_cast<cudaStream_t>(stream)>>>(
      dist, ids, num_candidates, k, p, dist_out, ids_out);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    return fail(ARRAG_ERROR_CUDA, op + "kernel launch failed: " + cudaGetErrorString(err));
  return arrag::ok();
}
