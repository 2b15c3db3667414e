#![warn(missing_docs)]
//! kiln: ZeRO/DDP data-parallel training on burn.
//!
//! The seams (see DESIGN.md): [`config`] → [`plan::Plan`]; [`comm::Communicator`] (local threads
//! or MPI); [`engine::Engine`] running a [`model::UnitModel`] unit by unit; a
//! [`strategy::Strategy`] per stage; the fused AdamW in [`optim`],
//! reaching the optimizer states through an [`offload::StateStore`].

pub mod api;
pub mod bench;
pub mod checkpoint;
pub mod cli;
pub mod comm;
pub mod config;
pub mod data;
pub mod device;
pub mod engine;
pub mod error;
pub mod flat;
pub mod hf;
pub mod init;
pub mod launch;
pub mod memory;
pub mod model;
pub mod offload;
pub mod optim;
pub mod plan;
pub mod plot;
pub mod rng;
pub mod sample;
pub mod signals;
pub mod simd;
pub mod strategy;
pub mod tokenizer;
pub mod train;
