//! Reading the next forward pass's batch on a background thread while the current one computes.
//!
//! A [`Prefetcher`] owns a loader's state `S` (for training: the [`Batches`] with its cache and
//! data order) and hands it to a background thread to load item `index + 1` once the caller has
//! taken item `index`. The state is never shared: it is either here or on the thread, so loading
//! in the background changes nothing of what is loaded (item `i` is `load(state, i)` either way,
//! and the trainer's random draws stay on its own thread). A loader error comes back as the error
//! of [`Prefetcher::take`]; a loader that panics ends it with an error naming the panic, never a
//! hang.
use super::batches::{Batches, CachedBatch};
use anyhow::{anyhow, Context, Result};
use std::sync::Arc;
use std::thread::JoinHandle;
use tch::Device;

/// What loads item `index` of a sequence from state `S`.
pub type Loader<S, T> = Arc<dyn Fn(&mut S, usize) -> Result<T> + Send + Sync>;

/// The loader's state: here, on the background thread (with the index it loads), or lost to a
/// panic of that thread.
enum Place<S, T> {
    Here(S),
    Loading(usize, JoinHandle<(S, Result<T>)>),
    Lost(String),
}

pub struct Prefetcher<S: Send + 'static, T: Send + 'static> {
    load: Loader<S, T>,
    place: Place<S, T>,
}

impl<S: Send + 'static, T: Send + 'static> Prefetcher<S, T> {
    pub fn new(state: S, load: Loader<S, T>) -> Self {
        Self {
            load,
            place: Place::Here(state),
        }
    }

    /// Starts loading item `index` in the background (after any load already under way).
    pub fn start(&mut self, index: usize) -> Result<()> {
        let mut state = self.state()?;
        let load = Arc::clone(&self.load);
        let handle = std::thread::Builder::new()
            .name("difftune-prefetch".into())
            .spawn(move || {
                let item = load(&mut state, index);
                (state, item)
            })
            .context("starting the batch loader thread")?;
        self.place = Place::Loading(index, handle);
        Ok(())
    }

    /// Item `index`: the one loading in the background when it is that one, else loaded now.
    pub fn take(&mut self, index: usize) -> Result<T> {
        if let Place::Loading(loading, _) = &self.place {
            if *loading == index {
                let (state, item) = self.join()?;
                self.place = Place::Here(state);
                return item.with_context(|| format!("loading batch {index} in the background"));
            }
        }
        let mut state = self.state()?;
        let item = (self.load)(&mut state, index);
        self.place = Place::Here(state);
        item
    }

    /// The loader's state, waiting for a background load to end (its item is dropped).
    pub fn get_mut(&mut self) -> Result<&mut S> {
        let state = self.state()?;
        self.place = Place::Here(state);
        match &mut self.place {
            Place::Here(state) => Ok(state),
            _ => unreachable!("the state was just put back"),
        }
    }

    /// Takes the state out (waiting for a background load), leaving `Lost` until it is put back.
    fn state(&mut self) -> Result<S> {
        let lost = Place::Lost("the batch loader's state is in use".into());
        match std::mem::replace(&mut self.place, lost) {
            Place::Here(state) => Ok(state),
            Place::Loading(index, handle) => {
                self.place = Place::Loading(index, handle);
                Ok(self.join()?.0)
            }
            Place::Lost(why) => {
                let error = anyhow!("the batch loader is gone: {why}");
                self.place = Place::Lost(why);
                Err(error)
            }
        }
    }

    /// Waits for the background load; a panic of its thread is an error that names it (and the
    /// state is lost with it).
    fn join(&mut self) -> Result<(S, Result<T>)> {
        let lost = Place::Lost("the batch loader's state is in use".into());
        let Place::Loading(index, handle) = std::mem::replace(&mut self.place, lost) else {
            unreachable!("join is called while loading");
        };
        handle.join().map_err(|panic| {
            let message = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic without a message".into());
            let why = format!("its thread panicked loading batch {index}: {message}");
            self.place = Place::Lost(why.clone());
            anyhow!("the batch loader thread panicked loading batch {index}: {message}")
        })
    }
}

impl<S: Send + 'static, T: Send + 'static> Drop for Prefetcher<S, T> {
    /// Waits for a background load, so that nothing reads the cache after the run has ended.
    fn drop(&mut self) {
        if let Place::Loading(_, handle) =
            std::mem::replace(&mut self.place, Place::Lost(String::new()))
        {
            let _ = handle.join();
        }
    }
}

/// The training run's batches, each read from the latent cache ahead of its forward pass; on
/// CUDA into pinned memory, so that its copy to the device does not block the host.
pub type PrefetchedBatches = Prefetcher<Batches, CachedBatch>;

/// Reads forward pass `index`'s batch in the background ([`Batches::read`]), pinned when
/// `device` is a CUDA device.
pub fn prefetched_batches(batches: Batches, device: Device) -> PrefetchedBatches {
    let pin = device.is_cuda();
    Prefetcher::new(
        batches,
        Arc::new(move |batches: &mut Batches, index| {
            let batch = batches.read(index)?;
            Ok(if pin { batch.pinned() } else { batch })
        }),
    )
}
