// Copyright 2026 The torch_psembed Authors. Licensed under the Apache License, Version 2.0.
//
// The SparseTable behind a Python _C.Table, for bindings that hand it to other C++ objects (the
// DataServer serves it): shared ownership, so the table outlives whichever lets go of it last.

#ifndef PSEMBED_BINDINGS_TABLE_HANDLE_H_
#define PSEMBED_BINDINGS_TABLE_HANDLE_H_

#include <pybind11/pybind11.h>

#include <memory>

#include "table/sparse_table.h"

namespace psembed {

// TypeError if `table` is not a _C.Table.
std::shared_ptr<SparseTable> SharedTableOf(const pybind11::handle& table);

}  // namespace psembed

#endif  // PSEMBED_BINDINGS_TABLE_HANDLE_H_
