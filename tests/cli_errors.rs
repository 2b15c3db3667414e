//! Bad input gives one line naming the key or file, exit code 2, no panic, nothing written.

use std::process::Command;

fn kiln(args: &[&str]) -> (i32, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .env("KILN_LOG", "error")
        .output()
        .expect("run kiln");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn train_with(sets: &[&str]) -> (i32, String) {
    let mut args = vec![
        "train",
        "--quiet",
        "--set",
        "train.steps=1",
        "--set",
        "output.dir=/nonexistent-kiln-out",
    ];
    for s in sets {
        args.push("--set");
        args.push(s);
    }
    kiln(&args)
}

fn assert_user_error(code: i32, stderr: &str, needles: &[&str]) {
    assert_eq!(code, 2, "exit code; stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "panicked: {stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "expected one line, got: {stderr}");
    for n in needles {
        assert!(lines[0].contains(n), "`{n}` missing from: {}", lines[0]);
    }
}

#[test]
fn unknown_key_is_named() {
    let (code, err) = train_with(&["train.stepz=3"]);
    assert_user_error(code, &err, &["train.stepz", "unknown key"]);
    let (code, err) = train_with(&["bogus.key=1"]);
    assert_user_error(code, &err, &["bogus"]);
}

#[test]
fn wrong_type_is_named() {
    let (code, err) = train_with(&["train.steps=\"many\""]);
    assert_user_error(code, &err, &["train.steps", "invalid type"]);
    let (code, err) = train_with(&["train.recompute=sometimes"]);
    assert_user_error(code, &err, &["train.recompute"]);
}

#[test]
fn out_of_range_values_are_named() {
    for (set, key) in [
        ("parallel.stage=7", "parallel.stage"),
        ("train.lr=-1", "train.lr"),
        ("train.beta2=1.5", "train.beta2"),
        ("model.preset=huge", "model.preset"),
        ("offload.optimizer=tape", "offload.optimizer"),
        ("comm.backend=carrier-pigeon", "comm.backend"),
        ("data.source=radio", "data.source"),
        ("model.n_heads=3", "model.n_heads"),
    ] {
        let (code, err) = train_with(&[set]);
        assert_user_error(code, &err, &[key]);
    }
}

#[test]
fn indivisible_batch_names_all_three_numbers() {
    let (code, err) = train_with(&["train.global_batch=12", "train.micro_batch=8"]);
    assert_user_error(
        code,
        &err,
        &["train.global_batch", "12", "8", "world size (1)"],
    );
}

#[test]
fn seq_len_above_the_maximum_is_named() {
    let (code, err) = train_with(&["model.seq_len=4096"]);
    assert_user_error(code, &err, &["model.seq_len", "4096", "128"]);
}

#[test]
fn missing_data_file_is_named() {
    let (code, err) = train_with(&["data.source=text", "data.path=/no/such/file.txt"]);
    assert_user_error(code, &err, &["/no/such/file.txt"]);
    let (code, err) = train_with(&["data.source=tokens"]);
    assert_user_error(code, &err, &["data.path"]);
}

#[test]
fn token_id_above_vocab_is_named_with_its_position() {
    let dir = std::env::temp_dir().join(format!("kiln-test-tokens-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("bad.bin");
    let mut tokens: Vec<u16> = (0..1000).map(|i| (i % 200) as u16).collect();
    tokens[517] = 300;
    std::fs::write(
        &path,
        tokens
            .iter()
            .flat_map(|t| t.to_le_bytes())
            .collect::<Vec<u8>>(),
    )
    .unwrap();
    let p = path.to_str().unwrap();
    let (code, err) = train_with(&["data.source=tokens", &format!("data.path={p}")]);
    assert_user_error(
        code,
        &err,
        &[p, "token id 300", "position 517", "vocab (256)"],
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn missing_and_malformed_config_files_are_named() {
    let (code, err) = kiln(&["train", "--config", "/no/such/recipe.toml"]);
    assert_user_error(code, &err, &["/no/such/recipe.toml"]);
    let dir = std::env::temp_dir().join(format!("kiln-test-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("broken.toml");
    std::fs::write(&path, "[train]\nsteps = = 3\n").unwrap();
    let (code, err) = kiln(&["train", "--config", path.to_str().unwrap()]);
    assert_user_error(code, &err, &["broken.toml", "line 2"]);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_failed_start_writes_no_outputs() {
    let dir = std::env::temp_dir().join(format!("kiln-test-noout-{}", std::process::id()));
    let d = dir.to_str().unwrap().to_string();
    let (code, _) = kiln(&[
        "train",
        "--quiet",
        "--set",
        &format!("output.dir={d}"),
        "--set",
        "train.global_batch=7",
    ]);
    assert_eq!(code, 2);
    assert!(
        !dir.exists(),
        "a rejected config must not create output.dir"
    );
}
