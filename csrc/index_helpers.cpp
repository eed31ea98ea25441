// yuanlfa._index_helpers: the sample index of the packed GPT dataset, built by one walk over the
// documents (the loop Megatron's helpers.cpp runs), and the blending indices that interleave
// several datasets by weight (Megatron's build_blending_indices), with the GIL released while
// they loop.
//
// The numpy versions (yuanlfa/data/dataset.py, and the blending fallback in
// yuanlfa/data/index_helpers.py) are the specification: same results, same checks and the same
// error texts (the Python wrapper in yuanlfa/data/index_helpers.py turns ValueError into
// DataError). Keep the messages below in step with those files.

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <string>
#include <utility>
#include <vector>

namespace py = pybind11;

namespace {

constexpr int64_t kInt64Max = std::numeric_limits<int64_t>::max();

// A 1-D array seen as a strided sequence of T; the array it came from must outlive it.
template <typename T>
struct View {
  const char* data;
  py::ssize_t stride;  // bytes: a sliced array need not be contiguous
  py::ssize_t size;
  int64_t operator[](py::ssize_t i) const {
    return static_cast<int64_t>(*reinterpret_cast<const T*>(data + i * stride));
  }
};

template <typename T>
View<T> view_of(const py::array& a) {
  return View<T>{static_cast<const char*>(a.data()), a.strides(0), a.shape(0)};
}

// What the checking pass found; an empty message means the inputs are fine.
struct Check {
  std::string error;
  int64_t total = 0;  // tokens in the whole document order
};

// Runs without the GIL: builds only a std::string, never a Python object.
template <typename L, typename O>
Check check_inputs(View<L> lengths, View<O> order) {
  Check c;
  const py::ssize_t num_docs = lengths.size;
  for (py::ssize_t i = 0; i < order.size; ++i) {
    const int64_t doc = order[i];
    if (doc < 0 || doc >= num_docs) {
      c.error = "doc_order[" + std::to_string(i) + "] = " + std::to_string(doc) +
                " is not a document id in [0, " + std::to_string(num_docs) + ")";
      return c;
    }
  }
  for (py::ssize_t d = 0; d < num_docs; ++d) {
    if (lengths[d] < 0) {
      c.error =
          "doc_lengths[" + std::to_string(d) + "] = " + std::to_string(lengths[d]) + " is negative";
      return c;
    }
  }
  for (py::ssize_t i = 0; i < order.size; ++i) {
    const int64_t len = lengths[order[i]];
    // Lengths are non-negative here, so this is the only way the sum can overflow.
    if (len > kInt64Max - c.total) {
      c.error = "the document order holds more than 2**63 - 1 tokens (int64 overflow)";
      return c;
    }
    c.total += len;
  }
  return c;
}

// Sample i ends on token (i + 1) * seq_length of the stream of documents in `order` (inclusive:
// that token is also the first of sample i + 1). Walk the documents once, keeping the stream
// offset where the current one starts; a document that ends at or before the target, an empty
// one included, is stepped over. The caller has checked that the stream is long enough, so the
// walk never runs past the end of `order`.
template <typename L, typename O>
void walk(View<L> lengths, View<O> order, int64_t seq_length, int64_t num_samples, int64_t* out) {
  out[0] = 0;
  out[1] = 0;
  py::ssize_t pos = 0;    // position in `order`
  int64_t doc_start = 0;  // stream offset of the first token of order[pos]
  int64_t doc_end = lengths[order[0]];
  for (int64_t i = 1; i <= num_samples; ++i) {
    const int64_t target = i * seq_length;
    while (doc_end <= target) {
      ++pos;
      doc_start = doc_end;
      doc_end += lengths[order[pos]];
    }
    out[2 * i] = pos;
    out[2 * i + 1] = target - doc_start;
  }
}

template <typename L, typename O>
py::array_t<int64_t> build(const py::array& lengths_arr, const py::array& order_arr,
                           int64_t seq_length, int64_t num_samples) {
  const View<L> lengths = view_of<L>(lengths_arr);
  const View<O> order = view_of<O>(order_arr);
  Check c;
  {
    py::gil_scoped_release release;
    c = check_inputs(lengths, order);
  }
  if (!c.error.empty()) throw py::value_error(c.error);
  // The product fits: build_sample_index checked num_samples * seq_length + 1 <= 2**63 - 1.
  const int64_t needed = num_samples * seq_length + 1;
  if (c.total < needed) {
    throw py::value_error("the document order holds " + std::to_string(c.total) + " tokens, " +
                          std::to_string(num_samples) + " samples of " +
                          std::to_string(seq_length) + " need " + std::to_string(needed));
  }
  py::array_t<int64_t> result({static_cast<py::ssize_t>(num_samples + 1), py::ssize_t{2}});
  int64_t* out = result.mutable_data();
  {
    py::gil_scoped_release release;
    walk(lengths, order, seq_length, num_samples, out);
  }
  return result;
}

// 4 for int32, 8 for int64, 0 for anything else (another type, byte order or rank). The
// isinstance test is numpy's dtype equivalence, so both 8-byte C types (long, long long) pass.
int int_width(const py::array& a) {
  if (a.ndim() != 1) return 0;
  if (py::isinstance<py::array_t<int32_t>>(a)) return 4;
  if (py::isinstance<py::array_t<int64_t>>(a)) return 8;
  return 0;
}

py::array_t<int64_t> build_sample_index(const py::array& doc_lengths, const py::array& doc_order,
                                        int64_t seq_length, int64_t num_samples) {
  if (seq_length < 1 || num_samples < 0) {
    throw py::value_error("need seq_length >= 1 and num_samples >= 0, got " +
                          std::to_string(seq_length) + ", " + std::to_string(num_samples));
  }
  if (num_samples > (kInt64Max - 1) / seq_length) {
    throw py::value_error(std::to_string(num_samples) + " samples of " +
                          std::to_string(seq_length) +
                          " tokens need more than 2**63 - 1 tokens (int64 overflow)");
  }
  const int lw = int_width(doc_lengths);
  const int ow = int_width(doc_order);
  if (lw == 0 || ow == 0) {
    throw py::value_error(
        "doc_lengths and doc_order must be 1-D int32 or int64 arrays in native byte order, got " +
        std::string(py::str(doc_lengths.dtype())) + " [" + std::to_string(doc_lengths.ndim()) +
        "-D] and " + std::string(py::str(doc_order.dtype())) + " [" +
        std::to_string(doc_order.ndim()) + "-D]");
  }
  if (lw == 4 && ow == 4) return build<int32_t, int32_t>(doc_lengths, doc_order, seq_length,
                                                         num_samples);
  if (lw == 4) return build<int32_t, int64_t>(doc_lengths, doc_order, seq_length, num_samples);
  if (ow == 4) return build<int64_t, int32_t>(doc_lengths, doc_order, seq_length, num_samples);
  return build<int64_t, int64_t>(doc_lengths, doc_order, seq_length, num_samples);
}

// Python's format(x, "g"): C's %g, except that every NaN prints as "nan" (glibc writes "-nan"
// for a negative one).
std::string format_g(double x) {
  if (std::isnan(x)) return "nan";
  char buf[32];
  std::snprintf(buf, sizeof buf, "%g", x);
  return buf;
}

// dataset_index is int16 as in Megatron's helpers.cpp while that holds the dataset numbers, and
// int32 beyond (Megatron stops there), so a blend may have any number of datasets.
constexpr int64_t kInt16Datasets = 32767;

// How far the weights' sum may be from 1 (numpy.isclose's default tolerances, which Megatron's
// BlendedDataset asserts with).
constexpr double kSumTolerance = 1e-8 + 1e-5;

std::string check_weights(const std::vector<double>& w) {
  const auto n = static_cast<int64_t>(w.size());
  if (n < 1) return "need at least 1 dataset, got 0";
  for (int64_t d = 0; d < n; ++d) {
    if (!std::isfinite(w[d]) || !(w[d] > 0.0)) {
      return "weights[" + std::to_string(d) + "] = " + format_g(w[d]) +
             " is not a finite number > 0";
    }
  }
  double sum = 0.0;  // left to right, as the numpy side's cumsum adds
  for (double x : w) sum += x;
  if (!(std::fabs(sum - 1.0) <= kSumTolerance)) {
    return "the weights sum to " + format_g(sum) +
           ", not 1; normalize them first (weights / weights.sum())";
  }
  return "";
}

// Megatron's greedy interleaving: sample i goes to the dataset furthest behind its share
// (weight * max(i, 1) minus the samples it already has), the first such on ties.
//
// Where the target has FMA (aarch64, x86 with -march=haswell or later) GCC and Clang would fuse
// the multiply and subtract into one, rounded once instead of twice: no longer numpy's number
// (nor that of Megatron's x86 build), so a near-tie could go the other way. Hence no contraction.
template <typename T>
#if defined(__GNUC__) && !defined(__clang__)
__attribute__((optimize("fp-contract=off")))
#endif
void blend(const std::vector<double>& weights, int64_t size, T* dataset_index,
           int64_t* dataset_sample_index) {
#ifdef __clang__
#pragma clang fp contract(off)
#endif
  const auto n = static_cast<py::ssize_t>(weights.size());
  std::vector<int64_t> current(n, 0);
  for (int64_t i = 0; i < size; ++i) {
    const double x = std::max(static_cast<double>(i), 1.0);
    py::ssize_t best = 0;
    double best_error = weights[0] * x - static_cast<double>(current[0]);
    for (py::ssize_t d = 1; d < n; ++d) {
      const double error = weights[d] * x - static_cast<double>(current[d]);
      if (error > best_error) {
        best_error = error;
        best = d;
      }
    }
    dataset_index[i] = static_cast<T>(best);
    dataset_sample_index[i] = current[best];
    ++current[best];
  }
}

template <typename T>
std::pair<py::array, py::array_t<int64_t>> fill(const std::vector<double>& weights, int64_t size) {
  py::array_t<T> dataset_index(static_cast<py::ssize_t>(size));
  py::array_t<int64_t> dataset_sample_index(static_cast<py::ssize_t>(size));
  T* index_out = dataset_index.mutable_data();
  int64_t* sample_out = dataset_sample_index.mutable_data();
  {
    py::gil_scoped_release release;
    blend(weights, size, index_out, sample_out);
  }
  return {dataset_index, dataset_sample_index};
}

std::pair<py::array, py::array_t<int64_t>> build_blending_indices(
    const py::array& weights_arr, int64_t size) {
  if (weights_arr.ndim() != 1 || !py::isinstance<py::array_t<double>>(weights_arr)) {
    throw py::value_error("weights must be a 1-D float64 array in native byte order, got " +
                          std::string(py::str(weights_arr.dtype())) + " [" +
                          std::to_string(weights_arr.ndim()) + "-D]");
  }
  // Copied, so the loop needs neither the array nor the GIL.
  const auto* data = static_cast<const char*>(weights_arr.data());
  std::vector<double> weights(static_cast<size_t>(weights_arr.shape(0)));
  for (py::ssize_t d = 0; d < weights_arr.shape(0); ++d) {
    weights[d] = *reinterpret_cast<const double*>(data + d * weights_arr.strides(0));
  }
  const std::string error = check_weights(weights);
  if (!error.empty()) throw py::value_error(error);
  if (size < 0) {
    throw py::value_error("size must be in [0, 2**63 - 1], got " + std::to_string(size));
  }
  if (static_cast<int64_t>(weights.size()) <= kInt16Datasets) return fill<int16_t>(weights, size);
  return fill<int32_t>(weights, size);
}

}  // namespace

PYBIND11_MODULE(_index_helpers, m) {
  m.doc() = "C++ helpers for yuanlfa.data; use yuanlfa.data.index_helpers, not this module.";
  m.def("build_sample_index", &build_sample_index, py::arg("doc_lengths"), py::arg("doc_order"),
        py::arg("seq_length"), py::arg("num_samples"),
        "Sample boundaries (position in doc_order, token offset), int64 [num_samples + 1, 2].\n\n"
        "doc_lengths and doc_order are 1-D int32 or int64 arrays; raises ValueError on bad "
        "inputs with the messages of yuanlfa.data.index_helpers.build_sample_index.");
  m.def("build_blending_indices", &build_blending_indices, py::arg("weights"), py::arg("size"),
        "(dataset_index int16 [size] (int32 beyond 32767 datasets), dataset_sample_index int64\n"
        "[size]): sample i of the blend\n"
        "is sample dataset_sample_index[i] of dataset dataset_index[i].\n\n"
        "weights: 1-D float64, one or more, each > 0, summing to 1; raises ValueError on\n"
        "bad inputs with the messages of yuanlfa.data.index_helpers.build_blending_indices.");
}
