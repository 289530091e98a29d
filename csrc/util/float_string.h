// Copyright 2026 The torch_psembed Authors. Licensed under the Apache License, Version 2.0.
//
// FloatString: a number as error messages show it (shortest stream form: 0.5, -1, nan, inf).

#ifndef PSEMBED_UTIL_FLOAT_STRING_H_
#define PSEMBED_UTIL_FLOAT_STRING_H_

#include <sstream>
#include <string>

namespace psembed {

inline std::string FloatString(double v) {
  std::ostringstream os;
  os << v;
  return os.str();
}

}  // namespace psembed

#endif  // PSEMBED_UTIL_FLOAT_STRING_H_
