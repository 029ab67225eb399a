//! The eBPF hooks' decision logic, as the agent's tests and the programs share it: one verdict per connect
//! (outbound) or per new inbound connection. These run in the kernel on every such event, so they must stay
//! a handful of branches; the benchmark guards that.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use meshcap_common::{
    addr_from_octets, inbound_verdict, outbound_verdict, PodConfig, RuleMatches, POD_CAPTURE_INBOUND,
    POD_CAPTURE_OUTBOUND, POD_INCLUDE_ALL_INBOUND, POD_INCLUDE_ALL_OUTBOUND, PORT_EXCLUDED, PORT_INCLUDED,
};

fn mapped(v4: [u8; 4]) -> meshcap_common::Addr {
    let mut o = [0u8; 16];
    o[10] = 0xff;
    o[11] = 0xff;
    o[12..].copy_from_slice(&v4);
    addr_from_octets(&o)
}

fn verdicts(c: &mut Criterion) {
    let all = PodConfig {
        flags: POD_CAPTURE_OUTBOUND | POD_CAPTURE_INBOUND | POD_INCLUDE_ALL_OUTBOUND | POD_INCLUDE_ALL_INBOUND,
        outbound_port: 15001,
        inbound_port: 15006,
    };
    let listed = PodConfig { flags: POD_CAPTURE_OUTBOUND | POD_CAPTURE_INBOUND, ..all };
    let pod = mapped([10, 0, 0, 7]);
    let loopback = mapped([127, 0, 0, 1]);
    let engine = mapped([127, 0, 0, 6]);
    let rules = [
        RuleMatches::default(),
        RuleMatches { port_excluded: true, ..Default::default() },
        RuleMatches { in_exclude_nets: true, ..Default::default() },
        RuleMatches { in_include_nets: true, ..Default::default() },
    ];
    c.bench_function("outbound_verdict (mixed destinations and rules)", |b| {
        b.iter(|| {
            let mut redirected = 0u32;
            for cfg in [&all, &listed] {
                for dst in [&pod, &loopback] {
                    for r in rules {
                        let v = outbound_verdict(black_box(cfg), black_box(dst), black_box(8080), black_box(r));
                        redirected += (v == meshcap_common::OutboundVerdict::Redirect) as u32;
                    }
                }
            }
            redirected
        })
    });
    c.bench_function("inbound_verdict (mixed sources and port rules)", |b| {
        b.iter(|| {
            let mut steered = 0u32;
            for cfg in [&all, &listed] {
                for remote in [&pod, &engine] {
                    for (port, rule) in [(8080, 0), (8080, PORT_EXCLUDED), (9090, PORT_INCLUDED), (15006, 0)] {
                        let v = inbound_verdict(black_box(cfg), black_box(remote), black_box(port), black_box(rule));
                        steered += (v == meshcap_common::InboundVerdict::Steer) as u32;
                    }
                }
            }
            steered
        })
    });
}

criterion_group!(benches, verdicts);
criterion_main!(benches);
