//! Benchmarks for lamb (see `benches/`).
