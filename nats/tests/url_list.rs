//! A comma-separated NATS URL list is several servers: a client given one that is down and one
//! that is up connects to the live one, and when the server it uses stops, fails over to
//! another of the list, where it keeps publishing and receiving.

use bench_nats::connect::{connect, server_list, NatsConfig};
use bench_nats::harness::{within, NatsServer, WAIT};
use futures::StreamExt;

#[test]
fn lists_are_split_and_trimmed() {
    assert_eq!(
        server_list(" nats://a:1, nats://b:2 ,,"),
        ["nats://a:1", "nats://b:2"]
    );
    assert_eq!(server_list("nats://a:1"), ["nats://a:1"]);
}

#[tokio::test]
async fn a_url_list_connects_to_a_live_server_and_fails_over() {
    let mut servers = [NatsServer::start(), NatsServer::start()];
    // Nothing listens on port 1: the client must go on to the servers that are up.
    let cfg = NatsConfig {
        url: Some(format!(
            "nats://127.0.0.1:1, {}, {}",
            servers[0].url(),
            servers[1].url()
        )),
        ..NatsConfig::default()
    };
    let client = within("connect through the list", WAIT, connect(&cfg, "url-list"))
        .await
        .expect("connects to a live server of the list");
    // Which server it chose: the one whose subscriber receives its publish (the two servers are
    // not a cluster, so a message stays on the server it was published to).
    let mut subs = Vec::new();
    for s in &servers {
        let observer = async_nats::connect(s.url()).await.expect("observer");
        let sub = observer.subscribe("failover.test").await.unwrap();
        observer.flush().await.unwrap();
        subs.push((observer, sub));
    }
    let used = publish_until_received(&client, &mut subs, &[0, 1]).await;
    servers[used].stop();
    // The client reconnects to the other server of its list, and its publishes arrive there.
    let other = 1 - used;
    assert_eq!(
        publish_until_received(&client, &mut subs, &[other]).await,
        other
    );
}

/// Publishes until one of the `watched` subscribers receives; its index.
async fn publish_until_received(
    client: &async_nats::Client,
    subs: &mut [(async_nats::Client, async_nats::Subscriber)],
    watched: &[usize],
) -> usize {
    within("a publish that arrives", WAIT, async {
        loop {
            let _ = client.publish("failover.test", "hello".into()).await;
            let _ = client.flush().await;
            for &i in watched {
                let next = subs[i].1.next();
                if let Ok(Some(m)) =
                    tokio::time::timeout(std::time::Duration::from_millis(100), next).await
                {
                    assert_eq!(&m.payload[..], b"hello");
                    return i;
                }
            }
        }
    })
    .await
}
