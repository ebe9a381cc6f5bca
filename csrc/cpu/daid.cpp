// DAiD decode step: CFG combine, temperature, softmax, retrieval distribution, mix, sample.
#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "common.h"

namespace arrag {
namespace {

// HF's TopKLogitsWarper then TopPLogitsWarper (min_tokens_to_keep = 1) on the scores s: removed
// scores become -inf. top-k keeps s >= the k-th largest (ties kept); top-p removes, in ascending
// order, the scores whose cumulative softmax mass is <= 1 - top_p, never the largest.
void filter_top_k_top_p(float* s, int64_t vocab, int64_t top_k, float top_p, std::vector<float>& scratch,
                        std::vector<std::pair<float, int64_t>>& order) {
  const float neg_inf = -std::numeric_limits<float>::infinity();
  if (top_k > 0 && top_k < vocab) {
    scratch.assign(s, s + vocab);
    std::nth_element(scratch.begin(), scratch.begin() + (top_k - 1), scratch.end(), std::greater<float>());
    const float kth = scratch[top_k - 1];
    for (int64_t v = 0; v < vocab; ++v)
      if (s[v] < kth) s[v] = neg_inf;
  }
  if (top_p < 1.0f) {
    // Only finite scores need ordering: removed (-inf) ones add zero mass at the front of HF's ascending order.
    order.clear();
    for (int64_t v = 0; v < vocab; ++v)
      if (s[v] > neg_inf) order.emplace_back(s[v], v);
    if (order.empty()) return;
    std::sort(order.begin(), order.end());
    const float mx = order.back().first;
    float sum = 0.0f;
    for (const auto& e : order) sum += std::exp(e.first - mx);
    // like torch: fp32 softmax, cumsum accumulated in double and rounded per prefix, fp32 threshold
    const float limit = static_cast<float>(1.0 - static_cast<double>(top_p));
    double cum = 0.0;
    for (size_t i = 0; i + 1 < order.size(); ++i) {
      cum += std::exp(order[i].first - mx) / sum;
      if (static_cast<float>(cum) > limit) break;
      s[order[i].second] = neg_inf;
    }
  }
}

// p_model for one row, written to p (vocab floats).
void model_probs(const float* lc, const float* lu, int64_t vocab, float w, float temperature, int64_t top_k,
                 float top_p, float* p, std::vector<float>& scratch, std::vector<std::pair<float, int64_t>>& order) {
  float mx = -std::numeric_limits<float>::infinity();
  if (lu != nullptr) {
    for (int64_t v = 0; v < vocab; ++v) {
      p[v] = (lu[v] + w * (lc[v] - lu[v])) / temperature;
      mx = p[v] > mx ? p[v] : mx;
    }
  } else {
    for (int64_t v = 0; v < vocab; ++v) {
      p[v] = lc[v] / temperature;
      mx = p[v] > mx ? p[v] : mx;
    }
  }
  filter_top_k_top_p(p, vocab, top_k, top_p, scratch, order);  // keeps the maximum mx
  float sum = 0.0f;
  for (int64_t v = 0; v < vocab; ++v) {
    p[v] = std::exp(p[v] - mx);
    sum += p[v];
  }
  const float inv = 1.0f / sum;
  for (int64_t v = 0; v < vocab; ++v) p[v] *= inv;
}

// Adds lam * p_ret to p (already scaled by 1 - lam). best is a vocab-sized scratch of +inf that is
// restored before returning; touched lists the distinct tokens.
void add_retrieval(const float* dist, const int64_t* tok, int64_t k, float tau, float lam, arrag_dedup dedup,
                   float* p, float* best, std::vector<int64_t>& touched) {
  touched.clear();
  float mx = -std::numeric_limits<float>::infinity();
  if (dedup == ARRAG_DEDUP_NEAREST) {
    for (int64_t j = 0; j < k; ++j) {
      const int64_t t = tok[j];
      if (t < 0) continue;
      if (best[t] == std::numeric_limits<float>::infinity()) touched.push_back(t);
      best[t] = dist[j] < best[t] ? dist[j] : best[t];
    }
    for (int64_t t : touched) {
      const float x = -best[t] / tau;
      mx = x > mx ? x : mx;
    }
    float sum = 0.0f;
    for (int64_t t : touched) {
      best[t] = std::exp(-best[t] / tau - mx);  // reuse the slot for the weight
      sum += best[t];
    }
    for (int64_t t : touched) {
      p[t] += lam * (best[t] / sum);
      best[t] = std::numeric_limits<float>::infinity();
    }
  } else {
    for (int64_t j = 0; j < k; ++j) {
      if (tok[j] < 0) continue;
      const float x = -dist[j] / tau;
      mx = x > mx ? x : mx;
    }
    float sum = 0.0f;
    for (int64_t j = 0; j < k; ++j)
      if (tok[j] >= 0) sum += std::exp(-dist[j] / tau - mx);
    for (int64_t j = 0; j < k; ++j)
      if (tok[j] >= 0) p[tok[j]] += lam * (std::exp(-dist[j] / tau - mx) / sum);
  }
}

// Inverse CDF like the reference (torch.cumsum accumulates fp32 in double on the CPU, then rounds
// each prefix to fp32): the smallest v with cdf[v] > u * cdf[V-1], else V - 1.
int64_t sample_row(const float* p, int64_t vocab, const float* u) {
  if (u == nullptr) {
    int64_t arg = 0;
    for (int64_t v = 1; v < vocab; ++v)
      if (p[v] > p[arg]) arg = v;
    return arg;
  }
  double total = 0.0;
  for (int64_t v = 0; v < vocab; ++v) total += p[v];
  const float target = *u * static_cast<float>(total);
  double cum = 0.0;
  for (int64_t v = 0; v < vocab; ++v) {
    cum += p[v];
    if (static_cast<float>(cum) > target) return v;
  }
  return vocab - 1;
}

}  // namespace

void daid_sample(const float* logits, int64_t batch, int64_t vocab, bool cfg, const float* dist,
                 const int64_t* tokens, int64_t k, const uint8_t* active, const float* uniforms,
                 float guidance_scale, float temperature, float lam, float tau, arrag_dedup dedup,
                 int64_t top_k, float top_p, int64_t* tokens_out, float* probs_out) {
  for (int64_t i = 0; i < batch * k; ++i)
    if (tokens[i] >= vocab)
      throw InvalidArgument{"retrieved token id " + std::to_string(tokens[i]) + " at (row " +
                            std::to_string(i / k) + ", hit " + std::to_string(i % k) +
                            ") is outside the vocabulary [0, " + std::to_string(vocab) + ")"};
  const float keep = static_cast<float>(1.0 - static_cast<double>(lam));
#pragma omp parallel
  {
    std::vector<float> row_probs(probs_out == nullptr ? vocab : 0);
    std::vector<float> best, scratch;
    std::vector<int64_t> touched;
    std::vector<std::pair<float, int64_t>> order;
#pragma omp for schedule(static)
    for (int64_t b = 0; b < batch; ++b) {
      float* p = probs_out != nullptr ? probs_out + b * vocab : row_probs.data();
      const float* lc = logits + b * vocab;
      model_probs(lc, cfg ? logits + (batch + b) * vocab : nullptr, vocab, guidance_scale, temperature, top_k, top_p,
                  p, scratch, order);
      bool any_hit = false;
      for (int64_t j = 0; j < k && !any_hit; ++j) any_hit = tokens[b * k + j] >= 0;
      if (active[b] && any_hit && lam > 0.0f) {
        if (best.empty()) best.assign(vocab, std::numeric_limits<float>::infinity());
        for (int64_t v = 0; v < vocab; ++v) p[v] *= keep;
        add_retrieval(dist + b * k, tokens + b * k, k, tau, lam, dedup, p, best.data(), touched);
      }
      tokens_out[b] = sample_row(p, vocab, uniforms != nullptr ? uniforms + b : nullptr);
    }
  }
}

}  // namespace arrag
