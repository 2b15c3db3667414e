//! Data sources: rows depend only on (seed, step, row), the Markov entropy rate is right, and
//! file sources read what nanoGPT and llm.c write.

use kiln::data::{FileSource, MarkovSource, TokenSource};

fn row(src: &dyn TokenSource, step: u64, r: u64, len: usize) -> Vec<u32> {
    let mut out = vec![0; len];
    src.fill_row(step, r, &mut out);
    out
}

#[test]
fn rows_depend_only_on_seed_step_and_row() {
    let a = MarkovSource::new(7, 32, 2.0);
    let b = MarkovSource::new(7, 32, 2.0);
    assert_eq!(row(&a, 3, 5, 65), row(&b, 3, 5, 65));
    assert_ne!(row(&a, 3, 5, 65), row(&a, 3, 6, 65));
    assert_ne!(row(&a, 3, 5, 65), row(&a, 4, 5, 65));
    assert!(row(&a, 0, 0, 1000).iter().all(|&t| t < 32));
}

#[test]
fn markov_entropy_rate_is_exact_at_the_extremes_and_matches_samples() {
    // Sharpness 0: every next symbol is uniform, H = ln(symbols).
    let uniform = MarkovSource::new(1, 16, 0.0);
    assert!((uniform.entropy_rate().unwrap() - 16f64.ln()).abs() < 1e-12);
    // Otherwise the empirical conditional entropy of a long sample approaches H.
    let src = MarkovSource::new(2, 8, 2.0);
    let h = src.entropy_rate().unwrap();
    assert!(h > 0.1 && h < 8f64.ln(), "H = {h}");
    let mut counts = vec![0u64; 8 * 8 * 8];
    for r in 0..400 {
        let tokens = row(&src, 0, r, 2000);
        for w in tokens.windows(3) {
            counts[(w[0] * 64 + w[1] * 8 + w[2]) as usize] += 1;
        }
    }
    let total: u64 = counts.iter().sum();
    let mut empirical = 0.0;
    for ctx in counts.chunks(8) {
        let n: u64 = ctx.iter().sum();
        for &c in ctx.iter().filter(|&&c| c > 0) {
            empirical -= c as f64 / total as f64 * (c as f64 / n as f64).ln();
        }
    }
    assert!(
        (empirical - h).abs() < 0.01,
        "empirical {empirical} vs H {h}"
    );
}

#[test]
fn text_and_token_files_are_read_as_written() {
    let dir = std::env::temp_dir().join(format!("kiln-data-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let text = dir.join("t.txt");
    std::fs::write(&text, "abcdefghijklmnopqrstuvwxyz").unwrap();
    let src = FileSource::text(text.to_str().unwrap(), 1, 256, 7).unwrap();
    let r = row(&src, 0, 0, 8);
    assert!(
        r.windows(2).all(|w| w[1] == w[0] + 1),
        "a window of consecutive letters: {r:?}"
    );

    // llm.c: 256 int32 header (magic 20240520, version 1, token count), then uint16 tokens.
    let tokens: Vec<u16> = (0..100).collect();
    let mut bytes = vec![0u8; 1024];
    bytes[0..4].copy_from_slice(&20240520i32.to_le_bytes());
    bytes[4..8].copy_from_slice(&1i32.to_le_bytes());
    bytes[8..12].copy_from_slice(&(tokens.len() as i32).to_le_bytes());
    bytes.extend(tokens.iter().flat_map(|t| t.to_le_bytes()));
    let llmc = dir.join("t.bin");
    std::fs::write(&llmc, &bytes).unwrap();
    let src = FileSource::tokens(llmc.to_str().unwrap(), 1, 256, 9).unwrap();
    assert!(src.describe().contains("100 tokens"));
    let r = row(&src, 2, 3, 10);
    assert!(
        r.windows(2).all(|w| w[1] == w[0] + 1) && r[9] < 100,
        "{r:?}"
    );

    let truncated = dir.join("short.bin");
    std::fs::write(&truncated, &bytes[..1024 + 20]).unwrap();
    let err = FileSource::tokens(truncated.to_str().unwrap(), 1, 256, 9)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("announces 100 tokens"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}
