//! The SSE bridge on a real socket (port 0): replay then live, `Last-Event-ID` resume with no
//! gap and no duplicate, the final `end`, and the fleet feed (status changes only).

mod common;

use common::*;
use serde_json::json;

fn ids(frames: &[Frame]) -> Vec<u64> {
    frames.iter().filter_map(|f| f.id).collect()
}

#[tokio::test]
async fn replay_and_resume_with_last_event_id() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let central = start_central(central_config(&nats.url(), dir.path())).await;
    let base = central.base();
    // Slow enough that the first connection joins while the job runs.
    let _agent = mock_agent("m1", "mock-7b", 100.0, &nats.url()).await;
    machines_online(&base, &["m1"]).await;
    let mut feed = Sse::open(&format!("{base}/api/events"), None).await;
    let (s, out) = post(&base, "/api/jobs", &json!({"machines": ["m1"], "model": "mock-7b", "prompt": "hi", "max_tokens": 40, "repeat": 2})).await;
    assert_eq!(s, 201, "{out}");
    let job_id = out["job_id"].as_str().unwrap().to_string();
    let url = format!("{base}/api/jobs/{job_id}/events");

    // Live: read a few events, then drop the connection mid-job.
    let mut first = Sse::open(&url, None).await;
    assert_eq!(first.status, 200);
    let mut head = Vec::new();
    while head.len() < 5 {
        let f = first.next().await.expect("live event");
        assert_ne!(f.event, "end", "the job should still be running");
        head.push(f);
    }
    drop(first);
    assert_eq!(head[0].event, "job_accepted");
    assert_eq!(head[0].json()["seq"], 1);
    let resume_from = head.last().unwrap().id.unwrap();

    // Resume: exactly what came after, then live, then end.
    let mut second = Sse::open(&url, Some(resume_from)).await;
    let tail = second.until_end().await;
    let end = tail.last().expect("frames");
    assert_eq!(end.event, "end", "{tail:?}");
    assert_eq!(end.json(), json!({"job_id": job_id, "status": "done"}));
    assert!(second.next().await.is_none(), "the stream closes after end");
    let tail_events = &tail[..tail.len() - 1];
    assert!(tail_events.iter().all(|f| f.id.unwrap() > resume_from));

    // The union is exactly the stored events: no gap, no duplicate.
    let mut all = ids(&head);
    all.extend(ids(tail_events));
    let stored: Vec<bench_schemas::Event> = tail_events
        .iter()
        .chain(head.iter())
        .map(|f| serde_json::from_str(&f.data).unwrap())
        .collect();
    let mut full = Sse::open(&url, None).await;
    let replayed = full.until_end().await;
    assert_eq!(
        ids(&replayed[..replayed.len() - 1]),
        all,
        "one replay from the start equals live + resumed"
    );
    let mut sorted = stored.clone();
    sorted.sort_by_key(|e| e.seq);
    assert_exactly_once(&sorted);
    assert_eq!(replayed.iter().filter(|f| f.event == "job_done").count(), 1);
    for f in &replayed[..replayed.len() - 1] {
        assert_eq!(
            f.json()["type"].as_str().unwrap(),
            f.event,
            "event: names the event type"
        );
    }

    // Resuming from the middle of a finished job gives exactly the missing events.
    let k = all[all.len() / 2];
    let mut again = Sse::open(&format!("{url}?last_event_id={k}"), None).await;
    let rest = again.until_end().await;
    assert_eq!(
        ids(&rest),
        all.iter().copied().filter(|i| *i > k).collect::<Vec<_>>()
    );
    // Resuming from the last event: just the end.
    let mut last = Sse::open(&url, Some(*all.last().unwrap())).await;
    let only = last.until_end().await;
    assert_eq!(only.len(), 1);
    assert_eq!(only[0].event, "end");

    // The fleet feed saw the machine and the job's status changes, and none of its events
    // (those are on the job's own stream).
    let mut kinds = std::collections::BTreeSet::new();
    while let Some(f) = feed.next().await {
        if f.event == "job" && f.json()["job_id"] == job_id.as_str() && f.json()["status"] == "done"
        {
            kinds.insert("job_done_status".to_string());
            break;
        }
        kinds.insert(f.event.clone());
    }
    assert!(kinds.contains("job"), "{kinds:?}");
    assert!(kinds.contains("machine"), "{kinds:?}");
    assert!(!kinds.contains("llm_token"), "{kinds:?}");
}
