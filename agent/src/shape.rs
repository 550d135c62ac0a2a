//! Controlled test shapes: prompts of an exact token count (`prompt_tokens`, `profile`), a
//! context filled to `depth` before the measured prompt, and a unique start for every measured
//! prompt so that it is processed cold.
//!
//! With an engine tokenizer (llama.cpp, vLLM: `/tokenize`, `/detokenize`) the agent builds the
//! text from token ids and checks the round trip. Without one (Ollama) it builds from words and
//! corrects the count with the engine's `prompt_eval_count` of a probe request. Either way the
//! count the engine reports for every measured run is checked, and a mismatch fails the job
//! with `prompt_mismatch`: a shape is never silently other than it says.

use crate::backend::{Backend, EngineReport, GenRequest, Item};
use crate::measure::RunSpec;
use bench_schemas::{CacheMode, ErrorBody, ErrorCode, Job};
use futures::StreamExt;

/// Material for prompts when the job gives none: plain prose, so that any tokenizer cuts it
/// into ordinary tokens.
const FILLER: &str = "The history of the river valley begins long before the first written \
records. Farmers planted grain along the banks, traders carried salt and copper between the \
hills, and every spring the water rose over the fields and left a layer of fresh soil behind. \
Over many centuries small villages grew into market towns, the towns built bridges and mills, \
and the mills turned wool into cloth that was sold in distant ports. Travellers wrote about the \
long roads, the careful stone walls, the orchards of apples and pears, and the quiet evenings \
when the bells of the old church could be heard across the meadows.";

/// Words that start each measured prompt, one per run, so no two runs share a first token
/// (every engine's prompt cache is a prefix cache). Common words: one token in most
/// vocabularies.
const NONCES: &[&str] = &[
    "Apple", "River", "Stone", "Cloud", "Green", "Table", "Music", "Paper", "Light", "Ocean",
    "Horse", "Sugar", "Chair", "Dance", "Earth", "Flame", "Glass", "House", "Index", "Juice",
    "Knife", "Lemon", "Metal", "Night", "Olive", "Piano", "Queen", "Robot", "Silver", "Tiger",
    "Umbrella", "Violin", "Water", "Yellow", "Zebra", "Bread", "Candle", "Dragon", "Forest",
    "Garden", "Hammer", "Island", "Jacket", "Kitten", "Ladder", "Mirror", "Needle", "Orange",
    "Pencil", "Rabbit", "Saddle", "Tunnel", "Valley", "Window", "Anchor", "Basket", "Castle",
    "Desert", "Engine", "Feather", "Guitar", "Harbor", "Jungle", "Kettle",
];

/// Tries at matching the exact count before giving up with `prompt_mismatch`.
const MAX_TRIES: usize = 6;

/// What a shaped job's prompts are built from, prepared once per job.
pub struct Shaper {
    model: String,
    /// Whether the engine adds a BOS token it counts in the prompt.
    bos: u64,
    tokenizer: bool,
    /// The base material's token ids (tokenizer engines).
    base_ids: Vec<u32>,
    /// The base material, long enough for the largest prompt.
    base_text: String,
    /// The context filled before the measured prompt (ends the same for every run).
    depth_text: String,
    /// Measured prompt size as the engine counts it; `None` for a free prompt.
    measured: Option<u64>,
    depth: u64,
    cold: bool,
    prompt: String,
    /// Words per measured prompt (engines without a tokenizer), found by probing.
    words: usize,
    /// Cold on an engine without a cache switch (Ollama): even a free prompt gets a unique
    /// first word per run.
    nonce_free_prompt: bool,
    /// Offset into [`NONCES`], random per job, so consecutive jobs differ too.
    nonce_offset: usize,
    last_first_token: Option<u32>,
}

fn mismatch(msg: String) -> ErrorBody {
    ErrorBody::new(ErrorCode::PromptMismatch, msg)
}

/// An unmeasured one-token request of `prompt` (raw, no fixed length), and the engine's report:
/// the probe that counts a prompt and the request that puts the depth in the engine's cache.
async fn one_token(
    backend: &dyn Backend,
    job: &Job,
    prompt: &str,
    cache_prompt: bool,
) -> Result<EngineReport, ErrorBody> {
    let mut req = GenRequest::from(job);
    req.prompt = prompt.to_string();
    req.max_tokens = 1;
    req.ignore_eos = false;
    req.raw = true;
    req.cache_prompt = Some(cache_prompt);
    let mut stream = backend.generate(req).await?;
    while let Some(item) = stream.next().await {
        if let Item::Final(r) = item? {
            return Ok(r);
        }
    }
    Err(ErrorBody::new(
        ErrorCode::StreamBroken,
        "the engine's unmeasured one-token request ended without a final message",
    ))
}

/// The prompt token count the engine reported for `prompt`.
async fn probe(backend: &dyn Backend, job: &Job, prompt: &str) -> Result<u64, ErrorBody> {
    one_token(backend, job, prompt, false)
        .await?
        .prompt_tokens
        .ok_or_else(|| {
            ErrorBody::new(
                ErrorCode::Unsupported,
                "the engine reports no prompt token count, so prompt_tokens cannot be checked",
            )
        })
}

impl Shaper {
    /// Prepares the prompts of `job` on `backend` (unmeasured requests only: tokenizer calls or
    /// probes). A job without `prompt_tokens` or `depth` keeps its prompt, with a unique start
    /// per run when it runs cold on an engine without a cache switch.
    pub async fn prepare(backend: &dyn Backend, job: &Job) -> Result<Self, ErrorBody> {
        let shape = job.shape();
        let material = if job.prompt.trim().is_empty() {
            FILLER.to_string()
        } else {
            job.prompt.clone()
        };
        let mut s = Self {
            model: job.model.clone(),
            bos: 0,
            tokenizer: false,
            base_ids: Vec::new(),
            base_text: String::new(),
            depth_text: String::new(),
            measured: shape.prompt_tokens.map(u64::from),
            depth: u64::from(shape.depth),
            cold: job.cache == CacheMode::Cold,
            prompt: job.prompt.clone(),
            words: 0,
            nonce_free_prompt: job.cache == CacheMode::Cold && !backend.has_cache_switch(),
            nonce_offset: (uuid::Uuid::new_v4().as_u128() % NONCES.len() as u128) as usize,
            last_first_token: None,
        };
        if s.measured.is_none() && s.depth == 0 {
            return Ok(s);
        }
        match backend.tokenize(&job.model, "Hello").await? {
            Some(one) => {
                s.tokenizer = true;
                // The engine's count of a one-word prompt against the tokenizer's tells
                // whether it adds a BOS token.
                let counted = probe(backend, job, "Hello").await?;
                s.bos = counted.saturating_sub(one.len() as u64);
                let need = (s.depth + s.measured.unwrap_or(0)) as usize + 64;
                let once = backend
                    .tokenize(&job.model, &material)
                    .await?
                    .unwrap_or_default()
                    .len();
                if once == 0 {
                    return Err(mismatch("the prompt material tokenizes to nothing".into()));
                }
                // Enough copies of the material in one go (a long depth would otherwise take
                // hundreds of growing tokenizer calls).
                let copies = need.div_ceil(once) + 1;
                let text = vec![material.as_str(); copies].join(" ");
                let ids = backend
                    .tokenize(&job.model, &text)
                    .await?
                    .unwrap_or_default();
                s.base_ids = ids;
                s.base_text = text;
                if s.depth > 0 {
                    // The depth prefix carries the BOS; it ends in a newline so the measured
                    // part never merges with it.
                    let want = s.depth.saturating_sub(s.bos) as usize;
                    s.depth_text = s.exact_text(backend, &s.base_ids, want, "\n").await?;
                }
            }
            None if s.depth > 0 => {
                return Err(ErrorBody::new(
                    ErrorCode::Unsupported,
                    format!(
                        "depth needs an engine with a tokenizer endpoint (llama.cpp, vLLM); {} has none",
                        backend.kind()
                    ),
                ));
            }
            None => {
                // Words, corrected by probes: each probe starts with a word no measured run
                // uses, so no probe is served from the cache.
                let target = s.measured.expect("prompt_tokens set");
                let words: Vec<&str> = material.split_whitespace().collect();
                let text_of = |n: usize, first: &str| {
                    let mut t = String::from(first);
                    for w in words.iter().cycle().take(n.saturating_sub(1)) {
                        t.push(' ');
                        t.push_str(w);
                    }
                    t
                };
                let mut n = target as usize;
                for attempt in 0..MAX_TRIES {
                    let got = probe(backend, job, &text_of(n, &format!("Probe{attempt}"))).await?;
                    if got == target {
                        s.words = n;
                        return Ok(s);
                    }
                    let next = n as i64 + target as i64 - got as i64;
                    n = next.max(1) as usize;
                }
                return Err(mismatch(format!(
                    "could not build a prompt of exactly {target} tokens for {} from words in {MAX_TRIES} probes",
                    job.model
                )));
            }
        }
        Ok(s)
    }

    /// Text of exactly `want` tokens taken from the start of `ids`, then `suffix`, checked by a
    /// round trip through the tokenizer.
    async fn exact_text(
        &self,
        backend: &dyn Backend,
        ids: &[u32],
        want: usize,
        suffix: &str,
    ) -> Result<String, ErrorBody> {
        let mut take = want;
        for _ in 0..MAX_TRIES {
            let take_ids = &ids[..take.min(ids.len())];
            let text = backend.detokenize(&self.model, take_ids).await?;
            let text = format!("{}{suffix}", text.trim_end());
            let got = backend
                .tokenize(&self.model, &text)
                .await?
                .map_or(0, |t| t.len());
            if got == want {
                return Ok(text);
            }
            take = (take as i64 + want as i64 - got as i64).max(1) as usize;
        }
        Err(mismatch(format!(
            "could not build text of exactly {want} tokens for {} ({MAX_TRIES} tries)",
            self.model
        )))
    }

    /// Whether this job's prompts are built by the agent.
    pub fn shaped(&self) -> bool {
        self.measured.is_some() || self.depth > 0
    }

    /// The prompt of run `index`, and what the run should show. A cold run on a shaped job
    /// starts its measured part with a word no other run of the job starts with.
    pub async fn prompt(
        &mut self,
        backend: &dyn Backend,
        index: u32,
    ) -> Result<(String, RunSpec), ErrorBody> {
        let spec = RunSpec {
            measured_prompt_tokens: self.measured,
            depth: self.depth,
            cold_prompt: self.cold,
            ..RunSpec::default()
        };
        let nonce = |i: usize| NONCES[(self.nonce_offset + index as usize + i) % NONCES.len()];
        if !self.shaped() {
            if self.nonce_free_prompt {
                return Ok((format!("{} {}", nonce(0), self.prompt), spec));
            }
            return Ok((self.prompt.clone(), spec));
        }
        let Some(target) = self.measured else {
            // Depth with a free prompt: the prompt follows the filled context as given.
            return Ok((format!("{}{}", self.depth_text, self.prompt), spec));
        };
        if !self.tokenizer {
            let words: Vec<&str> = if self.prompt.trim().is_empty() {
                FILLER.split_whitespace().collect()
            } else {
                self.prompt.split_whitespace().collect()
            };
            let first = if self.cold { nonce(0) } else { NONCES[0] };
            let mut t = String::from(first);
            for w in words.iter().cycle().take(self.words.saturating_sub(1)) {
                t.push(' ');
                t.push_str(w);
            }
            return Ok((t, spec));
        }
        let want = if self.depth > 0 {
            target as usize
        } else {
            target.saturating_sub(self.bos) as usize
        };
        for i in 0..NONCES.len() {
            let lead = if self.cold { nonce(i) } else { NONCES[0] };
            let lead_ids = backend
                .tokenize(&self.model, lead)
                .await?
                .unwrap_or_default();
            if self.cold
                && !lead_ids.is_empty()
                && lead_ids.first() == self.last_first_token.as_ref()
            {
                continue; // the same first token as the last run: its prefix would be cached
            }
            let ids = backend
                .tokenize(&self.model, &format!("{lead} {}", self.base_text))
                .await?
                .unwrap_or_default();
            let text = self.exact_text(backend, &ids, want, "").await?;
            self.last_first_token = lead_ids.first().copied();
            return Ok((format!("{}{}", self.depth_text, text), spec));
        }
        Err(mismatch(
            "no unique first word left for a cold prompt".into(),
        ))
    }

    /// Checks what the engine counted for a run against the shape: the whole prompt must be
    /// depth + measured tokens, and with a depth the engine must have evaluated only the
    /// measured part (the depth came from its cache).
    pub fn check(
        &self,
        prompt_tokens: Option<u64>,
        evaluated: Option<u64>,
    ) -> Result<(), ErrorBody> {
        let Some(target) = self.measured else {
            return Ok(());
        };
        let want = self.depth + target;
        match prompt_tokens {
            Some(got) if got != want => Err(mismatch(format!(
                "the engine counted {got} prompt tokens; the job asked for {want} (depth {} + prompt_tokens {target})",
                self.depth
            ))),
            None => Err(mismatch(
                "the engine reported no prompt token count, so the prompt size cannot be checked".into(),
            )),
            _ => match evaluated {
                Some(e) if self.depth > 0 && e > target => Err(mismatch(format!(
                    "the engine evaluated {e} prompt tokens, not the {target} after the depth: it did not keep the {} depth tokens cached (llama.cpp needs --swa-full for sliding-window models such as gemma-3, and cache_prompt)",
                    self.depth
                ))),
                _ => Ok(()),
            },
        }
    }

    /// Fills the engine's cache with the depth prefix (an unmeasured one-token request).
    pub async fn prime(&self, backend: &dyn Backend, job: &Job) -> Result<(), ErrorBody> {
        if self.depth > 0 {
            one_token(backend, job, &self.depth_text, true).await?;
        }
        Ok(())
    }
}
