//! The communicator conformance suite on the local backend for world sizes 1–4 (the same suite
//! runs under a real mpirun in tests/mpi_launch.rs), and comm.verify turning a mismatched
//! collective into an error instead of a hang.

use kiln::comm::{conformance, simulate_group, CommOptions, Communicator};
use kiln::launch;
use std::sync::Arc;

fn on_every_rank<T: Send>(
    comms: Vec<Arc<dyn Communicator>>,
    f: impl Fn(&dyn Communicator) -> kiln::error::Result<T> + Sync,
) -> Vec<T> {
    let results = std::thread::scope(|s| {
        let handles: Vec<_> = comms
            .iter()
            .map(|c| {
                let f = &f;
                s.spawn(move || {
                    let r = f(c.as_ref());
                    if let Err(e) = &r {
                        c.abort(&e.to_string());
                    }
                    r
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("rank thread"))
            .collect()
    });
    launch::collect(results).expect("every rank passes")
}

#[test]
fn local_backend_passes_the_suite_at_world_sizes_1_to_4() {
    for world in 1..=4 {
        let passed = on_every_rank(simulate_group(world, &CommOptions::new(false)), |c| {
            conformance::run_suite(c, true)
        });
        assert!(
            passed[0].len() >= conformance::suite_lengths(world, true).len(),
            "world {world}: {passed:?}"
        );
    }
}

#[test]
fn verify_names_the_operation_the_ranks_and_the_lengths() {
    for world in [2, 3] {
        let errors = on_every_rank(
            simulate_group(world, &CommOptions::new(true)),
            conformance::provoke_mismatch,
        );
        for e in errors {
            let msg = e.to_string();
            for needle in [
                "rank 0: all_reduce(Sum, len 10)",
                &format!("rank 1: all_gather(len {})", 2 * world),
            ] {
                assert!(msg.contains(needle), "`{needle}` missing from: {msg}");
            }
        }
    }
}

#[test]
fn a_failing_rank_releases_the_others() {
    // Rank 1 aborts instead of joining the collective; rank 0 must get an error, not hang.
    let comms = simulate_group(2, &CommOptions::new(false));
    let (c0, c1) = (comms[0].clone(), comms[1].clone());
    let waiter = std::thread::spawn(move || {
        c0.all_reduce(vec![1.0; 4], kiln::comm::ReduceOp::Sum)
            .wait()
    });
    std::thread::sleep(std::time::Duration::from_millis(50));
    c1.abort("test failure");
    let err = waiter
        .join()
        .unwrap()
        .expect_err("rank 0 must see the failure");
    assert!(err.to_string().contains("test failure"), "{err}");
}
