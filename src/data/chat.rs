//! Instruction data (`kiln prepare-data --format jsonl`): records `{"prompt", "response"}` or
//! `{"messages": [{"role", "content"}, …]}`, rendered with the model's chat template (the Jinja
//! `chat_template` of tokenizer_config.json, through minijinja with transformers' settings:
//! `trim_blocks`, `lstrip_blocks`, loop controls, Python string methods, `raise_exception`),
//! and the byte ranges of the text the loss is on: the assistant turns.
//!
//! An assistant turn's range runs from the end of the conversation before it rendered with
//! `add_generation_prompt = true` to the end of the conversation through it — the reply and
//! whatever closes the turn (`<|eot_id|>`, `<|im_end|>`), which the model must learn to emit.

use crate::error::{KilnError, Result};
use serde::{Deserialize, Serialize};
use std::ops::Range;
use std::path::{Path, PathBuf};

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    /// `system`, `user`, `assistant`, …
    pub role: String,
    /// The text.
    pub content: String,
}

/// One JSONL record as a conversation: `{"prompt", "response"}` is a user message and the
/// assistant's reply.
pub fn parse_record(line: &str, file: &Path, line_no: usize) -> Result<Vec<Message>> {
    let at = |msg: String| KilnError::file(file, format!("line {line_no}: {msg}"));
    let value: serde_json::Value =
        serde_json::from_str(line).map_err(|e| at(format!("is not JSON: {e}")))?;
    if let Some(messages) = value.get("messages") {
        let messages: Vec<Message> = serde_json::from_value(messages.clone()).map_err(|e| {
            at(format!(
                "`messages` must be a list of {{\"role\", \"content\"}} strings: {e}"
            ))
        })?;
        if !messages.iter().any(|m| m.role == "assistant") {
            return Err(at("`messages` has no assistant message to train on".into()));
        }
        return Ok(messages);
    }
    match (value["prompt"].as_str(), value["response"].as_str()) {
        (Some(prompt), Some(response)) => Ok(vec![
            Message {
                role: "user".into(),
                content: prompt.into(),
            },
            Message {
                role: "assistant".into(),
                content: response.into(),
            },
        ]),
        _ => Err(at(
            "expected string fields `prompt` and `response`, or a `messages` list".into(),
        )),
    }
}

/// A model's chat template with its special tokens.
pub struct ChatTemplate {
    env: minijinja::Environment<'static>,
    specials: serde_json::Map<String, serde_json::Value>,
    /// tokenizer_config.json, for messages.
    file: PathBuf,
}

impl ChatTemplate {
    /// The `chat_template` of the tokenizer_config.json beside `tokenizer_json` (a string, or
    /// a list of named templates: the one called `default`); `None` when there is none.
    pub fn beside(tokenizer_json: &Path) -> Result<Option<ChatTemplate>> {
        let file = tokenizer_json.with_file_name("tokenizer_config.json");
        let Ok(text) = std::fs::read_to_string(&file) else {
            return Ok(None);
        };
        let config: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| KilnError::file(&file, format!("is not JSON: {e}")))?;
        let source = match &config["chat_template"] {
            serde_json::Value::String(s) => s.clone(),
            serde_json::Value::Array(named) => named
                .iter()
                .find(|t| t["name"] == "default")
                .and_then(|t| t["template"].as_str())
                .ok_or_else(|| {
                    KilnError::file(&file, "key `chat_template`: no template named `default`")
                })?
                .to_string(),
            _ => return Ok(None),
        };
        let mut env = minijinja::Environment::new();
        let syntax = minijinja::syntax::SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .expect("the default delimiters");
        env.set_syntax(syntax);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        env.add_template_owned("chat", source).map_err(|e| {
            KilnError::file(&file, format!("key `chat_template` does not parse: {e}"))
        })?;
        // Special tokens as transformers passes them: the strings (or AddedToken contents).
        let mut specials = serde_json::Map::new();
        for key in ["bos_token", "eos_token", "unk_token", "pad_token"] {
            let v = &config[key];
            if let Some(s) = v.as_str().or_else(|| v["content"].as_str()) {
                specials.insert(key.into(), s.into());
            }
        }
        Ok(Some(ChatTemplate {
            env,
            specials,
            file,
        }))
    }

    /// The template's text for `messages`, as transformers' `apply_chat_template(...,
    /// tokenize=False)` renders it.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let mut ctx = self.specials.clone();
        ctx.insert(
            "messages".into(),
            serde_json::to_value(messages).expect("plain data"),
        );
        ctx.insert("add_generation_prompt".into(), add_generation_prompt.into());
        let template = self.env.get_template("chat").expect("added in beside()");
        template.render(minijinja::value::Serde(&ctx)).map_err(|e| {
            KilnError::file(
                &self.file,
                format!("key `chat_template` fails to render: {e}"),
            )
        })
    }

    /// The conversation's text and the byte ranges of its assistant turns (see the module
    /// comment). A template that does not render a conversation as an extension of its
    /// beginning is refused: the turns could not be told apart.
    pub fn render_conversation(&self, messages: &[Message]) -> Result<(String, Vec<Range<usize>>)> {
        let full = self.render(messages, false)?;
        let mut spans = Vec::new();
        for (i, m) in messages.iter().enumerate() {
            if m.role != "assistant" {
                continue;
            }
            let before = self.render(&messages[..i], true)?;
            let through = self.render(&messages[..=i], false)?;
            if !(through.starts_with(&before) && full.starts_with(&through)) {
                return Err(KilnError::file(
                    &self.file,
                    "key `chat_template`: a conversation does not render as an extension of its \
                     beginning, so the assistant turns cannot be found",
                ));
            }
            spans.push(before.len()..through.len());
        }
        Ok((full, spans))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_of_both_shapes_and_bad_ones() {
        let f = Path::new("d.jsonl");
        let pair = parse_record(r#"{"prompt": "2+2?", "response": "4"}"#, f, 1).unwrap();
        assert_eq!(pair[1].role, "assistant");
        let chat = r#"{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}"#;
        assert_eq!(parse_record(chat, f, 2).unwrap().len(), 2);
        for (bad, says) in [
            (r#"{"prompt": "x"}"#, "`response`"),
            (r#"{"messages": [{"role": "user"}]}"#, "`messages`"),
            (
                r#"{"messages": [{"role": "user", "content": "x"}]}"#,
                "no assistant",
            ),
            ("not json", "is not JSON"),
        ] {
            let err = parse_record(bad, f, 7).unwrap_err().to_string();
            assert!(err.contains("line 7") && err.contains(says), "{err}");
        }
    }
}
