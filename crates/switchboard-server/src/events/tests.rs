use std::sync::atomic::AtomicUsize;

use switchboard::core::NodeId;

use super::*;

fn conn(seq: u64) -> ConnId {
    ConnId::new(NodeId::new("n").expect("node"), seq)
}

/// A backend that fails its first `fail` requests with 503, then records
/// every event it is sent.
async fn backend(fail: usize) -> (String, mpsc::UnboundedReceiver<Value>, Arc<AtomicUsize>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let requests = Arc::new(AtomicUsize::new(0));
    let seen = requests.clone();
    let handler = move |body: Bytes| {
        let tx = tx.clone();
        let n = seen.fetch_add(1, Ordering::SeqCst);
        async move {
            if n < fail {
                return StatusCode::SERVICE_UNAVAILABLE;
            }
            let v: Value = serde_json::from_slice(&body).expect("JSON");
            for e in v["events"].as_array().expect("events") {
                let _ = tx.send(e.clone());
            }
            StatusCode::OK
        }
    };
    let app = axum::Router::new().route("/e", axum::routing::post(handler));
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}/e", l.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(l, app).await });
    (url, rx, requests)
}

fn config(url: &str, queue: usize) -> EventsConfig {
    EventsConfig::new(url, None, queue, Duration::from_secs(2)).expect("config")
}

#[test]
fn the_signature_is_hmac_sha256_of_the_body() {
    // RFC 4231, test case 2.
    let secret: Secret = "Jefe".parse().expect("secret");
    assert_eq!(
        sign(&secret, b"what do ya want for nothing?"),
        "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
    );
}

#[test]
fn only_plain_http_urls_are_taken() {
    for bad in ["ftp://x/e", "not a url", "/relative", "https://x/e"] {
        assert!(
            EventsConfig::new(bad, None, 1, Duration::from_secs(1)).is_err(),
            "{bad}"
        );
    }
}

#[tokio::test]
async fn a_failing_backend_gets_every_event_in_order_once_it_recovers() {
    let (url, mut rx, requests) = backend(2).await;
    let hub = Hub::builder().start().await.expect("hub");
    let (events, runner) = Events::new(config(&url, 1000));
    let stop = CancellationToken::new();
    let task = runner.spawn(hub, stop.clone());
    for i in 0..250 {
        events.close(&conn(i), None, "bye");
    }
    for i in 0..250u64 {
        let e = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("an event in time")
            .expect("an event");
        assert_eq!(e["conn"], conn(i).to_string(), "out of order at {i}");
    }
    assert!(requests.load(Ordering::SeqCst) >= 3 + 2);
    // The last batch is counted once its answer is read.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while events.stats()["sent"] != 250 && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let stats = events.stats();
    assert_eq!(stats["sent"], 250, "{stats}");
    assert_eq!(stats["failed_requests"], 2, "{stats}");
    assert_eq!(stats["dropped_undelivered"], 0, "{stats}");
    stop.cancel();
    task.await.expect("the sender ends");
}

#[tokio::test]
async fn a_dead_backend_costs_bounded_memory_and_every_loss_is_counted() {
    // Nothing listens on this port.
    let port = switchboard_test::services::free_port().expect("port");
    let hub = Hub::builder().start().await.expect("hub");
    let (events, runner) = Events::new(config(&format!("http://127.0.0.1:{port}/e"), 10));
    // Emitting never waits, whatever the backend does.
    let started = std::time::Instant::now();
    for i in 0..1000 {
        events.close(&conn(i), None, "bye");
    }
    assert!(started.elapsed() < Duration::from_millis(500));
    let stats = events.stats();
    assert_eq!(stats["queued"], 10, "{stats}");
    assert_eq!(stats["dropped_queue_full"], 990, "{stats}");
    let stop = CancellationToken::new();
    let task = runner.spawn(hub, stop.clone());
    // Five tries with backoff (0.2 + 0.4 + 0.8 + 1.6 s), then the batch is
    // dropped and counted.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while events.stats()["dropped_undelivered"] != 10 {
        assert!(std::time::Instant::now() < deadline, "{}", events.stats());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(events.stats()["failed_requests"], u64::from(ATTEMPTS));
    stop.cancel();
    task.await.expect("the sender ends");
}
