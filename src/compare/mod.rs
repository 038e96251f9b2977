//! `difftune compare`: the study in one command. Trains every tuning method on the same data and
//! budget, samples the same prompts and seeds with each (and with the base model), scores them
//! with FID/KID, measures their costs and writes the study's tables, plots and sample grids.
pub mod grid;
pub mod machine;
pub mod plots;
pub mod report;
