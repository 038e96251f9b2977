//! Activation checkpointing (PyTorch's reentrant `torch.utils.checkpoint`): a checkpointed
//! block keeps only its inputs in the forward pass and is recomputed, with grad enabled, in the
//! backward pass (csrc/checkpoint.cpp, a custom autograd Function). Memory falls from every
//! activation inside every block to the blocks' inputs, for about one more forward pass.
//!
//! The recomputation must see the same numbers as the forward: the blocks checkpointed here draw
//! no random numbers in training (the U-Net has no dropout), and the forward's autocast state is
//! re-entered around the recomputation.
//!
//! A block's forward is a Rust closure that the autograd graph calls after the forward returned.
//! As with [`std::thread::scope`], closures live in a [`Scope`]: they may borrow what outlives
//! the scope (the model), and when the scope ends they are dropped, so a backward pass run after
//! it fails with an error instead of calling into freed memory.
use std::ffi::{c_char, c_int, c_void};
use std::marker::PhantomData;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Arc, Mutex};
use tch::{Kind, Tensor};
use torch_sys::C_tensor;

type RunFn = unsafe extern "C" fn(
    *const c_void,
    *mut *mut C_tensor,
    c_int,
    *mut *mut C_tensor,
    *mut c_char,
    usize,
) -> c_int;
type ReleaseFn = unsafe extern "C" fn(*const c_void);

extern "C" {
    fn dt_ckpt_apply(
        run: RunFn,
        release: ReleaseFn,
        closure: *const c_void,
        inputs: *mut *mut C_tensor,
        n: c_int,
        output: *mut *mut C_tensor,
    ) -> *mut c_char;
    fn dt_grad_enabled() -> c_int;
}

type Block<'env> = dyn Fn(&[Tensor]) -> Tensor + 'env;

/// A block's forward, shared by its scope (which empties it when it ends) and its graph node.
struct Slot(Mutex<Option<Box<Block<'static>>>>);

// SAFETY: the closure runs on the thread that runs the forward or calls backward, or (CUDA) on
// torch's autograd device thread while that thread waits in backward: never concurrently with
// another use of what it borrows.
unsafe impl Send for Slot {}
unsafe impl Sync for Slot {}

/// Where checkpointed blocks live; see [`scope`].
pub struct Scope<'scope, 'env: 'scope> {
    slots: Mutex<Vec<Arc<Slot>>>,
    scope: PhantomData<&'scope mut &'scope ()>,
    env: PhantomData<&'env mut &'env ()>,
}

/// Runs `body` with a [`Scope`] for checkpointed blocks; the forward and the backward pass through
/// them both belong inside it.
pub fn scope<'env, R>(body: impl for<'scope> FnOnce(&'scope Scope<'scope, 'env>) -> R) -> R {
    /// Drops every block's closure when the scope ends, also by a panic.
    struct Disarm<'a, 'scope, 'env>(&'a Scope<'scope, 'env>);
    impl Drop for Disarm<'_, '_, '_> {
        fn drop(&mut self) {
            let slots = self.0.slots.lock().unwrap_or_else(|e| e.into_inner());
            for slot in slots.iter() {
                *slot.0.lock().unwrap_or_else(|e| e.into_inner()) = None;
            }
        }
    }
    let scope = Scope {
        slots: Mutex::new(Vec::new()),
        scope: PhantomData,
        env: PhantomData,
    };
    let _disarm = Disarm(&scope);
    body(&scope)
}

impl<'env> Scope<'_, 'env> {
    /// `block(inputs)`, keeping only `inputs` for the backward pass, which recomputes the block.
    /// Without grad mode there is no backward pass, and the block simply runs. Tensors the block
    /// reads other than its inputs (its weights) get their gradients through the recomputation.
    pub fn checkpoint(
        &self,
        inputs: &[&Tensor],
        block: impl Fn(&[Tensor]) -> Tensor + 'env,
    ) -> Tensor {
        let mut inputs: Vec<Tensor> = inputs.iter().map(|t| t.shallow_clone()).collect();
        // SAFETY: reads thread-local grad mode.
        if unsafe { dt_grad_enabled() } == 0 {
            return block(&inputs);
        }
        // A node none of whose inputs needs a gradient is skipped by the backward pass, and so
        // would be the block's weights (the reentrant checkpoint's known pitfall): an empty
        // input that needs a gradient keeps the node in the graph.
        if !inputs.iter().any(Tensor::requires_grad) {
            let device = inputs.first().map_or(tch::Device::Cpu, Tensor::device);
            inputs.push(Tensor::empty([0], (Kind::Float, device)).set_requires_grad(true));
        }
        let boxed: Box<Block<'env>> = Box::new(block);
        // SAFETY: only the lifetime is erased. The closure is dropped when the scope ends (see
        // `scope`), before anything it borrows for 'env can be gone; after that a node finds
        // its slot empty and fails.
        let boxed: Box<Block<'static>> = unsafe { std::mem::transmute(boxed) };
        let slot = Arc::new(Slot(Mutex::new(Some(boxed))));
        self.slots
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(slot.clone());
        let mut handles: Vec<*mut C_tensor> = inputs.iter_mut().map(|t| t.as_mut_ptr()).collect();
        let mut output: *mut C_tensor = std::ptr::null_mut();
        // SAFETY: the handles are live for the call; the node takes the slot reference made by
        // `Arc::into_raw` and gives it back through `release_slot`.
        let error = unsafe {
            dt_ckpt_apply(
                run_slot,
                release_slot,
                Arc::into_raw(slot).cast(),
                handles.as_mut_ptr(),
                handles.len() as c_int,
                &mut output,
            )
        };
        // SAFETY: a message from dt_ckpt_apply, freed once.
        if let Err(message) = unsafe { crate::util::shim::check(error) } {
            // As tch does for a failed op: the forward signatures are infallible.
            panic!("{message}");
        }
        // SAFETY: a new handle that the shim gave up.
        unsafe { Tensor::from_ptr(output) }
    }
}

/// Runs a slot's closure for the shim: takes the input handles, gives up the output's.
unsafe extern "C" fn run_slot(
    closure: *const c_void,
    inputs: *mut *mut C_tensor,
    n: c_int,
    output: *mut *mut C_tensor,
    error: *mut c_char,
    len: usize,
) -> c_int {
    let slot = &*closure.cast::<Slot>();
    let inputs: Vec<Tensor> = (0..n as usize)
        .map(|i| Tensor::from_ptr(*inputs.add(i)))
        .collect();
    let result = catch_unwind(AssertUnwindSafe(|| {
        let block = slot.0.lock().unwrap_or_else(|e| e.into_inner());
        match block.as_ref() {
            Some(block) => Ok(block(&inputs)),
            None => {
                Err("backward pass after the checkpoint scope ended: the block is gone".to_string())
            }
        }
    }));
    let message = match result {
        Ok(Ok(mut tensor)) => {
            *output = tensor.as_mut_ptr();
            std::mem::forget(tensor);
            return 0;
        }
        Ok(Err(message)) => message,
        Err(panic) => panic
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "the block panicked".to_string()),
    };
    let bytes = &message.as_bytes()[..message.len().min(len.saturating_sub(1))];
    std::ptr::copy_nonoverlapping(bytes.as_ptr().cast(), error, bytes.len());
    *error.add(bytes.len()) = 0;
    1
}

/// Drops the graph node's reference to a slot.
unsafe extern "C" fn release_slot(closure: *const c_void) {
    drop(Arc::from_raw(closure.cast::<Slot>()));
}
