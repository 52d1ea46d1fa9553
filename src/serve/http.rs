//! The HTTP side: routes, the API key, request checks, and answers as JSON or as
//! server-sent events. Requests reach the engine thread through a bounded channel;
//! when it is full the answer is 503 with Retry-After.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use super::api::{ApiError, ChatRequest, Checked, CompletionRequest, Sampling};
use super::metrics::Metrics;
use super::scheduler::{Event, Finish, Job};
use crate::engine::LoadedModel;
use crate::llama::{self, SamplerParams, Token};

/// What every handler shares.
pub struct App {
    pub model: Arc<LoadedModel>,
    pub model_id: String,
    pub chat_template: String,
    pub ctx_per_seq: usize,
    pub api_key: Option<String>,
    pub jobs: mpsc::Sender<Job>,
    pub metrics: Arc<Metrics>,
    pub next_id: AtomicU64,
}

/// Request bodies larger than this get a 413.
pub const MAX_BODY: usize = 8 << 20;

pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/v1/models", get(models))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .fallback(not_found)
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .with_state(app)
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut r = (status, Json(self.body())).into_response();
        if self.status == 503 {
            r.headers_mut().insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
        }
        r
    }
}

async fn not_found() -> ApiError {
    ApiError::new(
        404,
        "invalid_request_error",
        "not_found",
        "no such endpoint: see /v1/models, /v1/completions, /v1/chat/completions, /health, /metrics",
    )
}

async fn health(State(app): State<Arc<App>>) -> Response {
    if app.jobs.is_closed() {
        return ApiError::new(503, "server_error", "engine_stopped", "the engine has stopped").into_response();
    }
    Json(json!({"status": "ok"})).into_response()
}

async fn metrics(State(app): State<Arc<App>>) -> Response {
    let queued = (app.jobs.max_capacity() - app.jobs.capacity()) as u64;
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], app.metrics.render(queued)).into_response()
}

async fn models(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    if let Err(e) = authorize(&app, &headers) {
        return e.into_response();
    }
    Json(json!({"object": "list", "data": [{
        "id": app.model_id, "object": "model", "created": 0, "owned_by": "logquant",
        "meta": {"description": app.model.model.description(), "ctx_per_seq": app.ctx_per_seq, "n_vocab": app.model.model.n_vocab()}
    }]}))
    .into_response()
}

fn authorize(app: &App, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(key) = &app.api_key else { return Ok(()) };
    let given =
        headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
    // Compare in time independent of where the strings differ.
    let ok = given.is_some_and(|g| {
        g.len() == key.len() && g.bytes().zip(key.bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
    });
    if ok {
        Ok(())
    } else {
        Err(ApiError::new(
            401,
            "invalid_request_error",
            "invalid_api_key",
            "missing or wrong API key: send Authorization: Bearer KEY",
        ))
    }
}

fn parse<T: serde::de::DeserializeOwned>(body: Result<Bytes, BytesRejection>) -> Result<T, ApiError> {
    let body = body.map_err(|e| {
        let status = e.status().as_u16();
        let code = if status == 413 { "request_too_large" } else { "invalid_body" };
        ApiError::new(
            status,
            "invalid_request_error",
            code,
            format!("{} (at most {} MiB)", e.body_text(), MAX_BODY >> 20),
        )
    })?;
    serde_json::from_slice(&body).map_err(|e| {
        ApiError::new(
            400,
            "invalid_request_error",
            "invalid_json",
            format!("the request body is not a valid request: {e}"),
        )
    })
}

#[derive(Clone, Copy, PartialEq)]
enum Kind {
    Completion,
    Chat,
}

async fn completions(State(app): State<Arc<App>>, headers: HeaderMap, body: Result<Bytes, BytesRejection>) -> Response {
    answer(&app, &headers, Kind::Completion, body).await
}

async fn chat_completions(
    State(app): State<Arc<App>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    answer(&app, &headers, Kind::Chat, body).await
}

async fn answer(app: &Arc<App>, headers: &HeaderMap, kind: Kind, body: Result<Bytes, BytesRejection>) -> Response {
    Metrics::add(&app.metrics.requests, 1);
    match start(app, headers, kind, body) {
        Ok((checked, rx, prompt_tokens)) => {
            if checked.stream {
                stream(app.clone(), kind, checked, rx).into_response()
            } else {
                collect(app, kind, rx, prompt_tokens).await
            }
        }
        Err(e) => {
            if e.status == 503 {
                Metrics::add(&app.metrics.rejected_busy, 1);
            } else {
                Metrics::add(&app.metrics.rejected_bad, 1);
            }
            e.into_response()
        }
    }
}

/// Checks the request, tokenizes it and hands it to the engine.
fn start(
    app: &App,
    headers: &HeaderMap,
    kind: Kind,
    body: Result<Bytes, BytesRejection>,
) -> Result<(Checked, mpsc::UnboundedReceiver<Event>, usize), ApiError> {
    authorize(app, headers)?;
    let (sampling, prompt) = match kind {
        Kind::Completion => {
            let r: CompletionRequest = parse(body)?;
            let text = r.prompt_text()?;
            let tokens = app.model.model.tokenize(text, true).map_err(|e| ApiError::bad("prompt", e.to_string()))?;
            (r.sampling, tokens)
        }
        Kind::Chat => {
            let r: ChatRequest = parse(body)?;
            let conversation = r.conversation()?;
            let text = llama::apply_chat_template(&app.chat_template, &conversation, true)
                .map_err(|e| ApiError::bad("messages", e.to_string()))?;
            let tokens =
                app.model.model.tokenize_special(&text, true).map_err(|e| ApiError::bad("messages", e.to_string()))?;
            (r.sampling, tokens)
        }
    };
    let checked = check_model_and_length(app, &sampling, &prompt)?;
    let (tx, rx) = mpsc::unbounded_channel();
    let n = prompt.len();
    let job = Job {
        prompt,
        max_tokens: checked.max_tokens.unwrap_or(app.ctx_per_seq - n),
        sampler: SamplerParams {
            temperature: checked.temperature,
            top_k: checked.top_k,
            top_p: checked.top_p,
            seed: checked.seed,
        },
        stop: checked.stop.clone(),
        events: tx,
    };
    app.jobs.try_send(job).map_err(|e| match e {
        mpsc::error::TrySendError::Full(_) => ApiError::new(
            503,
            "server_error",
            "server_busy",
            "every sequence is busy and the queue is full: retry later",
        ),
        mpsc::error::TrySendError::Closed(_) => {
            ApiError::new(503, "server_error", "engine_stopped", "the engine has stopped")
        }
    })?;
    Ok((checked, rx, n))
}

fn check_model_and_length(app: &App, sampling: &Sampling, prompt: &[Token]) -> Result<Checked, ApiError> {
    if let Some(m) = sampling.model.as_deref().filter(|m| *m != app.model_id) {
        return Err(ApiError::new(
            404,
            "invalid_request_error",
            "model_not_found",
            format!("model {m:?} is not served here; this server serves {:?}", app.model_id),
        ));
    }
    let checked = sampling.check()?;
    let n = prompt.len();
    if n == 0 {
        return Err(ApiError::bad("prompt", "the prompt is empty"));
    }
    if n >= app.ctx_per_seq {
        return Err(ApiError {
            status: 400,
            kind: "invalid_request_error",
            code: Some("context_length_exceeded"),
            param: Some("prompt"),
            message: format!(
                "the prompt is {n} tokens and a sequence holds {}: shorten it (or restart the server with a larger -c)",
                app.ctx_per_seq
            ),
        });
    }
    if let Some(m) = checked.max_tokens.filter(|&m| n + m > app.ctx_per_seq) {
        return Err(ApiError {
            status: 400,
            kind: "invalid_request_error",
            code: Some("context_length_exceeded"),
            param: Some("max_tokens"),
            message: format!(
                "prompt ({n} tokens) + max_tokens ({m}) exceed the {} tokens a sequence holds: ask for at most {}",
                app.ctx_per_seq,
                app.ctx_per_seq - n
            ),
        });
    }
    Ok(checked)
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn usage(prompt: usize, completion: usize) -> Value {
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
}

fn new_id(app: &App, kind: Kind) -> String {
    let n = app.next_id.fetch_add(1, Relaxed);
    match kind {
        Kind::Completion => format!("cmpl-{n}"),
        Kind::Chat => format!("chatcmpl-{n}"),
    }
}

async fn collect(app: &App, kind: Kind, mut rx: mpsc::UnboundedReceiver<Event>, prompt_tokens: usize) -> Response {
    let mut text = String::new();
    let (finish, completion) = loop {
        match rx.recv().await {
            Some(Event::Text(t)) => text.push_str(&t),
            Some(Event::Done { finish, completion_tokens, .. }) => break (finish, completion_tokens),
            Some(Event::Failed(m)) => return ApiError::new(500, "server_error", "engine_error", m).into_response(),
            None => {
                return ApiError::new(500, "server_error", "engine_error", "the engine ended the request")
                    .into_response()
            }
        }
    };
    let id = new_id(app, kind);
    let choice = match kind {
        Kind::Completion => json!({"index": 0, "text": text, "finish_reason": finish.as_str(), "logprobs": null}),
        Kind::Chat => {
            json!({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish.as_str(), "logprobs": null})
        }
    };
    let object = if kind == Kind::Chat { "chat.completion" } else { "text_completion" };
    Json(json!({"id": id, "object": object, "created": now(), "model": app.model_id, "choices": [choice], "usage": usage(prompt_tokens, completion)}))
        .into_response()
}

/// Server-sent events: one chunk per piece of text, a last chunk with the finish
/// reason (and the usage, or a separate usage chunk when stream_options asks), then
/// `[DONE]`. A task relays the engine's events; when the client goes away the stream
/// is dropped, the relay's send fails, and dropping the engine's receiver frees the
/// sequence.
fn stream(app: Arc<App>, kind: Kind, checked: Checked, mut rx: mpsc::UnboundedReceiver<Event>) -> impl IntoResponse {
    let (tx, out) = mpsc::channel::<Result<SseEvent, Infallible>>(16);
    let id = new_id(&app, kind);
    let created = now();
    let model = app.model_id.clone();
    let chunk = move |delta: Option<&str>, finish: Option<Finish>, usage: Option<Value>| -> SseEvent {
        let f = finish.map(|f| f.as_str());
        let choices = match (kind, delta) {
            (_, None) if usage.is_some() && finish.is_none() => json!([]),
            (Kind::Completion, d) => {
                json!([{"index": 0, "text": d.unwrap_or(""), "finish_reason": f, "logprobs": null}])
            }
            // The first chat chunk (empty content) opens the assistant's turn.
            (Kind::Chat, Some("")) => {
                json!([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": f, "logprobs": null}])
            }
            (Kind::Chat, Some(d)) => {
                json!([{"index": 0, "delta": {"content": d}, "finish_reason": f, "logprobs": null}])
            }
            (Kind::Chat, None) => json!([{"index": 0, "delta": {}, "finish_reason": f, "logprobs": null}]),
        };
        let object = if kind == Kind::Chat { "chat.completion.chunk" } else { "text_completion" };
        let mut v = json!({"id": id, "object": object, "created": created, "model": model, "choices": choices});
        if let Some(u) = usage {
            v["usage"] = u;
        }
        SseEvent::default().data(v.to_string())
    };
    tokio::spawn(async move {
        let mut first = kind == Kind::Chat;
        while let Some(ev) = rx.recv().await {
            let events: Vec<SseEvent> =
                match ev {
                    Event::Text(t) => {
                        let mut v = Vec::new();
                        if first {
                            v.push(chunk(Some(""), None, None));
                            first = false;
                        }
                        v.push(chunk(Some(&t), None, None));
                        v
                    }
                    Event::Done { finish, prompt_tokens, completion_tokens } => {
                        let u = usage(prompt_tokens, completion_tokens);
                        let mut v = vec![];
                        if first {
                            v.push(chunk(Some(""), None, None));
                        }
                        if checked.include_usage {
                            v.push(chunk(None, Some(finish), None));
                            v.push(chunk(None, None, Some(u)));
                        } else {
                            v.push(chunk(None, Some(finish), Some(u)));
                        }
                        v.push(SseEvent::default().data("[DONE]"));
                        v
                    }
                    Event::Failed(m) => vec![SseEvent::default()
                        .data(ApiError::new(500, "server_error", "engine_error", m).body().to_string())],
                };
            for e in events {
                if tx.send(Ok(e)).await.is_err() {
                    return; // the client went away; dropping rx frees the sequence
                }
            }
        }
    });
    Sse::new(ReceiverStream::new(out)).keep_alive(KeepAlive::default())
}
