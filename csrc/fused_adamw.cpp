// torch's fused AdamW kernel (at::_fused_adamw_, the one torch.optim.AdamW(fused=True) runs),
// which tch's generated bindings leave out (its arguments are lists of tensors updated in
// place). Used on one contiguous slice of the optimizer's flat buffers at a time.
#include <ATen/ATen.h>
#include <ATen/Functions.h>

#include "shim_error.h"

extern "C" {

// One AdamW update of `param` (in place, with `exp_avg` and `exp_avg_sq`) from `grad`, at step
// `step` (1 for the first update; a 0-d f32 tensor on the parameter's device). NULL on success,
// else the error message (see shim_error.h).
char* dt_fused_adamw(at::Tensor* param, at::Tensor* grad, at::Tensor* exp_avg,
                     at::Tensor* exp_avg_sq, at::Tensor* step, double lr, double beta1,
                     double beta2, double weight_decay, double eps) {
  return difftune::guarded("unknown C++ exception in _fused_adamw_", [&] {
    at::_fused_adamw_({*param}, {*grad}, {*exp_avg}, {*exp_avg_sq}, {}, {*step}, lr, beta1, beta2,
                      weight_decay, eps, /*amsgrad=*/false, /*maximize=*/false);
  });
}

}  // extern "C"
