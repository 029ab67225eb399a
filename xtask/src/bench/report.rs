//! The benchmark's output: medians over rounds per setup and metric, the machine it ran on, and a markdown
//! table with each mode's ratio to `direct` and to `iptables` (same variant), plus the targets.

use std::fmt::Write as _;

use serde_json::{json, Map, Value};

use super::SETUPS;

/// Metric key, label, and whether more is better (for the targets only; ratios are plain quotients).
pub const METRICS: [(&str, &str); 16] = [
    ("rr_c1_per_sec", "req/resp c=1: req/s"),
    ("rr_c1_p50_us", "req/resp c=1: p50 µs"),
    ("rr_c1_p99_us", "req/resp c=1: p99 µs"),
    ("rr_c16_per_sec", "req/resp c=16: req/s"),
    ("rr_c16_p50_us", "req/resp c=16: p50 µs"),
    ("rr_c16_p99_us", "req/resp c=16: p99 µs"),
    ("rr_c64_per_sec", "req/resp c=64: req/s"),
    ("rr_c64_p50_us", "req/resp c=64: p50 µs"),
    ("rr_c64_p99_us", "req/resp c=64: p99 µs"),
    ("conn_per_sec", "new connection per request: conn/s"),
    ("conn_ttfb_p99_us", "new connection: p99 time to first byte µs"),
    ("bulk_gbit_per_sec", "bulk stream: Gbit/s"),
    ("bulk_agent_cpu_s_per_gib", "bulk stream: agent CPU-s per GiB"),
    ("rss_10_pods_idle_mib", "agent RSS, 10 enrolled pods, no traffic: MiB"),
    ("rss_per_idle_conn_1000_kib", "agent RSS per idle connection (1,000 held): KiB"),
    ("rss_per_idle_conn_most_kib", "agent RSS per idle connection (most held, see plan): KiB"),
];

/// Median over rounds of every metric of every setup: `{setup: {metric: value}}`.
pub fn summarize(runs: &[Value]) -> Value {
    let mut out = Map::new();
    for setup in SETUPS {
        let key = setup.key();
        let mut metrics = Map::new();
        for (metric, _) in METRICS {
            let mut values: Vec<f64> = runs
                .iter()
                .filter(|r| r["setup"] == key.as_str())
                .filter_map(|r| r["results"][metric].as_f64())
                .collect();
            if let Some(m) = median(&mut values) {
                metrics.insert(metric.into(), json!(m));
            }
        }
        out.insert(key, Value::Object(metrics));
    }
    Value::Object(out)
}

fn median(values: &mut [f64]) -> Option<f64> {
    if values.is_empty() {
        return None;
    }
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    Some(if values.len() % 2 == 1 { values[mid] } else { (values[mid - 1] + values[mid]) / 2.0 })
}

pub fn machine() -> Value {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu =
        cpuinfo.lines().find_map(|l| l.strip_prefix("model name")).map(|v| v.trim_start_matches([' ', '\t', ':']));
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let mem_kib: Option<u64> = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok());
    json!({
        "cpu": cpu.unwrap_or("unknown"),
        "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        "memory_gib": mem_kib.map(|k| (k as f64 / 1048576.0 * 10.0).round() / 10.0),
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim(),
    })
}

fn fmt(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn value(summary: &Value, setup: &str, metric: &str) -> Option<f64> {
    summary[setup][metric].as_f64()
}

/// The markdown report: the machine, the table of medians with ratios, and the targets.
pub fn markdown(doc: &Value) -> String {
    let summary = &doc["summary"];
    let mut out = String::new();
    let m = &doc["machine"];
    let _ = writeln!(out, "## Results: `{}`\n", doc["command"].as_str().unwrap_or_default());
    let _ = writeln!(
        out,
        "Machine: {} ({} CPUs), {} GiB, kernel {}. Load generator: {}. Medians of {} round(s); in each cell \
         `×d` is the ratio to `direct`, `×i` to `iptables` of the same variant. Idle connections held: {}.\n",
        m["cpu"].as_str().unwrap_or_default(),
        m["cpus"],
        m["memory_gib"],
        m["kernel"].as_str().unwrap_or_default(),
        doc["load_generator"].as_str().unwrap_or_default(),
        doc["plan"]["rounds"],
        doc["plan"]["idle_conns"],
    );
    let keys: Vec<String> = SETUPS.iter().map(|s| s.key()).collect();
    let _ = writeln!(out, "| metric | {} |", keys.join(" | "));
    let _ = writeln!(out, "|---|{}", "---|".repeat(keys.len()));
    for (metric, label) in METRICS {
        let mut row = format!("| {label} |");
        for setup in SETUPS {
            let key = setup.key();
            let Some(v) = value(summary, &key, metric) else {
                row.push_str(" – |");
                continue;
            };
            let mut cell = fmt(v);
            let direct = value(summary, "direct", metric).filter(|d| *d != 0.0 && setup.mode != "direct");
            let iptables = value(summary, &format!("iptables {}", setup.variant), metric)
                .filter(|i| *i != 0.0 && setup.mode != "iptables" && setup.mode != "direct");
            let ratios: Vec<String> = [("×d", direct), ("×i", iptables)]
                .into_iter()
                .filter_map(|(name, base)| base.map(|b| format!("{name} {:.2}", v / b)))
                .collect();
            if !ratios.is_empty() {
                let _ = write!(cell, " ({})", ratios.join(", "));
            }
            let _ = write!(row, " {cell} |");
        }
        let _ = writeln!(out, "{row}");
    }
    out.push_str(&targets(summary));
    out
}

/// The targets, each as measured in this run.
fn targets(summary: &Value) -> String {
    let mut out = String::from("\n### Targets (`ebpf+sockmap` against `iptables`, same run)\n\n");
    out.push_str("| target | variant | measured | met |\n|---|---|---|---|\n");
    let ratio = |metric: &str, variant: &str| -> Option<f64> {
        Some(
            value(summary, &format!("ebpf+sockmap {variant}"), metric)?
                / value(summary, &format!("iptables {variant}"), metric)?,
        )
    };
    let checks: [(&str, &str, bool, f64); 5] = [
        ("req/resp c=64 throughput ≥ 1.25×", "rr_c64_per_sec", true, 1.25),
        ("req/resp c=64 p99 ≤ 0.8×", "rr_c64_p99_us", false, 0.8),
        ("bulk throughput ≥ 1.5×", "bulk_gbit_per_sec", true, 1.5),
        ("agent CPU-s per GiB ≤ 0.7×", "bulk_agent_cpu_s_per_gib", false, 0.7),
        ("new connections/s ≥ 1.2×", "conn_per_sec", true, 1.2),
    ];
    for variant in ["plaintext", "mTLS"] {
        for (label, metric, more, bound) in checks {
            if let Some(r) = ratio(metric, variant) {
                let met = if more { r >= bound } else { r <= bound };
                let _ = writeln!(out, "| {label} | {variant} | {r:.2}× | {} |", if met { "yes" } else { "no" });
            }
        }
    }
    if let (Some(mesh), Some(direct)) =
        (value(summary, "ebpf+sockmap mTLS", "rr_c1_p50_us"), value(summary, "direct", "rr_c1_p50_us"))
    {
        let added = mesh - direct;
        let _ = writeln!(out, "| mesh adds ≤ 100 µs to p50 at c=1 | mTLS | {added:+.0} µs | {} |", yes(added <= 100.0));
    }
    for variant in ["plaintext", "mTLS"] {
        let key = format!("ebpf+sockmap {variant}");
        if let Some(rss) = value(summary, &key, "rss_10_pods_idle_mib") {
            let _ = writeln!(out, "| ≤ 32 MiB RSS, 10 pods idle | {variant} | {rss:.1} MiB | {} |", yes(rss <= 32.0));
        }
        for n in ["1000", "most"] {
            if let Some(kib) = value(summary, &key, &format!("rss_per_idle_conn_{n}_kib")) {
                let _ = writeln!(
                    out,
                    "| ≤ 4 KiB per idle connection ({n}) | {variant} | {kib:.1} KiB | {} |",
                    yes(kib <= 4.0)
                );
            }
        }
    }
    out
}

fn yes(met: bool) -> &'static str {
    if met {
        "yes"
    } else {
        "no"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_ratios_and_targets_come_out_of_the_runs() {
        let run = |setup: &str, round: u64, rps: f64, p99: f64| json!({"round": round, "setup": setup, "results": {"rr_c64_per_sec": rps, "rr_c64_p99_us": p99}});
        let runs = vec![
            run("direct", 0, 100.0, 10.0),
            run("direct", 1, 300.0, 30.0),
            run("direct", 2, 200.0, 20.0),
            run("iptables mTLS", 0, 50.0, 40.0),
            run("ebpf+sockmap mTLS", 0, 75.0, 30.0),
        ];
        let summary = summarize(&runs);
        assert_eq!(summary["direct"]["rr_c64_per_sec"], 200.0, "median of three rounds");
        let doc = json!({"command": "cargo xtask bench", "machine": machine(), "load_generator": "loadgen",
            "plan": {"rounds": 3}, "summary": summary});
        let md = markdown(&doc);
        assert!(md.contains("| 75.0 (×d 0.38, ×i 1.50) |"), "{md}");
        assert!(md.contains("| req/resp c=64 throughput ≥ 1.25× | mTLS | 1.50× | yes |"), "{md}");
        assert!(md.contains("| req/resp c=64 p99 ≤ 0.8× | mTLS | 0.75× | yes |"), "{md}");
        assert!(md.contains("| ebpf+sockmap mTLS |"), "every setup has a column");
    }
}
