// Channels-last (NHWC) memory format for 4-D tensors, which tch cannot request: the same values,
// strides ordered so that convolutions may pick their NHWC kernels.
#include <ATen/ATen.h>

extern "C" {

// A channels-last copy of the 4-D tensor `t` (a new tensor the caller owns).
at::Tensor* dt_channels_last(const at::Tensor* t) {
  return new at::Tensor(t->contiguous(at::MemoryFormat::ChannelsLast));
}

// Whether `t` is laid out channels-last.
int dt_is_channels_last(const at::Tensor* t) {
  return t->is_contiguous(at::MemoryFormat::ChannelsLast) ? 1 : 0;
}

}  // extern "C"
