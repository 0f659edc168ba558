//! Reads criterion's results (`<criterion dir>/**/new/{benchmark,estimates}.json`).

use std::path::{Path, PathBuf};

use serde_json::Value;

/// One benchmark's result.
#[derive(Clone, Debug)]
pub struct BenchResult {
    /// Criterion group, e.g. `layer_16M`.
    pub group: String,
    /// Function id, e.g. `lamb-avx512`.
    pub function: String,
    /// Median time of one iteration, ns.
    pub median_ns: f64,
    /// Lower and upper bound of the median's 95% confidence interval, ns.
    pub median_ci_ns: (f64, f64),
    /// Bytes per iteration, from the bench's `Throughput::Bytes`.
    pub bytes: Option<u64>,
    /// Elements per iteration, from `Throughput::Elements` (model benches).
    pub elements: Option<u64>,
}

impl BenchResult {
    /// Bytes per second at the median time.
    pub fn bytes_per_s(&self) -> Option<f64> {
        self.bytes.map(|b| b as f64 / (self.median_ns * 1e-9))
    }
}

/// Every benchmark under `dir` that has a `new/estimates.json`, sorted by group then id.
pub fn load(dir: &Path) -> Vec<BenchResult> {
    let mut out = vec![];
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            if !p.is_dir() {
                continue;
            }
            if p.file_name().is_some_and(|n| n == "new") {
                if let Some(r) = read_one(&p) {
                    out.push(r);
                }
            } else if p.file_name().is_none_or(|n| n != "report" && n != "base") {
                stack.push(p);
            }
        }
    }
    out.sort_by(|a, b| (&a.group, &a.function).cmp(&(&b.group, &b.function)));
    out
}

fn read_json(p: PathBuf) -> Option<Value> {
    serde_json::from_str(&std::fs::read_to_string(p).ok()?).ok()
}

fn read_one(new: &Path) -> Option<BenchResult> {
    let bench = read_json(new.join("benchmark.json"))?;
    let est = read_json(new.join("estimates.json"))?;
    let median = &est["median"];
    let tp = &bench["throughput"];
    let mut function = bench["function_id"].as_str().unwrap_or("").to_string();
    if let Some(v) = bench["value_str"].as_str() {
        function = format!("{function}/{v}");
    }
    Some(BenchResult {
        group: bench["group_id"].as_str()?.to_string(),
        function,
        median_ns: median["point_estimate"].as_f64()?,
        median_ci_ns: (
            median["confidence_interval"]["lower_bound"].as_f64()?,
            median["confidence_interval"]["upper_bound"].as_f64()?,
        ),
        bytes: tp["Bytes"].as_u64().or_else(|| tp["BytesDecimal"].as_u64()),
        elements: tp["Elements"].as_u64(),
    })
}

/// The result `group`/`function`, if present.
pub fn find<'a>(rs: &'a [BenchResult], group: &str, function: &str) -> Option<&'a BenchResult> {
    rs.iter()
        .find(|r| r.group == group && r.function == function)
}
