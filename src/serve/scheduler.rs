//! The engine thread: it alone owns the llama.cpp context and runs continuous
//! batching over its sequences.
//!
//! Each step builds one batch: one token for every sequence that is generating, then
//! one prompt chunk of each sequence still prefilling, oldest request first (a long
//! prompt takes one chunk per step, so it shares the steps with the others instead of
//! stalling them), within the context's batch size. A prompt is split into the same
//! chunks under any load, so on the CPU backend an answer at temperature 0 equals the
//! one the request gets alone (tests/serve.rs). On a GPU it may not, in near ties:
//! there the arithmetic depends on the micro-batch's shape (cuBLAS picks its matrix
//! product by size, the two-tier op its prefill path by the tokens per sequence in
//! the micro-batch). After the decode, every sequence whose last token produced logits
//! samples its next token. Requests wait in the bounded channel until a sequence is
//! free; a request whose client went away (its event receiver dropped) frees its
//! sequence before the next step. Every request was checked by the HTTP layer first
//! (prompt and max_tokens within the per-sequence context), so nothing here can
//! overrun a sequence.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::mpsc;

use super::metrics::Metrics;
use super::text::{AnswerText, Piece};
use crate::engine::LoadedModel;
use crate::llama::{Batch, LlamaError, Sampler, SamplerParams, Token};
use crate::session::Session;

/// One generation request, already tokenized and validated.
pub struct Job {
    pub prompt: Vec<Token>,
    pub max_tokens: usize,
    pub sampler: SamplerParams,
    pub stop: Vec<String>,
    pub events: mpsc::UnboundedSender<Event>,
}

#[derive(Debug)]
pub enum Event {
    /// New text of the answer (whole characters; may be empty at the first token).
    Text(String),
    Done {
        finish: Finish,
        prompt_tokens: usize,
        completion_tokens: usize,
    },
    Failed(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Finish {
    /// An end-of-generation token or a stop string.
    Stop,
    /// max_tokens, or the sequence's context is full.
    Length,
}

impl Finish {
    pub fn as_str(self) -> &'static str {
        match self {
            Finish::Stop => "stop",
            Finish::Length => "length",
        }
    }
}

struct Slot {
    seq: i32,
    job: Job,
    /// Prompt tokens decoded so far.
    prefilled: usize,
    /// The sampled token to decode next (None while prefilling).
    next: Option<Token>,
    generated: usize,
    sampler: Sampler,
    /// Greedy, sampled in llama.cpp's graph (Layout::device_greedy): the decode
    /// returns its token, no logits.
    on_device: bool,
    text: AnswerText,
}

impl Slot {
    fn pos(&self) -> usize {
        self.prefilled + self.generated.saturating_sub(1)
    }
}

/// How the engine's context is laid out.
pub struct Layout {
    /// Sequences the context holds.
    pub parallel: usize,
    /// Tokens each sequence may hold (prompt + answer).
    pub ctx_per_seq: usize,
    /// Most prompt tokens of one sequence per step.
    pub prefill_chunk: usize,
    /// Prompt tokens of a sequence's first step (at most prefill_chunk): its chunks are
    /// [0, first), then prefill_chunk at a time.
    pub first_chunk: usize,
    /// The context samples greedy requests in its graph (ContextConfig::device_greedy):
    /// a request at temperature 0 gets no logits copied to the host, nor a pass over
    /// them there; any other turns it off for its sequence.
    pub device_greedy: bool,
}

/// Runs until `jobs` is closed and every admitted request has ended.
pub fn run(
    model: &LoadedModel,
    mut session: Session<'_>,
    layout: Layout,
    mut jobs: mpsc::Receiver<Job>,
    metrics: Arc<Metrics>,
) {
    let capacity = session.n_batch() as usize;
    // Prompts are fed in chunks at fixed positions ([0, first), [first, first + chunk), ...)
    // whatever else the step carries: the two-tier cache's state after a prompt depends
    // on where its decode calls split it (the policy runs after each), and so, at
    // temperature 0, does the answer. A chunk fits beside one token of every other
    // sequence, so the oldest prefilling sequence always gets its chunk.
    let chunk = layout
        .prefill_chunk
        .min(session.max_tokens_per_sequence())
        .min(capacity.saturating_sub(layout.parallel.saturating_sub(1)))
        .max(1);
    let first = layout.first_chunk.clamp(1, chunk);
    let mut batch = match Batch::new(capacity) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("logquant serve: cannot allocate a batch: {e}");
            return;
        }
    };
    // The lowest free id first: the running ids stay few runs of consecutive ids (see
    // the batch's order below).
    let mut free: BTreeSet<i32> = (0..layout.parallel as i32).collect();
    let mut slots: Vec<Slot> = Vec::new();
    let sampling_threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(SAMPLING_THREADS);
    let mut closed = false;
    let mut rate = 0.0f64;
    loop {
        // Admit waiting requests while sequences are free.
        while !free.is_empty() && !closed {
            let job = if slots.is_empty() {
                match jobs.blocking_recv() {
                    Some(j) => j,
                    None => {
                        closed = true;
                        break;
                    }
                }
            } else {
                match jobs.try_recv() {
                    Ok(j) => j,
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => {
                        closed = true;
                        break;
                    }
                }
            };
            if job.events.is_closed() {
                Metrics::add(&metrics.cancelled, 1);
                continue;
            }
            let seq = free.pop_first().expect("a free sequence");
            let sampler = Sampler::new(&job.sampler);
            let text = AnswerText::new(job.stop.clone());
            // (a change makes llama.cpp reserve its buffers again: only a sequence that
            // moves between greedy and sampled requests pays it)
            let greedy = layout.device_greedy && job.sampler.temperature <= 0.0;
            let on_device = session.set_device_greedy(seq, greedy).unwrap_or(false) && greedy;
            slots.push(Slot { seq, job, prefilled: 0, next: None, generated: 0, sampler, on_device, text });
        }
        if slots.is_empty() && closed {
            return;
        }
        // Clients that went away free their sequence now.
        slots.retain(|s| {
            let gone = s.job.events.is_closed();
            if gone {
                Metrics::add(&metrics.cancelled, 1);
                release(&mut session, &mut free, s.seq);
            }
            !gone
        });
        metrics.active_sequences.store(slots.len() as u64, Relaxed);
        if slots.is_empty() {
            continue;
        }

        // One step: generating sequences first, then prompt chunks in turn; each a
        // (slot, first prompt token, tokens) part, None for a generated token.
        let mut parts: Vec<(usize, Option<usize>, usize)> = Vec::new();
        let mut taken = 0usize;
        for (i, s) in slots.iter().enumerate() {
            if s.next.is_some() && taken < capacity {
                parts.push((i, None, 1));
                taken += 1;
            }
        }
        // Slots are in admission order: the oldest requests get their first token first.
        let mut prefill_tokens = 0usize;
        for (i, s) in slots.iter_mut().enumerate() {
            if s.next.is_some() || s.prefilled == s.job.prompt.len() {
                continue;
            }
            let take = next_chunk(s.prefilled, s.job.prompt.len(), first, chunk);
            if take > capacity - taken {
                continue; // next step: a chunk is never split by the load
            }
            parts.push((i, Some(s.prefilled), take));
            s.prefilled += take;
            taken += take;
            prefill_tokens += take;
        }
        if parts.is_empty() {
            continue;
        }
        // Into the batch by sequence id: with a stream per sequence, llama.cpp splits a
        // batch into micro-batches of consecutive sequence ids in batch order
        // (llama_batch_allocr::split_equal, sequential), and every micro-batch reads all
        // the weights again. In admission order the ids come shuffled once sequences are
        // reused: 27 sequences took ~10 micro-batches a step (55 ms against 16 ms in order
        // on an H100, docs/results/cuda/serve-run5/step-diag.txt).
        parts.sort_unstable_by_key(|&(i, _, _)| slots[i].seq);
        batch.clear();
        let mut rows: Vec<(usize, usize)> = Vec::new(); // (slot, batch index with logits)
        for (i, first, n) in parts {
            let s = &slots[i];
            match first {
                None => {
                    rows.push((i, batch.len()));
                    add(&mut batch, s.next.expect("a generating slot"), s.pos(), s.seq, true);
                }
                Some(first) => {
                    for p in first..first + n {
                        let last = p + 1 == s.job.prompt.len();
                        if last {
                            rows.push((i, batch.len()));
                        }
                        add(&mut batch, s.job.prompt[p], p, s.seq, last);
                    }
                }
            }
        }
        let t0 = Instant::now();
        let before = session.decode_times();
        let result = session.decode(&batch);
        let dt = t0.elapsed();
        let after = session.decode_times();
        Metrics::add(&metrics.decode_steps, 1);
        Metrics::add(&metrics.decode_micros, dt.as_micros() as u64);
        Metrics::add(&metrics.llama_decode_micros, (after.llama_decode - before.llama_decode).as_micros() as u64);
        Metrics::add(&metrics.policy_micros, (after.policy - before.policy).as_micros() as u64);
        Metrics::add(&metrics.prompt_tokens, prefill_tokens as u64);
        if let Some(o) = session.overlay() {
            metrics.overlay_slots_used.store(o.slots_used, Relaxed);
        }
        if let Err(e) = result {
            // Nothing of this step is trusted: end every request it carried.
            eprintln!("logquant serve: decode failed: {e}");
            let in_batch: Vec<i32> = (0..batch.len()).map(|i| batch.seq_of(i)).collect();
            slots.retain(|s| {
                let hit = in_batch.contains(&s.seq);
                if hit {
                    let _ = s.job.events.send(Event::Failed(format!("decoding failed: {e}")));
                    Metrics::add(&metrics.failed, 1);
                    release(&mut session, &mut free, s.seq);
                }
                !hit
            });
            continue;
        }

        // Sample for every row with logits.
        let t_sample = Instant::now();
        let mut ended: Vec<usize> = Vec::new();
        let sampled = rows.len();
        let on_device = rows.iter().filter(|&&(i, _)| slots[i].on_device).count();
        Metrics::add(&metrics.device_sampled, on_device as u64);
        let tokens = sample_rows(&mut session, &mut slots, &rows, sampling_threads);
        for ((i, _), token) in rows.into_iter().zip(tokens) {
            let s = &mut slots[i];
            let token = match token {
                Ok(t) => t,
                Err(e) => {
                    let _ = s.job.events.send(Event::Failed(format!("sampling failed: {e}")));
                    Metrics::add(&metrics.failed, 1);
                    ended.push(i);
                    continue;
                }
            };
            let finish = if model.model.is_eog(token) {
                let rest = s.text.finish();
                send_text(s, rest);
                Some(Finish::Stop)
            } else {
                s.generated += 1;
                Metrics::add(&metrics.completion_tokens, 1);
                let bytes = model.model.token_bytes(token).unwrap_or_default();
                match s.text.push(&bytes) {
                    Piece::Stopped(t) => {
                        send_text(s, t);
                        Some(Finish::Stop)
                    }
                    Piece::More(t) => {
                        send_text(s, t);
                        let full = s.job.prompt.len() + s.generated >= layout.ctx_per_seq;
                        if s.generated >= s.job.max_tokens || full {
                            let rest = s.text.finish();
                            send_text(s, rest);
                            Some(Finish::Length)
                        } else {
                            s.next = Some(token);
                            None
                        }
                    }
                }
            };
            if let Some(finish) = finish {
                let done = Event::Done { finish, prompt_tokens: s.job.prompt.len(), completion_tokens: s.generated };
                let _ = s.job.events.send(done);
                Metrics::add(&metrics.completed, 1);
                ended.push(i);
            }
        }
        Metrics::add(&metrics.sample_micros, t_sample.elapsed().as_micros() as u64);
        let generating = sampled as f64;
        if dt.as_secs_f64() > 0.0 && generating > 0.0 {
            // A moving average over roughly the last 16 steps.
            rate = if rate == 0.0 {
                generating / dt.as_secs_f64()
            } else {
                0.9375 * rate + 0.0625 * generating / dt.as_secs_f64()
            };
            metrics.set_decode_rate(rate);
        }
        ended.sort_unstable();
        for i in ended.into_iter().rev() {
            let s = slots.remove(i);
            release(&mut session, &mut free, s.seq);
        }
        metrics.active_sequences.store(slots.len() as u64, Relaxed);
    }
}

fn add(batch: &mut Batch, token: Token, pos: usize, seq: i32, logits: bool) {
    // Within capacity by construction (the step counts its tokens).
    batch.add(token, pos as i32, seq, logits).expect("the step stays within the batch");
}

fn send_text(s: &Slot, text: String) {
    if !text.is_empty() {
        let _ = s.job.events.send(Event::Text(text));
    }
}

/// Forgets a sequence's tokens and returns it to the free list. A sequence that could
/// not be cleared is not reused (its cells would leak into the next request).
fn release(session: &mut Session<'_>, free: &mut BTreeSet<i32>, seq: i32) {
    match session.remove(seq, 0, -1) {
        Ok(_) => {
            free.insert(seq);
        }
        Err(e) => eprintln!("logquant serve: sequence {seq} could not be cleared and is retired: {e}"),
    }
}

/// Rows from which sampling is split over threads: below it, starting them costs more
/// than the work (a row is one pass over the vocabulary, ~0.1-0.5 ms at 128k tokens).
const PARALLEL_SAMPLING_ROWS: usize = 16;
/// The most threads sampling uses (the host also runs the HTTP side).
const SAMPLING_THREADS: usize = 8;

/// The next token of each (slot, batch row) in `rows`, in that order: the token the
/// graph sampled for a slot on the device, else the slot's own sampler on its row's
/// logits. With many sequences one thread sampling them all is the step's longest
/// part on a GPU (146 sequences of a 128k vocabulary: ~80 ms against ~40 ms of
/// decoding), so the host's rows are split over threads; every sampler sees only its
/// own row, so the tokens do not depend on the split.
fn sample_rows(
    session: &mut Session,
    slots: &mut [Slot],
    rows: &[(usize, usize)],
    threads: usize,
) -> Vec<Result<Token, LlamaError>> {
    let mut tokens: Vec<Option<Result<Token, LlamaError>>> = (0..rows.len()).map(|_| None).collect();
    let on_device: Vec<usize> = (0..rows.len()).filter(|&k| slots[rows[k].0].on_device).collect();
    if !on_device.is_empty() {
        let batch_rows: Vec<usize> = on_device.iter().map(|&k| rows[k].1).collect();
        for (k, t) in on_device.into_iter().zip(session.sampled_tokens(&batch_rows)) {
            tokens[k] = Some(t);
        }
    }
    let session: &Session = session;
    let mut samplers: Vec<Option<&mut Sampler>> = slots.iter_mut().map(|s| Some(&mut s.sampler)).collect();
    // (index in rows, the slot's sampler, its logits)
    let mut jobs: Vec<(usize, &mut Sampler, &[f32])> = Vec::with_capacity(rows.len());
    for (k, &(i, row)) in rows.iter().enumerate() {
        if tokens[k].is_some() {
            continue;
        }
        let sampler = samplers[i].take().expect("one row per slot");
        match session.logits(row) {
            Ok(logits) => jobs.push((k, sampler, logits)),
            Err(e) => tokens[k] = Some(Err(e)),
        }
    }
    let run = |chunk: &mut [(usize, &mut Sampler, &[f32])]| -> Vec<(usize, Result<Token, LlamaError>)> {
        chunk.iter_mut().map(|(k, sampler, logits)| (*k, sampler.sample_logits(logits))).collect()
    };
    let done = if jobs.len() < PARALLEL_SAMPLING_ROWS || threads < 2 {
        run(&mut jobs)
    } else {
        let per = jobs.len().div_ceil(threads);
        std::thread::scope(|scope| {
            let handles: Vec<_> = jobs.chunks_mut(per).map(|chunk| scope.spawn(|| run(chunk))).collect();
            handles.into_iter().flat_map(|h| h.join().expect("a sampling thread panicked")).collect()
        })
    };
    for (k, t) in done {
        tokens[k] = Some(t);
    }
    tokens.into_iter().map(|t| t.expect("every row sampled")).collect()
}

/// Prompt tokens of the next chunk of a prompt of `len` tokens with `prefilled` of
/// them decoded: chunks are [0, first), then `chunk` at a time, whatever the load.
fn next_chunk(prefilled: usize, len: usize, first: usize, chunk: usize) -> usize {
    let to_boundary = if prefilled < first { first - prefilled } else { chunk - (prefilled - first) % chunk };
    (len - prefilled).min(to_boundary)
}

#[cfg(test)]
mod tests {
    use super::next_chunk;

    fn chunks(len: usize, first: usize, chunk: usize) -> Vec<usize> {
        let mut out = Vec::new();
        let mut done = 0;
        while done < len {
            let n = next_chunk(done, len, first, chunk);
            out.push(n);
            done += n;
        }
        out
    }

    #[test]
    fn prompts_split_at_fixed_positions() {
        assert_eq!(chunks(1100, 16, 512), vec![16, 512, 512, 60]);
        assert_eq!(chunks(10, 16, 512), vec![10]);
        assert_eq!(chunks(1024, 512, 512), vec![512, 512]);
        assert_eq!(chunks(5, 1, 2), vec![1, 2, 2]);
    }
}
