// pybind11 module arrag_kernels._C: thin, validating bindings over the C ABI of libarrag_kernels.
//
// Arrays are numpy arrays (zero-copy views of CPU torch tensors via Tensor.numpy()), so the module
// does not depend on torch's C++ ABI. Every input is checked for dtype, rank, shape and
// C-contiguity here; wrong input raises TypeError / ValueError, never crashes.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>
#include <vector>

#include "arrag_kernels/arrag.h"

namespace py = pybind11;

namespace {

std::string shape_str(const py::array& a) {
  std::string s = "(";
  for (py::ssize_t i = 0; i < a.ndim(); ++i) s += (i ? ", " : "") + std::to_string(a.shape(i));
  return s + (a.ndim() == 1 ? ",)" : ")");
}

template <class T>
const char* dtype_name() {
  if (std::is_same<T, float>::value) return "float32";
  if (std::is_same<T, int64_t>::value) return "int64";
  if (std::is_same<T, int32_t>::value) return "int32";
  if (std::is_same<T, bool>::value) return "bool";
  return "?";
}

// Checks dtype T, rank and C-contiguity of `a` (argument `name` of `op`).
template <class T>
void require(const char* op, const char* name, const py::array& a, py::ssize_t ndim) {
  if (!a.dtype().is(py::dtype::of<T>()))
    throw py::type_error(std::string(op) + ": " + name + " must be " + dtype_name<T>() + ", got " +
                         std::string(py::str(a.dtype())));
  if (a.ndim() != ndim)
    throw py::value_error(std::string(op) + ": " + name + " must be " + std::to_string(ndim) + "-D, got shape " +
                          shape_str(a));
  if (!(a.flags() & py::array::c_style))
    throw py::value_error(std::string(op) + ": " + name + " must be C-contiguous (call .contiguous()), got shape " +
                          shape_str(a) + " with non-contiguous strides");
}

void require_dim(const char* op, const char* what, py::ssize_t got, py::ssize_t expected) {
  if (got != expected)
    throw py::value_error(std::string(op) + ": " + what + " must be " + std::to_string(expected) + ", got " +
                          std::to_string(got));
}

void check(arrag_status status) {
  if (status == ARRAG_OK) return;
  const std::string msg = arrag_last_error();
  switch (status) {
    case ARRAG_ERROR_INVALID_ARGUMENT: throw py::value_error(msg);
    case ARRAG_ERROR_OUT_OF_MEMORY: throw std::bad_alloc();
    default: throw std::runtime_error(msg);
  }
}

template <class T>
const T* ptr(const py::array& a) { return static_cast<const T*>(a.data()); }

py::tuple neighbor_keys(const py::array& tokens, const py::array& codebook, const py::array& positions, int64_t height,
                        int64_t width, const py::array& offsets, bool border_skip) {
  const char* op = "neighbor_keys";
  require<int64_t>(op, "tokens", tokens, 2);
  require<float>(op, "codebook", codebook, 2);
  require<int64_t>(op, "positions", positions, 2);
  require<int32_t>(op, "offsets", offsets, 2);
  require_dim(op, "tokens.shape[1] (height * width)", tokens.shape(1), height * width);
  require_dim(op, "positions.shape[0] (batch)", positions.shape(0), tokens.shape(0));
  require_dim(op, "offsets.shape[1]", offsets.shape(1), 2);
  const int64_t B = tokens.shape(0), P = positions.shape(1), V = codebook.shape(0), d = codebook.shape(1);
  const int64_t cells = offsets.shape(0);
  py::array_t<float> keys({B, P, cells * d});
  py::array_t<bool> valid({B, P});
  arrag_status s;
  {
    py::gil_scoped_release nogil;
    s = arrag_neighbor_keys(ptr<int64_t>(tokens), B, height, width, ptr<float>(codebook), V, d,
                            ptr<int64_t>(positions), P, ptr<int32_t>(offsets), cells, border_skip ? 1 : 0,
                            keys.mutable_data(), reinterpret_cast<uint8_t*>(valid.mutable_data()));
  }
  check(s);
  return py::make_tuple(keys, valid);
}

// The arrag_dtype of 2-D C-contiguous float32 / float16 keys.
arrag_dtype key_dtype(const char* op, const py::array& keys) {
  if (keys.dtype().is(py::dtype::of<float>())) {
    require<float>(op, "keys", keys, 2);
    return ARRAG_FLOAT32;
  }
  if (keys.dtype().is(py::dtype("float16"))) {
    if (keys.ndim() != 2 || !(keys.flags() & py::array::c_style))
      throw py::value_error(std::string(op) + ": keys must be a 2-D C-contiguous array, got shape " + shape_str(keys));
    return ARRAG_FLOAT16;
  }
  throw py::type_error(std::string(op) + ": keys must be float32 or float16, got " + std::string(py::str(keys.dtype())));
}

void require_k(const char* op, int64_t k, int64_t num_keys) {
  if (k < 1 || k > ARRAG_MAX_K || k > num_keys)
    throw py::value_error(std::string(op) + ": k must be in [1, min(" + std::to_string(ARRAG_MAX_K) +
                          ", number of keys = " + std::to_string(num_keys) + ")], got " + std::to_string(k));
}

py::tuple knn(const py::array& queries, const py::array& keys, int64_t k) {
  const char* op = "knn";
  require<float>(op, "queries", queries, 2);
  const arrag_dtype kd = key_dtype(op, keys);
  require_dim(op, "keys.shape[1] (the query dimension)", keys.shape(1), queries.shape(1));
  const int64_t Q = queries.shape(0), N = keys.shape(0), D = keys.shape(1);
  require_k(op, k, N);
  py::array_t<float> dist({Q, k});
  py::array_t<int64_t> ids({Q, k});
  arrag_status s;
  {
    py::gil_scoped_release nogil;
    s = arrag_knn(ptr<float>(queries), Q, keys.data(), kd, N, D, k, dist.mutable_data(), ids.mutable_data());
  }
  check(s);
  return py::make_tuple(dist, ids);
}

py::tuple knn_prepare(const py::array& keys) {
  const char* op = "knn_prepare";
  const arrag_dtype kd = key_dtype(op, keys);
  const int64_t N = keys.shape(0), D = keys.shape(1), rows = arrag_knn_blocked_rows(N);
  py::array blocked(keys.dtype(), std::vector<py::ssize_t>{rows * D});
  py::array_t<float> norms({rows});
  arrag_status s;
  {
    py::gil_scoped_release nogil;
    s = arrag_knn_prepare(keys.data(), kd, N, D, blocked.mutable_data(), norms.mutable_data());
  }
  check(s);
  return py::make_tuple(blocked, norms);
}

py::tuple knn_blocked(const py::array& queries, const py::array& blocked, const py::array& norms, int64_t num_keys,
                      int64_t k) {
  const char* op = "knn_blocked";
  require<float>(op, "queries", queries, 2);
  require<float>(op, "norms", norms, 1);
  const int64_t Q = queries.shape(0), D = queries.shape(1), rows = arrag_knn_blocked_rows(num_keys);
  const arrag_dtype kd = blocked.dtype().is(py::dtype("float16")) ? ARRAG_FLOAT16 : ARRAG_FLOAT32;
  if (kd == ARRAG_FLOAT32) require<float>(op, "blocked", blocked, 1);
  if (blocked.ndim() != 1 || !(blocked.flags() & py::array::c_style))
    throw py::value_error(std::string(op) + ": blocked must be the 1-D array knn_prepare returned, got shape " +
                          shape_str(blocked));
  require_dim(op, "blocked.shape[0] (blocked rows * query dimension)", blocked.shape(0), rows * D);
  require_dim(op, "norms.shape[0] (blocked rows)", norms.shape(0), rows);
  require_k(op, k, num_keys);
  py::array_t<float> dist({Q, k});
  py::array_t<int64_t> ids({Q, k});
  arrag_status s;
  {
    py::gil_scoped_release nogil;
    s = arrag_knn_blocked(ptr<float>(queries), Q, blocked.data(), ptr<float>(norms), kd, num_keys, D, k,
                          dist.mutable_data(), ids.mutable_data());
  }
  check(s);
  return py::make_tuple(dist, ids);
}

py::object daid_sample(const py::array& logits, const py::array& dist, const py::array& tokens, const py::array& active,
                       const py::object& uniforms, float guidance_scale, float temperature, float lam, float tau,
                       const std::string& dedup, bool cfg, bool return_probs, int64_t top_k, float top_p) {
  const char* op = "daid_sample";
  require<float>(op, "logits", logits, 2);
  require<float>(op, "dist", dist, 2);
  require<int64_t>(op, "tokens", tokens, 2);
  require<bool>(op, "active", active, 1);
  const int64_t B = active.shape(0), V = logits.shape(1), K = tokens.shape(1);
  require_dim(op, cfg ? "logits.shape[0] (2 * batch: conditional then unconditional rows)" : "logits.shape[0] (batch)",
              logits.shape(0), cfg ? 2 * B : B);
  require_dim(op, "dist.shape[0] (batch)", dist.shape(0), B);
  require_dim(op, "tokens.shape[0] (batch)", tokens.shape(0), B);
  require_dim(op, "dist.shape[1] (tokens.shape[1])", dist.shape(1), K);
  arrag_dedup dd;
  if (dedup == "nearest") dd = ARRAG_DEDUP_NEAREST;
  else if (dedup == "sum") dd = ARRAG_DEDUP_SUM;
  else throw py::value_error(std::string(op) + ": dedup must be 'nearest' or 'sum', got '" + dedup + "'");
  const float* u = nullptr;
  py::array u_arr;
  if (!uniforms.is_none()) {
    u_arr = uniforms.cast<py::array>();
    require<float>(op, "uniforms", u_arr, 1);
    require_dim(op, "uniforms.shape[0] (batch)", u_arr.shape(0), B);
    u = ptr<float>(u_arr);
  }
  py::array_t<int64_t> out({B});
  py::array_t<float> probs(return_probs ? std::vector<py::ssize_t>{B, V} : std::vector<py::ssize_t>{0});
  arrag_status s;
  {
    py::gil_scoped_release nogil;
    s = arrag_daid_sample_filtered(ptr<float>(logits), B, V, cfg ? 1 : 0, ptr<float>(dist), ptr<int64_t>(tokens), K,
                                   reinterpret_cast<const uint8_t*>(active.data()), u, guidance_scale, temperature, lam,
                                   tau, dd, top_k, top_p, out.mutable_data(),
                                   return_probs ? probs.mutable_data() : nullptr);
  }
  check(s);
  if (return_probs) return py::make_tuple(out, probs);
  return std::move(out);
}

void cuda_kselect(uintptr_t dist, uintptr_t ids, int64_t rows, int64_t cands, int64_t k, uintptr_t dist_out,
                  uintptr_t ids_out, uintptr_t stream) {
  arrag_status s;
  {
    py::gil_scoped_release nogil;
    s = arrag_cuda_kselect(reinterpret_cast<const float*>(dist), reinterpret_cast<const int64_t*>(ids), rows, cands, k,
                           reinterpret_cast<float*>(dist_out), reinterpret_cast<int64_t*>(ids_out),
                           reinterpret_cast<void*>(stream));
  }
  check(s);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "arrag_kernels compiled kernels (CPU: neighbour keys, exact k-NN, DAiD sample; CUDA: k-selection)";
  m.attr("MAX_K") = ARRAG_MAX_K;
  m.def("api_version", &arrag_api_version);
  m.def("has_cuda", [] { return arrag_has_cuda() != 0; });
  m.def("cpu_isa", [] { return std::string(arrag_cpu_isa()); });
  m.def("neighbor_keys", &neighbor_keys, py::arg("tokens"), py::arg("codebook"), py::arg("positions"),
        py::arg("height"), py::arg("width"), py::arg("offsets"), py::arg("border_skip"),
        "(tokens int64 (B, H*W), codebook f32 (V, d), positions int64 (B, P), H, W, offsets int32 (n, 2), "
        "border_skip) -> (keys f32 (B, P, n*d), valid bool (B, P))");
  m.def("knn", &knn, py::arg("queries"), py::arg("keys"), py::arg("k"),
        "(queries f32 (Q, D), keys f32/f16 (N, D), k) -> (dist f32 (Q, k), ids int64 (Q, k))");
  m.def("knn_prepare", &knn_prepare, py::arg("keys"),
        "(keys f32/f16 (N, D)) -> (blocked (R * D,) of the keys' dtype, norms f32 (R,)), R = N rounded up to 256");
  m.def("knn_blocked", &knn_blocked, py::arg("queries"), py::arg("blocked"), py::arg("norms"), py::arg("num_keys"),
        py::arg("k"), "knn over knn_prepare's layout: (queries, blocked, norms, N, k) -> (dist, ids)");
  m.def("daid_sample", &daid_sample, py::arg("logits"), py::arg("dist"), py::arg("tokens"), py::arg("active"),
        py::arg("uniforms"), py::arg("guidance_scale"), py::arg("temperature"), py::arg("lam"), py::arg("tau"),
        py::arg("dedup"), py::arg("cfg") = true, py::arg("return_probs") = false, py::arg("top_k") = 0,
        py::arg("top_p") = 1.0f,
        "DAiD merge + sample -> tokens int64 (B,) [, probs f32 (B, V)]");
  m.def("cuda_kselect", &cuda_kselect, py::arg("dist_ptr"), py::arg("ids_ptr"), py::arg("rows"),
        py::arg("candidates"), py::arg("k"), py::arg("dist_out_ptr"), py::arg("ids_out_ptr"), py::arg("stream"),
        "k-selection on raw CUDA device pointers (ids_ptr 0 = column index); raises if built without CUDA");
}
