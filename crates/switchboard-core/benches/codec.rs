//! Framing and envelope codec micro-benchmarks (`cargo bench -p switchboard-core`).

#![allow(missing_docs, clippy::unwrap_used)]

use bytes::BytesMut;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use std::hint::black_box;
use switchboard_core::framing::{Decoder, Framing, encode};
use switchboard_core::{Body, Envelope, Frame, NodeId, Target};

fn framing(c: &mut Criterion) {
    let msg = vec![b'x'; 64];
    let mut g = c.benchmark_group("framing");
    g.throughput(Throughput::Elements(100));
    for framing in [Framing::Line, Framing::Length] {
        let mut wire = BytesMut::new();
        for _ in 0..100 {
            encode(framing, &msg, &mut wire).unwrap();
        }
        let wire = wire.freeze();
        g.bench_function(format!("decode 100 x 64B {framing}"), |b| {
            b.iter(|| {
                let mut d = Decoder::new(framing, 1 << 16);
                let mut buf = BytesMut::from(&wire[..]);
                let mut n = 0;
                while let Some(m) = d.decode(&mut buf).unwrap() {
                    n += m.len();
                }
                black_box(n)
            })
        });
        g.bench_function(format!("encode 100 x 64B {framing}"), |b| {
            let mut out = BytesMut::with_capacity(8192);
            b.iter(|| {
                out.clear();
                for _ in 0..100 {
                    encode(framing, black_box(&msg), &mut out).unwrap();
                }
                black_box(out.len())
            })
        });
    }
    g.finish();
}

fn envelope(c: &mut Criterion) {
    let env = Envelope {
        origin: NodeId::new("node-1").unwrap(),
        id: 1_700_000_000_000_000,
        body: Body::Push {
            target: Target::group("room-42"),
            frame: Frame::text("x".repeat(64)),
        },
    };
    let bytes = env.encode();
    let mut g = c.benchmark_group("envelope");
    g.bench_function(format!("encode push ({} bytes)", bytes.len()), |b| {
        b.iter(|| black_box(env.encode()))
    });
    g.bench_function("decode push", |b| {
        b.iter(|| black_box(Envelope::decode(black_box(&bytes)).unwrap()))
    });
    g.bench_function("peek id", |b| {
        b.iter(|| black_box(switchboard_core::envelope::peek_id(black_box(&bytes))))
    });
    g.finish();
}

criterion_group!(benches, framing, envelope);
criterion_main!(benches);
