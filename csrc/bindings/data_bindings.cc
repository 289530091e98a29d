// Copyright 2026 The torch_psembed Authors. Licensed under the Apache License, Version 2.0.
//
// _C.parse_criteo: the C++ fast path of the Criteo reader (data/criteo_line.h) over a list of lines.

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <string>
#include <utility>
#include <vector>

#include "data/criteo_line.h"

namespace py = pybind11;

namespace psembed {

namespace {

py::tuple ParseCriteo(const py::list& lines) {
  const size_t n = lines.size();
  // The UTF-8 of every line, read with the GIL (an ASCII str hands out its own buffer: no copy); the list
  // keeps the strings alive while the parse runs without it.
  std::vector<std::pair<const char*, size_t>> text(n);  // {nullptr, 0}: no UTF-8 for that line
  for (size_t i = 0; i < n; ++i) {
    PyObject* s = lines[i].ptr();
    if (!PyUnicode_Check(s)) {
      throw py::type_error("lines must be a list of str, got " + std::string(Py_TYPE(s)->tp_name) + " at index " +
                           std::to_string(i));
    }
    Py_ssize_t len = 0;
    const char* p = PyUnicode_AsUTF8AndSize(s, &len);
    if (p == nullptr) {
      // No UTF-8 for this str (a lone surrogate: the reader keeps undecodable bytes as surrogate escapes so
      // that they hash as themselves): left to the Python parser, as every unusual line is.
      PyErr_Clear();
      continue;
    }
    text[i] = {p, static_cast<size_t>(len)};
  }
  py::array_t<float> labels(static_cast<py::ssize_t>(n));
  py::array_t<uint64_t> values({static_cast<py::ssize_t>(n), static_cast<py::ssize_t>(kCriteoSlots)});
  py::array_t<uint8_t> ok(static_cast<py::ssize_t>(n));
  float* l = labels.mutable_data();
  uint64_t* v = values.mutable_data();
  uint8_t* o = ok.mutable_data();
  {
    py::gil_scoped_release release;
    for (size_t i = 0; i < n; ++i) {
      o[i] = text[i].first != nullptr && ParseCriteoLine(text[i].first, text[i].second, &l[i], v + i * kCriteoSlots) ? 1 : 0;
      if (!o[i]) l[i] = 0.0f;  // defined contents for the rows the caller parses again
    }
  }
  return py::make_tuple(labels, values, ok);
}

}  // namespace

void RegisterDataBindings(py::module_& m) {
  m.def("parse_criteo", &ParseCriteo, py::arg("lines"),
        R"doc(parse_criteo(lines: list[str]) -> (labels f32[n], values uint64[n, 39], ok uint8[n]).
The Criteo reader's fast path: where ok[i] is 1, labels[i] and values[i] are exactly what
CriteoParser.parse(lines[i]) returns; where it is 0 the line is bad or unusual, and the caller parses it
in Python (which gives the values or raises the error naming the problem).)doc");
}

}  // namespace psembed
