//! The OpenAI request bodies the server accepts, their checks, and the error body.
//!
//! Unknown fields are ignored (clients send many); fields we cannot honour (n > 1,
//! logprobs, tools) are refused with a 400 that says so, rather than silently dropped.

use serde::Deserialize;

/// An error as OpenAI's API returns it, with its HTTP status.
#[derive(Debug)]
pub struct ApiError {
    pub status: u16,
    pub kind: &'static str,
    pub code: Option<&'static str>,
    pub param: Option<&'static str>,
    pub message: String,
}

impl ApiError {
    pub fn bad(param: &'static str, message: impl Into<String>) -> ApiError {
        ApiError { status: 400, kind: "invalid_request_error", code: None, param: Some(param), message: message.into() }
    }

    pub fn new(status: u16, kind: &'static str, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError { status, kind, code: Some(code), param: None, message: message.into() }
    }

    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}})
    }
}

/// A string or a list of strings (`prompt`, `stop`).
#[derive(Deserialize, Debug, Clone)]
#[serde(untagged)]
pub enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize, Debug, Clone, Default)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// The sampling and length fields both endpoints share.
#[derive(Deserialize, Debug, Clone, Default)]
pub struct Sampling {
    pub model: Option<String>,
    pub max_tokens: Option<i64>,
    /// The chat endpoint's newer name for max_tokens.
    pub max_completion_tokens: Option<i64>,
    pub temperature: Option<f64>,
    pub top_p: Option<f64>,
    pub top_k: Option<i64>,
    pub seed: Option<i64>,
    pub stop: Option<OneOrMany>,
    #[serde(default)]
    pub stream: bool,
    pub stream_options: Option<StreamOptions>,
    pub n: Option<i64>,
    pub logprobs: Option<serde_json::Value>,
}

#[derive(Deserialize, Debug)]
pub struct CompletionRequest {
    pub prompt: OneOrMany,
    #[serde(flatten)]
    pub sampling: Sampling,
}

/// Message content: a string, or a list of parts of which only text is understood.
#[derive(Deserialize, Debug)]
#[serde(untagged)]
pub enum Content {
    Text(String),
    Parts(Vec<ContentPart>),
}

#[derive(Deserialize, Debug)]
pub struct ContentPart {
    #[serde(rename = "type")]
    pub kind: String,
    pub text: Option<String>,
}

#[derive(Deserialize, Debug)]
pub struct Message {
    pub role: String,
    pub content: Option<Content>,
}

#[derive(Deserialize, Debug)]
pub struct ChatRequest {
    pub messages: Vec<Message>,
    pub tools: Option<serde_json::Value>,
    #[serde(flatten)]
    pub sampling: Sampling,
}

/// Checked sampling parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct Checked {
    /// None: until the context is full.
    pub max_tokens: Option<usize>,
    pub temperature: f32,
    pub top_p: f32,
    pub top_k: i32,
    pub seed: u32,
    pub stop: Vec<String>,
    pub stream: bool,
    pub include_usage: bool,
}

impl Sampling {
    pub fn check(&self) -> Result<Checked, ApiError> {
        if let Some(n) = self.n.filter(|&n| n != 1) {
            return Err(ApiError::bad(
                "n",
                format!("n = {n}: this server returns one choice per request; send n = 1 or leave it out"),
            ));
        }
        if self.logprobs.as_ref().is_some_and(|v| !v.is_null() && *v != serde_json::Value::Bool(false)) {
            return Err(ApiError::bad("logprobs", "logprobs are not supported by this server; leave the field out"));
        }
        let max = self.max_completion_tokens.or(self.max_tokens);
        let max_tokens = match max {
            Some(m) if m < 1 => {
                return Err(ApiError::bad("max_tokens", format!("max_tokens must be at least 1, not {m}")))
            }
            Some(m) => Some(usize::try_from(m).unwrap_or(usize::MAX)),
            None => None,
        };
        let temperature = self.temperature.unwrap_or(1.0);
        if !(0.0..=2.0).contains(&temperature) {
            return Err(ApiError::bad("temperature", format!("temperature must be within 0..=2, not {temperature}")));
        }
        let top_p = self.top_p.unwrap_or(1.0);
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(ApiError::bad("top_p", format!("top_p must be within (0, 1], not {top_p}")));
        }
        let top_k = self.top_k.unwrap_or(0);
        if !(0..=i64::from(i32::MAX)).contains(&top_k) {
            return Err(ApiError::bad("top_k", format!("top_k must be 0 (off) or positive, not {top_k}")));
        }
        // Any integer seeds the sampler; without one each request draws its own.
        let seed = match self.seed {
            Some(s) => s as u32 ^ (s >> 32) as u32,
            None => rand_seed(),
        };
        let stop = match &self.stop {
            None => vec![],
            Some(OneOrMany::One(s)) => vec![s.clone()],
            Some(OneOrMany::Many(v)) => v.clone(),
        };
        if stop.len() > 4 {
            return Err(ApiError::bad("stop", format!("at most 4 stop strings, not {}", stop.len())));
        }
        if stop.iter().any(|s| s.is_empty()) {
            return Err(ApiError::bad("stop", "a stop string must not be empty"));
        }
        Ok(Checked {
            max_tokens,
            temperature: temperature as f32,
            top_p: top_p as f32,
            top_k: top_k as i32,
            seed,
            stop,
            stream: self.stream,
            include_usage: self.stream_options.as_ref().is_some_and(|o| o.include_usage),
        })
    }
}

fn rand_seed() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0));
    h.finish() as u32
}

impl CompletionRequest {
    pub fn prompt_text(&self) -> Result<&str, ApiError> {
        match &self.prompt {
            OneOrMany::One(s) => Ok(s),
            OneOrMany::Many(v) if v.len() == 1 => Ok(&v[0]),
            OneOrMany::Many(v) => {
                Err(ApiError::bad("prompt", format!("{} prompts in one request: send one prompt per request", v.len())))
            }
        }
    }
}

impl ChatRequest {
    /// (role, text) pairs, checked.
    pub fn conversation(&self) -> Result<Vec<(String, String)>, ApiError> {
        if self.tools.as_ref().is_some_and(|t| !t.is_null()) {
            return Err(ApiError::bad("tools", "tool calls are not supported by this server; leave out tools"));
        }
        if self.messages.is_empty() {
            return Err(ApiError::bad("messages", "messages is empty: give at least one message"));
        }
        let mut out = Vec::new();
        for (i, m) in self.messages.iter().enumerate() {
            if !matches!(m.role.as_str(), "system" | "developer" | "user" | "assistant") {
                return Err(ApiError::bad(
                    "messages",
                    format!("messages[{i}].role is {:?}: use system, user or assistant", m.role),
                ));
            }
            let text = match &m.content {
                None => String::new(),
                Some(Content::Text(s)) => s.clone(),
                Some(Content::Parts(parts)) => {
                    let mut s = String::new();
                    for p in parts {
                        match (&*p.kind, &p.text) {
                            ("text", Some(t)) => s.push_str(t),
                            _ => {
                                return Err(ApiError::bad(
                                    "messages",
                                    format!("messages[{i}] has a {:?} part: only text parts are supported", p.kind),
                                ))
                            }
                        }
                    }
                    s
                }
            };
            let role = if m.role == "developer" { "system" } else { &m.role };
            out.push((role.to_string(), text));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sampling(json: &str) -> Result<Checked, ApiError> {
        serde_json::from_str::<Sampling>(json).unwrap().check()
    }

    #[test]
    fn defaults_and_ranges() {
        let c = sampling("{}").unwrap();
        assert_eq!((c.max_tokens, c.temperature, c.top_p, c.top_k, c.stream), (None, 1.0, 1.0, 0, false));
        assert_eq!(sampling(r#"{"seed": 7}"#).unwrap().seed, sampling(r#"{"seed": 7}"#).unwrap().seed);
        for bad in [
            r#"{"max_tokens": 0}"#,
            r#"{"temperature": 3}"#,
            r#"{"top_p": 0}"#,
            r#"{"top_k": -1}"#,
            r#"{"n": 2}"#,
            r#"{"stop": ["a","b","c","d","e"]}"#,
            r#"{"stop": ""}"#,
        ] {
            let e = sampling(bad).unwrap_err();
            assert_eq!(e.status, 400, "{bad}");
        }
        assert_eq!(sampling(r#"{"max_completion_tokens": 5, "max_tokens": 9}"#).unwrap().max_tokens, Some(5));
    }

    #[test]
    fn wrong_types_are_refused_by_the_parser() {
        assert!(serde_json::from_str::<CompletionRequest>(r#"{"prompt": 5}"#).is_err());
        assert!(serde_json::from_str::<CompletionRequest>(r#"{"prompt": "x", "max_tokens": "many"}"#).is_err());
        assert!(serde_json::from_str::<ChatRequest>(r#"{"messages": "hi"}"#).is_err());
    }

    #[test]
    fn chat_messages_become_role_text_pairs() {
        let r: ChatRequest = serde_json::from_str(
            r#"{"messages": [{"role": "developer", "content": "be brief"}, {"role": "user", "content": [{"type": "text", "text": "hi"}]}]}"#,
        )
        .unwrap();
        assert_eq!(r.conversation().unwrap(), vec![("system".into(), "be brief".into()), ("user".into(), "hi".into())]);
        let r: ChatRequest = serde_json::from_str(r#"{"messages": [{"role": "tool", "content": "x"}]}"#).unwrap();
        assert_eq!(r.conversation().unwrap_err().status, 400);
    }
}
