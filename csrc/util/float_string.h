// Copyright 2026 The torch_psembed Authors. Licensed under the Apache License, Version 2.0.
//
// FloatString: a number as error messages show it (printf's %g: 0.5, -1, 1e+30, nan, inf).
//
// Formatted with snprintf, not an ostringstream, on purpose: the extension's error messages must not touch
// iostreams' locale facets. A toolchain that links parts of its own libstdc++ into the extension (seen with a
// GCC 13 under /opt/gcc beside torch 2.11) crashed in `ostream << long` once torch's libstdc++ was loaded.

#ifndef PSEMBED_UTIL_FLOAT_STRING_H_
#define PSEMBED_UTIL_FLOAT_STRING_H_

#include <cstdio>
#include <string>

namespace psembed {

inline std::string FloatString(double v) {
  char buf[32];
  const int len = std::snprintf(buf, sizeof(buf), "%g", v);
  return std::string(buf, len > 0 ? static_cast<size_t>(len) : 0);
}

}  // namespace psembed

#endif  // PSEMBED_UTIL_FLOAT_STRING_H_
