//! One corpus of bad inputs, across the command line, the config (recipe, `--set`, DeepSpeed
//! file), data files, checkpoints, offload paths, outputs and `kiln consolidate`. For each, with
//! the default logging a user gets: exit code 2, exactly one line on stderr naming the key or
//! file, no panic, nothing on stdout, and nothing written or overwritten (every file under the
//! scratch directory — fixtures, outputs, the working directory, whose `runs/latest` is the
//! default output.dir — is compared byte for byte before and after).

mod common;

use common::{output_text, snapshot, Scratch, TEST_MODEL};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The differences between two snapshots, by path.
fn changes(before: &[(PathBuf, Vec<u8>)], after: &[(PathBuf, Vec<u8>)]) -> Vec<String> {
    let mut out = Vec::new();
    for (p, bytes) in after {
        match before.iter().find(|(q, _)| q == p) {
            None => out.push(format!("created {}", p.display())),
            Some((_, old)) if old != bytes => out.push(format!("changed {}", p.display())),
            Some(_) => {}
        }
    }
    for (p, _) in before {
        if !after.iter().any(|(q, _)| q == p) {
            out.push(format!("removed {}", p.display()));
        }
    }
    out
}

fn tokens_file(path: &Path, tokens: &[u16]) {
    let bytes: Vec<u8> = tokens.iter().flat_map(|t| t.to_le_bytes()).collect();
    std::fs::write(path, bytes).unwrap();
}

/// Copies checkpoint directory `from` to `to` (a flat directory of files).
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, to.join(p.file_name().unwrap())).unwrap();
    }
}

/// A copy of the Hugging Face checkpoint `from` in `to`, its config.json passed through
/// `config` and each tensor given the shape `tensors` returns (`None` leaves it out).
fn hf_variant(
    from: &Path,
    to: &Path,
    config: &dyn Fn(&str) -> String,
    tensors: &dyn Fn(&str, &[usize]) -> Option<Vec<usize>>,
) {
    use kiln::checkpoint::{TensorFileReader, TensorFileWriter};
    std::fs::create_dir_all(to).unwrap();
    let text = std::fs::read_to_string(from.join("config.json")).unwrap();
    std::fs::write(to.join("config.json"), config(&text)).unwrap();
    let src = TensorFileReader::open(&from.join("model.safetensors")).unwrap();
    let mut names: Vec<String> = src.names().map(str::to_string).collect();
    names.sort();
    let kept: Vec<(String, Vec<usize>)> = names
        .iter()
        .filter_map(|n| tensors(n, src.shape(n).unwrap()).map(|s| (n.clone(), s)))
        .collect();
    let out = TensorFileWriter::create(&to.join("model.safetensors"), &kept, &Default::default())
        .unwrap();
    for (name, shape) in &kept {
        let mut buf = vec![0f32; shape.iter().product()];
        let have: usize = src.shape(name).unwrap().iter().product();
        let n = buf.len().min(have);
        src.read(name, 0, &mut buf[..n]).unwrap();
        out.write(name, 0, &buf).unwrap();
    }
    out.finish().unwrap();
}

fn strings(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

#[test]
fn every_bad_input_is_one_line_exit_2_and_writes_nothing() {
    let scratch = Scratch::new("bad-inputs");
    let s = |rel: &str| scratch.path(rel).display().to_string();
    let cwd = scratch.path("cwd");
    std::fs::create_dir_all(&cwd).unwrap();
    std::fs::write(scratch.path("afile"), "not a directory\n").unwrap();

    // Data files.
    std::fs::create_dir_all(scratch.path("data")).unwrap();
    std::fs::write(scratch.path("data/empty.txt"), "").unwrap();
    std::fs::write(scratch.path("data/short.txt"), "too short").unwrap();
    std::fs::write(scratch.path("data/latin1.txt"), b"caf\xe9 ".repeat(100)).unwrap();
    std::fs::write(scratch.path("data/odd.bin"), [1u8; 2001]).unwrap();
    let mut tokens: Vec<u16> = (0..1000).map(|i| (i % 200) as u16).collect();
    tokens[517] = 300;
    tokens_file(&scratch.path("data/big-id.bin"), &tokens);
    let short: Vec<u16> = (0..200).map(|i| (i % 50) as u16).collect();
    tokens_file(&scratch.path("data/val-short.bin"), &short);
    std::fs::create_dir_all(scratch.path("prepared")).unwrap();
    tokens_file(&scratch.path("prepared/train.bin"), &short);
    let mut llmc = vec![0u8; 1024];
    llmc[0..4].copy_from_slice(&20240520i32.to_le_bytes());
    llmc[8..12].copy_from_slice(&5000i32.to_le_bytes());
    llmc.extend(std::iter::repeat_n(0u8, 2 * 100));
    std::fs::write(scratch.path("data/llmc-short.bin"), llmc).unwrap();

    // Config files.
    std::fs::create_dir_all(scratch.path("cfg")).unwrap();
    std::fs::write(scratch.path("cfg/broken.toml"), "[train]\nsteps = = 3\n").unwrap();
    std::fs::write(scratch.path("cfg/unknown.toml"), "[train]\nstepz = 3\n").unwrap();
    std::fs::write(
        scratch.path("cfg/type.toml"),
        "[parallel]\nstage = \"two\"\n",
    )
    .unwrap();
    std::fs::write(
        scratch.path("cfg/comma.json"),
        r#"{"train_batch_size": 8,}"#,
    )
    .unwrap();
    std::fs::write(
        scratch.path("cfg/stage4.json"),
        r#"{"zero_optimization": {"stage": 4}}"#,
    )
    .unwrap();
    std::fs::write(
        scratch.path("cfg/gpu.json"),
        r#"{"zero_optimization": {"offload_optimizer": {"device": "gpu"}}}"#,
    )
    .unwrap();

    // A good checkpoint of the test model at step 2 (world 2), and broken copies of it.
    let mut model: Vec<String> = TEST_MODEL.iter().map(|s| s.to_string()).collect();
    model.extend(strings(&[
        "train.global_batch=4",
        "train.micro_batch=2",
        "train.threads=1",
    ]));
    let mut args = strings(&["train", "--quiet", "--simulate", "2"]);
    for set in model.iter().cloned().chain([
        "train.steps=2".into(),
        format!("checkpoint.dir={}", s("ck")),
        format!("output.dir={}", s("ck-run")),
    ]) {
        args.extend(["--set".into(), set]);
    }
    let made = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(&args)
        .env("KILN_LOG", "warn")
        .output()
        .unwrap();
    assert!(made.status.success(), "{}", output_text(&made));
    let good = scratch.path("ck/step_000002");
    let broken = |name: &str, breaks: &dyn Fn(&Path)| {
        let dir = scratch.path(&format!("bad/{name}/step_000002"));
        copy_dir(&good, &dir);
        breaks(&dir);
        dir.display().to_string()
    };
    let rank1 = "rank-00001.safetensors";
    let trunc = broken("trunc", &|d| {
        let bytes = std::fs::read(d.join(rank1)).unwrap();
        std::fs::write(d.join(rank1), &bytes[..bytes.len() - 100]).unwrap();
    });
    let flipped = broken("flipped", &|d| {
        let mut bytes = std::fs::read(d.join(rank1)).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0x40;
        std::fs::write(d.join(rank1), bytes).unwrap();
    });
    let no_rank = broken("no-rank", &|d| std::fs::remove_file(d.join(rank1)).unwrap());
    let bad_json = broken("json", &|d| {
        let text = std::fs::read_to_string(d.join("manifest.json")).unwrap();
        std::fs::write(d.join("manifest.json"), &text[..text.len() / 2]).unwrap();
    });
    let format = broken("format", &|d| {
        let text = std::fs::read_to_string(d.join("manifest.json")).unwrap();
        let text = text.replace("kiln-checkpoint-1", "kiln-checkpoint-0");
        std::fs::write(d.join("manifest.json"), text).unwrap();
    });
    std::fs::create_dir_all(scratch.path("dangling")).unwrap();
    std::fs::write(scratch.path("dangling/latest"), "step_000099\n").unwrap();

    // `kiln train` on the tiny preset, one step: `sets` are --set arguments.
    let train = |sets: &[&str]| {
        let mut a = strings(&["train", "--quiet", "--set", "train.steps=1"]);
        for set in sets {
            a.extend(["--set".into(), set.to_string()]);
        }
        a
    };
    // `kiln train --simulate 2` on the checkpoint's model, to step 4: `extra` are more args.
    let resume = |extra: &[&str]| {
        let mut a = strings(&["train", "--quiet", "--simulate", "2"]);
        for set in model.iter().map(String::as_str).chain(["train.steps=4"]) {
            a.extend(["--set".into(), set.to_string()]);
        }
        a.extend(strings(extra));
        a
    };
    let good_str = good.display().to_string();
    let data = |source: &str, file: &str| {
        [
            format!("data.source={source}"),
            format!("data.path={}", s(file)),
        ]
    };

    // (arguments, what the line must name). Paths are as the user gave them.
    let mut cases: Vec<(Vec<String>, Vec<String>)> = Vec::new();
    let mut case = |args: Vec<String>, needles: &[&str]| cases.push((args, strings(needles)));

    // The command line.
    case(
        strings(&["train", "--bogus"]),
        &["--bogus", "kiln train --help"],
    );
    case(
        strings(&["train", "--simulate", "abc"]),
        &["--simulate", "abc"],
    );
    case(strings(&["frobnicate"]), &["frobnicate", "consolidate"]);
    case(strings(&["train", "--set"]), &["--set"]);
    case(strings(&["train", "--resume", "a", "b"]), &["'b'"]);
    case(
        strings(&["consolidate", "only-one"]),
        &["<OUT>", "kiln consolidate --help"],
    );
    case(strings(&["dump-data"]), &["--out", "kiln dump-data --help"]);
    case(
        strings(&["bench", "nosuch"]),
        &["nosuch", "kiln bench --help"],
    );
    // PyTorch's side recomputes only under FSDP2 with resharding: refused before anything runs.
    let tiny = format!("{}/configs/tiny.toml", env!("CARGO_MANIFEST_DIR"));
    case(
        strings(&[
            "bench",
            "ddp",
            "--torch-recompute",
            "--torch-python",
            "python3",
        ])
        .into_iter()
        .chain(["--config".to_string(), tiny])
        .collect(),
        &["--torch-recompute", "parallel.stage = 3", "not stage 0"],
    );
    case(
        train(&[])
            .into_iter()
            .chain(strings(&["--simulate", "0"]))
            .collect(),
        &["--simulate"],
    );
    case(
        strings(&["check", "comm", "--simulate", "0"]),
        &["--simulate"],
    );
    let mut mpi = resume(&[]);
    mpi.extend(strings(&["--set", "comm.backend=mpi"]));
    case(mpi, &["comm.backend", "--simulate"]);

    // Config keys: unknown, wrong type, out of range, inconsistent.
    case(train(&["train.stepz=3"]), &["train.stepz", "unknown key"]);
    case(train(&["bogus.key=1"]), &["bogus"]);
    case(
        train(&["train.steps=\"many\""]),
        &["train.steps", "invalid type"],
    );
    case(train(&["train.steps=3.5"]), &["train.steps"]);
    case(train(&["train.recompute=sometimes"]), &["train.recompute"]);
    case(train(&["parallel.stage=7"]), &["parallel.stage"]);
    case(train(&["train.lr=-1"]), &["train.lr"]);
    case(train(&["train.beta2=1.5"]), &["train.beta2"]);
    case(train(&["model.preset=huge"]), &["model.preset"]);
    case(train(&["offload.optimizer=tape"]), &["offload.optimizer"]);
    case(train(&["comm.backend=carrier-pigeon"]), &["comm.backend"]);
    case(train(&["data.source=radio"]), &["data.source"]);
    case(train(&["model.n_heads=3"]), &["model.n_heads"]);
    case(train(&["train.schedule=step"]), &["train.schedule"]);
    case(
        train(&["train.global_batch=12", "train.micro_batch=8"]),
        &["train.global_batch", "12", "8", "world size (1)"],
    );
    case(
        train(&["train.global_batch=7"]),
        &["train.global_batch", "7"],
    );
    case(
        train(&["model.seq_len=4096"]),
        &["model.seq_len", "4096", "128"],
    );
    case(train(&["noequals"]), &["noequals", "section.key=value"]);
    case(
        train(&["train.steps.x=1"]),
        &["train.steps", "not a section"],
    );
    case(train(&[".x=1"]), &[".x=1", "section.key=value"]);

    // Config files: recipe and DeepSpeed.
    let with = |flag: &str, file: &str| {
        let mut a = train(&[]);
        a.extend([flag.to_string(), file.to_string()]);
        a
    };
    case(
        with("--config", "/no/such/recipe.toml"),
        &["/no/such/recipe.toml"],
    );
    case(
        with("--config", &s("cfg/broken.toml")),
        &[&s("cfg/broken.toml"), "line 2"],
    );
    case(
        with("--config", &s("cfg/unknown.toml")),
        &["train.stepz", "unknown key"],
    );
    case(
        with("--config", &s("cfg/type.toml")),
        &["parallel.stage", "invalid type"],
    );
    case(
        with("--config", &s("cfg")),
        &[&s("cfg"), "cannot read config"],
    );
    case(
        strings(&["config", "--config", &s("cfg/broken.toml")]),
        &[&s("cfg/broken.toml"), "line 2"],
    );
    case(
        with("--deepspeed", "/no/such/ds.json"),
        &["/no/such/ds.json"],
    );
    case(
        with("--deepspeed", &s("cfg/comma.json")),
        &[&s("cfg/comma.json"), "not valid JSON"],
    );
    case(
        with("--deepspeed", &s("cfg/stage4.json")),
        &["zero_optimization.stage"],
    );
    case(
        with("--deepspeed", &s("cfg/gpu.json")),
        &["zero_optimization.offload_optimizer.device"],
    );

    // Data files.
    let d = |source: &str, file: &str| {
        let [a, b] = data(source, file);
        train(&[a.as_str(), b.as_str()])
    };
    case(
        train(&["data.source=text", "data.path=/no/such/file.txt"]),
        &["/no/such/file.txt"],
    );
    case(train(&["data.source=tokens"]), &["data.path"]);
    case(
        d("text", "data/empty.txt"),
        &[&s("data/empty.txt"), "holds 0 bytes"],
    );
    case(
        d("text", "data/short.txt"),
        &[&s("data/short.txt"), "seq_len + 1"],
    );
    case(
        d("text", "data/latin1.txt"),
        &[&s("data/latin1.txt"), "not UTF-8"],
    );
    case(d("text", "data"), &[&s("data"), "cannot read data file"]);
    case(d("tokens", "data/odd.bin"), &[&s("data/odd.bin"), "odd"]);
    case(
        d("tokens", "data/big-id.bin"),
        &[
            &s("data/big-id.bin"),
            "token id 300",
            "position 517",
            "vocab (256)",
        ],
    );
    case(
        d("tokens", "data/llmc-short.bin"),
        &[&s("data/llmc-short.bin"), "5000 tokens"],
    );
    let [a, b] = data("tokens", "data/odd.bin");
    case(
        strings(&[
            "dump-data",
            "--out",
            &s("dump.bin"),
            "--set",
            &a,
            "--set",
            &b,
        ]),
        &[&s("data/odd.bin")],
    );

    // Checkpoints and --resume.
    case(
        resume(&["--resume", "/no/such/ckpt"]),
        &["/no/such/ckpt", "no checkpoint here"],
    );
    case(
        resume(&["--resume", &s("afile")]),
        &[&s("afile"), "no checkpoint here"],
    );
    case(
        resume(&["--resume"]),
        &["--resume latest", "checkpoint.dir"],
    );
    case(
        resume(&["--resume", &trunc]),
        &[&format!("{trunc}/{rank1}"), "truncated"],
    );
    case(
        resume(&["--resume", &flipped]),
        &[&format!("{flipped}/{rank1}"), "corrupted"],
    );
    case(
        resume(&["--resume", &no_rank]),
        &[&format!("{no_rank}/{rank1}"), "missing"],
    );
    case(
        resume(&["--resume", &bad_json]),
        &[&format!("{bad_json}/manifest.json"), "malformed manifest"],
    );
    case(
        resume(&["--resume", &format]),
        &[&format!("{format}/manifest.json"), "format"],
    );
    case(
        resume(&["--resume", &s("dangling")]),
        &[&s("dangling/step_000099")],
    );
    case(
        resume(&["--resume", &good_str, "--set", "model.d_model=24"]),
        &[
            &format!("{good_str}/manifest.json"),
            "another model",
            "model.d_model",
        ],
    );
    case(
        resume(&["--resume", &good_str, "--set", "data.seed=99"]),
        &[&format!("{good_str}/manifest.json"), "data.seed"],
    );
    case(
        resume(&["--resume", &good_str, "--set", "train.steps=2"]),
        &["train.steps", "step 2"],
    );

    // kiln consolidate.
    case(
        strings(&["consolidate", "/no/such/ckpt", &s("out.safetensors")]),
        &["/no/such/ckpt"],
    );
    case(
        strings(&["consolidate", &trunc, &s("out.safetensors")]),
        &[&format!("{trunc}/{rank1}"), "truncated"],
    );
    case(
        strings(&["consolidate", &good_str, &s("afile/out.safetensors")]),
        &[&s("afile"), "cannot create"],
    );
    case(
        strings(&["consolidate", &good_str, "/sys/out.safetensors"]),
        &["/sys/out.safetensors"],
    );

    // Hugging Face checkpoints (model.init_from, kiln sample --init-from, kiln export).
    let hf_fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf-gpt2-tiny");
    let hf = |name: &str,
              config: &dyn Fn(&str) -> String,
              tensors: &dyn Fn(&str, &[usize]) -> Option<Vec<usize>>| {
        hf_variant(
            &hf_fixture,
            &scratch.path(&format!("hf/{name}")),
            config,
            tensors,
        );
        s(&format!("hf/{name}"))
    };
    let same_config = |c: &str| c.to_string();
    let all_tensors = |_: &str, shape: &[usize]| Some(shape.to_vec());
    let no_fc_bias = hf("missing", &same_config, &|n, shape| {
        (n != "transformer.h.1.mlp.c_fc.bias").then(|| shape.to_vec())
    });
    let short_wpe = hf("shape", &same_config, &|n, shape| {
        Some(if n == "transformer.wpe.weight" {
            vec![32, shape[1]]
        } else {
            shape.to_vec()
        })
    });
    let relu = hf(
        "relu",
        &|c| c.replace("\"gelu_new\"", "\"relu\""),
        &all_tensors,
    );
    let by_layer = hf(
        "by-layer",
        &|c| {
            c.replace(
                "\"scale_attn_by_inverse_layer_idx\": false",
                "\"scale_attn_by_inverse_layer_idx\": true",
            )
        },
        &all_tensors,
    );
    let from = |path: &str, more: &[&str]| {
        let init = format!("model.init_from={path}");
        let mut sets = vec![
            init.as_str(),
            "model.qkv_bias=qkv",
            "model.tie_embeddings=true",
        ];
        sets.extend(more);
        train(&sets)
    };
    case(
        from(&no_fc_bias, &[]),
        &[&no_fc_bias, "transformer.h.1.mlp.c_fc.bias"],
    );
    case(
        from(&short_wpe, &[]),
        &[&short_wpe, "transformer.wpe.weight", "[32, 64]", "[64, 64]"],
    );
    case(from(&relu, &[]), &[&relu, "activation_function", "relu"]);
    case(
        from(&by_layer, &[]),
        &[&by_layer, "scale_attn_by_inverse_layer_idx"],
    );
    let fixture_str = hf_fixture.display().to_string();
    case(
        from(&fixture_str, &["model.seq_len=65"]),
        &["model.seq_len", "65", "n_positions = 64"],
    );
    case(
        from(&fixture_str, &["model.d_model=32"]),
        &["model.d_model", "32", "n_embd = 64"],
    );
    let untied = hf(
        "untied",
        &|c| {
            c.replace(
                "\"tie_word_embeddings\": true",
                "\"tie_word_embeddings\": false",
            )
        },
        &all_tensors,
    );
    case(
        from(&untied, &[]),
        &["model.tie_embeddings", "LM head of its own", &untied],
    );
    case(
        from(&s("no-such-model"), &[]),
        &[&s("no-such-model"), "model.init_from"],
    );
    case(
        strings(&["sample", "--init-from", &fixture_str, "--prompt", "Hello"]),
        &["--prompt", "15496", "vocab (384)"],
    );
    case(
        strings(&["sample", "--init-from", &relu, "--prompt", "a"]),
        &[&relu, "activation_function"],
    );
    case(
        strings(&["export", "--format", "onnx", &good_str, &s("onnx")]),
        &["--format", "onnx"],
    );
    case(
        strings(&["export", &good_str, &s("afile")]),
        &[&s("afile"), "is a file"],
    );

    // Optimizer, micro-batch and parameter-tier choices.
    case(
        train(&["offload.param=\"cpu\""]),
        &["offload.param", "parallel.stage = 3"],
    );
    case(
        train(&["train.optimizer=\"adam8\""]),
        &["train.optimizer", "adam8", "adamw8bit"],
    );
    case(
        train(&["train.micro_batch=\"most\""]),
        &["train.micro_batch", "most", "\"auto\""],
    );
    let llama = common::hf_fixture("llama").display().to_string();
    case(
        train(&[
            &format!("model.init_from={llama}"),
            &format!("data.path={llama}/tokens.bin"),
            "train.micro_batch=\"auto\"",
        ]),
        &["train.micro_batch", "built-in GPT"],
    );

    // The nvme tier's path.
    let nvme = |path: &str| {
        train(&[
            "offload.optimizer=nvme",
            &format!("offload.nvme_path={path}"),
        ])
    };
    case(nvme(&s("missing")), &[&s("missing"), "offload.nvme_path"]);
    case(nvme(&s("afile")), &[&s("afile"), "offload.nvme_path"]);
    case(nvme("/sys"), &["/sys/kiln-", "offload.nvme_path"]);

    // Outputs.
    case(
        train(&[&format!("output.dir={}", s("afile"))]),
        &[&s("afile"), "output.dir"],
    );
    case(
        train(&[&format!("checkpoint.dir={}", s("afile"))]),
        &[&s("afile"), "checkpoint.dir"],
    );
    case(
        train(&["checkpoint.dir=/sys/ckpt"]),
        &["/sys/ckpt", "checkpoint.dir"],
    );
    case(
        train(&[&format!("output.export={}", s("afile/x.safetensors"))]),
        &[&s("afile"), "cannot create"],
    );
    case(
        strings(&["dump-data", "--out", &s("afile/x.bin")]),
        &[&s("afile/x.bin"), "cannot create"],
    );

    // Validation (issue 12).
    case(
        train(&["train.eval_every=5"]),
        &["train.eval_every", "data.val_path"],
    );
    case(
        train(&["train.eval_every=5", "data.val_path=/no/such/val.bin"]),
        &["/no/such/val.bin"],
    );
    case(
        train(&[
            "train.eval_every=5",
            &format!("data.val_path={}", s("data/val-short.bin")),
        ]),
        &[&s("data/val-short.bin"), "train.eval_batches", "200 tokens"],
    );
    case(
        train(&[
            "train.eval_every=5",
            "train.eval_batches=0",
            &format!("data.val_path={}", s("data/val-short.bin")),
        ]),
        &["train.eval_batches"],
    );

    // kiln prepare-data (issue 12).
    let prep = |inputs: &[&str], extra: &[&str]| {
        let mut a = strings(&["prepare-data"]);
        a.extend(strings(inputs));
        a.extend(strings(&["--out", &s("prep-out")]));
        a.extend(strings(extra));
        a
    };
    case(
        prep(&[&s("data/short.txt")], &["--tokenizer", "gpt3"]),
        &["--tokenizer", "gpt3", "gpt2, bytes"],
    );
    case(
        prep(&[&s("data/short.txt"), &s("data/latin1.txt")], &[]),
        &[&s("data/latin1.txt"), "not UTF-8"],
    );
    case(
        prep(&[&s("data/empty.txt")], &[]),
        &[&s("data/empty.txt"), "empty"],
    );
    case(prep(&["/no/such/text.txt"], &[]), &["/no/such/text.txt"]);
    case(
        prep(&[&s("data/short.txt")], &["--val-fraction", "1"]),
        &["--val-fraction"],
    );
    case(
        strings(&[
            "prepare-data",
            &s("data/short.txt"),
            "--out",
            &s("prepared"),
        ]),
        &[&s("prepared/train.bin"), "--force"],
    );

    assert!(cases.len() >= 40, "{} cases", cases.len());
    let mut failures = Vec::new();
    for (args, needles) in &cases {
        let before = snapshot(&scratch.0);
        let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(args)
            .current_dir(&cwd)
            .env_remove("KILN_LOG")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
        let mut wrong = Vec::new();
        if out.status.code() != Some(2) {
            wrong.push(format!("exit code {:?}", out.status.code()));
        }
        if stderr.contains("panicked") {
            wrong.push("panicked".to_string());
        }
        if lines.len() != 1 {
            wrong.push(format!("{} lines", lines.len()));
        }
        if !out.stdout.is_empty() {
            wrong.push("wrote to stdout".to_string());
        }
        let first = lines.first().copied().unwrap_or_default();
        wrong.extend(
            needles
                .iter()
                .filter(|n| !first.contains(n.as_str()))
                .map(|n| format!("`{n}` not named")),
        );
        wrong.extend(changes(&before, &snapshot(&scratch.0)));
        if !wrong.is_empty() {
            failures.push(format!(
                "kiln {}\n  {}\n  {}",
                args.join(" "),
                wrong.join("; "),
                stderr.trim_end().replace('\n', "\n  | ")
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} bad inputs fail the standard:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}
