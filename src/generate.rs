//! Text generation: prefill the prompt, then sample token by token.

use std::time::Instant;

use crate::engine::EngineError;
use crate::llama::{Batch, Sampler, SamplerParams, Token};
use crate::session::Session;

#[derive(Clone, Debug)]
pub struct GenerateParams {
    pub n_predict: usize,
    pub sampler: SamplerParams,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct GenerateStats {
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    pub prompt_seconds: f64,
    pub generate_seconds: f64,
    /// True when generation stopped because the context was full.
    pub hit_context_limit: bool,
    /// True when the model produced an end-of-generation token.
    pub stopped_at_eog: bool,
}

impl GenerateStats {
    pub fn prompt_tokens_per_second(&self) -> f64 {
        rate(self.prompt_tokens, self.prompt_seconds)
    }
    pub fn generated_tokens_per_second(&self) -> f64 {
        rate(self.generated_tokens, self.generate_seconds)
    }
}

fn rate(n: usize, secs: f64) -> f64 {
    if secs > 0.0 {
        n as f64 / secs
    } else {
        0.0
    }
}

/// Generates after `prompt` (already tokenized), calling `on_text` with each piece
/// of text as soon as it forms whole UTF-8 characters. Returns the generated tokens.
pub fn generate(
    ctx: &mut Session,
    prompt: &[Token],
    params: &GenerateParams,
    mut on_text: impl FnMut(&str),
) -> Result<(Vec<Token>, GenerateStats), EngineError> {
    let n_ctx = ctx.n_ctx() as usize;
    if prompt.is_empty() {
        return Err(EngineError::Input("the prompt is empty: give some text with -p".into()));
    }
    if prompt.len() >= n_ctx {
        return Err(EngineError::Input(format!(
            "the prompt is {} tokens but the context holds {n_ctx}; raise -c or shorten the prompt",
            prompt.len()
        )));
    }
    let model = ctx.model();
    let mut sampler = Sampler::new(&params.sampler);
    let n_batch = ctx.max_tokens_per_sequence();
    let mut batch = Batch::new(n_batch)?;

    let t0 = Instant::now();
    for (chunk_index, chunk) in prompt.chunks(n_batch).enumerate() {
        batch.clear();
        let base = chunk_index * n_batch;
        for (j, &t) in chunk.iter().enumerate() {
            let pos = base + j;
            batch.add(t, pos as i32, 0, pos + 1 == prompt.len())?;
        }
        ctx.decode(&batch)?;
    }
    let prompt_seconds = t0.elapsed().as_secs_f64();

    let t1 = Instant::now();
    let mut out = Vec::new();
    let mut pending: Vec<u8> = Vec::new();
    let mut pos = prompt.len();
    let mut stopped_at_eog = false;
    let mut hit_context_limit = false;
    while out.len() < params.n_predict {
        let token = sampler.sample(ctx, batch.len() - 1)?;
        if model.is_eog(token) {
            stopped_at_eog = true;
            break;
        }
        out.push(token);
        pending.extend(model.token_bytes(token)?);
        emit_complete_utf8(&mut pending, &mut on_text);
        if out.len() == params.n_predict {
            break;
        }
        if pos >= n_ctx {
            hit_context_limit = true;
            break;
        }
        batch.clear();
        batch.add(token, pos as i32, 0, true)?;
        ctx.decode(&batch)?;
        pos += 1;
    }
    if !pending.is_empty() {
        on_text(&String::from_utf8_lossy(&pending));
    }
    let stats = GenerateStats {
        prompt_tokens: prompt.len(),
        generated_tokens: out.len(),
        prompt_seconds,
        generate_seconds: t1.elapsed().as_secs_f64(),
        hit_context_limit,
        stopped_at_eog,
    };
    Ok((out, stats))
}

/// Passes on the longest prefix of `pending` that is valid UTF-8 and keeps the rest
/// (a character split over two tokens).
fn emit_complete_utf8(pending: &mut Vec<u8>, on_text: &mut impl FnMut(&str)) {
    let valid = match std::str::from_utf8(pending) {
        Ok(_) => pending.len(),
        Err(e) if e.error_len().is_none() => e.valid_up_to(),
        // An invalid sequence (not just an incomplete one): emit it lossily.
        Err(_) => pending.len(),
    };
    if valid > 0 {
        on_text(&String::from_utf8_lossy(&pending[..valid]));
        pending.drain(..valid);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utf8_split_across_tokens_is_held_back() {
        let mut out = String::new();
        let mut pending = "é".as_bytes()[..1].to_vec();
        emit_complete_utf8(&mut pending, &mut |s| out.push_str(s));
        assert_eq!(out, "");
        pending.extend(&"é".as_bytes()[1..]);
        pending.extend(b"x");
        emit_complete_utf8(&mut pending, &mut |s| out.push_str(s));
        assert_eq!(out, "éx");
        assert!(pending.is_empty());
    }
}
