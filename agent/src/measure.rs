//! Turns chunk arrival times and the engine's report into [`Metrics`], exactly as
//! DESIGN.md defines them. Times are ms since the request was sent, on a monotonic clock.

use crate::backend::EngineReport;
use bench_schemas::metrics::percentiles;
use bench_schemas::{Metrics, TokenCountSource};

/// Arrival records of one run's content chunks.
#[derive(Debug, Default, Clone)]
pub struct Measure {
    chunks: Vec<(f64, Option<u64>)>,
    output_chars: u64,
}

impl Measure {
    /// Records a non-empty content chunk that arrived `t_ms` after the request was sent.
    pub fn chunk(&mut self, t_ms: f64, text: &str, tokens: Option<u64>) {
        self.chunks.push((t_ms, tokens));
        self.output_chars += text.chars().count() as u64;
    }

    /// The metrics of the run. `total_ms` is when the engine's final message arrived.
    pub fn finish(
        &self,
        repeat_index: u32,
        warmup: bool,
        total_ms: f64,
        report: &EngineReport,
    ) -> Metrics {
        let n_chunks = self.chunks.len() as u64;
        let (gen_tokens, source) = report
            .gen_tokens
            .unwrap_or((n_chunks, TokenCountSource::ChunkCount));
        let t_first = self.chunks.first().map(|c| c.0);
        let t_last = self.chunks.last().map(|c| c.0);
        // With nothing generated there is no first token: TTFT is the whole request.
        let ttft_ms = t_first.unwrap_or(total_ms);
        let gen_tokens_per_s = match (t_first, t_last) {
            (Some(a), Some(b)) if gen_tokens >= 2 && b > a => {
                Some((gen_tokens - 1) as f64 / ((b - a) / 1000.0))
            }
            _ => None,
        };
        // Chunks that carry no count get the run's average tokens per chunk.
        let avg = if n_chunks > 0 {
            (gen_tokens as f64 / n_chunks as f64).max(f64::MIN_POSITIVE)
        } else {
            1.0
        };
        let gaps: Vec<f64> = self
            .chunks
            .windows(2)
            .map(|w| {
                let per = w[1].1.map(|t| t as f64).filter(|t| *t > 0.0).unwrap_or(avg);
                (w[1].0 - w[0].0) / per
            })
            .collect();
        let prompt_tokens_per_s = match report.prompt_tokens {
            Some(p) if ttft_ms > 0.0 && t_first.is_some() => Some(p as f64 / (ttft_ms / 1000.0)),
            _ => None,
        };
        Metrics {
            repeat_index,
            warmup,
            ttft_ms,
            total_ms,
            gen_tokens,
            token_count_source: source,
            gen_tokens_per_s,
            tpot_ms: gen_tokens_per_s.filter(|r| *r > 0.0).map(|r| 1000.0 / r),
            itl_ms: percentiles(&gaps),
            prompt_tokens: report.prompt_tokens,
            prompt_tokens_per_s,
            load_ms: report.load_ms,
            engine_gen_tokens_per_s: report.gen_tokens_per_s,
            engine_prompt_tokens_per_s: report.prompt_tokens_per_s,
            engine_gen_ms: report.gen_ms,
            engine_prompt_ms: report.prompt_ms,
            engine_total_ms: report.total_ms,
            chunks: n_chunks,
            output_chars: self.output_chars,
            done_reason: report.done_reason.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn definitions() {
        let mut m = Measure::default();
        for (i, t) in [100.0, 110.0, 130.0, 160.0].iter().enumerate() {
            m.chunk(*t, if i == 0 { "ab" } else { "c" }, None);
        }
        let report = EngineReport {
            gen_tokens: Some((4, TokenCountSource::OllamaEvalCount)),
            prompt_tokens: Some(20),
            ..Default::default()
        };
        let x = m.finish(0, false, 170.0, &report);
        assert_eq!((x.ttft_ms, x.total_ms, x.gen_tokens), (100.0, 170.0, 4));
        assert_eq!(x.gen_tokens_per_s, Some(3.0 / 0.060));
        assert!((x.tpot_ms.unwrap() - 20.0).abs() < 1e-9);
        let itl = x.itl_ms.unwrap();
        assert_eq!((itl.p50, itl.p90, itl.p99), (20.0, 30.0, 30.0));
        assert_eq!(x.prompt_tokens_per_s, Some(200.0));
        assert_eq!((x.chunks, x.output_chars), (4, 5));
    }

    #[test]
    fn no_engine_count_falls_back_to_chunks_and_says_so() {
        let mut m = Measure::default();
        m.chunk(5.0, "x", None);
        let x = m.finish(1, true, 9.0, &EngineReport::default());
        assert_eq!(
            (x.gen_tokens, x.token_count_source),
            (1, TokenCountSource::ChunkCount)
        );
        assert_eq!(x.gen_tokens_per_s, None);
        assert!(x.warmup);
        let empty = Measure::default().finish(0, false, 9.0, &EngineReport::default());
        assert_eq!((empty.ttft_ms, empty.gen_tokens), (9.0, 0));
    }
}
