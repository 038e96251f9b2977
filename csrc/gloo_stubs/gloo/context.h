// Stub of Gloo's header (the torch wheel ships none): just what ProcessGroupGloo.hpp names.
// Nothing declared here is defined or instantiated by difftune's shim; the real Gloo lives inside
// libtorch_cpu.so.
#pragma once
#include <chrono>

namespace gloo {
class Context {
 public:
  void setTimeout(std::chrono::milliseconds timeout);
};
} // namespace gloo
