// Neighbourhood-key gather: one key = the codebook rows of the target's neighbour cells.
#include <cstring>
#include <string>

#include "common.h"

namespace arrag {

void neighbor_keys(const int64_t* tokens, int64_t batch, int64_t height, int64_t width, const float* codebook,
                   int64_t vocab, int64_t dim, const int64_t* positions, int64_t num_positions,
                   const int32_t* offsets, int64_t num_cells, bool border_skip, float* keys_out,
                   uint8_t* valid_out) {
  const int64_t rows = batch * num_positions, key_dim = num_cells * dim;
  // Bad ids are collected per row and reported after the parallel loop (no throw inside OpenMP).
  int64_t bad_row = -1, bad_id = 0, bad_cell = 0;
#pragma omp parallel for schedule(static)
  for (int64_t row = 0; row < rows; ++row) {
    const int64_t b = row / num_positions;
    const int64_t p = positions[row];
    const int64_t r = p / width, c = p % width;
    const int64_t* grid = tokens + b * height * width;
    float* key = keys_out + row * key_dim;
    bool inside_all = true;
    for (int64_t j = 0; j < num_cells; ++j) {
      const int64_t rr = r + offsets[2 * j], cc = c + offsets[2 * j + 1];
      float* cell = key + j * dim;
      const bool inside = rr >= 0 && rr < height && cc >= 0 && cc < width;
      inside_all = inside_all && inside;
      const int64_t id = inside ? grid[rr * width + cc] : -1;
      if (id >= vocab) {
#pragma omp critical(arrag_bad_token)
        if (bad_row < 0 || row < bad_row) {
          bad_row = row;
          bad_id = id;
          bad_cell = rr * width + cc;
        }
        std::memset(cell, 0, sizeof(float) * dim);
      } else if (id >= 0) {
        std::memcpy(cell, codebook + id * dim, sizeof(float) * dim);
      } else {
        std::memset(cell, 0, sizeof(float) * dim);
      }
    }
    valid_out[row] = border_skip ? static_cast<uint8_t>(inside_all) : 1;
  }
  if (bad_row >= 0)
    throw InvalidArgument{"token id " + std::to_string(bad_id) + " at grid cell " + std::to_string(bad_cell) +
                          " of image " + std::to_string(bad_row / num_positions) + " is outside the codebook [0, " +
                          std::to_string(vocab) + ")"};
}

}  // namespace arrag
