// torch's own profiler (Kineto, CPU activity) around a stretch of difftune's code, saved as the
// same Chrome trace that torch.profiler's export_chrome_trace writes for the Python peer, so both
// tools' steps are summarised by one script (bench/profile_summary.py). tch does not expose it.
#include <torch/csrc/autograd/profiler_kineto.h>

#include "shim_error.h"

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

}  // namespace

extern "C" {

// Starts recording every op this thread runs; NULL on success, else the error message.
char* dt_profiler_start() {
  return difftune::guarded("unknown C++ exception starting the profiler", [] {
    torch::autograd::profiler::prepareProfiler(kineto_config(), cpu_activity());
    torch::autograd::profiler::enableProfiler(kineto_config(), cpu_activity());
  });
}

// Stops recording and writes the Chrome trace to `path`; NULL on success, else the message.
char* dt_profiler_stop(const char* path) {
  return difftune::guarded("unknown C++ exception stopping the profiler", [&] {
    auto result = torch::autograd::profiler::disableProfiler();
    result->save(path);
  });
}

}  // extern "C"
