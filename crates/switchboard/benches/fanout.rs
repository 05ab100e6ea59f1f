//! Fan-out of one frame to 10,000 local connections: the per-recipient cost of
//! a push before any socket I/O (`cargo bench -p switchboard`).

#![allow(missing_docs)]

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use std::hint::black_box;
use switchboard::Frame;
use switchboard::bench_support::Fanout;

fn fanout(c: &mut Criterion) {
    let mut f = Fanout::new(10_000);
    let frame = Frame::text("x".repeat(64));
    let mut g = c.benchmark_group("fanout");
    g.throughput(Throughput::Elements(10_000));
    g.bench_function("push one frame to a 10k group", |b| {
        b.iter(|| {
            let n = f.push_group(black_box(&frame));
            f.drain();
            black_box(n)
        })
    });
    g.finish();
    c.bench_function("group_count over 10k members", |b| {
        b.iter(|| black_box(f.group_count()))
    });
}

criterion_group!(benches, fanout);
criterion_main!(benches);
