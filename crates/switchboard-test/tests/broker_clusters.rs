//! The private broker clusters themselves: a Redis Cluster that serves every
//! slot and fails a killed master over to its replica, and NATS servers that
//! route to each other, lose a killed one and take it back. They need the
//! `redis-server`, `redis-cli` and `nats-server` binaries, and fail without
//! them; their names say which (docs/TESTING.md).

use std::io::Read;
use std::time::{Duration, Instant};

use switchboard_test::broker_clusters::{NatsCluster, RedisCluster};

/// Reads the line a NATS server greets a client with.
fn greeting(port: u16) -> String {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    let mut buf = [0u8; 5];
    s.read_exact(&mut buf).expect("a greeting");
    String::from_utf8_lossy(&buf).into_owned()
}

#[test]
fn a_redis_cluster_serves_every_slot_and_fails_over() {
    let t = Instant::now();
    let mut c = RedisCluster::start().unwrap_or_else(|e| panic!("{e:#}"));
    let started = t.elapsed();
    let masters = c.masters().unwrap();
    assert_eq!(masters.len(), 3, "{masters:?}");
    assert_eq!(c.seeds().len(), 6);
    let url = c.url();
    assert!(url.starts_with("redis-cluster://"), "{url}");
    for &m in &masters {
        assert!(
            url.contains(&format!("127.0.0.1:{}", c.port(m))),
            "{url} {masters:?}"
        );
    }
    for i in 0..6 {
        let info = c.cli(i, &["cluster", "info"]).unwrap();
        assert!(info.contains("cluster_slots_ok:16384"), "node {i}: {info}");
    }

    // Acknowledged by its replica before the master dies, so that it survives.
    let key = "{k}x";
    let out = c
        .cli_pipe(0, &[&format!("SET {key} 1"), "WAIT 1 1000"])
        .unwrap();
    assert_eq!(
        out.split_whitespace().collect::<Vec<_>>(),
        ["OK", "1"],
        "{out}"
    );
    let m = c.master_of_key(key).unwrap();
    // Without -c: only the node that serves the key answers with it.
    assert_eq!(c.cli(m, &["get", key]).unwrap().trim(), "1");

    c.kill(m);
    let took = c
        .wait_failover(m, Duration::from_secs(15))
        .unwrap_or_else(|e| panic!("{e:#}"));
    let promoted = c.master_of_key(key).unwrap();
    assert_ne!(promoted, m);
    assert_eq!(c.cli(promoted, &["get", key]).unwrap().trim(), "1");
    let other = (0..6).find(|&i| i != m).unwrap();
    assert_eq!(c.cli(other, &["-c", "get", key]).unwrap().trim(), "1");
    let masters = c.masters().unwrap();
    assert!(
        masters.contains(&promoted) && !masters.contains(&m),
        "{masters:?}"
    );

    let t = Instant::now();
    c.restart(m).unwrap_or_else(|e| panic!("{e:#}"));
    let rejoined = t.elapsed();
    assert_eq!(
        c.masters().unwrap(),
        masters,
        "the restarted master is a replica"
    );
    let role = c.cli(m, &["role"]).unwrap();
    assert!(role.starts_with("slave"), "{role}");
    eprintln!(
        "formed in {started:?}, failed over {took:?} after the kill, rejoined in {rejoined:?}"
    );
}

#[test]
fn a_nats_cluster_routes_between_its_servers_and_survives_a_kill() {
    let t = Instant::now();
    let mut c = NatsCluster::start(3).unwrap_or_else(|e| panic!("{e:#}"));
    let started = t.elapsed();
    let url = c.url();
    assert_eq!(url.matches("127.0.0.1:").count(), 3, "{url}");
    for i in 0..3 {
        assert!(
            url.contains(&format!("127.0.0.1:{}", c.client_port(i))),
            "{url}"
        );
        assert_eq!(greeting(c.client_port(i)), "INFO ");
        assert_eq!(c.num_routes(i).unwrap(), 2, "server {i}");
    }

    c.kill(1);
    for i in [0, 2] {
        c.monitor(i, "/varz").unwrap_or_else(|e| panic!("{e:#}"));
        // A route closes with its socket: at once.
        let t = Instant::now();
        while c.num_routes(i).unwrap() != 1 {
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "server {i} keeps its route to 1"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    let t = Instant::now();
    c.restart(1).unwrap_or_else(|e| panic!("{e:#}"));
    let rejoined = t.elapsed();
    for i in 0..3 {
        assert_eq!(c.num_routes(i).unwrap(), 2, "server {i}");
    }
    assert_eq!(greeting(c.client_port(1)), "INFO ");
    eprintln!("routed in {started:?}, rejoined in {rejoined:?}");
}

#[test]
fn a_single_nats_server_runs_jetstream() {
    let c = NatsCluster::start(1).unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(c.url(), format!("nats://127.0.0.1:{}", c.client_port(0)));
    assert_eq!(greeting(c.client_port(0)), "INFO ");
    let jsz = c.monitor(0, "/jsz").unwrap();
    assert!(jsz["config"]["store_dir"].is_string(), "{jsz}");
}
