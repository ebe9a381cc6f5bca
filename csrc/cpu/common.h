// Internal helpers shared by the C API implementation files.
#pragma once

#include <cstdint>
#include <new>
#include <string>

#include "arrag_kernels/arrag.h"

namespace arrag {

// Records the message as this thread's last error and returns the code.
arrag_status fail(arrag_status code, const std::string& message);
arrag_status ok();

// Thrown by kernels for invalid data found while running (e.g. a token id >= vocab).
struct InvalidArgument {
  std::string message;
};

// Runs `body` (returning arrag_status) and converts C++ exceptions to error codes, so nothing
// escapes through the C ABI.
template <class F>
arrag_status guarded(const char* op, F&& body) {
  try {
    return body();
  } catch (const InvalidArgument& e) {
    return fail(ARRAG_ERROR_INVALID_ARGUMENT, std::string(op) + ": " + e.message);
  } catch (const std::bad_alloc&) {
    return fail(ARRAG_ERROR_OUT_OF_MEMORY, std::string(op) + ": out of memory");
  } catch (const std::exception& e) {
    return fail(ARRAG_ERROR_INTERNAL, std::string(op) + ": internal error: " + e.what());
  }
}

// Kernels (validated inputs).
void neighbor_keys(const int64_t* tokens, int64_t batch, int64_t height, int64_t width, const float* codebook,
                   int64_t vocab, int64_t dim, const int64_t* positions, int64_t num_positions,
                   const int32_t* offsets, int64_t num_cells, bool border_skip, float* keys_out,
                   uint8_t* valid_out);
void knn(const float* queries, int64_t num_queries, const void* keys, arrag_dtype key_dtype, int64_t num_keys,
         int64_t dim, int64_t k, float* dist_out, int64_t* ids_out);
int64_t knn_blocked_rows(int64_t num_keys);
void knn_prepare(const void* keys, arrag_dtype key_dtype, int64_t num_keys, int64_t dim, void* blocked, float* norms);
void knn_blocked(const float* queries, int64_t num_queries, const void* blocked, const float* norms,
                 arrag_dtype key_dtype, int64_t num_keys, int64_t dim, int64_t k, float* dist_out, int64_t* ids_out);
const char* cpu_isa_name();
void daid_sample(const float* logits, int64_t batch, int64_t vocab, bool cfg, const float* dist,
                 const int64_t* tokens, int64_t k, const uint8_t* active, const float* uniforms,
                 float guidance_scale, float temperature, float lam, float tau, arrag_dedup dedup,
                 int64_t top_k, float top_p, int64_t* tokens_out, float* probs_out);

}  // namespace arrag
