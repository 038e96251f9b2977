// The CUDA caching allocator's memory statistics (what torch.cuda.empty_cache,
// reset_peak_memory_stats and max_memory_allocated reach in Python), for peak-memory measurements.
// Built with DIFFTUNE_WITH_CUDA against a CUDA torch (build.rs); against a CPU-only torch every
// entry point reports that instead. Never called for a CPU device.
#ifdef DIFFTUNE_WITH_CUDA
#include <c10/cuda/CUDACachingAllocator.h>
#endif

#include "shim_error.h"

#include <cstdint>
#include <stdexcept>

namespace {

constexpr const char* kUnknown = "unknown C++ exception in the CUDA caching allocator";

#ifndef DIFFTUNE_WITH_CUDA
[[noreturn]] void no_cuda() {
  throw std::runtime_error("this difftune was built against a CPU-only torch: no CUDA");
}
#endif

}  // namespace

extern "C" {

// Returns the cached, unused blocks of every device to the driver and resets the peak statistics
// of `device`, so that the next peak is this phase's alone.
char* dt_cuda_memory_reset(int device) {
  return difftune::guarded(kUnknown, [&] {
#ifdef DIFFTUNE_WITH_CUDA
    c10::cuda::CUDACachingAllocator::emptyCache();
    c10::cuda::CUDACachingAllocator::resetPeakStats(static_cast<c10::DeviceIndex>(device));
#else
    (void)device;
    no_cuda();
#endif
  });
}

// The peak of the memory allocated to tensors on `device` since the last reset
// (torch.cuda.max_memory_allocated), in bytes.
char* dt_cuda_memory_peak_allocated(int device, uint64_t* bytes) {
  return difftune::guarded(kUnknown, [&] {
#ifdef DIFFTUNE_WITH_CUDA
    auto stats =
        c10::cuda::CUDACachingAllocator::getDeviceStats(static_cast<c10::DeviceIndex>(device));
    constexpr auto aggregate = static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE);
    *bytes = static_cast<uint64_t>(stats.allocated_bytes[aggregate].peak);
#else
    (void)device;
    (void)bytes;
    no_cuda();
#endif
  });
}

}  // extern "C"
