// difftune's bridge to PyTorch's c10d (TCPStore, PrefixStore, ProcessGroupGloo and, when built
// with NCCL headers, ProcessGroupNCCL), and sub-groups of a group's ranks as torch's new_group
// makes them (a backend of their own over the parent's store, under a prefix of their own). Every entry point returns NULL on success or a malloc'd
// error message the caller frees with dt_free_message (csrc/checkpoint.cpp); no C++ exception crosses into Rust.
// Tied to the exact torch version the crate pins (class layouts are seen through its headers).
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#ifdef DIFFTUNE_WITH_NCCL
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

#include "shim_error.h"

#include <cstdlib>
#include <string>
#include <vector>

namespace {

using difftune::guarded;

constexpr const char* kUnknown = "unknown C++ exception in c10d";

enum BackendKind { kGloo = 0, kNccl = 1 };

struct Group {
  c10::intrusive_ptr<c10d::Store> store;
  c10::intrusive_ptr<c10d::Backend> backend;
  std::chrono::milliseconds timeout;
  // The CUDA device index for NCCL (its barrier needs it), -1 for Gloo.
  int device_index;
  int backend_kind;
  // Gloo's network interface, which its sub-groups use too (null for NCCL).
  std::shared_ptr<gloo::transport::Device> gloo_device;
};

// How Gloo picks the network interface of this rank (mirrors torch.distributed's choices).
enum GlooDeviceKind { kGlooHostname = 0, kGlooInterface = 1, kGlooDefault = 2 };

std::shared_ptr<gloo::transport::Device> gloo_device(int kind, const char* name) {
  switch (kind) {
    case kGlooHostname:
      return c10d::ProcessGroupGloo::createDeviceForHostname(name);
    case kGlooInterface:
      return c10d::ProcessGroupGloo::createDeviceForInterface(name);
    default:
      return c10d::ProcessGroupGloo::createDefaultDevice();
  }
}

c10::intrusive_ptr<c10d::Backend> make_gloo(
    const c10::intrusive_ptr<c10d::Store>& store,
    int rank,
    int world,
    std::chrono::milliseconds timeout,
    const std::shared_ptr<gloo::transport::Device>& device) {
  auto options = c10d::ProcessGroupGloo::Options::create(timeout);
  options->devices.push_back(device);
  return c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, world, options);
}

c10::intrusive_ptr<c10d::Backend> make_nccl(
    const c10::intrusive_ptr<c10d::Store>& store,
    int rank,
    int world,
    std::chrono::milliseconds timeout) {
#ifdef DIFFTUNE_WITH_NCCL
  auto options = c10d::ProcessGroupNCCL::Options::create();
  options->timeout = timeout;
  return c10::make_intrusive<c10d::ProcessGroupNCCL>(store, rank, world, options);
#else
  (void)store;
  (void)rank;
  (void)world;
  (void)timeout;
  throw std::runtime_error(
      "this difftune was built without NCCL support (nccl.h and the CUDA headers were not "
      "found at build time); use Gloo (CPU) or rebuild with them");
#endif
}

// The backend of `group`'s kind over `store` (the group's own, or a sub-group's).
c10::intrusive_ptr<c10d::Backend> make_backend(
    const Group& group,
    const c10::intrusive_ptr<c10d::Store>& store,
    int rank,
    int world) {
  return group.backend_kind == kNccl
      ? make_nccl(store, rank, world, group.timeout)
      : make_gloo(store, rank, world, group.timeout, group.gloo_device);
}

void wait_for(const c10::intrusive_ptr<c10d::Work>& work) {
  work->wait();
}

} // namespace

extern "C" {

int dt_has_nccl() {
#ifdef DIFFTUNE_WITH_NCCL
  return 1;
#else
  return 0;
#endif
}

// Connects to (or, when listen_fd >= 0, hosts on that already-bound socket) the TCPStore at
// host:port, prefixes its keys with `prefix`, and builds the process group.
// backend: 0 = Gloo, 1 = NCCL. Ownership of listen_fd passes to the store.
char* dt_group_new(
    int backend,
    const char* host,
    uint16_t port,
    int listen_fd,
    int rank,
    int world,
    const char* prefix,
    int64_t timeout_ms,
    int gloo_device_kind,
    const char* gloo_device_name,
    int device_index,
    void** out) {
  return guarded(kUnknown, [&] {
    std::chrono::milliseconds timeout(timeout_ms);
    c10d::TCPStoreOptions store_options;
    store_options.port = port;
    store_options.isServer = listen_fd >= 0;
    if (listen_fd >= 0) {
      store_options.masterListenFd = listen_fd;
    }
    // Every rank checks in; the server waits (up to the timeout) until all have.
    store_options.numWorkers = static_cast<size_t>(world);
    store_options.waitWorkers = true;
    store_options.timeout = timeout;
    auto tcp = c10::make_intrusive<c10d::TCPStore>(std::string(host), store_options);
    c10::intrusive_ptr<c10d::Store> store =
        c10::make_intrusive<c10d::PrefixStore>(std::string(prefix), tcp);
    auto group = new Group{store, {}, timeout, device_index, backend, nullptr};
    try {
      if (backend == kGloo) {
        group->gloo_device = gloo_device(gloo_device_kind, gloo_device_name);
      }
      group->backend = make_backend(*group, store, rank, world);
    } catch (...) {
      delete group;
      throw;
    }
    *out = group;
  });
}

// A sub-group of `parent`'s ranks, where this rank is `rank` of `world`, its keys under `prefix`
// in the parent's store: only its members call this, each with the same prefix (so groups of
// disjoint ranks form at once, and none waits for ranks outside it).
char* dt_group_sub(void* parent, const char* prefix, int rank, int world, void** out) {
  return guarded(kUnknown, [&] {
    auto p = static_cast<Group*>(parent);
    c10::intrusive_ptr<c10d::Store> store =
        c10::make_intrusive<c10d::PrefixStore>(std::string(prefix), p->store);
    auto group = new Group{store, {}, p->timeout, p->device_index, p->backend_kind, p->gloo_device};
    try {
      group->backend = make_backend(*group, store, rank, world);
    } catch (...) {
      delete group;
      throw;
    }
    *out = group;
  });
}

char* dt_allreduce_sum(void* group, at::Tensor* tensor) {
  return guarded(kUnknown, [&] {
    auto g = static_cast<Group*>(group);
    std::vector<at::Tensor> tensors{*tensor};
    c10d::AllreduceOptions options;
    options.reduceOp = c10d::ReduceOp::SUM;
    options.timeout = g->timeout;
    wait_for(g->backend->allreduce(tensors, options));
  });
}

char* dt_broadcast(void* group, at::Tensor* tensor, int root) {
  return guarded(kUnknown, [&] {
    auto g = static_cast<Group*>(group);
    std::vector<at::Tensor> tensors{*tensor};
    c10d::BroadcastOptions options;
    options.rootRank = root;
    options.timeout = g->timeout;
    wait_for(g->backend->broadcast(tensors, options));
  });
}

// Gathers `input` (same shape on every rank) into outputs[0..n), one tensor per rank.
char* dt_allgather(void* group, at::Tensor* input, at::Tensor** outputs, int n) {
  return guarded(kUnknown, [&] {
    auto g = static_cast<Group*>(group);
    std::vector<at::Tensor> inputs{*input};
    std::vector<std::vector<at::Tensor>> gathered(1);
    for (int i = 0; i < n; ++i) {
      gathered[0].push_back(*outputs[i]);
    }
    c10d::AllgatherOptions options;
    options.timeout = g->timeout;
    wait_for(g->backend->allgather(gathered, inputs, options));
  });
}

char* dt_barrier(void* group) {
  return guarded(kUnknown, [&] {
    auto g = static_cast<Group*>(group);
    c10d::BarrierOptions options;
    options.timeout = g->timeout;
    if (g->device_index >= 0) {
      options.device_ids = {g->device_index};
    }
    wait_for(g->backend->barrier(options));
  });
}

char* dt_store_set(void* group, const char* key, const char* value) {
  return guarded(kUnknown, [&] {
    auto g = static_cast<Group*>(group);
    std::string v(value);
    g->store->set(std::string(key), std::vector<uint8_t>(v.begin(), v.end()));
  });
}

// *present = 1 when `key` is in the store now (no waiting).
char* dt_store_check(void* group, const char* key, int* present) {
  return guarded(kUnknown, [&] {
    auto g = static_cast<Group*>(group);
    *present = g->store->check({std::string(key)}) ? 1 : 0;
  });
}

char* dt_shutdown(void* group) {
  return guarded(kUnknown, [&] { static_cast<Group*>(group)->backend->shutdown(); });
}

void dt_group_free(void* group) {
  delete static_cast<Group*>(group);
}

} // extern "C"
