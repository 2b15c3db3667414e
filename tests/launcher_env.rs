//! What kiln reads from the launcher's environment — a rank's place on its node (local rank,
//! ranks on the node, nodes) and the number of processes started — from the variables that
//! mpirun, Hydra and srun set, given as a map rather than the process's environment.

use kiln::comm::{
    check_launched_world, launched_world, parse_tasks_per_node, placement_from, Placement,
};
use std::collections::HashMap;

fn lookup<'a>(vars: &'a [(&str, &str)]) -> impl Fn(&str) -> Option<String> + 'a {
    let env: HashMap<&str, &str> = vars.iter().copied().collect();
    move |name| env.get(name).map(|v| v.to_string())
}

fn place(vars: &[(&str, &str)], rank: usize, world: usize) -> Placement {
    placement_from(lookup(vars), rank, world)
}

fn at(local_rank: usize, local_ranks: usize, num_nodes: Option<usize>) -> Placement {
    Placement {
        local_rank,
        local_ranks,
        num_nodes,
    }
}

#[test]
fn tasks_per_node_lists_expand_repeats() {
    assert_eq!(parse_tasks_per_node("2(x3),1"), Some(vec![2, 2, 2, 1]));
    assert_eq!(parse_tasks_per_node("4"), Some(vec![4]));
    assert_eq!(parse_tasks_per_node("1,3(x2)"), Some(vec![1, 3, 3]));
    for bad in ["", "2(x", "2(x3", "a", "2(x3),", "2x3", "2(x99999999999)"] {
        assert_eq!(parse_tasks_per_node(bad), None, "{bad:?}");
    }
}

#[test]
fn srun_without_ntasks_per_node_takes_this_nodes_entry_of_the_step_layout() {
    // sbatch -n 7 -N 4: nodes 0–2 run 2 tasks, node 3 runs 1.
    let mut vars = vec![
        ("SLURM_PROCID", "6"),
        ("SLURM_LOCALID", "0"),
        ("SLURM_NODEID", "3"),
        ("SLURM_STEP_TASKS_PER_NODE", "2(x3),1"),
        ("SLURM_TASKS_PER_NODE", "2(x3),1"),
        ("SLURM_STEP_NUM_NODES", "4"),
    ];
    assert_eq!(place(&vars, 6, 7), at(0, 1, Some(4)));
    vars[1] = ("SLURM_LOCALID", "1");
    vars[2] = ("SLURM_NODEID", "1");
    assert_eq!(place(&vars, 3, 7), at(1, 2, Some(4)));
}

#[test]
fn srun_step_layout_wins_over_the_jobs() {
    // `srun --preserve-env -n 4` in an allocation of 2 nodes × 8 tasks: SLURM_TASKS_PER_NODE
    // and SLURM_NTASKS_PER_NODE still describe the job; the step runs 2 tasks per node.
    let vars = [
        ("SLURM_LOCALID", "1"),
        ("SLURM_NODEID", "0"),
        ("SLURM_STEP_TASKS_PER_NODE", "2(x2)"),
        ("SLURM_TASKS_PER_NODE", "8(x2)"),
        ("SLURM_NTASKS_PER_NODE", "8"),
    ];
    assert_eq!(place(&vars, 1, 4), at(1, 2, Some(2)));
}

#[test]
fn older_slurm_uses_tasks_per_node_then_ntasks_per_node() {
    let vars = [
        ("SLURM_LOCALID", "2"),
        ("SLURM_NODEID", "1"),
        ("SLURM_TASKS_PER_NODE", "1,3"),
    ];
    assert_eq!(place(&vars, 3, 4), at(2, 3, Some(2)));
    let vars = [
        ("SLURM_LOCALID", "2"),
        ("SLURM_NTASKS_PER_NODE", "4"),
        ("SLURM_NNODES", "3"),
    ];
    assert_eq!(place(&vars, 6, 12), at(2, 4, Some(3)));
}

#[test]
fn mpirun_inside_an_allocation_ignores_the_inherited_slurm_variables() {
    // mpirun starts one daemon per node with srun; its ranks inherit the daemon step's
    // SLURM_LOCALID 0 and one task per node.
    let slurm = [
        ("SLURM_LOCALID", "0"),
        ("SLURM_NODEID", "1"),
        ("SLURM_STEP_TASKS_PER_NODE", "1(x2)"),
        ("SLURM_NTASKS_PER_NODE", "4"),
    ];
    let mut ompi = slurm.to_vec();
    ompi.extend([
        ("OMPI_COMM_WORLD_LOCAL_RANK", "3"),
        ("OMPI_COMM_WORLD_LOCAL_SIZE", "4"),
        ("OMPI_MCA_orte_num_nodes", "2"),
    ]);
    assert_eq!(place(&ompi, 7, 8), at(3, 4, Some(2)));
    let mut hydra = slurm.to_vec();
    hydra.extend([("MPI_LOCALRANKID", "2"), ("MPI_LOCALNRANKS", "4")]);
    assert_eq!(place(&hydra, 6, 8), at(2, 4, None));
}

#[test]
fn without_a_launcher_the_whole_world_shares_the_node() {
    assert_eq!(place(&[], 0, 1), at(0, 1, None));
    // A node id past the end of the layout is not believed.
    let vars = [
        ("SLURM_LOCALID", "0"),
        ("SLURM_NODEID", "5"),
        ("SLURM_STEP_TASKS_PER_NODE", "2(x2)"),
    ];
    assert_eq!(place(&vars, 1, 4), at(1, 4, None));
}

#[test]
fn a_world_smaller_than_the_launch_is_an_error() {
    // srun starting an MPI that does not speak its --mpi plugin: 4 tasks, each MPI alone.
    let srun = [("SLURM_STEP_NUM_TASKS", "4"), ("SLURM_PROCID", "2")];
    assert_eq!(launched_world(lookup(&srun)), Some(4));
    let err = check_launched_world(Some(4), 1).unwrap_err();
    assert_eq!(
        err.to_string(),
        "comm: the launcher started 4 processes but MPI sees a world of 1: with srun use the --mpi plugin this MPI was built for (srun --mpi=list), or start kiln with mpirun (launcher/README.md)"
    );
    assert!(check_launched_world(Some(4), 4).is_ok());
    assert!(check_launched_world(None, 1).is_ok());
    // mpirun -np 1 inside a 2-node allocation: its rank inherits the daemons' srun step of 2.
    let mpirun = [("SLURM_STEP_NUM_TASKS", "2"), ("OMPI_COMM_WORLD_SIZE", "1")];
    assert_eq!(launched_world(lookup(&mpirun)), Some(1));
    let hydra = [("SLURM_STEP_NUM_TASKS", "2"), ("PMI_SIZE", "8")];
    assert_eq!(launched_world(lookup(&hydra)), Some(8));
    assert_eq!(launched_world(lookup(&[])), None);
}
