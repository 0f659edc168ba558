//! Parameter-set shapes of real models, for the benches (and lamb-std's optimizer tests,
//! which include this file with `#[path]` instead of keeping a copy).

/// The 199 tensors of BERT-base (uncased, as in HuggingFace `bert-base-uncased`), in
/// `named_parameters()` order: 109,482,240 f32 parameters.
///
/// ```
/// let shapes = lamb_benches::shapes::bert_base();
/// assert_eq!(shapes.len(), 199);
/// assert_eq!(shapes.iter().map(|(_, n)| n).sum::<usize>(), 109_482_240);
/// ```
pub fn bert_base() -> Vec<(String, usize)> {
    const H: usize = 768;
    const FF: usize = 3072;
    let mut s: Vec<(String, usize)> = vec![
        ("embeddings.word_embeddings.weight".into(), 30522 * H),
        ("embeddings.position_embeddings.weight".into(), 512 * H),
        ("embeddings.token_type_embeddings.weight".into(), 2 * H),
        ("embeddings.LayerNorm.weight".into(), H),
        ("embeddings.LayerNorm.bias".into(), H),
    ];
    for l in 0..12 {
        let p = format!("encoder.layer.{l}");
        for (name, len) in [
            ("attention.self.query.weight", H * H),
            ("attention.self.query.bias", H),
            ("attention.self.key.weight", H * H),
            ("attention.self.key.bias", H),
            ("attention.self.value.weight", H * H),
            ("attention.self.value.bias", H),
            ("attention.output.dense.weight", H * H),
            ("attention.output.dense.bias", H),
            ("attention.output.LayerNorm.weight", H),
            ("attention.output.LayerNorm.bias", H),
            ("intermediate.dense.weight", FF * H),
            ("intermediate.dense.bias", FF),
            ("output.dense.weight", H * FF),
            ("output.dense.bias", H),
            ("output.LayerNorm.weight", H),
            ("output.LayerNorm.bias", H),
        ] {
            s.push((format!("{p}.{name}"), len));
        }
    }
    s.push(("pooler.dense.weight".into(), H * H));
    s.push(("pooler.dense.bias".into(), H));
    s
}

/// The same tensors with every length divided by `div` (at least 1 element each), for
/// tests that want BERT's structure at a fraction of its size.
///
/// ```
/// let small = lamb_benches::shapes::scaled(&lamb_benches::shapes::bert_base(), 1000);
/// assert_eq!(small.len(), 199);
/// assert!(small.iter().all(|(_, n)| *n >= 1));
/// ```
pub fn scaled(shapes: &[(String, usize)], div: usize) -> Vec<(String, usize)> {
    shapes
        .iter()
        .map(|(n, len)| (n.clone(), (len / div.max(1)).max(1)))
        .collect()
}

/// `count` tensors of `len` elements each, named `layer.{i}`.
///
/// ```
/// assert_eq!(lamb_benches::shapes::uniform(1000, 1024).len(), 1000);
/// ```
pub fn uniform(count: usize, len: usize) -> Vec<(String, usize)> {
    (0..count).map(|i| (format!("layer.{i}"), len)).collect()
}
