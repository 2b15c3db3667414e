#![warn(missing_docs)]
//! kiln: ZeRO/DDP data-parallel training on burn.
//!
//! To train your own burn model, start at [`api`]: a `#[derive(Module)]` struct that says how
//! it splits into units ([`api::TrainModule`]), your own batches ([`api::BatchSource`]), and
//! [`api::Trainer::fit`].
//!
//! The seams (docs/ARCHITECTURE.md): [`config`] → [`plan::Plan`]; [`comm::Communicator`] (local
//! threads or MPI); [`engine::Engine`] running a [`model::UnitModel`] unit by unit; a
//! [`strategy::Strategy`] per stage; the fused AdamW in [`optim`], reaching the optimizer states
//! through an [`offload::StateStore`].

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
pub mod halves;
pub mod hf;
pub mod init;
pub mod launch;
pub mod llama;
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
pub mod tensor_file;
pub mod tokenizer;
pub mod train;
