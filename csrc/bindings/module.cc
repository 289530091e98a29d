// Copyright 2026 The torch_psembed Authors. Licensed under the Apache License, Version 2.0.
//
// PYBIND11_MODULE(_C): registration only. The shims live in table_bindings.cc, data_bindings.cc and net_bindings.cc.

#include <pybind11/pybind11.h>

#ifndef PSEMBED_VERSION
#define PSEMBED_VERSION "0+unknown"
#endif

namespace psembed {
void RegisterTableBindings(pybind11::module_& m);
void RegisterDataBindings(pybind11::module_& m);
void RegisterNetBindings(pybind11::module_& m);
}  // namespace psembed

PYBIND11_MODULE(_C, m) {
  m.doc() = R"doc(torch_psembed._C: the C++ sparse table (no libtorch). See docs/architecture.md.)doc";
  m.attr("__version__") = PSEMBED_VERSION;
  psembed::RegisterTableBindings(m);
  psembed::RegisterDataBindings(m);
  psembed::RegisterNetBindings(m);
}
