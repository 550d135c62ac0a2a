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
    /// The first request after the engine loaded the model: reported apart, never mixed into
    /// the warm statistics, and not counted in `repeat`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cold: bool,
    /// Request sent -> first non-empty content chunk of any kind (reasoning or answer). `null`
    /// when nothing was generated (see `null_reason`).
    #[serde(deserialize_with = "nullable_f64")]
    pub ttft_ms: f64,
    /// Request sent -> first answer chunk (after any reasoning). Equals `ttft_ms` for a model
    /// that does not reason; `None` when no answer text came.
    #[serde(default)]
    pub ttfot_ms: Option<f64>,
    /// Request sent -> last chunk.
    #[serde(deserialize_with = "nullable_f64")]
    pub total_ms: f64,
    /// Generated tokens, as the engine counted them.
    pub gen_tokens: u64,
    /// Which count `gen_tokens` is.
    pub token_count_source: TokenCountSource,
    /// Tokens that arrived as content: the chunks' own counts where the engine gives them (one
    /// per Ollama line), else the engine's count less a counted-but-never-streamed
    /// end-of-sequence token. The decode rate and ITL are over these.
    #[serde(default)]
    pub streamed_tokens: u64,
    /// Decode rate: tokens that arrived after the first content chunk / (t_last_chunk -
    /// t_first_chunk). None below 2 streamed tokens (see `null_reason`).
    pub gen_tokens_per_s: Option<f64>,
    /// Time per output token after the first: 1000 / gen_tokens_per_s.
    pub tpot_ms: Option<f64>,
    /// Inter-token latency: gaps between content chunks, each divided by the tokens it carried.
    pub itl_ms: Option<Percentiles>,
    /// Tokens in the prompt, as the engine counted them (depth included).
    pub prompt_tokens: Option<u64>,
    /// Prompt processing rate measured by the client: measured prompt tokens (depth excluded,
    /// else `prompt_tokens`) / ttft.
    pub prompt_tokens_per_s: Option<f64>,
    /// Prompt tokens the engine evaluated (llama.cpp `timings.prompt_n`, Ollama
    /// `prompt_eval_count`): fewer than the prompt means the engine served some from its cache.
    #[serde(default)]
    pub prompt_evaluated: Option<u64>,
    /// The engine served part of a prompt that should have been processed cold from its cache
    /// (beyond the job's `depth`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub prompt_cache_hit: bool,
    /// llama-bench's `pp`: measured prompt tokens / the engine's own prompt time where it
    /// reports one, else / ttft.
    #[serde(default)]
    pub pp_tokens_per_s: Option<f64>,
    /// llama-bench's `tg`: the decode rate (`gen_tokens_per_s`), under llama-bench's name.
    #[serde(default)]
    pub tg_tokens_per_s: Option<f64>,
    /// The job asked for exactly `max_tokens` and the engine stopped earlier: excluded from the
    /// summary unless the job says `include_short`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub short_output: bool,
    /// Why a rate or TTFT is `null` (no token, or one token: no decode interval).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub null_reason: Option<String>,
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
    /// What the machine did during this run, and its energy over the decode window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub telemetry: Option<crate::telemetry::TelemetrySummary>,
    /// The matrix cell this run belongs to (absent for a job without a matrix).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cell: Option<String>,
    /// Load cells: which of the concurrent streams ran it (0-based).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream: Option<u32>,
    /// Load cells: when it was sent, ms since the cell's load began (monotonic clock).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_ms: Option<f64>,
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
    /// Lower end of the 95% confidence interval of the median: the exact distribution-free
    /// order-statistic interval (see [`median_ci`]). `None` below [`MIN_CI_SAMPLES`] samples.
    #[serde(default)]
    pub ci_low: Option<f64>,
    /// Upper end of that interval.
    #[serde(default)]
    pub ci_high: Option<f64>,
}

/// Fewest samples with a 95% interval of the median: with 5, even [min, max] covers the median
/// only 93.75% of the time.
pub const MIN_CI_SAMPLES: usize = 6;

/// The exact 95% confidence interval of the median of sorted finite samples, as 0-based
/// indices `(lo, hi)` into them: the order statistics `x(k)` and `x(n+1-k)` with the largest
/// `k` such that `P(Binomial(n, 1/2) < k) <= 2.5%`. Distribution-free (no normality, no
/// resampling, no seed), with coverage of at least 95%. `None` below [`MIN_CI_SAMPLES`].
pub fn median_ci(n: usize) -> Option<(usize, usize)> {
    if n < MIN_CI_SAMPLES {
        return None;
    }
    // P(B <= j) for B ~ Binomial(n, 1/2), accumulated in log space to stay finite at any n.
    let ln_half_n = n as f64 * 0.5f64.ln();
    let mut ln_c = 0.0f64; // ln C(n, j)
    let mut cdf = 0.0f64;
    let mut k = 0usize; // largest k with P(B <= k-1) <= 0.025
    for j in 0..n {
        if j > 0 {
            ln_c += ((n - j + 1) as f64).ln() - (j as f64).ln();
        }
        cdf += (ln_c + ln_half_n).exp();
        if cdf <= 0.025 {
            k = j + 1;
        } else {
            break;
        }
    }
    let k = k.max(1);
    Some((k - 1, n - k))
}

/// Whether two results differ beyond their intervals, and by how much the intervals overlap.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq)]
pub struct Separation {
    /// Both have a 95% interval and the intervals do not touch.
    pub separated: bool,
    /// Overlap of the two intervals as a percentage of the narrower one (0 when separated);
    /// `None` when either has no interval yet.
    pub overlap_pct: Option<f64>,
}

impl Separation {
    /// Compares the intervals of `a` and `b`.
    pub fn of(a: &Stats, b: &Stats) -> Self {
        match (a.ci_low, a.ci_high, b.ci_low, b.ci_high) {
            (Some(al), Some(ah), Some(bl), Some(bh)) => {
                let overlap = (ah.min(bh) - al.max(bl)).max(0.0);
                let narrower = (ah - al).min(bh - bl);
                let separated = al > bh || bl > ah;
                let pct = if separated {
                    0.0
                } else if narrower > 0.0 {
                    (overlap / narrower * 100.0).min(100.0)
                } else {
                    100.0
                };
                Self {
                    separated,
                    overlap_pct: Some(pct),
                }
            }
            _ => Self {
                separated: false,
                overlap_pct: None,
            },
        }
    }
}

impl Stats {
    /// Half the interval's width as a percentage of the median: the precision `repeat: "auto"`
    /// aims at. `None` without an interval or with a zero median.
    pub fn ci_half_width_pct(&self) -> Option<f64> {
        let (lo, hi) = (self.ci_low?, self.ci_high?);
        (self.median.abs() > 0.0).then(|| (hi - lo) / 2.0 / self.median.abs() * 100.0)
    }

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
        let ci = median_ci(n);
        Some(Self {
            n: n as u32,
            median,
            mean,
            stdev,
            min: v[0],
            max: v[n - 1],
            ci_low: ci.map(|(lo, _)| v[lo]),
            ci_high: ci.map(|(_, hi)| v[hi]),
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

/// The cold run, reported apart from the warm statistics.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq)]
pub struct ColdRun {
    /// Its TTFT.
    #[serde(deserialize_with = "nullable_f64")]
    pub ttft_ms: f64,
    /// Its total time.
    #[serde(deserialize_with = "nullable_f64")]
    pub total_ms: f64,
    /// The engine's model load time, where it reports one.
    pub load_ms: Option<f64>,
    /// Its decode rate.
    pub gen_tokens_per_s: Option<f64>,
}

/// The summary of a job's measured repeats on one machine.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
pub struct Summary {
    /// Measured repeats summarised (warm, not short unless the job includes short runs).
    pub repeats: u32,
    /// Measured repeats left out because the engine stopped before `max_tokens`.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub excluded_short: u32,
    /// The first request after a model load, when there was one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cold: Option<ColdRun>,
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
    /// Over `ttfot_ms`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttfot_ms: Option<Stats>,
    /// Over `pp_tokens_per_s` (llama-bench's pp).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pp_tokens_per_s: Option<Stats>,
    /// Over `tg_tokens_per_s` (llama-bench's tg).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tg_tokens_per_s: Option<Stats>,
    /// Over the runs' `telemetry.joules_per_token`, where a power source exists.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub joules_per_token: Option<Stats>,
    /// Over the runs' `telemetry.tokens_per_joule`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tokens_per_joule: Option<Stats>,
    /// Over the runs' mean total power, watts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub power_w: Option<Stats>,
}

fn is_zero(v: &u32) -> bool {
    *v == 0
}

impl Summary {
    /// Summarises the warm measured repeats: warmups and the cold run never count, and runs
    /// flagged `short_output` only when `include_short`.
    pub fn of(runs: &[Metrics], include_short: bool) -> Self {
        Self::of_refs(&runs.iter().collect::<Vec<_>>(), include_short)
    }

    /// [`Summary::of`] over borrowed runs (a subset, such as one matrix cell's, without
    /// copying them).
    pub fn of_refs(runs: &[&Metrics], include_short: bool) -> Self {
        let warm = || runs.iter().copied().filter(|m| !m.warmup && !m.cold);
        let measured: Vec<&Metrics> = warm()
            .filter(|m| include_short || !m.short_output)
            .collect();
        let over = |f: &dyn Fn(&Metrics) -> Option<f64>| {
            Stats::from_samples(measured.iter().filter_map(|m| f(m)))
        };
        Self {
            repeats: measured.len() as u32,
            excluded_short: (warm().count() - measured.len()) as u32,
            cold: runs.iter().find(|m| m.cold).map(|m| ColdRun {
                ttft_ms: m.ttft_ms,
                total_ms: m.total_ms,
                load_ms: m.load_ms,
                gen_tokens_per_s: m.gen_tokens_per_s,
            }),
            ttfot_ms: over(&|m| m.ttfot_ms),
            pp_tokens_per_s: over(&|m| m.pp_tokens_per_s),
            tg_tokens_per_s: over(&|m| m.tg_tokens_per_s),
            ttft_ms: over(&|m| Some(m.ttft_ms)),
            gen_tokens_per_s: over(&|m| m.gen_tokens_per_s),
            total_ms: over(&|m| Some(m.total_ms)),
            tpot_ms: over(&|m| m.tpot_ms),
            gen_tokens: over(&|m| Some(m.gen_tokens as f64)),
            prompt_tokens_per_s: over(&|m| m.prompt_tokens_per_s),
            joules_per_token: over(&|m| m.telemetry.as_ref()?.joules_per_token),
            tokens_per_joule: over(&|m| m.telemetry.as_ref()?.tokens_per_joule),
            power_w: over(&|m| Some(m.telemetry.as_ref()?.power_w?.mean)),
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
    fn median_interval_is_the_exact_order_statistic_one() {
        // Published values (e.g. Conover, Practical Nonparametric Statistics, table A3): the
        // 1-based ranks of the 95% interval of the median.
        for (n, lo, hi) in [
            (6, 1, 6),
            (8, 1, 8),
            (9, 2, 8),
            (10, 2, 9),
            (12, 3, 10),
            (20, 6, 15),
            (50, 18, 33),
        ] {
            assert_eq!(median_ci(n), Some((lo - 1, hi - 1)), "n = {n}");
        }
        assert_eq!(median_ci(5), None);
        let s = Stats::from_samples((1..=20).map(f64::from)).unwrap();
        assert_eq!((s.ci_low, s.ci_high), (Some(6.0), Some(15.0)));
        assert!((s.ci_half_width_pct().unwrap() - 4.5 / 10.5 * 100.0).abs() < 1e-9);
        assert_eq!(Stats::from_samples([1.0, 2.0, 3.0]).unwrap().ci_low, None);
    }

    #[test]
    fn separation() {
        let s = |v: &[f64]| Stats::from_samples(v.iter().copied()).unwrap();
        let a = s(&[10.0, 10.1, 10.2, 10.3, 10.4, 10.5]);
        let b = s(&[11.0, 11.1, 11.2, 11.3, 11.4, 11.5]);
        let c = s(&[10.25, 10.35, 10.45, 10.55, 10.65, 10.75]);
        assert_eq!(
            Separation::of(&a, &b),
            Separation {
                separated: true,
                overlap_pct: Some(0.0)
            }
        );
        let ac = Separation::of(&a, &c);
        assert!(!ac.separated);
        assert!((ac.overlap_pct.unwrap() - 50.0).abs() < 1e-9, "{ac:?}");
        let few = s(&[1.0, 2.0]);
        assert_eq!(Separation::of(&a, &few).overlap_pct, None);
    }

    #[test]
    fn summary_keeps_cold_warmup_and_short_runs_apart() {
        let run = |i: u32, rate: f64| Metrics {
            repeat_index: i,
            warmup: false,
            cold: false,
            ttft_ms: 10.0,
            ttfot_ms: Some(10.0),
            total_ms: 20.0,
            gen_tokens: 8,
            token_count_source: TokenCountSource::Mock,
            streamed_tokens: 8,
            gen_tokens_per_s: Some(rate),
            tpot_ms: None,
            itl_ms: None,
            prompt_tokens: None,
            prompt_tokens_per_s: None,
            prompt_evaluated: None,
            prompt_cache_hit: false,
            pp_tokens_per_s: None,
            tg_tokens_per_s: Some(rate),
            load_ms: Some(900.0),
            engine_gen_tokens_per_s: None,
            engine_prompt_tokens_per_s: None,
            engine_gen_ms: None,
            engine_prompt_ms: None,
            engine_total_ms: None,
            chunks: 8,
            output_chars: 8,
            done_reason: None,
            short_output: false,
            null_reason: None,
            telemetry: None,
            cell: None,
            stream: None,
            start_ms: None,
        };
        let mut runs = vec![
            run(0, 1.0),
            run(1, 5.0),
            run(2, 100.0),
            run(3, 10.0),
            run(4, 12.0),
        ];
        runs[0].warmup = true;
        runs[1].cold = true;
        runs[2].short_output = true;
        let s = Summary::of(&runs, false);
        assert_eq!((s.repeats, s.excluded_short), (2, 1));
        assert_eq!(s.gen_tokens_per_s.unwrap().median, 11.0);
        assert_eq!(s.cold.unwrap().load_ms, Some(900.0));
        assert_eq!(s.tg_tokens_per_s.unwrap().max, 12.0);
        let with_short = Summary::of(&runs, true);
        assert_eq!((with_short.repeats, with_short.excluded_short), (3, 0));
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
