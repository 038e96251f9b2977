// How difftune's C++ shims report failure to Rust: an entry point returns NULL on success or a
// malloc'd copy of the error message (freed by the shim's free function), so no C++ exception
// crosses into Rust.
#pragma once

#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>
#include <exception>

namespace difftune {

inline char* copy_message(const char* message) {
  size_t n = std::strlen(message);
  char* out = static_cast<char*>(std::malloc(n + 1));
  if (out != nullptr) {
    std::memcpy(out, message, n + 1);
  }
  return out;
}

// Runs `body`, turning any exception into an error message; `unknown` describes an exception that
// is not a std::exception. c10::Error's what() carries a long C++ backtrace; its
// what_without_backtrace() is the message a user can act on.
template <class F>
char* guarded(const char* unknown, F&& body) {
  try {
    body();
    return nullptr;
  } catch (const c10::Error& e) {
    return copy_message(e.what_without_backtrace());
  } catch (const std::exception& e) {
    return copy_message(e.what());
  } catch (...) {
    return copy_message(unknown);
  }
}

}  // namespace difftune
