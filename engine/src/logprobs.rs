//! Log-probabilities of sampled tokens (OpenAI `logprobs` / `top_logprobs`).

/// Log-probabilities of one sampled token under the model's distribution (log-softmax of the
/// raw logits, before temperature or top-k/top-p, as vLLM and OpenAI report them).
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprobs {
    /// Log-probability of the sampled token (natural log, ≤ 0).
    pub logprob: f32,
    /// The `n` most likely tokens, most likely first (ties: lower id first).
    pub top: Vec<(u32, f32)>,
}

/// Log-softmax of `logits` at `token`, and the `top` most likely tokens. NaN logits count as
/// impossible (−∞).
pub fn token_logprobs(logits: &[f32], token: u32, top: usize) -> TokenLogprobs {
    let max = logits.iter().copied().filter(|v| !v.is_nan()).fold(f32::NEG_INFINITY, f32::max);
    let sum: f64 = logits.iter().filter(|v| !v.is_nan()).map(|&v| ((v - max) as f64).exp()).sum();
    let lse = max as f64 + sum.ln();
    let lp = |v: f32| if v.is_nan() { f32::NEG_INFINITY } else { (v as f64 - lse) as f32 };
    let mut order: Vec<u32> = Vec::new();
    if top > 0 {
        order = (0..logits.len() as u32).filter(|&i| !logits[i as usize].is_nan()).collect();
        let k = top.min(order.len());
        let cmp = |a: &u32, b: &u32| logits[*b as usize].total_cmp(&logits[*a as usize]).then(a.cmp(b));
        if k > 0 && k < order.len() {
            order.select_nth_unstable_by(k - 1, cmp);
        }
        order.truncate(k);
        order.sort_by(cmp);
    }
    TokenLogprobs {
        logprob: logits.get(token as usize).map_or(f32::NEG_INFINITY, |&v| lp(v)),
        top: order.into_iter().map(|i| (i, lp(logits[i as usize]))).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logprobs_are_a_log_softmax_with_sorted_alternatives() {
        let logits = [0.0f32, (2.0f32).ln(), (7.0f32).ln()];
        let l = token_logprobs(&logits, 1, 2);
        assert!((l.logprob - (0.2f32).ln()).abs() < 1e-6);
        assert_eq!(l.top.len(), 2);
        assert_eq!(l.top[0].0, 2);
        assert!((l.top[0].1 - (0.7f32).ln()).abs() < 1e-6);
        assert_eq!(l.top[1].0, 1);
        assert!(token_logprobs(&logits, 0, 0).top.is_empty());
        assert_eq!(token_logprobs(&logits, 0, 10).top.len(), 3);
    }
}
