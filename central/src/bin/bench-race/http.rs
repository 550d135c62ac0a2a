//! Talking to bench-central: bounded JSON requests, API errors said in words, and the job's
//! Server-Sent Events followed (resuming with `Last-Event-ID`) until `end`.

use anyhow::{anyhow, bail, Context, Result};
use bench_schemas::Event;
use futures::StreamExt;
use serde_json::Value;
use std::time::Duration;
use tokio::time::Instant;

/// Longest wait for one plain request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// Central sends a keep-alive every 15 s: a stream silent for longer is dead.
const SSE_IDLE: Duration = Duration::from_secs(45);

/// Percent-encodes a path or query component.
pub fn enc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// One central.
pub struct Central {
    base: String,
    token: Option<String>,
    client: reqwest::Client,
}

impl Central {
    /// A client of `base` (`http://host:port`).
    pub fn new(base: &str, token: Option<String>) -> Result<Self> {
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .build()
            .context("building the HTTP client")?;
        Ok(Self {
            base: base.trim_end_matches('/').to_string(),
            token: token.filter(|t| !t.is_empty()),
            client,
        })
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn send(&self, req: reqwest::RequestBuilder, what: &str) -> Result<bytes::Bytes> {
        let req = match &self.token {
            Some(t) => req.bearer_auth(t),
            None => req,
        };
        let resp = req
            .timeout(REQUEST_TIMEOUT)
            .send()
            .await
            .map_err(|e| anyhow!("{what}: cannot reach central at {}: {e}", self.base))?;
        let status = resp.status();
        let body = resp
            .bytes()
            .await
            .map_err(|e| anyhow!("{what}: reading the answer: {e}"))?;
        if !status.is_success() {
            let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            let err = &v["error"];
            match (err["code"].as_str(), err["message"].as_str()) {
                (Some(code), Some(msg)) => bail!("{what}: {status} {code}: {msg}"),
                _ => bail!(
                    "{what}: {status}: {}",
                    String::from_utf8_lossy(&body[..body.len().min(500)])
                ),
            }
        }
        Ok(body)
    }

    /// `GET path` as JSON.
    pub async fn get_json(&self, path: &str) -> Result<Value> {
        let body = self
            .send(self.client.get(self.url(path)), &format!("GET {path}"))
            .await?;
        serde_json::from_slice(&body).with_context(|| format!("GET {path}: not JSON"))
    }

    /// `GET path` as bytes.
    pub async fn get_bytes(&self, path: &str) -> Result<bytes::Bytes> {
        self.send(self.client.get(self.url(path)), &format!("GET {path}"))
            .await
    }

    /// `POST path` with a JSON body.
    pub async fn post_json(&self, path: &str, body: &Value) -> Result<Value> {
        let body = self
            .send(
                self.client.post(self.url(path)).json(body),
                &format!("POST {path}"),
            )
            .await?;
        serde_json::from_slice(&body).with_context(|| format!("POST {path}: not JSON"))
    }

    /// Waits until central knows the job and it is no longer running.
    pub async fn wait_finished(&self, job_id: &str, limit: Duration) -> Result<()> {
        let deadline = Instant::now() + limit;
        let path = format!("/api/jobs/{}", enc(job_id));
        loop {
            if let Ok(Ok(v)) = tokio::time::timeout_at(deadline, self.get_json(&path)).await {
                if v["status"].as_str().is_some_and(|s| s != "running") {
                    return Ok(());
                }
            }
            if Instant::now() >= deadline {
                bail!("central did not show job {job_id} finished within {limit:?}");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Follows `GET /api/jobs/{id}/events` until `end` (returned: the job's status), feeding
    /// every event to `on_event`. Reconnects after a dropped stream or `lagged`, resuming
    /// after the last event seen; gives up after `limit` in all.
    pub async fn follow(
        &self,
        job_id: &str,
        limit: Duration,
        mut on_event: impl FnMut(Event),
    ) -> Result<String> {
        let deadline = Instant::now() + limit;
        let url = self.url(&format!("/api/jobs/{}/events", enc(job_id)));
        let mut last_id: Option<String> = None;
        let mut failures = 0u32;
        loop {
            if Instant::now() >= deadline {
                bail!("the job did not end within {limit:?}");
            }
            let mut req = self.client.get(&url).header("Accept", "text/event-stream");
            if let Some(id) = &last_id {
                req = req.header("Last-Event-ID", id.as_str());
            }
            let resp = match tokio::time::timeout_at(deadline, req.send()).await {
                Ok(Ok(r)) if r.status().is_success() => Some(r),
                Ok(Ok(r)) if r.status().is_client_error() => {
                    let status = r.status();
                    let text = tokio::time::timeout(REQUEST_TIMEOUT, r.text())
                        .await
                        .ok()
                        .and_then(Result::ok)
                        .unwrap_or_default();
                    bail!("GET /api/jobs/{job_id}/events: {status}: {text}");
                }
                _ => None,
            };
            if let Some(resp) = resp {
                let mut frames = Frames::default();
                let mut body = resp.bytes_stream();
                loop {
                    let chunk = match tokio::time::timeout_at(
                        deadline.min(Instant::now() + SSE_IDLE),
                        body.next(),
                    )
                    .await
                    {
                        Ok(Some(Ok(c))) => c,
                        _ => break,
                    };
                    failures = 0;
                    for f in frames.push(&chunk) {
                        match f.event.as_str() {
                            "end" => {
                                let v: Value = serde_json::from_str(&f.data).unwrap_or(Value::Null);
                                return Ok(v["status"].as_str().unwrap_or("").to_string());
                            }
                            "lagged" => break,
                            _ => {
                                if let Some(id) = f.id {
                                    last_id = Some(id);
                                }
                                if let Ok(ev) = serde_json::from_str::<Event>(&f.data) {
                                    on_event(ev);
                                }
                            }
                        }
                    }
                }
            }
            failures += 1;
            if failures > 20 {
                bail!(
                    "lost the event stream of job {job_id} (central at {})",
                    self.base
                );
            }
            // Back off before reconnecting (not a synchronisation: central is away or slow).
            tokio::time::sleep(Duration::from_millis(250 * failures.min(8) as u64)).await;
        }
    }
}

/// One Server-Sent Events message.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Frame {
    /// `id:`.
    pub id: Option<String>,
    /// `event:` (`message` when absent).
    pub event: String,
    /// `data:` lines joined by newlines.
    pub data: String,
}

/// Splits a byte stream into SSE messages.
#[derive(Default)]
pub struct Frames {
    buf: Vec<u8>,
    cur: Frame,
    has_data: bool,
}

impl Frames {
    /// Adds bytes; returns the messages they complete.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<Frame> {
        self.buf.extend_from_slice(bytes);
        let mut out = Vec::new();
        while let Some(nl) = self.buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = self.buf.drain(..=nl).collect();
            let line = String::from_utf8_lossy(&line);
            let line = line.trim_end_matches(['\n', '\r']);
            if line.is_empty() {
                if self.has_data || !self.cur.event.is_empty() {
                    let mut f = std::mem::take(&mut self.cur);
                    if f.event.is_empty() {
                        f.event = "message".into();
                    }
                    out.push(f);
                }
                self.has_data = false;
                continue;
            }
            if line.starts_with(':') {
                continue;
            }
            let (field, value) = match line.split_once(':') {
                Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
                None => (line, ""),
            };
            match field {
                "id" => self.cur.id = Some(value.to_string()),
                "event" => self.cur.event = value.to_string(),
                "data" => {
                    if self.has_data {
                        self.cur.data.push('\n');
                    }
                    self.cur.data.push_str(value);
                    self.has_data = true;
                }
                _ => {}
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_split_across_chunks() {
        let mut f = Frames::default();
        assert!(f.push(b": keep-alive\n\nid: 7\nevent: llm_to").is_empty());
        let got = f.push(b"ken\ndata: {\"a\":1}\n\nevent: end\r\ndata: {}\r\n\r\n");
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].id.as_deref(), Some("7"));
        assert_eq!(got[0].event, "llm_token");
        assert_eq!(got[0].data, "{\"a\":1}");
        assert_eq!(got[1].event, "end");
        assert_eq!(enc("a b/c"), "a%20b%2Fc");
    }
}
