//! Every number a benchmark reports, with its definition. Times are milliseconds on the agent's
//! monotonic clock, measured from the moment the request was sent to the engine.

use serde::{Deserialize, Deserializer, Serialize};

/// Reads a number that may be `null`: JSON has no NaN or infinity, so serde_json writes a
/// non-finite `f64` as `null`, and a record carrying one must still be read back (as NaN: every
/// summary skips non-finite samples) rather than refused as invalid.
pub fn nullable_f64<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

/// Where `gen_tokens` came from.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum TokenCountSource {
    /// Ollama's `eval_count`.
    OllamaEvalCount,
    /// llama.cpp's `timings.predicted_n`.
    LlamacppTimings,
    /// OpenAI `usage.completion_tokens` (requested with `stream_options.include_usage`).
    OpenaiUsage,
    /// Number of content chunks: only when the engine reported no count (an approximation).
    ChunkCount,
    /// The mock backend's own count.
    Mock,
    /// A source this version does not know.
    #[serde(other)]
    Unknown,
}

/// p50/p90/p99 of a distribution.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq)]
pub struct Percentiles {
    /// Median.
    #[serde(deserialize_with = "nullable_f64")]
    pub p50: f64,
    /// 90th percentile.
    #[serde(deserialize_with = "nullable_f64")]
    pub p90: f64,
    /// 99th percentile.
    #[serde(deserialize_with = "nullable_f64")]
    pub p99: f64,
}

/// The metrics of one repeat.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Metrics {
    /// 0-based index over all runs, warmups first.
    pub repeat_index: u32,
    /// A warmup run (excluded from the summary).
    pub warmup: bool,
    /// Request sent -> first non-empty content chunk.
    #[serde(deserialize_with = "nullable_f64")]
    pub ttft_ms: f64,
    /// Request sent -> last chunk.
    #[serde(deserialize_with = "nullable_f64")]
    pub total_ms: f64,
    /// Generated tokens, as the engine counted them.
    pub gen_tokens: u64,
    /// Which count `gen_tokens` is.
    pub token_count_source: TokenCountSource,
    /// Decode rate: (gen_tokens - 1) / (t_last_token - t_first_token). None below 2 tokens.
    pub gen_tokens_per_s: Option<f64>,
    /// Time per output token after the first: 1000 / gen_tokens_per_s.
    pub tpot_ms: Option<f64>,
    /// Inter-token latency: gaps between content chunks, each divided by the tokens it carried.
    pub itl_ms: Option<Percentiles>,
    /// Tokens in the prompt, as the engine counted them.
    pub prompt_tokens: Option<u64>,
    /// Prompt processing rate: prompt_tokens / ttft.
    pub prompt_tokens_per_s: Option<f64>,
    /// Model load time the engine reported (Ollama `load_duration`).
    pub load_ms: Option<f64>,
    /// The engine's own decode rate (Ollama eval_count/eval_duration, llama.cpp timings).
    pub engine_gen_tokens_per_s: Option<f64>,
    /// The engine's own prompt rate.
    pub engine_prompt_tokens_per_s: Option<f64>,
    /// The engine's own decode time.
    pub engine_gen_ms: Option<f64>,
    /// The engine's own prompt time.
    pub engine_prompt_ms: Option<f64>,
    /// The engine's own end-to-end time (Ollama `total_duration`).
    pub engine_total_ms: Option<f64>,
    /// Content chunks received.
    pub chunks: u64,
    /// Characters of generated text.
    pub output_chars: u64,
    /// Why generation stopped (`stop`, `length`, ...), as the engine said.
    pub done_reason: Option<String>,
}

/// median, mean, stdev (sample), min, max over the measured repeats.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq)]
pub struct Stats {
    /// Number of samples.
    pub n: u32,
    /// Median.
    #[serde(deserialize_with = "nullable_f64")]
    pub median: f64,
    /// Arithmetic mean.
    #[serde(deserialize_with = "nullable_f64")]
    pub mean: f64,
    /// Sample standard deviation (0 for one sample).
    #[serde(deserialize_with = "nullable_f64")]
    pub stdev: f64,
    /// Smallest.
    #[serde(deserialize_with = "nullable_f64")]
    pub min: f64,
    /// Largest.
    #[serde(deserialize_with = "nullable_f64")]
    pub max: f64,
}

impl Stats {
    /// Stats of the finite samples, or None when there are none.
    pub fn from_samples(samples: impl IntoIterator<Item = f64>) -> Option<Self> {
        let mut v: Vec<f64> = samples.into_iter().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let mean = v.iter().sum::<f64>() / n as f64;
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        let stdev = if n > 1 {
            (v.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt()
        } else {
            0.0
        };
        Some(Self {
            n: n as u32,
            median,
            mean,
            stdev,
            min: v[0],
            max: v[n - 1],
        })
    }
}

/// Nearest-rank percentiles of the samples, or None when there are none.
pub fn percentiles(samples: &[f64]) -> Option<Percentiles> {
    if samples.is_empty() {
        return None;
    }
    let mut v = samples.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = |p: f64| {
        let i = ((p / 100.0) * v.len() as f64).ceil() as usize;
        v[i.clamp(1, v.len()) - 1]
    };
    Some(Percentiles {
        p50: rank(50.0),
        p90: rank(90.0),
        p99: rank(99.0),
    })
}

/// The summary of a job's measured repeats on one machine.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
pub struct Summary {
    /// Measured repeats summarised.
    pub repeats: u32,
    /// Over `ttft_ms`.
    pub ttft_ms: Option<Stats>,
    /// Over `gen_tokens_per_s`.
    pub gen_tokens_per_s: Option<Stats>,
    /// Over `total_ms`.
    pub total_ms: Option<Stats>,
    /// Over `tpot_ms`.
    pub tpot_ms: Option<Stats>,
    /// Over `gen_tokens`.
    pub gen_tokens: Option<Stats>,
    /// Over `prompt_tokens_per_s`.
    pub prompt_tokens_per_s: Option<Stats>,
}

impl Summary {
    /// Summarises the non-warmup repeats.
    pub fn of(runs: &[Metrics]) -> Self {
        let measured: Vec<&Metrics> = runs.iter().filter(|m| !m.warmup).collect();
        let over = |f: &dyn Fn(&Metrics) -> Option<f64>| {
            Stats::from_samples(measured.iter().filter_map(|m| f(m)))
        };
        Self {
            repeats: measured.len() as u32,
            ttft_ms: over(&|m| Some(m.ttft_ms)),
            gen_tokens_per_s: over(&|m| m.gen_tokens_per_s),
            total_ms: over(&|m| Some(m.total_ms)),
            tpot_ms: over(&|m| m.tpot_ms),
            gen_tokens: over(&|m| Some(m.gen_tokens as f64)),
            prompt_tokens_per_s: over(&|m| m.prompt_tokens_per_s),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats() {
        let s = Stats::from_samples([4.0, 1.0, 3.0, 2.0]).unwrap();
        assert_eq!(
            (s.n, s.median, s.mean, s.min, s.max),
            (4, 2.5, 2.5, 1.0, 4.0)
        );
        assert!((s.stdev - 1.2909944487358056).abs() < 1e-12);
        let one = Stats::from_samples([7.0]).unwrap();
        assert_eq!((one.median, one.stdev), (7.0, 0.0));
        assert!(Stats::from_samples([f64::NAN]).is_none());
    }

    #[test]
    fn non_finite_numbers_round_trip_as_null() {
        let s = Stats::from_samples([1.0]).unwrap();
        let inf = Stats {
            mean: f64::INFINITY,
            ..s
        };
        let json = serde_json::to_string(&inf).unwrap();
        assert!(json.contains("\"mean\":null"), "{json}");
        let back: Stats = serde_json::from_str(&json).unwrap();
        assert!(back.mean.is_nan() && back.median == 1.0);
    }

    #[test]
    fn nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        let p = percentiles(&v).unwrap();
        assert_eq!((p.p50, p.p90, p.p99), (50.0, 90.0, 99.0));
        assert_eq!(percentiles(&[5.0]).unwrap().p99, 5.0);
        assert!(percentiles(&[]).is_none());
    }
}
