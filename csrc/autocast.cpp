// bf16 autocast on the CPU and on CUDA, entered through torch's own C++ API: tch only toggles
// CUDA autocast (whose default dtype is f16) and cannot reach the CPU's. Compiled against the
// pinned torch's headers, so a renamed or re-typed setter fails the build, not a training run.
#include <ATen/autocast_mode.h>

#include <cstdint>

extern "C" {

// What autocast was on a device before dt_autocast_enter changed it.
struct dt_autocast_state {
  bool enabled;
  int8_t dtype;
};

static at::DeviceType device_type(int cuda) {
  return cuda != 0 ? at::kCUDA : at::kCPU;
}

// Enables autocast in bf16 on the CPU (`cuda` = 0) or CUDA; `saved` receives the previous state.
void dt_autocast_enter(int cuda, dt_autocast_state* saved) {
  auto device = device_type(cuda);
  saved->enabled = at::autocast::is_autocast_enabled(device);
  saved->dtype = static_cast<int8_t>(at::autocast::get_autocast_dtype(device));
  at::autocast::set_autocast_enabled(device, true);
  at::autocast::set_autocast_dtype(device, at::kBFloat16);
  at::autocast::increment_nesting();
}

// Restores the state dt_autocast_enter saved; the outermost exit drops autocast's cast cache.
void dt_autocast_exit(int cuda, const dt_autocast_state* saved) {
  auto device = device_type(cuda);
  if (at::autocast::decrement_nesting() == 0) {
    at::autocast::clear_cache();
  }
  at::autocast::set_autocast_enabled(device, saved->enabled);
  at::autocast::set_autocast_dtype(device, static_cast<at::ScalarType>(saved->dtype));
}

// Whether autocast is on for the device, and in which dtype (a c10::ScalarType value).
int dt_autocast_dtype(int cuda) {
  auto device = device_type(cuda);
  if (!at::autocast::is_autocast_enabled(device)) {
    return -1;
  }
  return static_cast<int>(at::autocast::get_autocast_dtype(device));
}

}  // extern "C"
