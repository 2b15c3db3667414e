//! `kiln bench adamw`: parameters updated per second by the fused flat AdamW at 1 and 2 threads,
//! next to PyTorch's fused CPU AdamW (`torch.optim.AdamW(fused=True)`) on the same machine, the
//! two alternating, when a Python with torch is given.

use crate::error::{KilnError, Result};
use crate::launch::with_threads;
use crate::optim::{adamw_step, AdamWConfig, StepScalars};
use std::process::Command;
use std::time::Instant;

/// Median Mparam/s of kiln's fused AdamW over `repeats` timed steps of `params` parameters.
pub fn kiln_mparams_per_s(params: usize, threads: usize, repeats: usize) -> f64 {
    with_threads(threads, || {
        let mut p = vec![0.1f32; params];
        let g = vec![0.01f32; params];
        let mut m = vec![0.0f32; params];
        let mut v = vec![0.0f32; params];
        let cfg = AdamWConfig {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        };
        let mut times = Vec::with_capacity(repeats);
        for t in 1..=repeats as u64 + 2 {
            let s = StepScalars::new(&cfg, t, 1e-3, 1.0);
            let start = Instant::now();
            adamw_step(&mut p, &g, &mut m, &mut v, &s, true);
            if t > 2 {
                times.push(start.elapsed().as_secs_f64());
            }
        }
        std::hint::black_box(&p);
        times.sort_by(f64::total_cmp);
        params as f64 / times[times.len() / 2] / 1e6
    })
}

const TORCH_SNIPPET: &str = r#"
import sys, time, statistics, torch
n, threads, repeats = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(threads)
p = torch.nn.Parameter(torch.full((n,), 0.1))
p.grad = torch.full((n,), 0.01)
opt = torch.optim.AdamW([p], lr=1e-3, weight_decay=0.01, fused=True)
times = []
for i in range(repeats + 2):
    start = time.perf_counter(); opt.step(); el = time.perf_counter() - start
    if i >= 2: times.append(el)
print(n / statistics.median(times) / 1e6)
"#;

/// Median Mparam/s of PyTorch's fused CPU AdamW, run by `python`.
pub fn torch_mparams_per_s(
    python: &str,
    params: usize,
    threads: usize,
    repeats: usize,
) -> Result<f64> {
    let out = Command::new(python)
        .args([
            "-c",
            TORCH_SNIPPET,
            &params.to_string(),
            &threads.to_string(),
            &repeats.to_string(),
        ])
        .output()
        .map_err(|e| KilnError::config(format!("--torch-python {python}: cannot start it: {e}")))?;
    if !out.status.success() {
        return Err(KilnError::config(format!(
            "--torch-python {python}: {}",
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .last()
                .unwrap_or("")
        )));
    }
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .map_err(|_| KilnError::config(format!("--torch-python {python}: unexpected output")))
}
