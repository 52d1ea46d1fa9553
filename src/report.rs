//! Output for people (tables) and scripts (JSON).

use crate::gguf::{GgufError, GgufFile, KvCacheType, ModelInfo};

/// "outer: inner: innermost", skipping causes already contained in their parent's text.
pub fn error_chain(e: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if !parts.last().is_some_and(|p| p.contains(&text)) {
            parts.push(text);
        }
    }
    parts.join(": ")
}

/// `logquant inspect` as data: what the table shows, for scripts.
pub fn inspect_json(file: &GgufFile, info: &ModelInfo, n_ctx: u64) -> Result<serde_json::Value, GgufError> {
    let n_ctx = u32::try_from(n_ctx).unwrap_or(u32::MAX);
    let mut kv = Vec::new();
    // A type whose blocks do not divide this model's rows cannot hold its cache: null.
    for t in KvCacheType::ALL {
        kv.push(serde_json::json!({
            "cache_type": t.name(),
            "bits_per_value": t.bits_per_value(),
            "bytes_per_token_all_layers": info.kv_bytes_per_token(t, t).ok(),
            "bytes_at_ctx": info.kv_bytes(n_ctx, t, t, false, 1, 512).ok(),
        }));
    }
    let types: Vec<_> = info
        .tensor_types
        .iter()
        .map(|s| serde_json::json!({"type": s.ggml_type.name(), "tensors": s.n_tensors, "bytes": s.n_bytes, "share": s.share}))
        .collect();
    Ok(serde_json::json!({
        "path": file.path(),
        "gguf_version": file.version(),
        "file_size": info.file_size,
        "architecture": info.architecture,
        "name": info.name,
        "n_layer": info.n_layer,
        "n_embd": info.n_embd,
        "n_head": info.n_head,
        "n_head_kv": info.n_head_kv,
        "head_dim_k": info.head_dim_k,
        "head_dim_v": info.head_dim_v,
        "n_ctx_train": info.n_ctx_train,
        "n_vocab": info.n_vocab,
        "n_params": info.n_params,
        "sliding_window": info.sliding_window,
        "swa_layers": info.swa_layers,
        "swa_pattern_known": info.swa_pattern_known,
        "tensor_types": types,
        "kv_cache": {"ctx": n_ctx, "swa_full": false, "n_seq": 1, "n_ubatch": 512, "types": kv},
    }))
}

/// `logquant inspect` for people.
pub fn inspect_text(file: &GgufFile, info: &ModelInfo, n_ctx: u64) -> Result<String, GgufError> {
    use std::fmt::Write;
    let n_ctx32 = u32::try_from(n_ctx).unwrap_or(u32::MAX);
    let mut o = String::new();
    let uniform = |v: &[u32]| v.first().filter(|&&x| v.iter().all(|&y| y == x)).map(|x| x.to_string());
    let _ = writeln!(
        o,
        "file:            {} (GGUF v{}, {} MiB)",
        file.path().display(),
        file.version(),
        mib(info.file_size)
    );
    let _ = writeln!(
        o,
        "architecture:    {}{}",
        info.architecture,
        info.name.as_deref().map(|n| format!(" ({n})")).unwrap_or_default()
    );
    let _ = writeln!(o, "parameters:      {:.1} M", info.n_params as f64 / 1e6);
    let _ = writeln!(o, "layers:          {}", info.n_layer);
    let _ = writeln!(o, "embedding:       {}", info.n_embd);
    let _ = writeln!(
        o,
        "heads:           {}",
        uniform(&info.n_head_per_layer).unwrap_or_else(|| format!("{:?}", info.n_head_per_layer))
    );
    let _ =
        writeln!(o, "KV heads:        {}", uniform(&info.n_head_kv).unwrap_or_else(|| format!("{:?}", info.n_head_kv)));
    let _ = writeln!(o, "head size K/V:   {}/{}", info.head_dim_k, info.head_dim_v);
    let _ = writeln!(o, "training ctx:    {}", info.n_ctx_train);
    let _ = writeln!(o, "vocabulary:      {}", info.n_vocab);
    if info.sliding_window > 0 {
        let layout: String = info.swa_layers.iter().map(|&s| if s { 'S' } else { 'G' }).collect();
        let _ = writeln!(
            o,
            "sliding window:  {} tokens on {} of {} layers{} (S = sliding, G = global): {layout}",
            info.sliding_window,
            info.n_swa_layers(),
            info.n_layer,
            if info.swa_pattern_known { "" } else { " (pattern unknown: KV figures are upper bounds)" }
        );
    } else {
        let _ = writeln!(o, "sliding window:  none");
    }
    let _ = writeln!(o, "\ntensor types:");
    let mut t = Table::new(&["type", "tensors", "MiB", "share of file %"]);
    for s in &info.tensor_types {
        t.row(vec![
            s.ggml_type.name().into(),
            s.n_tensors.to_string(),
            mib(s.n_bytes),
            format!("{:.1}", 100.0 * s.share),
        ]);
    }
    o += &t.render();
    let _ = writeln!(
        o,
        "\nKV cache (K and V of one type; {n_ctx} tokens, 1 sequence, swa_full = false as in llama.cpp's tools):"
    );
    let mut t = Table::new(&[
        "cache type",
        "bits/value",
        "bytes/token (all layers)",
        &format!("MiB at {n_ctx}"),
        "bytes/token at ctx",
    ]);
    for ty in KvCacheType::ALL {
        let row = match (info.kv_bytes(n_ctx32, ty, ty, false, 1, 512), info.kv_bytes_per_token(ty, ty)) {
            (Ok(total), Ok(per_token)) => {
                vec![per_token.to_string(), mib(total), format!("{:.0}", total as f64 / n_ctx.max(1) as f64)]
            }
            // Its blocks do not divide this model's K/V rows.
            _ => vec!["n/a".into(), "n/a".into(), "n/a".into()],
        };
        t.row([vec![ty.name().into(), format!("{:.2}", ty.bits_per_value())], row].concat());
    }
    o += &t.render();
    Ok(o)
}

/// A plain-text table with right-aligned numeric columns, for people.
pub struct Table {
    headers: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(headers: &[&str]) -> Table {
        Table { headers: headers.iter().map(|h| h.to_string()).collect(), rows: Vec::new() }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// Markdown-compatible: the same text reads in a terminal and pastes into BENCHMARKS.md.
    pub fn render(&self) -> String {
        let n = self.headers.len();
        let mut width: Vec<usize> = self.headers.iter().map(|h| h.chars().count()).collect();
        for r in &self.rows {
            for (i, c) in r.iter().enumerate().take(n) {
                width[i] = width[i].max(c.chars().count());
            }
        }
        let numeric = |i: usize| {
            self.rows.iter().all(|r| {
                r.get(i).is_some_and(|c| c.starts_with(|ch: char| ch.is_ascii_digit() || ch == '-' || ch == '+'))
            })
        };
        let line = |cells: &[String]| {
            let parts: Vec<String> = (0..n)
                .map(|i| {
                    let c = cells.get(i).map(String::as_str).unwrap_or("");
                    if numeric(i) {
                        format!("{c:>w$}", w = width[i])
                    } else {
                        format!("{c:<w$}", w = width[i])
                    }
                })
                .collect();
            format!("| {} |\n", parts.join(" | "))
        };
        let mut out = line(&self.headers);
        let rule: Vec<String> = (0..n)
            .map(|i| if numeric(i) { format!("{}:", "-".repeat(width[i] - 1)) } else { "-".repeat(width[i]) })
            .collect();
        out += &format!("| {} |\n", rule.join(" | "));
        for r in &self.rows {
            out += &line(r);
        }
        out
    }
}

pub fn mib(bytes: u64) -> String {
    format!("{:.2}", bytes as f64 / (1024.0 * 1024.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_aligns_numbers_right_and_text_left() {
        let mut t = Table::new(&["name", "value"]);
        t.row(vec!["f16".into(), "1.5".into()]);
        t.row(vec!["q4_0".into(), "12.25".into()]);
        let s = t.render();
        assert!(s.contains("| f16  |   1.5 |"), "{s}");
        assert!(s.contains("| ---- | ----: |"), "{s}");
    }

    #[test]
    fn error_chain_skips_repeats() {
        let e = anyhow::anyhow!("inner problem").context("outer: inner problem");
        assert_eq!(error_chain(&e), "outer: inner problem");
        let e = anyhow::anyhow!("inner").context("outer");
        assert_eq!(error_chain(&e), "outer: inner");
    }
}
