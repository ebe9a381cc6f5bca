/*
 * arrag_kernels C interface: the decode-step operations of AR-RAG on plain buffers.
 *
 * Stable C ABI (extern "C", plain pointers and integers, no C++ or torch types), so generators not
 * written in Python can link libarrag_kernels directly. All arrays are dense and row-major
 * (C-contiguous). Every function returns ARRAG_OK or an error code; on error the outputs are left
 * in an unspecified state and arrag_last_error() describes what was expected and what was given.
 * Functions are thread-safe (the error message is per thread); the CPU kernels use OpenMP threads.
 *
 * Semantics match the Python reference ops of arrag_kernels.ops (neighbor_keys_ref, knn_ref,
 * daid_sample_ref).
 */
#ifndef ARRAG_KERNELS_ARRAG_H
#define ARRAG_KERNELS_ARRAG_H

#include <stdint.h>

#if defined(_WIN32)
#define ARRAG_API __declspec(dllexport)
#else
#define ARRAG_API __attribute__((visibility("default")))
#endif

#ifdef __cplusplus
extern "C" {
#endif

#define ARRAG_API_VERSION 2 /* 2: arrag_knn_prepare / arrag_knn_blocked */
#define ARRAG_MAX_K 2048

typedef enum arrag_status {
  ARRAG_OK = 0,
  ARRAG_ERROR_INVALID_ARGUMENT = 1, /* shapes, sizes, null pointers, values out of range */
  ARRAG_ERROR_OUT_OF_MEMORY = 2,
  ARRAG_ERROR_NOT_BUILT = 3,        /* e.g. a CUDA function in a library built without CUDA */
  ARRAG_ERROR_CUDA = 4,             /* a CUDA runtime call failed (message has the CUDA error) */
  ARRAG_ERROR_INTERNAL = 5
} arrag_status;

typedef enum arrag_dtype { ARRAG_FLOAT32 = 0, ARRAG_FLOAT16 = 1 } arrag_dtype;

typedef enum arrag_dedup {
  ARRAG_DEDUP_NEAREST = 0, /* official AR-RAG: each distinct token keeps its smallest distance */
  ARRAG_DEDUP_SUM = 1      /* paper / kNN-LM: per-hit softmax weights summed per token */
} arrag_dedup;

/* ARRAG_API_VERSION of the library actually loaded. */
ARRAG_API int arrag_api_version(void);
/* 1 when the library was built with the CUDA kernels, else 0. */
ARRAG_API int arrag_has_cuda(void);
/* The message of this thread's last error ("" if none). Valid until the next call on this thread. */
ARRAG_API const char* arrag_last_error(void);
/* Name of the CPU code path the distance kernels use ("generic", "avx2", "avx512"). */
ARRAG_API const char* arrag_cpu_isa(void);

/*
 * Neighbourhood keys (retrieval queries) of target positions of a batch of token grids.
 *   tokens    (batch, height * width) int64 token ids in raster order; < 0 = not generated yet
 *   codebook  (vocab, dim) float32 (L2-normalised codebook rows)
 *   positions (batch, num_positions) int64 flat target positions in [0, height * width)
 *   offsets   (num_cells, 2) int32 (dr, dc) of each key cell relative to the target, in key order
 *   border_skip  1: valid = all key cells inside the grid; 0: valid = 1 everywhere
 *   keys_out  (batch, num_positions, num_cells * dim) float32; cell j = codebook[tokens[r+dr, c+dc]]
 *             or zeros when outside the grid or not generated
 *   valid_out (batch, num_positions) uint8 0/1
 * Token ids >= vocab are an error.
 */
ARRAG_API arrag_status arrag_neighbor_keys(const int64_t* tokens, int64_t batch, int64_t height, int64_t width,
                                           const float* codebook, int64_t vocab, int64_t dim,
                                           const int64_t* positions, int64_t num_positions,
                                           const int32_t* offsets, int64_t num_cells, int border_skip,
                                           float* keys_out, uint8_t* valid_out);

/*
 * Exact k-nearest-neighbour search under squared L2 (FAISS IndexFlatL2 semantics).
 *   queries (num_queries, dim) float32; keys (num_keys, dim) of key_dtype (float32 or float16)
 *   1 <= k <= min(ARRAG_MAX_K, num_keys)
 *   dist_out (num_queries, k) float32: ||q||^2 + ||y||^2 - 2 q.y in fp32, clamped at 0, ascending
 *   ids_out  (num_queries, k) int64 key rows; equal distances ordered by smaller id
 */
ARRAG_API arrag_status arrag_knn(const float* queries, int64_t num_queries, const void* keys, arrag_dtype key_dtype,
                                 int64_t num_keys, int64_t dim, int64_t k, float* dist_out, int64_t* ids_out);

/*
 * The same search over keys prepared once for many searches: arrag_knn transposes every block of
 * 256 keys and computes their norms on every call, which dominates at a few queries.
 *   arrag_knn_blocked_rows(num_keys): num_keys rounded up to a multiple of 256 (= R)
 *   arrag_knn_prepare: keys (num_keys, dim) of key_dtype -> blocked_out (R * dim elements of
 *     key_dtype: blocks of 256 keys, each transposed to dim x 256, zero-padded) and norms_out
 *     (R float32 squared norms)
 *   arrag_knn_blocked: arrag_knn over (blocked, norms) as written by arrag_knn_prepare; same results.
 */
ARRAG_API int64_t arrag_knn_blocked_rows(int64_t num_keys);
ARRAG_API arrag_status arrag_knn_prepare(const void* keys, arrag_dtype key_dtype, int64_t num_keys, int64_t dim,
                                         void* blocked_out, float* norms_out);
ARRAG_API arrag_status arrag_knn_blocked(const float* queries, int64_t num_queries, const void* blocked,
                                         const float* norms, arrag_dtype key_dtype, int64_t num_keys, int64_t dim,
                                         int64_t k, float* dist_out, int64_t* ids_out);

/*
 * DAiD merge + sample, one decode step.
 *   logits   (2 * batch, vocab) float32 with classifier-free guidance (conditional rows first, then
 *            the unconditional rows), combined as l_u + guidance_scale * (l_c - l_u);
 *            or (batch, vocab) when cfg == 0 (used as is)
 *   dist, tokens (batch, k) float32 / int64 retrieved distances and token ids; ids < 0 are ignored
 *   active   (batch,) uint8: rows at a retrieval step (others sample from the model alone)
 *   uniforms (batch,) float32 in [0, 1), or NULL for greedy (argmax, first maximum)
 *   p_model = softmax(l / temperature); p_ret from (dist, tokens) with softmax(-d / tau) per dedup;
 *   p = (1 - lam) p_model + lam p_ret on active rows with at least one valid token, else p_model.
 *   tokens_out (batch,) int64: smallest v with cumsum(p)[v] > u * sum(p)
 *   probs_out  (batch, vocab) float32 p, or NULL to skip writing it
 *   Refused with ARRAG_ERROR_INVALID_ARGUMENT: NaN or +inf logits (-inf masks a token; every row must
 *   allow one) and NaN distances of hits with id >= 0.
 */
ARRAG_API arrag_status arrag_daid_sample(const float* logits, int64_t batch, int64_t vocab, int cfg,
                                         const float* dist, const int64_t* tokens, int64_t k, const uint8_t* active,
                                         const float* uniforms, float guidance_scale, float temperature, float lam,
                                         float tau, arrag_dedup dedup, int64_t* tokens_out, float* probs_out);

/*
 * arrag_daid_sample with HF's top-k then top-p filter on l / temperature before the softmax (the
 * merge adds the retrieval distribution after it): top_k >= 0 (0: off) keeps the scores >= the
 * top_k-th largest; top_p in [0, 1] (1: off) keeps the highest scores up to softmax mass top_p
 * (at least the largest). arrag_daid_sample is this with top_k = 0, top_p = 1.
 */
ARRAG_API arrag_status arrag_daid_sample_filtered(const float* logits, int64_t batch, int64_t vocab, int cfg,
                                                  const float* dist, const int64_t* tokens, int64_t k,
                                                  const uint8_t* active, const float* uniforms, float guidance_scale,
                                                  float temperature, float lam, float tau, arrag_dedup dedup,
                                                  int64_t top_k, float top_p, int64_t* tokens_out, float* probs_out);

/*
 * CUDA k-selection (device pointers; needs a library built with CUDA, see arrag_has_cuda()).
 *   dist (num_rows, num_candidates) float32 candidate distances, ids the matching int64 ids, or NULL
 *   to use the column index; 1 <= k <= min(ARRAG_MAX_K, num_candidates).
 *   dist_out / ids_out (num_rows, k): the k smallest per row, ascending, ties by smaller id; NaN is
 *   ordered as +inf. Enqueued on `stream` (a cudaStream_t; NULL = legacy default stream), asynchronous.
 */
ARRAG_API arrag_status arrag_cuda_kselect(const float* dist, const int64_t* ids, int64_t num_rows,
                                          int64_t num_candidates, int64_t k, float* dist_out, int64_t* ids_out,
                                          void* stream);

#ifdef __cplusplus
}
#endif

#endif /* ARRAG_KERNELS_ARRAG_H */
