// The C ABI (arrag.h): argument validation, then the kernels; no C++ exception crosses it.
#include <cmath>
#include <string>

#include "common.h"

namespace arrag {

namespace {
thread_local std::string last_error;

std::string str(int64_t v) { return std::to_string(v); }
}  // namespace

arrag_status fail(arrag_status code, const std::string& message) {
  last_error = message;
  return code;
}

arrag_status ok() {
  last_error.clear();
  return ARRAG_OK;
}

}  // namespace arrag

using arrag::fail;
using arrag::str;

#define ARRAG_REQUIRE(cond, msg) \
  do {                           \
    if (!(cond)) return fail(ARRAG_ERROR_INVALID_ARGUMENT, std::string(op) + ": " + (msg)); \
  } while (0)

namespace {
// The checks shared by the exact searches.
arrag_status check_knn(const char* op, const float* queries, int64_t num_queries, const void* keys,
                       arrag_dtype key_dtype, int64_t num_keys, int64_t dim, int64_t k, float* dist_out,
                       int64_t* ids_out) {
  ARRAG_REQUIRE(key_dtype == ARRAG_FLOAT32 || key_dtype == ARRAG_FLOAT16,
                "key_dtype must be ARRAG_FLOAT32 (0) or ARRAG_FLOAT16 (1), got " + str(key_dtype));
  ARRAG_REQUIRE(num_queries >= 0 && num_keys > 0 && dim > 0,
                "expected num_queries >= 0, num_keys > 0, dim > 0; got " + str(num_queries) + ", " + str(num_keys) +
                    ", " + str(dim));
  ARRAG_REQUIRE(k >= 1 && k <= ARRAG_MAX_K && k <= num_keys,
                "k must be in [1, min(" + str(ARRAG_MAX_K) + ", num_keys = " + str(num_keys) + ")], got " + str(k));
  ARRAG_REQUIRE(dim <= (1 << 16), "dim must be <= 65536, got " + str(dim));
  ARRAG_REQUIRE((queries || num_queries == 0) && keys && (dist_out || num_queries == 0) &&
                    (ids_out || num_queries == 0),
                "a required pointer is NULL");
  return ARRAG_OK;
}
}  // namespace

extern "C" {

int arrag_api_version(void) { return ARRAG_API_VERSION; }

int arrag_has_cuda(void) {
#ifdef ARRAG_HAVE_CUDA
  return 1;
#else
  return 0;
#endif
}

const char* arrag_last_error(void) { return arrag::last_error.c_str(); }

const char* arrag_cpu_isa(void) { return arrag::cpu_isa_name(); }

arrag_status arrag_neighbor_keys(const int64_t* tokens, int64_t batch, int64_t height, int64_t width,
                                 const float* codebook, int64_t vocab, int64_t dim, const int64_t* positions,
                                 int64_t num_positions, const int32_t* offsets, int64_t num_cells, int border_skip,
                                 float* keys_out, uint8_t* valid_out) {
  const char* op = "arrag_neighbor_keys";
  ARRAG_REQUIRE(batch >= 0 && height > 0 && width > 0 && num_positions >= 0,
                "expected batch >= 0, height > 0, width > 0, num_positions >= 0; got batch " + str(batch) +
                    ", grid " + str(height) + " x " + str(width) + ", num_positions " + str(num_positions));
  ARRAG_REQUIRE(vocab > 0 && dim > 0 && num_cells > 0,
                "expected vocab, dim and num_cells > 0; got " + str(vocab) + ", " + str(dim) + ", " + str(num_cells));
  ARRAG_REQUIRE(tokens && codebook && positions && offsets && keys_out && valid_out, "a required pointer is NULL");
  for (int64_t i = 0; i < batch * num_positions; ++i)
    ARRAG_REQUIRE(positions[i] >= 0 && positions[i] < height * width,
                  "position " + str(positions[i]) + " (entry " + str(i) + ") is outside the grid [0, " +
                      str(height * width) + ")");
  return arrag::guarded(op, [&] {
    arrag::neighbor_keys(tokens, batch, height, width, codebook, vocab, dim, positions, num_positions, offsets,
                         num_cells, border_skip != 0, keys_out, valid_out);
    return arrag::ok();
  });
}

arrag_status arrag_knn(const float* queries, int64_t num_queries, const void* keys, arrag_dtype key_dtype,
                       int64_t num_keys, int64_t dim, int64_t k, float* dist_out, int64_t* ids_out) {
  const char* op = "arrag_knn";
  if (arrag_status s = check_knn(op, queries, num_queries, keys, key_dtype, num_keys, dim, k, dist_out, ids_out))
    return s;
  return arrag::guarded(op, [&] {
    arrag::knn(queries, num_queries, keys, key_dtype, num_keys, dim, k, dist_out, ids_out);
    return arrag::ok();
  });
}

int64_t arrag_knn_blocked_rows(int64_t num_keys) { return arrag::knn_blocked_rows(num_keys); }

arrag_status arrag_knn_prepare(const void* keys, arrag_dtype key_dtype, int64_t num_keys, int64_t dim,
                               void* blocked_out, float* norms_out) {
  const char* op = "arrag_knn_prepare";
  ARRAG_REQUIRE(key_dtype == ARRAG_FLOAT32 || key_dtype == ARRAG_FLOAT16,
                "key_dtype must be ARRAG_FLOAT32 (0) or ARRAG_FLOAT16 (1), got " + str(key_dtype));
  ARRAG_REQUIRE(num_keys > 0 && dim > 0 && dim <= (1 << 16),
                "expected num_keys > 0 and 0 < dim <= 65536; got " + str(num_keys) + ", " + str(dim));
  ARRAG_REQUIRE(keys && blocked_out && norms_out, "a required pointer is NULL");
  return arrag::guarded(op, [&] {
    arrag::knn_prepare(keys, key_dtype, num_keys, dim, blocked_out, norms_out);
    return arrag::ok();
  });
}

arrag_status arrag_knn_blocked(const float* queries, int64_t num_queries, const void* blocked, const float* norms,
                               arrag_dtype key_dtype, int64_t num_keys, int64_t dim, int64_t k, float* dist_out,
                               int64_t* ids_out) {
  const char* op = "arrag_knn_blocked";
  if (arrag_status s = check_knn(op, queries, num_queries, blocked, key_dtype, num_keys, dim, k, dist_out, ids_out))
    return s;
  ARRAG_REQUIRE(norms, "a required pointer is NULL");
  return arrag::guarded(op, [&] {
    arrag::knn_blocked(queries, num_queries, blocked, norms, key_dtype, num_keys, dim, k, dist_out, ids_out);
    return arrag::ok();
  });
}

arrag_status arrag_daid_sample(const float* logits, int64_t batch, int64_t vocab, int cfg, const float* dist,
                               const int64_t* tokens, int64_t k, const uint8_t* active, const float* uniforms,
                               float guidance_scale, float temperature, float lam, float tau, arrag_dedup dedup,
                               int64_t* tokens_out, float* probs_out) {
  return arrag_daid_sample_filtered(logits, batch, vocab, cfg, dist, tokens, k, active, uniforms, guidance_scale,
                                    temperature, lam, tau, dedup, 0, 1.0f, tokens_out, probs_out);
}

arrag_status arrag_daid_sample_filtered(const float* logits, int64_t batch, int64_t vocab, int cfg, const float* dist,
                                        const int64_t* tokens, int64_t k, const uint8_t* active, const float* uniforms,
                                        float guidance_scale, float temperature, float lam, float tau,
                                        arrag_dedup dedup, int64_t top_k, float top_p, int64_t* tokens_out,
                                        float* probs_out) {
  const char* op = "arrag_daid_sample";
  ARRAG_REQUIRE(batch >= 0 && vocab > 0 && k >= 0,
                "expected batch >= 0, vocab > 0, k >= 0; got " + str(batch) + ", " + str(vocab) + ", " + str(k));
  ARRAG_REQUIRE(temperature > 0.0f && std::isfinite(temperature), "temperature must be finite and > 0, got " +
                                                                       std::to_string(temperature));
  ARRAG_REQUIRE(lam >= 0.0f && lam <= 1.0f, "lam must be in [0, 1], got " + std::to_string(lam));
  ARRAG_REQUIRE(top_k >= 0, "top_k must be >= 0 (0: no top-k), got " + str(top_k));
  ARRAG_REQUIRE(top_p >= 0.0f && top_p <= 1.0f, "top_p must be in [0, 1] (1: no top-p), got " + std::to_string(top_p));
  ARRAG_REQUIRE(tau > 0.0f && std::isfinite(tau), "tau must be finite and > 0, got " + std::to_string(tau));
  ARRAG_REQUIRE(std::isfinite(guidance_scale), "guidance_scale must be finite, got " + std::to_string(guidance_scale));
  ARRAG_REQUIRE(dedup == ARRAG_DEDUP_NEAREST || dedup == ARRAG_DEDUP_SUM,
                "dedup must be ARRAG_DEDUP_NEAREST (0) or ARRAG_DEDUP_SUM (1), got " + str(dedup));
  ARRAG_REQUIRE((logits && active && tokens_out && (k == 0 || (dist && tokens))) || batch == 0,
                "a required pointer is NULL");
  if (uniforms != nullptr)
    for (int64_t b = 0; b < batch; ++b)
      ARRAG_REQUIRE(uniforms[b] >= 0.0f && uniforms[b] < 1.0f,
                    "uniforms must lie in [0, 1), got " + std::to_string(uniforms[b]) + " at row " + str(b));
  // As the Python ops (ops/daid.py) for CPU inputs: NaN or +inf scores, all -inf rows and NaN distances of
  // real hits would otherwise sample a silent token 0. One pass over the inputs, small next to the merge.
  for (int64_t r = 0; r < (cfg != 0 ? 2 * batch : batch); ++r) {
    const float* row = logits + r * vocab;
    bool any_finite = false;
    for (int64_t v = 0; v < vocab; ++v) {
      ARRAG_REQUIRE(!std::isnan(row[v]) && row[v] != INFINITY,
                    "logits row " + str(r) + " holds NaN or +inf at " + str(v) +
                        "; expected finite scores (-inf only for masked tokens)");
      any_finite = any_finite || row[v] != -INFINITY;
    }
    ARRAG_REQUIRE(any_finite, "logits row " + str(r) + " is all -inf; at least one token must be allowed");
  }
  for (int64_t i = 0; i < batch * k; ++i)
    ARRAG_REQUIRE(tokens[i] < 0 || !std::isnan(dist[i]),
                  "retrieved distance (" + str(i / k) + ", " + str(i % k) + ") is NaN; expected finite distances");
  return arrag::guarded(op, [&] {
    arrag::daid_sample(logits, batch, vocab, cfg != 0, dist, tokens, k, active, uniforms, guidance_scale, temperature,
                       lam, tau, dedup, top_k, top_p, tokens_out, probs_out);
    return arrag::ok();
  });
}

#ifndef ARRAG_HAVE_CUDA
arrag_status arrag_cuda_kselect(const float*, const int64_t*, int64_t, int64_t, int64_t, float*, int64_t*, void*) {
  return fail(ARRAG_ERROR_NOT_BUILT,
              "arrag_cuda_kselect: this libarrag_kernels was built without CUDA (rebuild with nvcc available and "
              "ARRAG_KERNELS_BUILD_CUDA=1)");
}
#endif

}  // extern "C"
