//! Turns chunk arrival times and the engine's report into [`Metrics`], by the definitions in
//! the README ("How accurate are the numbers"). Times are ms since the request was sent, on a
//! monotonic clock.
//!
//! - TTFT: the first chunk with text of any kind (reasoning or answer); role-only and empty
//!   chunks never count. `ttfot_ms`: the first answer chunk.
//! - Streamed tokens: the chunks' own counts where the engine gives them (Ollama: one per line),
//!   else the engine's count less an end-of-sequence token it counted but never streamed.
//! - Decode rate: the tokens that arrived after the first chunk / (last chunk - first chunk).
//! - ITL: per token: each gap between chunks divided among the tokens the later chunk carried.
//! - Fewer than 2 streamed tokens: no rate (`null`, with `null_reason`), never an infinity.

use crate::backend::EngineReport;
use bench_schemas::metrics::percentiles;
use bench_schemas::{Metrics, TokenCountSource};

/// What a run was asked to measure, for the flags that compare it with what happened.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RunSpec {
    /// Tokens of the measured prompt (depth excluded), when the agent built it.
    pub measured_prompt_tokens: Option<u64>,
    /// Context filled before the measured prompt.
    pub depth: u64,
    /// `Some(max_tokens)` when the job asked for exactly that many tokens.
    pub fixed_output: Option<u32>,
    /// Whether the prompt should have been processed without the engine's cache.
    pub cold_prompt: bool,
    /// The first request after a model load.
    pub cold: bool,
}

/// One content chunk: when it arrived, the tokens it holds when the engine says.
#[derive(Debug, Clone, Copy)]
struct Chunk {
    t_ms: f64,
    tokens: Option<u64>,
}

/// Arrival records of one run's content chunks.
#[derive(Debug, Default, Clone)]
pub struct Measure {
    chunks: Vec<Chunk>,
    first_answer_ms: Option<f64>,
    output_chars: u64,
}

/// Engine stop reasons that mean "the model ended the text" (so a counted end-of-sequence or
/// stop-string token may not have been streamed), as opposed to `length`.
fn ended_by_model(done_reason: Option<&str>) -> bool {
    matches!(
        done_reason,
        Some("stop" | "eos" | "stop_sequence" | "end_turn")
    )
}

impl Measure {
    /// Records a non-empty chunk that arrived `t_ms` after the request was sent. `reasoning`
    /// marks a reasoning model's thinking, which counts for TTFT but not for `ttfot_ms`.
    pub fn chunk(&mut self, t_ms: f64, text: &str, tokens: Option<u64>, reasoning: bool) {
        if text.is_empty() {
            return;
        }
        self.chunks.push(Chunk { t_ms, tokens });
        if !reasoning && self.first_answer_ms.is_none() {
            self.first_answer_ms = Some(t_ms);
        }
        self.output_chars += text.chars().count() as u64;
    }

    /// Tokens that arrived as content (see the module docs).
    fn streamed_tokens(&self, report: &EngineReport) -> u64 {
        let n_chunks = self.chunks.len() as u64;
        if n_chunks > 0 && self.chunks.iter().all(|c| c.tokens.is_some()) {
            return self.chunks.iter().map(|c| c.tokens.unwrap_or(0)).sum();
        }
        match report.gen_tokens {
            None => n_chunks,
            Some((engine, _)) => {
                let eos =
                    u64::from(ended_by_model(report.done_reason.as_deref()) && engine > n_chunks);
                // Every chunk holds at least one token.
                (engine - eos).max(n_chunks)
            }
        }
    }

    /// Every inter-token gap of the run, ms: each gap between chunks divided among the tokens
    /// the later chunk carried, one sample per token (at least one per chunk).
    pub fn itl_gaps(&self, report: &EngineReport) -> Vec<f64> {
        self.itl_of(self.streamed_tokens(report))
    }

    fn itl_of(&self, streamed: u64) -> Vec<f64> {
        let n_chunks = self.chunks.len() as u64;
        let avg = if n_chunks > 0 {
            streamed as f64 / n_chunks as f64
        } else {
            1.0
        };
        let mut itl = Vec::with_capacity(streamed as usize);
        for w in self.chunks.windows(2) {
            let k = w[1].tokens.map_or(avg, |t| t as f64).max(f64::MIN_POSITIVE);
            let per = (w[1].t_ms - w[0].t_ms) / k;
            for _ in 0..(k.round() as u64).max(1) {
                itl.push(per);
            }
        }
        itl
    }

    /// The metrics of the run. `total_ms` is when the engine's final message arrived.
    pub fn finish(
        &self,
        repeat_index: u32,
        warmup: bool,
        total_ms: f64,
        report: &EngineReport,
        spec: &RunSpec,
    ) -> Metrics {
        let n_chunks = self.chunks.len() as u64;
        let (gen_tokens, source) = report
            .gen_tokens
            .unwrap_or((n_chunks, TokenCountSource::ChunkCount));
        let streamed = self.streamed_tokens(report);
        // Tokens of a chunk that carries no count: the run's average per chunk.
        let avg = if n_chunks > 0 {
            streamed as f64 / n_chunks as f64
        } else {
            1.0
        };
        let tokens_of = |c: &Chunk| c.tokens.map_or(avg, |t| t as f64);
        let first = self.chunks.first();
        let last = self.chunks.last();
        let ttft_ms = first.map_or(f64::NAN, |c| c.t_ms);
        let mut null_reason = None;
        let gen_tokens_per_s = match (first, last) {
            (None, _) | (_, None) => {
                null_reason = Some("no tokens were generated".to_string());
                None
            }
            (Some(a), Some(b)) if streamed >= 2 && b.t_ms > a.t_ms => {
                let after_first = streamed as f64 - tokens_of(a);
                Some(after_first / ((b.t_ms - a.t_ms) / 1000.0))
            }
            _ => {
                null_reason = Some(format!(
                    "{streamed} token(s) in {n_chunks} chunk(s): a decode rate needs tokens arriving at two times"
                ));
                None
            }
        };
        let itl = self.itl_of(streamed);
        let measured_prompt = spec.measured_prompt_tokens.or(report.prompt_tokens);
        let client_pp = match measured_prompt {
            Some(p) if ttft_ms.is_finite() && ttft_ms > 0.0 => Some(p as f64 / (ttft_ms / 1000.0)),
            _ => None,
        };
        let prompt_cache_hit = spec.cold_prompt
            && match (report.prompt_evaluated, measured_prompt) {
                (Some(evaluated), Some(want)) => evaluated < want,
                _ => false,
            };
        let short_output = spec
            .fixed_output
            .is_some_and(|want| gen_tokens.max(streamed) < u64::from(want));
        Metrics {
            repeat_index,
            warmup,
            cold: spec.cold,
            ttft_ms,
            ttfot_ms: self.first_answer_ms,
            total_ms,
            gen_tokens,
            token_count_source: source,
            streamed_tokens: streamed,
            gen_tokens_per_s,
            tpot_ms: gen_tokens_per_s.filter(|r| *r > 0.0).map(|r| 1000.0 / r),
            itl_ms: percentiles(&itl),
            prompt_tokens: report.prompt_tokens,
            prompt_tokens_per_s: client_pp,
            prompt_evaluated: report.prompt_evaluated,
            prompt_cache_hit,
            pp_tokens_per_s: report.prompt_tokens_per_s.or(client_pp),
            tg_tokens_per_s: gen_tokens_per_s,
            load_ms: report.load_ms,
            engine_gen_tokens_per_s: report.gen_tokens_per_s,
            engine_prompt_tokens_per_s: report.prompt_tokens_per_s,
            engine_gen_ms: report.gen_ms,
            engine_prompt_ms: report.prompt_ms,
            engine_total_ms: report.total_ms,
            chunks: n_chunks,
            output_chars: self.output_chars,
            done_reason: report.done_reason.clone(),
            telemetry: None,
            cell: None,
            stream: None,
            start_ms: None,
            short_output,
            null_reason,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(n: u64, reason: &str) -> EngineReport {
        EngineReport {
            gen_tokens: Some((n, TokenCountSource::LlamacppTimings)),
            prompt_tokens: Some(20),
            done_reason: Some(reason.into()),
            ..Default::default()
        }
    }

    #[test]
    fn definitions() {
        let mut m = Measure::default();
        for (i, t) in [100.0, 110.0, 130.0, 160.0].iter().enumerate() {
            m.chunk(*t, if i == 0 { "ab" } else { "c" }, None, false);
        }
        let x = m.finish(0, false, 170.0, &report(4, "length"), &RunSpec::default());
        assert_eq!((x.ttft_ms, x.total_ms, x.gen_tokens), (100.0, 170.0, 4));
        assert_eq!(x.gen_tokens_per_s, Some(3.0 / 0.060));
        assert!((x.tpot_ms.unwrap() - 20.0).abs() < 1e-9);
        let itl = x.itl_ms.unwrap();
        assert_eq!((itl.p50, itl.p90, itl.p99), (20.0, 30.0, 30.0));
        assert_eq!(x.prompt_tokens_per_s, Some(200.0));
        assert_eq!((x.chunks, x.output_chars), (4, 5));
    }

    #[test]
    fn a_counted_end_of_sequence_does_not_inflate_the_rate() {
        let mut m = Measure::default();
        for t in [100.0, 110.0, 120.0] {
            m.chunk(t, "x", None, false);
        }
        // The engine counts 4 (the EOS), 3 arrived: 2 after the first, over 20 ms.
        let x = m.finish(0, false, 125.0, &report(4, "stop"), &RunSpec::default());
        assert_eq!((x.gen_tokens, x.streamed_tokens), (4, 3));
        assert_eq!(x.gen_tokens_per_s, Some(100.0));
        // Cut by length: every counted token was streamed (multi-token chunks).
        let x = m.finish(0, false, 125.0, &report(6, "length"), &RunSpec::default());
        assert_eq!(x.streamed_tokens, 6);
        assert_eq!(x.gen_tokens_per_s, Some(4.0 / 0.020));
    }

    #[test]
    fn counted_chunks_reasoning_and_flags() {
        let mut m = Measure::default();
        m.chunk(50.0, "think", Some(1), true);
        m.chunk(60.0, "", Some(1), false); // empty: never a token
        m.chunk(70.0, "ab", Some(2), false);
        m.chunk(80.0, "c", Some(1), false);
        let spec = RunSpec {
            measured_prompt_tokens: Some(20),
            fixed_output: Some(8),
            cold_prompt: true,
            ..Default::default()
        };
        let r = EngineReport {
            prompt_evaluated: Some(12),
            ..report(9, "stop")
        };
        let x = m.finish(0, false, 90.0, &r, &spec);
        assert_eq!((x.ttft_ms, x.ttfot_ms), (50.0, Some(70.0)));
        assert_eq!(x.streamed_tokens, 4, "the chunks' own counts win");
        assert_eq!(x.gen_tokens_per_s, Some(3.0 / 0.030));
        let itl = x.itl_ms.unwrap();
        assert_eq!(
            (itl.p50, itl.p99),
            (10.0, 10.0),
            "20 ms over 2 tokens = 10 each"
        );
        assert!(x.prompt_cache_hit, "12 of 20 prompt tokens evaluated");
        assert!(!x.short_output, "the engine counted 9 >= 8");
    }

    #[test]
    fn no_or_one_token_gives_null_rates_with_a_reason() {
        let mut m = Measure::default();
        m.chunk(5.0, "x", None, false);
        let x = m.finish(1, true, 9.0, &EngineReport::default(), &RunSpec::default());
        assert_eq!(
            (x.gen_tokens, x.token_count_source),
            (1, TokenCountSource::ChunkCount)
        );
        assert_eq!(x.gen_tokens_per_s, None);
        assert!(x.null_reason.as_deref().unwrap().contains("two times"));
        assert!(x.warmup);
        let spec = RunSpec {
            fixed_output: Some(4),
            ..Default::default()
        };
        let empty = Measure::default().finish(0, false, 9.0, &EngineReport::default(), &spec);
        assert!(empty.ttft_ms.is_nan(), "no fabricated TTFT");
        assert_eq!(empty.gen_tokens, 0);
        assert!(empty.short_output);
        assert_eq!(
            empty.null_reason.as_deref(),
            Some("no tokens were generated")
        );
        assert_eq!(empty.prompt_tokens_per_s, None);
    }
}
