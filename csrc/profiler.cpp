// torch's own profiler (Kineto, CPU activity) around a stretch of difftune's code, saved as the
// same Chrome trace that torch.profiler's export_chrome_trace writes for the Python peer, so both
// tools' steps are summarised by one script (bench/profile_summary.py). tch does not expose it.
#include <torch/csrc/autograd/profiler_kineto.h>

#include <cstring>
#include <exception>
#include <set>
#include <string>

namespace {

std::set<torch::profiler::impl::ActivityType> cpu_activity() {
  return {torch::profiler::impl::ActivityType::CPU};
}

torch::profiler::impl::ProfilerConfig kineto_config() {
  return torch::profiler::impl::ProfilerConfig(torch::profiler::impl::ProfilerState::KINETO,
                                               /*report_input_shapes=*/true);
}

// Copies the exception's message into `error` (of `len` bytes) and returns 1.
int fail(const std::exception& e, char* error, size_t len) {
  std::strncpy(error, e.what(), len - 1);
  error[len - 1] = '\0';
  return 1;
}

}  // namespace

extern "C" {

// Starts recording every op this thread runs; 0 on success.
int dt_profiler_start(char* error, size_t len) {
  try {
    torch::autograd::profiler::prepareProfiler(kineto_config(), cpu_activity());
    torch::autograd::profiler::enableProfiler(kineto_config(), cpu_activity());
    return 0;
  } catch (const std::exception& e) {
    return fail(e, error, len);
  }
}

// Stops recording and writes the Chrome trace to `path`; 0 on success.
int dt_profiler_stop(const char* path, char* error, size_t len) {
  try {
    auto result = torch::autograd::profiler::disableProfiler();
    result->save(path);
    return 0;
  } catch (const std::exception& e) {
    return fail(e, error, len);
  }
}

}  // extern "C"
