//! Benchmarks for lamb: shared pieces of the criterion benches (`benches/`) and the result
//! tools (`src/bin/`). See `benches/README.md` for what is measured and how to run it.

/// The code blocks of the workspace's README, run as doctests so that they cannot rot. They
/// live in this crate, which is never published, because the README is not part of either
/// library's package (each of those tests its own README).
#[cfg(doctest)]
#[doc = include_str!("../../README.md")]
pub struct ReadmeDoctests;

pub mod precision;
pub mod pulp_lamb;
pub mod results;
pub mod roof_model;
pub mod roofline;
pub mod shapes;

use std::path::PathBuf;

use rand::distr::OpenClosed01;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use lamb_std::buffer::{Aligned, AlignedBuf, Element, Placement};

/// A buffer whose placement the bench reports: any [`Aligned`] (f32 or compact).
pub trait Placed {
    /// Address range `[start, end)` of its elements.
    fn range(&self) -> (usize, usize);
    /// How it was placed.
    fn placement(&self) -> Placement;
}

impl<T: Element> Placed for Aligned<T> {
    fn range(&self) -> (usize, usize) {
        let start = self.as_ptr() as usize;
        (start, start + std::mem::size_of_val::<[T]>(self))
    }
    fn placement(&self) -> Placement {
        Aligned::placement(self)
    }
}

/// The single-layer sizes of the kernel benches, with their labels.
pub const LAYER_SIZES: [(&str, usize); 4] = [
    ("1K", 1 << 10),
    ("64K", 1 << 16),
    ("1M", 1 << 20),
    ("16M", 1 << 24),
];

/// The whole-model workloads: (label, tensor lengths).
pub fn model_workloads() -> Vec<(&'static str, Vec<(String, usize)>)> {
    vec![
        ("bert_base", crate::shapes::bert_base()),
        ("uniform_1000x1024", crate::shapes::uniform(1000, 1024)),
        ("single_16M", vec![("layer".to_string(), 1 << 24)]),
    ]
}

/// Registers a workload's layers with `opt` and makes each layer's parameters and
/// gradients ([`model_layer_buffers`], allocated right after the layer's registration): the
/// set-up every whole-model bench and the interleaved runner's worker share, so they step
/// the same model.
pub fn model_tensors(
    opt: &mut lamb_std::Lamb,
    shapes: &[(String, usize)],
) -> Result<(Vec<AlignedBuf>, Vec<AlignedBuf>), lamb_std::Error> {
    let (mut params, mut grads) = (Vec::new(), Vec::new());
    for (i, (name, len)) in shapes.iter().enumerate() {
        opt.add_layer(name.clone(), *len)?;
        let (p, g) = model_layer_buffers(i, *len);
        params.push(p);
        grads.push(g);
    }
    Ok((params, grads))
}

/// Layer `i`'s parameters and gradients, `len` elements each, in the optimizer's own aligned
/// buffers, filled by [`fill`] with per-layer seeds (params at scale 0.05, grads at 0.01):
/// what [`model_tensors`] gives a registered layer, and what the roofline workers
/// (`roof_model`) step without an optimizer.
pub fn model_layer_buffers(i: usize, len: usize) -> (AlignedBuf, AlignedBuf) {
    let mut p = AlignedBuf::zeroed(len);
    fill(&mut p, 2 * i as u64 + 1, 0.05, 0.0);
    let mut g = AlignedBuf::zeroed(len);
    fill(&mut g, 2 * i as u64 + 2, 0.01, 0.0);
    (p, g)
}

/// Thread counts of the model benches: 1, 2 and all cores, without repeats.
pub fn thread_counts() -> Vec<usize> {
    let all = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut t = vec![1, 2, all];
    t.sort_unstable();
    t.dedup();
    t
}

/// Fills `x` with deterministic values `scale · (offset + w)`, `w` uniform in `[-1, 1]`
/// (seeded by `seed`), never exactly zero when `offset` is 0 (so no gradient element is 0
/// and v stays positive): `w` is a magnitude in `(0, 1]` with a random sign.
pub fn fill(x: &mut [f32], seed: u64, scale: f32, offset: f32) {
    let mut rng = SmallRng::seed_from_u64(seed);
    for e in x.iter_mut() {
        let magnitude: f32 = rng.sample(OpenClosed01);
        let w = if rng.random() { magnitude } else { -magnitude };
        *e = scale * (offset + w);
    }
}

/// A human description of how a set of buffers was placed, e.g.
/// `4 × 64 MiB AlignedBuf: 4 huge-page (2 MiB-aligned, MADV_HUGEPAGE accepted)`.
pub fn describe_placement<'a, B: Placed + ?Sized + 'a>(
    bufs: impl IntoIterator<Item = &'a B>,
) -> String {
    let (mut n, mut bytes) = (0usize, 0usize);
    let (mut huge, mut aligned, mut line) = (0, 0, 0);
    for b in bufs {
        n += 1;
        let (start, end) = b.range();
        bytes += end - start;
        match b.placement() {
            Placement::HugePages => huge += 1,
            Placement::HugeAligned => aligned += 1,
            Placement::CacheLine => line += 1,
        }
    }
    let mut parts = vec![];
    if huge > 0 {
        parts.push(format!(
            "{huge} huge-page (2 MiB-aligned, MADV_HUGEPAGE accepted)"
        ));
    }
    if aligned > 0 {
        parts.push(format!(
            "{aligned} 2 MiB-aligned (MADV_HUGEPAGE refused/unavailable)"
        ));
    }
    if line > 0 {
        parts.push(format!("{line} 64 B-aligned (< 2 MiB)"));
    }
    format!(
        "{n} AlignedBuf, {} total: {}",
        human_bytes(bytes),
        parts.join(", ")
    )
}

/// `12.0 MiB` style.
pub fn human_bytes(b: usize) -> String {
    let b = b as f64;
    if b >= (1u64 << 30) as f64 {
        format!("{:.2} GiB", b / (1u64 << 30) as f64)
    } else if b >= (1 << 20) as f64 {
        format!("{:.1} MiB", b / (1 << 20) as f64)
    } else {
        format!("{:.1} KiB", b / 1024.0)
    }
}

/// The CPU model line of `/proc/cpuinfo` (`unknown` elsewhere).
pub fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

/// The transparent-huge-page mode (`always [madvise] never` → `madvise`).
pub fn thp_mode() -> String {
    std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled")
        .ok()
        .and_then(|s| {
            let a = s.find('[')?;
            let b = s[a..].find(']')?;
            Some(s[a + 1..a + b].to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

/// KiB of transparent huge pages in the mappings that hold `bufs`: the `AnonHugePages` of
/// every `/proc/self/smaps` mapping that overlaps one of them, each mapping counted once.
/// A mapping can be larger than the buffers in it, so this is an upper bound; `None` where
/// smaps is unreadable.
pub fn huge_kib_of<'a, B: Placed + ?Sized + 'a>(
    bufs: impl IntoIterator<Item = &'a B>,
) -> Option<u64> {
    let ranges: Vec<(usize, usize)> = bufs
        .into_iter()
        .map(|b| b.range())
        .filter(|&(s, e)| s < e)
        .collect();
    let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
    let (mut total, mut hit) = (0u64, false);
    for line in smaps.lines() {
        let first = line.split_whitespace().next().unwrap_or("");
        if let Some((a, b)) = first.split_once('-')
            && let (Ok(a), Ok(b)) = (usize::from_str_radix(a, 16), usize::from_str_radix(b, 16))
        {
            hit = ranges.iter().any(|&(s, e)| s < b && a < e);
            continue;
        }
        if hit && line.starts_with("AnonHugePages:") {
            total += line.split_whitespace().nth(1)?.parse::<u64>().ok()?;
        }
    }
    Some(total)
}

/// One line for a bench's output: how `bufs` were placed, and how much of them the kernel
/// actually backs with huge pages (call it after the buffers were written).
pub fn placement_line<'a, B: Placed + ?Sized + 'a>(
    what: &str,
    bufs: impl IntoIterator<Item = &'a B> + Clone,
) -> String {
    let bytes: usize = bufs
        .clone()
        .into_iter()
        .map(|b| {
            let (s, e) = b.range();
            e - s
        })
        .sum();
    let huge = huge_kib_of(bufs.clone())
        .map(|k| {
            format!(
                "; backed by THP: {} of {}",
                human_bytes(k as usize * 1024),
                human_bytes(bytes)
            )
        })
        .unwrap_or_default();
    format!(
        "[alloc] {what}: {} (THP mode: {}{huge})",
        describe_placement(bufs),
        thp_mode()
    )
}

/// Where criterion writes its results: `$CRITERION_HOME`, else `$CARGO_TARGET_DIR/criterion`,
/// else the workspace's `target/criterion` (criterion's own order of preference).
pub fn criterion_dir() -> PathBuf {
    if let Some(h) = std::env::var_os("CRITERION_HOME") {
        return h.into();
    }
    if let Some(t) = std::env::var_os("CARGO_TARGET_DIR") {
        return PathBuf::from(t).join("criterion");
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("target")
        .join("criterion")
}

/// Notes a bench prints as it goes (how buffers were placed, which backend ran, what was
/// skipped) and saves next to criterion's results as `lamb-meta-<name>.txt` for the report.
#[derive(Default)]
pub struct Meta(Vec<String>);

impl Meta {
    /// Prints `line` and keeps it.
    pub fn note(&mut self, line: impl Into<String>) {
        let line = line.into();
        println!("{line}");
        self.0.push(line);
    }

    /// Writes the notes to `<criterion dir>/lamb-meta-<name>.txt`; a failure is reported,
    /// never fatal. Not in criterion's `--test`, `--list` or `--profile-time` modes, which
    /// store no results either (so a CI smoke run leaves a real run's notes alone).
    pub fn save(&self, name: &str) {
        if std::env::args()
            .any(|a| a == "--test" || a == "--list" || a.starts_with("--profile-time"))
        {
            return;
        }
        let dir = criterion_dir();
        let text = self.0.join("\n") + "\n";
        let path = dir.join(format!("lamb-meta-{name}.txt"));
        if let Err(e) = std::fs::create_dir_all(&dir).and_then(|_| std::fs::write(&path, text)) {
            eprintln!("note: could not write {}: {e}", path.display());
        }
    }
}

/// `true` when the command line sets the sample size or asks for criterion's quick or test
/// modes: the benches then leave criterion's settings alone.
pub fn cli_sets_sampling() -> bool {
    std::env::args().any(|a| {
        a == "--quick" || a == "--test" || a == "--sample-size" || a.starts_with("--sample-size=")
    })
}
