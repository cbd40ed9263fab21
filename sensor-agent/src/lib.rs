//! The EPMM sensor agent as a library; `main.rs` is a thin command line over it.
//!
//! An event's path is the module layout: `probes` (load and attach, ring buffer) ->
//! `decode` (wire records to `sensor.v1` events) -> `proctable` (process tree) ->
//! `output` (JSON lines). `pipeline` strings the stages together for live runs and replay;
//! `run` is the live command.

pub mod config;
pub mod connections;
pub mod decode;
pub mod delivery;
pub mod detect;
pub mod executables;
pub mod identity;
pub mod learn;
pub mod ops;
pub mod output;
pub mod pipeline;
pub mod probes;
pub mod proc_seed;
pub mod proctable;
pub mod replay;
pub mod run;
pub mod trace;
