//! `RedisHistory` against the shared Redis on 127.0.0.1:6379 (each test under
//! its own prefix), and against a private `redis-server` for a real restart.
//! The same checks as `MemoryHistory`'s, since both must behave alike.

#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use bytes::Bytes;
use switchboard_core::FrameKind;
use switchboard_core::history::{Entry, History, HistoryError, Position, Retention, Since};
use switchboard_redis::RedisHistory;
use switchboard_test::services::{RedisServer, redis_url, unique_prefix};

/// The shared Redis: a failure, never a skip, when it is missing (see
/// `switchboard_test::services`).
fn shared_redis() -> String {
    redis_url().unwrap_or_else(|e| panic!("{e:#}"))
}

fn retention(size: usize) -> Retention {
    Retention {
        size,
        // Long enough for any test, short enough that nothing lingers.
        ttl: Duration::from_secs(60),
    }
}

async fn store(size: usize) -> (RedisHistory, String) {
    let prefix = unique_prefix("hist");
    let h = RedisHistory::connect(&shared_redis(), &prefix, retention(size))
        .await
        .unwrap();
    (h, prefix)
}

fn text(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

async fn append_all(h: &RedisHistory, stream: &str, datas: &[&str]) -> Vec<Position> {
    let mut pos = Vec::new();
    for d in datas {
        pos.push(h.append(stream, text(d), FrameKind::Text).await.unwrap());
    }
    pos
}

fn datas(since: &Since) -> Vec<String> {
    match since {
        Since::Entries { entries, .. } => entries
            .iter()
            .map(|e| String::from_utf8_lossy(&e.data).into_owned())
            .collect(),
        Since::Gone { .. } => vec!["<gone>".into()],
    }
}

fn offsets(entries: &[Entry]) -> Vec<u64> {
    entries.iter().map(|e| e.pos.offset).collect()
}

#[tokio::test]
async fn appends_get_consecutive_offsets_and_a_read_returns_what_came_after() {
    let (h, _) = store(100).await;
    let pos = append_all(&h, "user:a", &["m1", "m2", "m3", "m4", "m5"]).await;
    assert_eq!(
        pos.iter().map(|p| p.offset).collect::<Vec<_>>(),
        [1, 2, 3, 4, 5]
    );
    assert!(pos.iter().all(|p| p.epoch == pos[0].epoch), "{pos:?}");
    assert_ne!(pos[0].epoch, 0);

    let s = h.since("user:a", pos[1], 100).await.unwrap();
    let Since::Entries { entries, top } = &s else {
        panic!("{s:?}")
    };
    assert_eq!(datas(&s), ["m3", "m4", "m5"]);
    assert_eq!(
        entries.iter().map(|e| e.pos).collect::<Vec<_>>(),
        &pos[2..],
        "each entry with its position"
    );
    assert!(entries.iter().all(|e| e.kind == FrameKind::Text));
    assert_eq!(*top, pos[4]);

    // From the start of the epoch: everything.
    let start = Position {
        offset: 0,
        ..pos[0]
    };
    assert_eq!(
        datas(&h.since("user:a", start, 100).await.unwrap()),
        ["m1", "m2", "m3", "m4", "m5"]
    );

    // Up to date: nothing, and the top.
    assert_eq!(
        h.since("user:a", pos[4], 100).await.unwrap(),
        Since::Entries {
            entries: Vec::new(),
            top: pos[4]
        }
    );

    // Another stream has its own offsets and epoch.
    let other = h
        .append("group:g", text("x"), FrameKind::Text)
        .await
        .unwrap();
    assert_eq!(other.offset, 1);
    assert_ne!(other.epoch, pos[0].epoch);
}

#[tokio::test]
async fn a_position_outside_the_window_over_the_limit_or_of_another_epoch_is_gone() {
    let (h, _) = store(3).await;
    let pos = append_all(&h, "user:a", &["0", "1", "2", "3", "4"]).await;
    let gone = Since::Gone { top: Some(pos[4]) };
    // Entries 1 and 2 were trimmed: a client at 1 missed 2.
    assert_eq!(h.since("user:a", pos[0], 100).await.unwrap(), gone);
    // At 2 it missed 3, 4, 5, all still there.
    assert_eq!(
        datas(&h.since("user:a", pos[1], 100).await.unwrap()),
        ["2", "3", "4"]
    );
    // More than the limit missed.
    assert_eq!(h.since("user:a", pos[1], 2).await.unwrap(), gone);
    // Exactly the limit is fine.
    assert_eq!(
        datas(&h.since("user:a", pos[1], 3).await.unwrap()),
        ["2", "3", "4"]
    );
    let other_epoch = Position {
        epoch: pos[1].epoch ^ 2,
        ..pos[1]
    };
    assert_eq!(h.since("user:a", other_epoch, 100).await.unwrap(), gone);
    let future = Position {
        offset: 99,
        ..pos[1]
    };
    assert_eq!(h.since("user:a", future, 100).await.unwrap(), gone);
    let huge = Position {
        offset: u64::MAX,
        ..pos[1]
    };
    assert_eq!(h.since("user:a", huge, usize::MAX).await.unwrap(), gone);
    assert_eq!(
        h.since("user:nobody", pos[1], 100).await.unwrap(),
        Since::Gone { top: None }
    );
    // latest sees only the window.
    let (latest, top) = h.latest("user:a", 10).await.unwrap();
    assert_eq!(offsets(&latest), [3, 4, 5]);
    assert_eq!(top, Some(pos[4]));
}

#[tokio::test]
async fn lost_keys_mean_a_new_epoch_from_offset_1() {
    let (h, prefix) = store(100).await;
    let old = append_all(&h, "user:a", &["a", "b"]).await;

    // What a Redis restarted without persistence looks like: no keys.
    let client = redis::Client::open(shared_redis()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let deleted: u64 = redis::cmd("DEL")
        .arg(format!("{prefix}:hist:user:a"))
        .arg(format!("{prefix}:histm:user:a"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(
        deleted, 2,
        "the stream and its meta, under the documented names"
    );

    assert_eq!(
        h.since("user:a", old[1], 100).await.unwrap(),
        Since::Gone { top: None }
    );
    assert_eq!(h.latest("user:a", 10).await.unwrap(), (Vec::new(), None));

    let new = h
        .append("user:a", text("c"), FrameKind::Text)
        .await
        .unwrap();
    assert_eq!(new.offset, 1);
    assert_ne!(new.epoch, old[0].epoch);
    // The old position says nothing about the new epoch's entries.
    assert_eq!(
        h.since("user:a", old[0], 100).await.unwrap(),
        Since::Gone { top: Some(new) }
    );
    let start = Position { offset: 0, ..new };
    assert_eq!(datas(&h.since("user:a", start, 100).await.unwrap()), ["c"]);
}

#[tokio::test]
async fn a_lost_meta_alone_also_starts_a_new_epoch_without_the_old_entries() {
    let (h, prefix) = store(100).await;
    let old = append_all(&h, "user:a", &["a", "b", "c"]).await;
    let client = redis::Client::open(shared_redis()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    // An eviction could take one key and not the other.
    let () = redis::cmd("DEL")
        .arg(format!("{prefix}:histm:user:a"))
        .query_async(&mut conn)
        .await
        .unwrap();
    let new = h
        .append("user:a", text("d"), FrameKind::Text)
        .await
        .unwrap();
    assert_eq!(new.offset, 1);
    assert_ne!(new.epoch, old[0].epoch);
    let (latest, top) = h.latest("user:a", 10).await.unwrap();
    assert_eq!(offsets(&latest), [1]);
    assert_eq!(&latest[0].data[..], b"d");
    assert_eq!(top, Some(new));
}

#[tokio::test]
async fn binary_data_round_trips_with_its_kind() {
    let (h, _) = store(100).await;
    let bin = Bytes::from_static(b"\x00\xff\xfe\r\n{\"op\"}\x80");
    let p1 = h
        .append("group:g", bin.clone(), FrameKind::Binary)
        .await
        .unwrap();
    let p2 = h
        .append("group:g", text("h\u{e9}llo"), FrameKind::Text)
        .await
        .unwrap();
    let empty = h
        .append("group:g", Bytes::new(), FrameKind::Binary)
        .await
        .unwrap();
    let start = Position { offset: 0, ..p1 };
    let Since::Entries { entries, top } = h.since("group:g", start, 10).await.unwrap() else {
        panic!("gone")
    };
    assert_eq!(top, empty);
    assert_eq!(
        entries,
        [
            Entry {
                pos: p1,
                data: bin,
                kind: FrameKind::Binary
            },
            Entry {
                pos: p2,
                data: text("h\u{e9}llo"),
                kind: FrameKind::Text
            },
            Entry {
                pos: empty,
                data: Bytes::new(),
                kind: FrameKind::Binary
            },
        ]
    );
    let (latest, _) = h.latest("group:g", 3).await.unwrap();
    assert_eq!(latest, entries);
}

#[tokio::test]
async fn latest_gives_the_newest_entries_oldest_first() {
    let (h, _) = store(100).await;
    assert_eq!(h.latest("user:a", 5).await.unwrap(), (Vec::new(), None));
    let pos = append_all(&h, "user:a", &["1", "2", "3", "4"]).await;
    let (latest, top) = h.latest("user:a", 2).await.unwrap();
    assert_eq!(offsets(&latest), [3, 4]);
    assert_eq!(&latest[1].data[..], b"4");
    assert_eq!(top, Some(pos[3]));
    let (all, _) = h.latest("user:a", 100).await.unwrap();
    assert_eq!(offsets(&all), [1, 2, 3, 4]);
    let (none, top) = h.latest("user:a", 0).await.unwrap();
    assert_eq!((none, top), (Vec::new(), Some(pos[3])));
    let (all, _) = h.latest("user:a", usize::MAX).await.unwrap();
    assert_eq!(offsets(&all), [1, 2, 3, 4]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn appends_from_two_stores_get_distinct_consecutive_offsets() {
    let prefix = unique_prefix("hist");
    let url = shared_redis();
    let a = RedisHistory::connect(&url, &prefix, retention(200))
        .await
        .unwrap();
    let b = RedisHistory::connect(&url, &prefix, retention(200))
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for (name, h) in [("a", a.clone()), ("b", b.clone())] {
        for i in 0..50 {
            let h = h.clone();
            tasks.push(tokio::spawn(async move {
                h.append("group:busy", text(&format!("{name}{i}")), FrameKind::Text)
                    .await
                    .unwrap()
            }));
        }
    }
    let mut pos = Vec::new();
    for t in tasks {
        pos.push(t.await.unwrap());
    }
    assert!(pos.iter().all(|p| p.epoch == pos[0].epoch), "one epoch");
    let mut got: Vec<u64> = pos.iter().map(|p| p.offset).collect();
    got.sort_unstable();
    assert_eq!(got, (1..=100).collect::<Vec<_>>());

    // Both stores read the same history, every append once, in offset order.
    let start = Position {
        offset: 0,
        ..pos[0]
    };
    let from_a = h_since(&a, start).await;
    assert_eq!(from_a, h_since(&b, start).await);
    assert_eq!(offsets(&from_a), (1..=100).collect::<Vec<_>>());
    let mut seen: Vec<String> = from_a
        .iter()
        .map(|e| String::from_utf8_lossy(&e.data).into_owned())
        .collect();
    seen.sort();
    let mut sent: Vec<String> = ["a", "b"]
        .iter()
        .flat_map(|n| (0..50).map(move |i| format!("{n}{i}")))
        .collect();
    sent.sort();
    assert_eq!(seen, sent);
}

async fn h_since(h: &RedisHistory, after: Position) -> Vec<Entry> {
    match h.since("group:busy", after, 1000).await.unwrap() {
        Since::Entries { entries, .. } => entries,
        Since::Gone { top } => panic!("gone, top {top:?}"),
    }
}

#[tokio::test]
async fn entries_expire_one_by_one_and_an_idle_stream_is_forgotten() {
    let prefix = unique_prefix("hist");
    let ttl = Duration::from_secs(2);
    let h = RedisHistory::connect(&shared_redis(), &prefix, Retention { size: 10, ttl })
        .await
        .unwrap();
    let t0 = Instant::now();
    let a = h
        .append("user:a", text("a"), FrameKind::Text)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let b = h
        .append("user:a", text("b"), FrameKind::Text)
        .await
        .unwrap();
    // `a` is older than the ttl; `b` is not, and keeps the stream alive.
    tokio::time::sleep(ttl.saturating_sub(t0.elapsed()) + Duration::from_millis(100)).await;
    let start = Position { offset: 0, ..a };
    assert_eq!(
        h.since("user:a", start, 10).await.unwrap(),
        Since::Gone { top: Some(b) },
        "a client that missed the expired entry must resync"
    );
    assert_eq!(datas(&h.since("user:a", a, 10).await.unwrap()), ["b"]);
    let (latest, top) = h.latest("user:a", 10).await.unwrap();
    assert_eq!((offsets(&latest), top), (vec![2], Some(b)));
    assert!(
        t0.elapsed() < Duration::from_millis(1200) + ttl,
        "the machine was too slow for this test's timing ({:?})",
        t0.elapsed()
    );

    // Idle for the ttl after its last append: forgotten with its epoch.
    tokio::time::sleep(ttl + Duration::from_millis(100)).await;
    assert_eq!(
        h.since("user:a", b, 10).await.unwrap(),
        Since::Gone { top: None }
    );
    let c = h
        .append("user:a", text("c"), FrameKind::Text)
        .await
        .unwrap();
    assert_eq!(c.offset, 1);
    assert_ne!(c.epoch, a.epoch);
}

#[tokio::test]
async fn a_redis_restarted_without_persistence_gives_a_new_epoch() {
    let mut server = RedisServer::start(false).unwrap_or_else(|e| panic!("{e:#}"));
    let prefix = unique_prefix("hist");
    let h = RedisHistory::connect(&server.url(), &prefix, retention(100))
        .await
        .unwrap();
    let old = append_all(&h, "user:a", &["a", "b"]).await;
    server.restart().unwrap_or_else(|e| panic!("{e:#}"));

    // The first command may fail on the dead connection; the store
    // reconnects by itself (and loads its scripts again).
    let deadline = Instant::now() + Duration::from_secs(20);
    let since = loop {
        match h.since("user:a", old[1], 100).await {
            Ok(s) => break s,
            Err(HistoryError::Unavailable(e)) if Instant::now() < deadline => {
                eprintln!("while redis restarts: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("{e}"),
        }
    };
    assert_eq!(since, Since::Gone { top: None });
    let new = h
        .append("user:a", text("c"), FrameKind::Text)
        .await
        .unwrap();
    assert_eq!(new.offset, 1);
    assert_ne!(new.epoch, old[0].epoch);
}

#[tokio::test]
async fn only_user_and_group_streams_are_accepted() {
    let (h, _) = store(10).await;
    let p = Position {
        offset: 0,
        epoch: 1,
    };
    for bad in ["room:x", "user:", "group:", "", "user"] {
        let want = HistoryError::BadStream(bad.to_owned());
        assert_eq!(
            h.append(bad, text("x"), FrameKind::Text).await,
            Err(want.clone())
        );
        assert_eq!(h.since(bad, p, 10).await, Err(want.clone()));
        assert_eq!(h.latest(bad, 10).await, Err(want));
    }
}

#[tokio::test]
async fn the_cluster_url_and_its_options_are_accepted() {
    let url = shared_redis();
    let prefix = unique_prefix("hist");
    let with_options = format!("{url}/0?mode=queue&prefix=not-this-one&ttl=5");
    let h = RedisHistory::connect(&with_options, &prefix, retention(10))
        .await
        .unwrap();
    let p = h
        .append("user:a", text("x"), FrameKind::Text)
        .await
        .unwrap();
    assert_eq!(p.offset, 1);
    // The prefix given, not the URL's, names the keys.
    let client = redis::Client::open(url).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let exists: u64 = redis::cmd("EXISTS")
        .arg(format!("{prefix}:hist:user:a"))
        .arg(format!("{prefix}:histm:user:a"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(exists, 2);

    // And from a connection made by the caller.
    let manager = redis::aio::ConnectionManager::new(client).await.unwrap();
    let same = RedisHistory::from_manager(manager, &prefix, retention(10));
    assert_eq!(same.latest("user:a", 1).await.unwrap().1, Some(p));

    assert!(matches!(
        RedisHistory::connect("redis://127.0.0.1:1?color=red", &prefix, retention(1)).await,
        Err(HistoryError::Unavailable(_))
    ));
}

#[tokio::test]
async fn an_unreachable_redis_is_unavailable_without_the_password() {
    // Nothing listens on port 1.
    let e = RedisHistory::connect(
        "redis://user:s3cr%40t-pw@127.0.0.1:1/0?prefix=x",
        "x",
        retention(1),
    )
    .await
    .unwrap_err();
    let HistoryError::Unavailable(msg) = &e else {
        panic!("{e:?}")
    };
    assert!(!msg.contains("s3cr"), "{msg}");
    // A wrong password on a reachable Redis.
    let url = shared_redis().replace("redis://", "redis://:s3cr%40t-pw@");
    if let Err(e) = RedisHistory::connect(&url, "x", retention(1)).await {
        assert!(!e.to_string().contains("s3cr"), "{e}");
    }
}
