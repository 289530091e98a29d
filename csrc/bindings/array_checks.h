// Copyright 2026 The torch_psembed Authors. Licensed under the Apache License, Version 2.0.
//
// Argument checks shared by the bindings: an array argument is taken as py::object and checked by
// hand (not py::array_t with conversion), so wrong dtypes and strided arrays are refused, never cast
// or copied. Each check raises TypeError (dtype) or ValueError (shape, layout) naming the argument.

#ifndef PSEMBED_BINDINGS_ARRAY_CHECKS_H_
#define PSEMBED_BINDINGS_ARRAY_CHECKS_H_

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstddef>
#include <cstdint>
#include <string>

namespace psembed {

namespace py = pybind11;

// "[2, 3]".
std::string ShapeString(const py::array& a);
// A native-endian, C-contiguous numpy array of the given kind ('i' signed int, 'u' unsigned int,
// 'f' float), item size and number of dimensions. Returns obj itself, or an aligned copy where obj is
// unaligned: for arrays the caller only reads.
py::array CheckArray(const py::handle& obj, const char* name, char kind, int itemsize, const char* dtype_name,
                     int ndim);
// A 1-D int64 array of fewer than 2^32 - 1 keys.
py::array CheckKeys(const py::handle& obj, const char* name = "keys");
// a.shape[0] == n (n_what says what n is, for the message).
void CheckRows(const py::array& a, const char* name, size_t n, const char* n_what);
// a.shape == [n, width].
void CheckMatrix(const py::array& a, const char* name, size_t n, size_t width, const char* n_what);

inline const uint64_t* KeyPtr(const py::array& a) { return static_cast<const uint64_t*>(a.data()); }
template <typename T>
const T* Ptr(const py::array& a) {
  return static_cast<const T*>(a.data());
}

}  // namespace psembed

#endif  // PSEMBED_BINDINGS_ARRAY_CHECKS_H_
