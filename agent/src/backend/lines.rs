//! Splits a byte stream into lines without assuming chunk boundaries match line boundaries
//! or UTF-8 character boundaries.

/// Accumulates bytes and yields complete lines (without `\n` / `\r\n`).
#[derive(Debug, Default)]
pub struct LineSplitter {
    buf: Vec<u8>,
}

impl LineSplitter {
    /// Adds bytes and returns the lines they complete.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<String> {
        self.buf.extend_from_slice(bytes);
        let mut out = Vec::new();
        while let Some(i) = self.buf.iter().position(|b| *b == b'\n') {
            let mut line: Vec<u8> = self.buf.drain(..=i).collect();
            line.pop();
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            out.push(String::from_utf8_lossy(&line).into_owned());
        }
        out
    }

    /// The unterminated rest, if any.
    pub fn finish(&mut self) -> Option<String> {
        if self.buf.is_empty() {
            None
        } else {
            let rest = std::mem::take(&mut self.buf);
            Some(String::from_utf8_lossy(&rest).into_owned())
        }
    }
}

use super::{body_error, Item, ItemStream};
use bench_schemas::{ErrorBody, ErrorCode};
use futures::StreamExt;
use std::collections::VecDeque;

struct State<P> {
    body: futures::stream::BoxStream<'static, reqwest::Result<bytes::Bytes>>,
    split: LineSplitter,
    queue: VecDeque<Result<Item, ErrorBody>>,
    ended: bool,
    saw_final: bool,
    url: String,
    parser: P,
}

impl<P: FnMut(&str) -> Result<Vec<Item>, ErrorBody>> State<P> {
    fn feed(&mut self, line: &str) {
        match (self.parser)(line) {
            Ok(items) => self.queue.extend(items.into_iter().map(Ok)),
            Err(e) => {
                self.queue.push_back(Err(e));
                self.ended = true;
            }
        }
    }
}

/// Turns a line-oriented streaming body (NDJSON or SSE) into items. `parser` sees each line
/// and returns the items it holds. The stream ends after the first [`Item::Final`]; a body that
/// ends or breaks before one is `stream_broken`.
pub(crate) fn parse_lines<P>(resp: reqwest::Response, url: String, parser: P) -> ItemStream
where
    P: FnMut(&str) -> Result<Vec<Item>, ErrorBody> + Send + 'static,
{
    let state = State {
        body: resp.bytes_stream().boxed(),
        split: LineSplitter::default(),
        queue: VecDeque::new(),
        ended: false,
        saw_final: false,
        url,
        parser,
    };
    futures::stream::unfold(state, |mut st| async move {
        loop {
            if st.saw_final {
                return None;
            }
            if let Some(item) = st.queue.pop_front() {
                if matches!(item, Ok(Item::Final(_))) {
                    st.saw_final = true;
                } else if item.is_err() {
                    st.saw_final = true; // an error ends the stream too
                }
                return Some((item, st));
            }
            if st.ended {
                return None;
            }
            match st.body.next().await {
                Some(Ok(bytes)) => {
                    for line in st.split.push(&bytes) {
                        if !st.ended {
                            st.feed(&line);
                        }
                    }
                }
                Some(Err(e)) => {
                    let err = body_error(&st.url, e);
                    st.queue.push_back(Err(err));
                    st.ended = true;
                }
                None => {
                    if let Some(rest) = st.split.finish() {
                        st.feed(&rest);
                    }
                    if !st.ended && !st.queue.iter().any(|i| matches!(i, Ok(Item::Final(_)))) {
                        st.queue.push_back(Err(ErrorBody::new(
                            ErrorCode::StreamBroken,
                            format!(
                                "the engine at {} closed the stream before its final message",
                                st.url
                            ),
                        )));
                    }
                    st.ended = true;
                }
            }
        }
    })
    .boxed()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_across_chunks_and_utf8() {
        let mut s = LineSplitter::default();
        let text = "{\"a\":\"é\"}\r\n{\"b\":1}\npartial";
        let bytes = text.as_bytes();
        let mut lines = Vec::new();
        for b in bytes.chunks(3) {
            lines.extend(s.push(b));
        }
        assert_eq!(lines, vec!["{\"a\":\"é\"}", "{\"b\":1}"]);
        assert_eq!(s.finish().as_deref(), Some("partial"));
        assert_eq!(s.finish(), None);
    }
}
