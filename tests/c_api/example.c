/* Links libarrag_kernels through its C ABI and checks the decode-step ops on hand-computed values.
 * Build: cc -std=c99 -I csrc/include example.c -L<dir> -larrag_kernels -Wl,-rpath,<dir> -lm
 * Exit status 0 and "all checks passed" on success; prints each failed check otherwise. */
#include <math.h>
#include <stdio.h>
#include <string.h>

#include "arrag_kernels/arrag.h"

static int failures = 0;

#define CHECK(cond, ...)                       \
  do {                                         \
    if (!(cond)) {                             \
      ++failures;                              \
      printf("FAIL %s:%d: ", __FILE__, __LINE__); \
      printf(__VA_ARGS__);                     \
      printf("\n");                            \
    }                                          \
  } while (0)

/* Outputs are filled with NaN / -7 before each call, so an element the library forgets to write fails. */
static void poison_f32(float* x, int n) {
  for (int i = 0; i < n; ++i) x[i] = NAN;
}

static void poison_i64(int64_t* x, int n) {
  for (int i = 0; i < n; ++i) x[i] = -7;
}

static void check_status(arrag_status s, const char* what) {
  CHECK(s == ARRAG_OK, "%s returned %d: %s", what, (int)s, arrag_last_error());
}

static void test_knn(void) {
  /* 5 keys in 2-D; squared distances from (0,0): 0,1,4,9,2; from (1,0): 1,0,5,4,1 */
  const float keys[10] = {0, 0, 1, 0, 0, 2, 3, 0, 1, 1};
  const float queries[4] = {0, 0, 1, 0};
  const float want_d[6] = {0, 1, 2, 0, 1, 1};
  const int64_t want_i[6] = {0, 1, 4, 1, 0, 4}; /* (1,0): ids 0 and 4 tie at 1, smaller id first */
  float d[6];
  int64_t ids[6];
  poison_f32(d, 6);
  poison_i64(ids, 6);
  check_status(arrag_knn(queries, 2, keys, ARRAG_FLOAT32, 5, 2, 3, d, ids), "arrag_knn");
  for (int j = 0; j < 6; ++j) {
    CHECK(d[j] == want_d[j], "knn dist[%d] = %g, expected %g", j, d[j], want_d[j]);
    CHECK(ids[j] == want_i[j], "knn id[%d] = %lld, expected %lld", j, (long long)ids[j], (long long)want_i[j]);
  }
  /* the same search over keys prepared once (blocks of 256 transposed keys + norms) */
  CHECK(arrag_knn_blocked_rows(5) == 256, "arrag_knn_blocked_rows(5) = %lld", (long long)arrag_knn_blocked_rows(5));
  static float blocked[256 * 2], norms[256];
  poison_f32(blocked, 256 * 2);
  poison_f32(norms, 256);
  check_status(arrag_knn_prepare(keys, ARRAG_FLOAT32, 5, 2, blocked, norms), "arrag_knn_prepare");
  poison_f32(d, 6);
  poison_i64(ids, 6);
  check_status(arrag_knn_blocked(queries, 2, blocked, norms, ARRAG_FLOAT32, 5, 2, 3, d, ids), "arrag_knn_blocked");
  for (int j = 0; j < 6; ++j) {
    CHECK(d[j] == want_d[j], "blocked knn dist[%d] = %g, expected %g", j, d[j], want_d[j]);
    CHECK(ids[j] == want_i[j], "blocked knn id[%d] = %lld, expected %lld", j, (long long)ids[j], (long long)want_i[j]);
  }
  /* k > number of keys is an error with a message, not a crash */
  arrag_status s = arrag_knn(queries, 2, keys, ARRAG_FLOAT32, 5, 2, 6, d, ids);
  CHECK(s == ARRAG_ERROR_INVALID_ARGUMENT, "knn with k = 6 > 5 keys returned %d", (int)s);
  CHECK(strstr(arrag_last_error(), "k must be in") != NULL, "unexpected error message: %s", arrag_last_error());
}

static void test_neighbor_keys(void) {
  /* 2 x 3 grid, codebook of 4 two-dimensional codes; causal hop-1 cells UL, U, UR, L */
  const int64_t tokens[6] = {0, 1, 2, 3, -1, -1};
  const float codebook[8] = {1, 0, 0, 1, -1, 0, 0, -1};
  const int64_t positions[2] = {4, 3}; /* (1,1): all inside; (1,0): UL and L outside */
  const int32_t offsets[8] = {-1, -1, -1, 0, -1, 1, 0, -1};
  const float want[16] = {1, 0, 0, 1, -1, 0, 0, -1, /* position 4 */ 0, 0, 1, 0, 0, 1, 0, 0 /* position 3 */};
  float keys[16];
  uint8_t valid[2] = {7, 7};
  poison_f32(keys, 16);
  check_status(arrag_neighbor_keys(tokens, 1, 2, 3, codebook, 4, 2, positions, 2, offsets, 4, 1, keys, valid),
               "arrag_neighbor_keys");
  for (int j = 0; j < 16; ++j) CHECK(keys[j] == want[j], "neighbor key[%d] = %g, expected %g", j, keys[j], want[j]);
  CHECK(valid[0] == 1 && valid[1] == 0, "valid = (%d, %d), expected (1, 0)", valid[0], valid[1]);
}

static void test_daid_sample(void) {
  /* batch 1, vocab 4, CFG rows (cond, uncond) all zero -> p_model uniform 0.25; both hits are token
   * 2 -> p_ret = e_2; lam = 0.5 -> p = (0.125, 0.125, 0.625, 0.125), cumsum (.125, .25, .875, 1). */
  const float logits[8] = {0};
  const float dist[2] = {0.5f, 1.5f};
  const int64_t hits[2] = {2, 2};
  const uint8_t active[1] = {1};
  const float want_p[4] = {0.125f, 0.125f, 0.625f, 0.125f};
  const float us[3] = {0.2f, 0.3f, 0.9f};
  const int64_t want_tok[3] = {1, 2, 3};
  float p[4];
  int64_t tok;
  for (int t = 0; t < 3; ++t) {
    poison_f32(p, 4);
    poison_i64(&tok, 1);
    check_status(arrag_daid_sample(logits, 1, 4, 1, dist, hits, 2, active, &us[t], 5.0f, 1.0f, 0.5f, 0.6f,
                                   ARRAG_DEDUP_NEAREST, &tok, p),
                 "arrag_daid_sample");
    CHECK(tok == want_tok[t], "u = %g sampled %lld, expected %lld", us[t], (long long)tok, (long long)want_tok[t]);
  }
  for (int v = 0; v < 4; ++v) CHECK(fabsf(p[v] - want_p[v]) < 1e-6f, "p[%d] = %g, expected %g", v, p[v], want_p[v]);
  poison_i64(&tok, 1);
  check_status(arrag_daid_sample(logits, 1, 4, 1, dist, hits, 2, active, NULL, 5.0f, 1.0f, 0.5f, 0.6f,
                                 ARRAG_DEDUP_SUM, &tok, NULL),
               "arrag_daid_sample (greedy)");
  CHECK(tok == 2, "greedy sampled %lld, expected 2", (long long)tok);

  /* Non-finite inputs are refused (not sampled as a silent token 0): NaN and +inf logits, an all -inf
   * row, a NaN distance of a real hit. A -inf logit (a masked token) and a NaN at an ignored hit
   * (id < 0) are fine. */
  float bad[8] = {0};
  const float nan_dist[2] = {0.5f, NAN};
  const int64_t padded[2] = {2, -1};
  bad[5] = NAN;
  arrag_status s = arrag_daid_sample(bad, 1, 4, 1, dist, hits, 2, active, NULL, 5.0f, 1.0f, 0.5f, 0.6f,
                                     ARRAG_DEDUP_NEAREST, &tok, NULL);
  CHECK(s == ARRAG_ERROR_INVALID_ARGUMENT && strstr(arrag_last_error(), "logits row 1 holds NaN") != NULL,
        "NaN logit: status %d, message %s", (int)s, arrag_last_error());
  bad[5] = INFINITY;
  s = arrag_daid_sample(bad, 1, 4, 1, dist, hits, 2, active, NULL, 5.0f, 1.0f, 0.5f, 0.6f, ARRAG_DEDUP_NEAREST, &tok,
                        NULL);
  CHECK(s == ARRAG_ERROR_INVALID_ARGUMENT, "+inf logit: status %d", (int)s);
  for (int v = 0; v < 4; ++v) bad[v] = -INFINITY;
  bad[5] = 0.0f;
  s = arrag_daid_sample(bad, 1, 4, 1, dist, hits, 2, active, NULL, 5.0f, 1.0f, 0.5f, 0.6f, ARRAG_DEDUP_NEAREST, &tok,
                        NULL);
  CHECK(s == ARRAG_ERROR_INVALID_ARGUMENT && strstr(arrag_last_error(), "all -inf") != NULL,
        "all -inf row: status %d, message %s", (int)s, arrag_last_error());
  s = arrag_daid_sample(logits, 1, 4, 1, nan_dist, hits, 2, active, NULL, 5.0f, 1.0f, 0.5f, 0.6f,
                        ARRAG_DEDUP_NEAREST, &tok, NULL);
  CHECK(s == ARRAG_ERROR_INVALID_ARGUMENT && strstr(arrag_last_error(), "distance (0, 1) is NaN") != NULL,
        "NaN distance: status %d, message %s", (int)s, arrag_last_error());
  bad[0] = 0.0f; /* row 0 now has one allowed token among -inf masked ones */
  check_status(arrag_daid_sample(bad, 1, 4, 1, nan_dist, padded, 2, active, NULL, 5.0f, 1.0f, 0.5f, 0.6f,
                                 ARRAG_DEDUP_NEAREST, &tok, NULL),
               "arrag_daid_sample (masked logits, NaN at an ignored hit)");
}

static void test_cuda_stub(void) {
  if (arrag_has_cuda()) return; /* device pointers are exercised by the Python GPU tests */
  float d;
  int64_t i;
  arrag_status s = arrag_cuda_kselect(&d, NULL, 1, 1, 1, &d, &i, NULL);
  CHECK(s == ARRAG_ERROR_NOT_BUILT, "arrag_cuda_kselect without CUDA returned %d", (int)s);
}

int main(void) {
  CHECK(arrag_api_version() == ARRAG_API_VERSION, "library API version %d, header %d", arrag_api_version(),
        ARRAG_API_VERSION);
  test_knn();
  test_neighbor_keys();
  test_daid_sample();
  test_cuda_stub();
  if (failures) {
    printf("%d checks failed\n", failures);
    return 1;
  }
  printf("all checks passed (cpu isa %s, cuda %d)\n", arrag_cpu_isa(), arrag_has_cuda());
  return 0;
}
