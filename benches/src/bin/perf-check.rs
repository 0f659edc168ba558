//! Reads criterion's results and prints the speed targets of the benches issue:
//!
//! 1. one 16M-element layer, single thread: the dispatched backend reaches >= 85% of the
//!    bytes/second of the same-traffic (44 B/element) roofline loop;
//! 2. one 64K-element layer (cache resident, compute bound): AVX2 >= 1.7x portable.
//!
//! Also prints every kernel/model result as ns/element and % of roofline, and with
//! `--json PATH` writes them all (plus the benches' allocation notes) for
//! `benches/peers/report.py`.
//!
//! ```text
//! cargo run -p benches --release --bin perf-check -- [--dir target/criterion]
//!     [--backend avx512] [--json docs/perf/lamb.json] [--strict]
//! ```
//! Exit status: 0 (these are reports, not assertions), 1 if no results were found, and with
//! `--strict` 3 if a target is missed.

use std::path::PathBuf;

use lamb_benches::results::{self, BenchResult};
use lamb_benches::roofline::bytes;
use lamb_benches::{LAYER_SIZES, criterion_dir, model_workloads};
use lamb_core::Backend;
use serde_json::json;

struct Args {
    dir: PathBuf,
    backend: Backend,
    json: Option<PathBuf>,
    strict: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut a = Args {
        dir: criterion_dir(),
        backend: Backend::detect(),
        json: None,
        strict: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--dir" => a.dir = it.next().ok_or("--dir needs a path")?.into(),
            "--json" => a.json = Some(it.next().ok_or("--json needs a path")?.into()),
            "--backend" => {
                let n = it.next().ok_or("--backend needs a name")?;
                a.backend = Backend::from_name(&n).ok_or(format!("unknown backend {n}"))?;
            }
            "--strict" => a.strict = true,
            "-h" | "--help" => {
                println!(
                    "perf-check [--dir CRITERION_DIR] [--backend NAME] [--json OUT] [--strict]"
                );
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    Ok(a)
}

/// Bytes per element the function moves, by the model of `roofline`'s docs.
fn bytes_per_element(function: &str) -> u64 {
    match function {
        "roof-design40" => bytes::DESIGN40,
        "roof-rw43" => bytes::RW43,
        "roof-copy" => bytes::COPY,
        _ => bytes::LAMB,
    }
}

/// Elements per iteration of a group.
fn elements(group: &str) -> Option<u64> {
    if let Some(label) = group.strip_prefix("layer_") {
        return LAYER_SIZES
            .iter()
            .find(|(l, _)| *l == label)
            .map(|(_, n)| *n as u64);
    }
    let label = group.strip_prefix("model_")?;
    model_workloads()
        .into_iter()
        .find(|(l, _)| *l == label)
        .map(|(_, s)| s.iter().map(|(_, n)| *n as u64).sum())
}

/// Prints every result as ns/element and % of roofline; returns their JSON rows.
fn result_rows(rs: &[BenchResult]) -> Vec<serde_json::Value> {
    println!(
        "{:<28} {:<16} {:>12} {:>9} {:>9} {:>10} {:>9}",
        "group", "function", "median", "ns/elem", "GB/s", "%roof44", "t/t(40B)"
    );
    let mut rows = vec![];
    let roof_16m = results::find(rs, "layer_16M", "roof-same44");
    for r in rs {
        let Some(n) = elements(&r.group) else {
            continue;
        };
        let per = bytes_per_element(&r.function);
        let gbps = per as f64 * n as f64 / r.median_ns;
        // % of the same-traffic roofline: for a layer, the roof-same44 of the same size;
        // for a model, the single-thread 16M roof-same44 (the DRAM-resident case).
        let roof = if r.group.starts_with("layer_") {
            results::find(rs, &r.group, "roof-same44")
        } else {
            roof_16m
        };
        let roof_gbps = roof.map(|x| 44.0 * elements(&x.group).unwrap_or(0) as f64 / x.median_ns);
        let pct = roof_gbps.map(|rg| 100.0 * gbps / rg);
        let vs40 = results::find(rs, &r.group, "roof-design40")
            .filter(|_| per == 44)
            .map(|d| r.median_ns / d.median_ns);
        println!(
            "{:<28} {:<16} {:>12} {:>9.3} {:>9.1} {:>10} {:>9}",
            r.group,
            r.function,
            human_ns(r.median_ns),
            r.median_ns / n as f64,
            gbps,
            pct.map_or("-".into(), |p| format!("{p:.0}%")),
            vs40.map_or("-".into(), |x| format!("{x:.2}")),
        );
        rows.push(json!({
            "group": r.group,
            "function": r.function,
            "median_ns": r.median_ns,
            "median_ci_ns": [r.median_ci_ns.0, r.median_ci_ns.1],
            "elements": n,
            "bytes_per_element": per,
            "ns_per_element": r.median_ns / n as f64,
            "gb_per_s": gbps,
            "pct_of_roof44": pct,
            "time_vs_design40": vs40,
        }));
    }
    rows
}

/// Prints the speed targets (and two context ratios); returns their JSON entries and
/// whether one was missed.
fn targets(rs: &[BenchResult], backend: Backend) -> (Vec<serde_json::Value>, bool) {
    let mut missed = false;
    let mut targets = vec![];
    let dispatched = format!("lamb-{backend}");
    let t1 = ratio(rs, "layer_16M", "roof-same44", &dispatched);
    report_target(
        &format!(
            "16M layer, 1 thread: {dispatched} bytes/s vs same-traffic roofline (roof-same44)"
        ),
        t1,
        0.85,
        true,
        &mut missed,
    );
    targets.push(json!({"name": "16M dispatched vs roof-same44", "backend": backend.name(), "value": t1, "target": 0.85}));
    let t2 = ratio(rs, "layer_64K", "lamb-portable", "lamb-avx2");
    report_target(
        "64K layer: lamb-avx2 speed-up over lamb-portable",
        t2,
        1.7,
        false,
        &mut missed,
    );
    targets.push(json!({"name": "64K avx2 / portable", "value": t2, "target": 1.7}));
    if let Some(x) = ratio(rs, "layer_16M", "roof-design40", &dispatched) {
        println!(
            "  (honesty) 16M {dispatched} vs the 40 B two-pass loop: {:.0}% of its speed",
            100.0 * x
        );
    }
    if let Some(x) = ratio(rs, "layer_16M", "roof-rw43", &dispatched) {
        println!(
            "  (context) 16M {dispatched} vs single-pass read-4/write-3 (28 B, Adam traffic): {:.0}% of its speed",
            100.0 * x
        );
    }
    (targets, missed)
}

/// Writes the rows, targets and the benches' allocation notes as JSON to `path`.
fn write_json(
    args: &Args,
    path: &std::path::Path,
    rows: Vec<serde_json::Value>,
    targets: Vec<serde_json::Value>,
) {
    let meta: Vec<String> = ["kernels", "model"]
        .iter()
        .filter_map(|n| std::fs::read_to_string(args.dir.join(format!("lamb-meta-{n}.txt"))).ok())
        .collect();
    let doc = json!({
        "cpu": lamb_benches::cpu_model(),
        "backend": args.backend.name(),
        "criterion_dir": args.dir.display().to_string(),
        "results": rows,
        "targets": targets,
        "notes": meta.join(""),
    });
    if let Some(parent) = path.parent() {
        let _ = std::fs::create_dir_all(parent);
    }
    match std::fs::write(path, serde_json::to_string_pretty(&doc).expect("json")) {
        Ok(()) => println!("\nwrote {}", path.display()),
        Err(e) => {
            eprintln!("perf-check: cannot write {}: {e}", path.display());
            std::process::exit(2);
        }
    }
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("perf-check: {e}");
            std::process::exit(2);
        }
    };
    let mut rs = results::load(&args.dir);
    rs.sort_by_key(|r| order(&r.group, &r.function));
    if rs.is_empty() {
        eprintln!(
            "perf-check: no criterion results under {} (run `cargo bench -p benches` first)",
            args.dir.display()
        );
        std::process::exit(1);
    }

    println!("criterion results: {}", args.dir.display());
    let rows = result_rows(&rs);
    println!();
    let (targets, missed) = targets(&rs, args.backend);
    if let Some(path) = &args.json {
        write_json(&args, path, rows, targets);
    }
    if args.strict && missed {
        std::process::exit(3);
    }
}

/// Sort key: layers by size then models, and within a group lamb-core backends (slowest
/// first), pulp, rooflines, lamb-std thread counts.
fn order(group: &str, function: &str) -> (usize, usize, String) {
    let g = group
        .strip_prefix("layer_")
        .and_then(|l| LAYER_SIZES.iter().position(|(x, _)| *x == l))
        .or_else(|| {
            let m = group.strip_prefix("model_")?;
            model_workloads()
                .iter()
                .position(|(x, _)| *x == m)
                .map(|i| 100 + i)
        })
        .unwrap_or(1000);
    const FNS: [&str; 11] = [
        "lamb-scalar",
        "lamb-portable",
        "lamb-avx2",
        "lamb-avx512",
        "lamb-neon",
        "pulp-v4",
        "pulp-v3",
        "roof-same44",
        "roof-design40",
        "roof-rw43",
        "roof-copy",
    ];
    let f = FNS.iter().position(|x| *x == function).unwrap_or(FNS.len());
    (g, f, function.to_string())
}

/// `time(num) / time(den)` for two functions of one group: how much faster `den` is.
fn ratio(rs: &[BenchResult], group: &str, num: &str, den: &str) -> Option<f64> {
    let a = results::find(rs, group, num)?;
    let b = results::find(rs, group, den)?;
    Some(a.median_ns / b.median_ns)
}

fn report_target(what: &str, value: Option<f64>, target: f64, pct: bool, missed: &mut bool) {
    let fmt = |x: f64| {
        if pct {
            format!("{:.1}%", 100.0 * x)
        } else {
            format!("{x:.2}x")
        }
    };
    match value {
        Some(x) => {
            let ok = x >= target;
            *missed |= !ok;
            println!(
                "[{}] {what}: {} (target >= {})",
                if ok { "MET" } else { "MISSED" },
                fmt(x),
                fmt(target)
            );
        }
        None => {
            *missed = true;
            println!(
                "[NO DATA] {what}: result missing (target >= {})",
                fmt(target)
            );
        }
    }
}

fn human_ns(ns: f64) -> String {
    if ns >= 1e9 {
        format!("{:.3} s", ns / 1e9)
    } else if ns >= 1e6 {
        format!("{:.3} ms", ns / 1e6)
    } else if ns >= 1e3 {
        format!("{:.3} µs", ns / 1e3)
    } else {
        format!("{ns:.1} ns")
    }
}
