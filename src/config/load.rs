//! Reading a recipe, a DeepSpeed config, and applying `--set section.key=value` overrides.

use super::deepspeed::{self, Translation};
use super::{Config, ModelConfig};
use crate::error::{KilnError, Result};
use std::path::Path;

/// Reads `path` (if given), applies the overrides in order and checks keys and types.
/// Errors name the key (`train.steps`) or the file.
pub fn load(path: Option<&Path>, sets: &[String]) -> Result<Config> {
    load_layers(path, None, sets, &|_| Ok(0)).map(|(config, _)| config)
}

/// `load` with a DeepSpeed config between the recipe and the overrides (precedence: recipe,
/// then DeepSpeed file, then `--set`). Also returns what the DeepSpeed file said about itself:
/// the keys kiln ignores and how some keys were read. `block_params` counts the parameters of
/// one transformer block of the model `[model]` describes (DeepSpeed's "auto" sizes scale with
/// it); the config layer knows no model, so the caller says (`plan::load_layers`).
pub fn load_layers(
    path: Option<&Path>,
    deepspeed: Option<&Path>,
    sets: &[String],
    block_params: &dyn Fn(&ModelConfig) -> Result<usize>,
) -> Result<(Config, Translation)> {
    let mut table = read_table(path)?;
    let sets = sets
        .iter()
        .map(|s| parse_set(s))
        .collect::<Result<Vec<_>>>()?;
    let translation = match deepspeed {
        None => Translation::default(),
        Some(ds) => {
            // The model's shape comes from the recipe and --set only (DeepSpeed has no model keys).
            let block_params = || {
                let mut t = table.clone();
                for (key, value) in &sets {
                    insert(&mut t, key, value.clone())?;
                }
                block_params(&deserialize(t)?.model)
            };
            deepspeed::translate(ds, &block_params)?
        }
    };
    for (key, value) in translation.sets.iter().chain(&sets) {
        insert(&mut table, key, value.clone())?;
    }
    Ok((deserialize(table)?, translation))
}

fn read_table(path: Option<&Path>) -> Result<toml::Table> {
    Ok(match path {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .map_err(|e| KilnError::file(p, format!("cannot read config: {e}")))?;
            text.parse::<toml::Table>().map_err(|e| {
                let msg = one_line(e.message());
                let line = e.span().map(|s| text[..s.start].lines().count().max(1));
                KilnError::file(
                    p,
                    match line {
                        Some(l) => format!("line {l}: {msg}"),
                        None => msg,
                    },
                )
            })?
        }
        None => toml::Table::new(),
    })
}

fn deserialize(table: toml::Table) -> Result<Config> {
    let de = toml::Value::Table(table);
    serde_path_to_error::deserialize::<_, Config>(de).map_err(|e| {
        let path = e.path().to_string();
        // toml's own message repeats the key on a second line; kiln names the key itself.
        let inner = e
            .inner()
            .to_string()
            .lines()
            .next()
            .unwrap_or_default()
            .to_string();
        // serde reports an unknown field at its parent; name the field itself.
        if let Some(rest) = inner.strip_prefix("unknown field `") {
            let (field, expected) = rest.split_once('`').unwrap_or((rest, ""));
            let full = if path == "." || path.is_empty() {
                field.to_string()
            } else if path.ends_with(field) {
                path.clone()
            } else {
                format!("{path}.{field}")
            };
            return KilnError::config(format!(
                "unknown key `{full}`{}",
                expected.trim_start_matches(',')
            ));
        }
        KilnError::config(format!("key `{path}`: {inner}"))
    })
}

/// Splits `section.key=value`; the value is read as TOML, or as a plain string when it is not
/// valid TOML (`--set offload.optimizer=nvme`).
pub fn parse_set(set: &str) -> Result<(String, toml::Value)> {
    let (key, raw) = set
        .split_once('=')
        .ok_or_else(|| KilnError::config(format!("--set `{set}`: expected section.key=value")))?;
    let key = key.trim().to_string();
    if key.is_empty() || key.split('.').any(str::is_empty) {
        return Err(KilnError::config(format!(
            "--set `{set}`: expected section.key=value"
        )));
    }
    let raw = raw.trim();
    let value = format!("v = {raw}")
        .parse::<toml::Table>()
        .ok()
        .and_then(|mut t| t.remove("v"))
        .unwrap_or_else(|| toml::Value::String(raw.to_string()));
    Ok((key, value))
}

fn insert(table: &mut toml::Table, key: &str, value: toml::Value) -> Result<()> {
    let mut parts: Vec<&str> = key.split('.').collect();
    let last = parts.pop().expect("parse_set rejects empty keys");
    let mut node = table;
    for (i, part) in parts.iter().enumerate() {
        let entry = node
            .entry(part.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        node = entry.as_table_mut().ok_or_else(|| {
            KilnError::config(format!(
                "--set {key}: `{}` is a value, not a section",
                parts[..=i].join(".")
            ))
        })?;
    }
    node.insert(last.to_string(), value);
    Ok(())
}

fn one_line(msg: &str) -> String {
    msg.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ")
}
