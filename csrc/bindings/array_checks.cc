// Copyright 2026 The torch_psembed Authors. Licensed under the Apache License, Version 2.0.

#include "bindings/array_checks.h"

#include <string>
#include <vector>

#include "table/sparse_table.h"

namespace psembed {

// Built with std::to_string, not an ostringstream: see util/float_string.h for why the extension keeps
// clear of iostreams.
std::string ShapeString(const py::array& a) {
  std::string s = "[";
  for (py::ssize_t i = 0; i < a.ndim(); ++i) s += (i ? ", " : "") + std::to_string(a.shape(i));
  return s + "]";
}

// kind: 'i' signed int, 'u' unsigned int, 'f' float.
py::array CheckArray(const py::handle& obj, const char* name, char kind, int itemsize, const char* dtype_name,
                     int ndim) {
  if (!py::isinstance<py::array>(obj)) {
    throw py::type_error(std::string(name) + " must be a numpy.ndarray of " + dtype_name + ", got " +
                         std::string(py::str(py::type::of(obj).attr("__name__"))));
  }
  auto a = py::reinterpret_borrow<py::array>(obj);
  const py::dtype dt = a.dtype();
  if (dt.kind() != kind || dt.itemsize() != itemsize || !dt.attr("isnative").cast<bool>()) {
    throw py::type_error(std::string(name) + " must have dtype " + dtype_name + ", got " +
                         std::string(py::str(dt)));
  }
  if (a.ndim() != ndim) {
    throw py::value_error(std::string(name) + " must be " + std::to_string(ndim) + "-D, got shape " + ShapeString(a));
  }
  if (!(a.flags() & py::array::c_style)) {
    throw py::value_error(std::string(name) + " must be C-contiguous; call numpy.ascontiguousarray first");
  }
  if (!(a.flags() & py::detail::npy_api::NPY_ARRAY_ALIGNED_)) {
    // An unaligned view (numpy.frombuffer at an odd offset, say) is read through an aligned copy: the core
    // reads whole 4- and 8-byte values, and reading them unaligned is undefined behaviour (UBSan caught it
    // when the fuzzer ran against the sanitized extension). Every checked array is an input: nothing is lost.
    a = py::array(a.dtype(), std::vector<py::ssize_t>(a.shape(), a.shape() + a.ndim()), a.data());
  }
  return a;
}

py::array CheckKeys(const py::handle& obj, const char* name) {
  py::array a = CheckArray(obj, name, 'i', 8, "int64", 1);
  if (static_cast<uint64_t>(a.shape(0)) > SparseTable::kMaxKeysPerCall) {
    throw py::value_error(std::string(name) + " has too many entries (at most 2**31 - 1 per call)");
  }
  return a;
}

void CheckRows(const py::array& a, const char* name, size_t n, const char* n_what) {
  if (static_cast<size_t>(a.shape(0)) != n) {
    throw py::value_error(std::string(name) + " must have length " + std::to_string(n) + " (" + n_what +
                          "), got " + std::to_string(a.shape(0)));
  }
}

void CheckMatrix(const py::array& a, const char* name, size_t n, size_t width, const char* n_what) {
  if (static_cast<size_t>(a.shape(0)) != n || static_cast<size_t>(a.shape(1)) != width) {
    throw py::value_error(std::string(name) + " must have shape [n, " + std::to_string(width) + "] (n = " + n_what +
                          " = " + std::to_string(n) + "), got " + ShapeString(a));
  }
}

}  // namespace psembed
