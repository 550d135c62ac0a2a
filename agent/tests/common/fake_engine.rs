//! What the engine fakes share: a streamed (`text/event-stream`) answer fed from a channel, the
//! OpenAI-style closing chunks (`usage`, then `data: [DONE]`), and a server on a runtime and
//! thread of its own, so that a fake's schedule is never late because the agent under test is
//! busy on the same threads.

use axum::body::Body;
use axum::http::header;
use axum::response::Response;
use axum::Router;
use serde_json::json;

/// The sending side of a streamed answer.
pub type Chunks = tokio::sync::mpsc::Sender<Result<bytes::Bytes, std::io::Error>>;

/// A streamed answer whose chunks are sent by `produce` (spawned), in order.
pub fn sse<F, Fut>(produce: F) -> Response
where
    F: FnOnce(Chunks) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, mut rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(produce(tx));
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .body(Body::from_stream(futures::stream::poll_fn(move |cx| {
            rx.poll_recv(cx)
        })))
        .unwrap()
}

/// `data: <json>` of one chat completion chunk.
pub fn chat_chunk(model: &str, delta: serde_json::Value, finish: Option<&str>) -> bytes::Bytes {
    let v = json!({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]});
    bytes::Bytes::from(format!("data: {v}\n\n"))
}

/// The last chunk with `usage` (empty `choices`), then `data: [DONE]`.
pub async fn finish(tx: &Chunks, prompt_tokens: u64, completion_tokens: u64) {
    let usage = json!({"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "choices": [],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens}});
    let _ = tx.send(Ok(format!("data: {usage}\n\n").into())).await;
    let _ = tx.send(Ok("data: [DONE]\n\n".into())).await;
}

/// Serves the router `app()` builds on 127.0.0.1 from a runtime and thread of its own; its
/// base URL.
pub fn serve(app: impl FnOnce() -> Router + Send + 'static) -> String {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(format!("http://{}", listener.local_addr().unwrap()))
                .unwrap();
            axum::serve(listener, app()).await.unwrap()
        })
    });
    rx.recv().expect("fake server address")
}
