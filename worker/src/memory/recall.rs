//! Merging rankings and fitting recalled memories into a prompt.

use std::collections::HashMap;

use super::estimate_tokens;
use super::item::Hit;

/// The constant of reciprocal rank fusion: a memory at rank `r` (from 1) in a list
/// scores `1 / (RRF_K + r)`. 60 is the value of the original paper (Cormack et al.,
/// 2009); it keeps a single first place from outweighing agreement between lists.
pub const RRF_K: f64 = 60.0;

/// Candidates each method contributes to a hybrid search of `k`: more than `k`, so
/// that a memory ranked just below the cut by one method can still win on the sum.
pub fn candidates(k: usize) -> usize {
    (k * 4).max(20)
}

/// Reciprocal rank fusion of `rankings` (ids, best first): ids with their fused
/// score, best first, at most `limit`. Ties keep the order of first appearance.
pub fn fuse(rankings: &[&[i64]], limit: usize) -> Vec<(i64, f64)> {
    let mut scores: HashMap<i64, (f64, usize)> = HashMap::new();
    let mut order = 0;
    for ranking in rankings {
        for (rank, id) in ranking.iter().enumerate() {
            let entry = scores.entry(*id).or_insert_with(|| {
                order += 1;
                (0.0, order)
            });
            entry.0 += 1.0 / (RRF_K + rank as f64 + 1.0);
        }
    }
    let mut fused: Vec<(i64, f64, usize)> =
        scores.into_iter().map(|(id, (s, o))| (id, s, o)).collect();
    fused.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.2.cmp(&b.2)));
    fused
        .into_iter()
        .take(limit)
        .map(|(id, s, _)| (id, s))
        .collect()
}

/// The recalled memories as a block for the system prompt, best first, leaving out
/// those that would exceed `token_budget`. `None` when nothing fits.
pub fn prompt_block(hits: &[Hit], token_budget: usize) -> Option<String> {
    const HEADER: &str = "Relevant memories (from earlier conversations; may be outdated):";
    let mut used = estimate_tokens(HEADER);
    let mut block = String::from(HEADER);
    let mut any = false;
    for hit in hits {
        let line = format!(
            "\n- [{}] {}",
            hit.item.created_at.format("%Y-%m-%d"),
            hit.item.memory.text
        );
        let cost = estimate_tokens(&line);
        if used + cost > token_budget {
            continue;
        }
        used += cost;
        block.push_str(&line);
        any = true;
    }
    any.then_some(block)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agreement_beats_a_single_first_place() {
        let keyword = [1, 2, 3];
        let vector = [4, 2, 5];
        let fused = fuse(&[&keyword, &vector], 10);
        assert_eq!(fused[0].0, 2);
        assert_eq!(fused.len(), 5);
        assert_eq!(fuse(&[&keyword, &vector], 2).len(), 2);
    }
}
