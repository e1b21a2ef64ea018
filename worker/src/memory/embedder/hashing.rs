//! Offline embeddings by feature hashing: each word and each character trigram of a
//! text adds ±1 to one of `dimensions` buckets. Texts sharing words or spellings get
//! close vectors; synonyms and paraphrases with other words do not. Needs no model
//! and no network, which makes it the default; use a real embedding model for
//! meaning.

use async_trait::async_trait;
use xxhash_rust::xxh3::xxh3_64;

use super::{EmbedError, Embedder, normalize};

pub struct HashingEmbedder {
    dimensions: usize,
}

/// Weight of a whole word against one of its trigrams: a shared word counts more
/// than a shared spelling fragment.
const WORD_WEIGHT: f32 = 2.0;

impl HashingEmbedder {
    pub fn new(dimensions: usize) -> Self {
        Self {
            dimensions: dimensions.max(1),
        }
    }

    pub fn embed_one(&self, text: &str) -> Vec<f32> {
        let mut v = vec![0f32; self.dimensions];
        let lower = text.to_lowercase();
        for word in lower
            .split(|c: char| !c.is_alphanumeric())
            .filter(|w| !w.is_empty())
        {
            self.add(&mut v, word.as_bytes(), WORD_WEIGHT);
            let padded: Vec<char> = format!(" {word} ").chars().collect();
            for gram in padded.windows(3) {
                let gram: String = gram.iter().collect();
                self.add(&mut v, gram.as_bytes(), 1.0);
            }
        }
        normalize(&mut v);
        v
    }

    fn add(&self, v: &mut [f32], feature: &[u8], weight: f32) {
        let h = xxh3_64(feature);
        let bucket = (h % self.dimensions as u64) as usize;
        // The top bit picks the sign, so colliding features tend to cancel out
        // instead of piling up.
        v[bucket] += if h >> 63 == 0 { weight } else { -weight };
    }
}

#[async_trait]
impl Embedder for HashingEmbedder {
    fn id(&self) -> String {
        format!("hashing-v1/{}", self.dimensions)
    }

    fn dimensions(&self) -> usize {
        self.dimensions
    }

    async fn embed(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, EmbedError> {
        Ok(texts.iter().map(|t| self.embed_one(t)).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cosine(a: &[f32], b: &[f32]) -> f32 {
        a.iter().zip(b).map(|(x, y)| x * y).sum()
    }

    #[test]
    fn shared_words_are_closer_than_unrelated_text() {
        let e = HashingEmbedder::new(384);
        let fact = e.embed_one("Ada's favourite colour is teal");
        let query = e.embed_one("what colour does Ada like?");
        let other = e.embed_one("the train leaves at nine");
        assert!(cosine(&fact, &query) > cosine(&fact, &other) + 0.1);
        assert!((cosine(&fact, &fact) - 1.0).abs() < 1e-5);
    }
}
