//! A ceiling on what a cross-node message costs, in instructions: the figure
//! that the noise of a shared machine does not move, so a regression fails
//! here rather than hiding in a benchmark's spread.
//!
//! Two nodes in one process (`serve --cluster memory:2`, the build under
//! test) run under `valgrind --tool=callgrind`, twice: a short and a long run
//! of the same point-to-point load, senders on one node and receivers on the
//! other. The difference in instructions over the difference in messages is
//! the cost of one message, start-up and connections cancelled out.
//! scripts/bench-instructions.sh measures the release build of every mode
//! the same way (BENCHMARKS.md).

#![allow(clippy::unwrap_used)]

use std::cell::Cell;
use std::time::Duration;

use serde_json::json;
use switchboard_test::Client;
use switchboard_test::cluster::spawn_role;
use switchboard_test::services::require;

const BIN: &str = env!("CARGO_BIN_EXE_switchboard");
/// Sender→receiver pairs.
const PAIRS: usize = 10;
/// Instructions per message of the debug build, as measured when this
/// ceiling was set: 149k (the release build: about 19k, see BENCHMARKS.md).
/// The ceiling leaves room for toolchain and dependency drift, not for a
/// hot path that doubles.
const CEILING: u64 = 240_000;

/// Instructions the nodes ran, with `messages` per pair.
async fn run(messages: usize) -> u64 {
    let out = std::env::temp_dir().join(format!(
        "switchboard-callgrind-{}-{messages}.out",
        std::process::id()
    ));
    let out_arg = format!("--callgrind-out-file={}", out.display());
    let consoles = Cell::new(0);
    let args = [
        "--tool=callgrind",
        out_arg.as_str(),
        BIN,
        "serve",
        "--cluster",
        "memory:2",
        "--ws",
        "127.0.0.1:0",
        "--tcp",
        "off",
    ];
    let (mut child, banner) = spawn_role("valgrind".as_ref(), &args, |line| {
        // Each node's last banner line; two nodes.
        if line.trim_start().starts_with("console") {
            consoles.set(consoles.get() + 1);
        }
        consoles.get() == 2
    })
    .await
    .unwrap();
    let (n0, n1) = (banner.nodes[0].ws.unwrap(), banner.nodes[1].ws.unwrap());
    let mut senders = Vec::new();
    let mut receivers = Vec::new();
    for i in 0..PAIRS {
        senders.push(Client::ws(n0, &format!("s{i}"), None).await.unwrap());
        receivers.push(Client::ws(n1, &format!("r{i}"), None).await.unwrap());
    }
    for m in 0..messages {
        for (i, s) in senders.iter_mut().enumerate() {
            s.send(json!({"op":"to_user","uid":format!("r{i}"),"data":format!("m{m}")}))
                .await
                .unwrap();
        }
        for r in &mut receivers {
            assert_eq!(r.recv().await.unwrap(), format!("m{m}"));
        }
    }
    drop((senders, receivers));
    // SIGTERM: the node shuts down, and valgrind writes its counts.
    let pid = child.id().unwrap().to_string();
    std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    tokio::time::timeout(Duration::from_secs(120), child.wait())
        .await
        .expect("the node stops")
        .unwrap();
    let counts = std::fs::read_to_string(&out).unwrap();
    let _ = std::fs::remove_file(&out);
    counts
        .lines()
        .find_map(|l| l.strip_prefix("summary: "))
        .expect("callgrind's summary line")
        .trim()
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cross_node_message_stays_under_its_instruction_ceiling() {
    let valgrind = std::process::Command::new("valgrind")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    require("valgrind", valgrind).unwrap();
    let (short, long) = (5, 25);
    let a = run(short).await;
    let b = run(long).await;
    let per_message = (b - a) / ((long - short) * PAIRS) as u64;
    println!("instructions per cross-node message (debug build): {per_message}");
    assert!(
        per_message < CEILING,
        "a cross-node message costs {per_message} instructions, over the ceiling of {CEILING}"
    );
}
