//! Prints the README table of the `precision` bench from criterion's results: per storage
//! combination, bytes of optimizer state per parameter, bytes moved per element, and the
//! median ns/element of one step at 64K and 16M elements, with the 16M speed relative to
//! all-f32 storage measured in the same run.
//!
//! ```text
//! cargo bench -p benches --bench precision
//! cargo run -p benches --release --bin precision-table -- [--dir target/criterion]
//! ```

use std::path::PathBuf;

use lamb_benches::criterion_dir;
use lamb_benches::precision::{Combo, MomentFmt, ParamFmt, combos};
use lamb_benches::results::{self, BenchResult};

/// Median ns/element of combination `c` in group `precision_{label}` (`n` elements).
fn ns_per_elem(rs: &[BenchResult], label: &str, n: f64, c: Combo) -> Option<f64> {
    let r: &BenchResult = results::find(rs, &format!("precision_{label}"), &c.id())?;
    Some(r.median_ns / n)
}

/// `x` with three decimals, or a dash where there is no result.
fn fmt(x: Option<f64>) -> String {
    x.map_or("—".to_string(), |v| format!("{v:.3}"))
}

/// The table of every storage combination, one layer through lamb-core (`base16`: the
/// all-f32 ns/element at 16M).
fn combos_table(rs: &[BenchResult], base16: f64) {
    println!(
        "| params (grads) | moments | state B/param | moved B/element | ns/element 64K | ns/element 16M | 16M speed vs all-f32 |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|");
    for c in combos() {
        let small = ns_per_elem(rs, "64K", (1u64 << 16) as f64, c);
        let big = ns_per_elem(rs, "16M", (1u64 << 24) as f64, c);
        let params = match c.params {
            ParamFmt::F32 => "f32 (f32)",
            ParamFmt::Bf16 => "bf16 in place, nearest (bf16)",
            ParamFmt::Bf16Sr => "bf16 in place, stochastic (bf16)",
            ParamFmt::MasterBf16 => "bf16 + f32 master (bf16)",
            ParamFmt::MasterF16 => "f16 + f32 master (f16)",
        };
        let moments = match c.moments {
            MomentFmt::F32 => "f32",
            MomentFmt::Bf16 => "bf16 (stochastic)",
            MomentFmt::Q8 => "8-bit blockwise",
        };
        println!(
            "| {params} | {moments} | {:.2} | {:.1} | {} | {} | {} |",
            c.state_bytes(),
            c.traffic_bytes(),
            fmt(small),
            fmt(big),
            big.map_or("—".to_string(), |b| format!("{:.2}×", base16 / b)),
        );
    }
}

/// The same 16M layer through lamb-std on several threads (nothing where it did not run).
fn threads_table(rs: &[BenchResult]) {
    let threads: Vec<usize> = lamb_benches::thread_counts()
        .into_iter()
        .filter(|t| rs.iter().any(|r| r.group == format!("precision_16M_t{t}")))
        .collect();
    if threads.is_empty() {
        return;
    }
    println!();
    print!("| 16M layer, `Lamb::step_mixed` | moved B/element |");
    for t in &threads {
        print!(
            " ns/element, {t} thread{} |",
            if *t == 1 { "" } else { "s" }
        );
    }
    println!();
    println!("|---|---:|{}", "---:|".repeat(threads.len()));
    for params in [ParamFmt::F32, ParamFmt::Bf16] {
        for moments in [MomentFmt::F32, MomentFmt::Bf16, MomentFmt::Q8] {
            let c = Combo { params, moments };
            print!(
                "| params {} + moments {} | {:.1} |",
                params.name(),
                moments.name(),
                c.traffic_bytes()
            );
            for t in &threads {
                let r = results::find(rs, &format!("precision_16M_t{t}"), &c.id());
                print!(" {} |", fmt(r.map(|r| r.median_ns / (1u64 << 24) as f64)));
            }
            println!();
        }
    }
}

fn main() {
    let mut dir = criterion_dir();
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match (a.as_str(), it.next()) {
            ("--dir", Some(d)) => dir = PathBuf::from(d),
            _ => {
                eprintln!("usage: precision-table [--dir DIR]");
                std::process::exit(2);
            }
        }
    }
    let rs = results::load(&dir);
    let base = Combo {
        params: ParamFmt::F32,
        moments: MomentFmt::F32,
    };
    let Some(base16) = ns_per_elem(&rs, "16M", (1u64 << 24) as f64, base) else {
        eprintln!(
            "no precision_16M results under {}: run `cargo bench -p benches --bench precision`",
            dir.display()
        );
        std::process::exit(1);
    };
    combos_table(&rs, base16);
    threads_table(&rs);
}
