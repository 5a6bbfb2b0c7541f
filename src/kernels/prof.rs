//! Where a forward pass spends its wall-clock time, phase by phase: off unless `HAYLOFT_PROFILE=1`.
//!
//! The forward passes open a [`scope`] around each phase (the projections, attention, the element-wise ops ...) on
//! the thread that drives the pass; the time a scope is open, and how often, is added to that phase's counters. With
//! the variable unset a scope costs one relaxed load. `hayloft bench speed` prints the split after each row when it is
//! on: comparing the split at 2 and at 16 threads shows which phase stops scaling (a serial element-wise op, a
//! product split too finely), on a machine where no sampling profiler runs.
//! [`Phase::Quantize`] (the activations' quantization inside every product) is also counted within its product's
//! phase; every other phase excludes the others.

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering::Relaxed};
use std::time::Instant;

/// A part of the forward pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Token embedding rows.
    Embed,
    /// RMSNorm of a block's input.
    Norm,
    /// Q, K, V projections.
    Qkv,
    /// Biases, QK-norm and RoPE on the projected rows.
    Rope,
    /// Appending keys and values to the cache.
    KvAppend,
    /// Selection and attention over the cache.
    Attention,
    /// Output projection of attention.
    Wo,
    /// Gate and up projections of the feed-forward block.
    FfnUp,
    /// The gate's activation times up.
    Act,
    /// Down projection.
    FfnDown,
    /// Residual additions.
    Residual,
    /// Final norm and output head.
    Logits,
    /// Quantizing a product's activations (counted inside the product's phase too).
    Quantize,
    /// A decode-time selector choosing what attention reads (counted inside attention too).
    Select,
}

const PHASES: [Phase; 14] = [
    Phase::Embed,
    Phase::Norm,
    Phase::Qkv,
    Phase::Rope,
    Phase::KvAppend,
    Phase::Attention,
    Phase::Wo,
    Phase::FfnUp,
    Phase::Act,
    Phase::FfnDown,
    Phase::Residual,
    Phase::Logits,
    Phase::Quantize,
    Phase::Select,
];

impl Phase {
    pub fn name(self) -> &'static str {
        match self {
            Phase::Embed => "embed",
            Phase::Norm => "norm",
            Phase::Qkv => "qkv",
            Phase::Rope => "rope",
            Phase::KvAppend => "kv-append",
            Phase::Attention => "attention",
            Phase::Wo => "wo",
            Phase::FfnUp => "ffn-up",
            Phase::Act => "act",
            Phase::FfnDown => "ffn-down",
            Phase::Residual => "residual",
            Phase::Logits => "logits",
            Phase::Quantize => "(quantize)",
            Phase::Select => "(select)",
        }
    }
}

#[allow(clippy::declare_interior_mutable_const)] // array initializer only
const ZERO: AtomicU64 = AtomicU64::new(0);
static NS: [AtomicU64; PHASES.len()] = [ZERO; PHASES.len()];
static CALLS: [AtomicU64; PHASES.len()] = [ZERO; PHASES.len()];
/// 0 = not read yet, 1 = off, 2 = on.
static STATE: AtomicU8 = AtomicU8::new(0);

/// Whether `HAYLOFT_PROFILE` asks for the split (read once).
pub fn enabled() -> bool {
    match STATE.load(Relaxed) {
        0 => {
            let on = std::env::var("HAYLOFT_PROFILE").is_ok_and(|v| !v.is_empty() && v != "0");
            STATE.store(if on { 2 } else { 1 }, Relaxed);
            on
        }
        s => s == 2,
    }
}

/// An open phase; its time is added when it drops.
pub struct Scope(Option<(Phase, Instant)>);

/// Opens `p` until the returned guard drops (nothing when profiling is off).
#[inline]
pub fn scope(p: Phase) -> Scope {
    Scope(enabled().then(|| (p, Instant::now())))
}

impl Drop for Scope {
    fn drop(&mut self) {
        if let Some((p, t0)) = self.0 {
            let i = p as usize;
            NS[i].fetch_add(t0.elapsed().as_nanos() as u64, Relaxed);
            CALLS[i].fetch_add(1, Relaxed);
        }
    }
}

/// The phases' (name, nanoseconds, calls) since the last call, in pass order, and resets them.
pub fn take() -> Vec<(&'static str, u64, u64)> {
    PHASES
        .iter()
        .map(|&p| {
            let i = p as usize;
            (p.name(), NS[i].swap(0, Relaxed), CALLS[i].swap(0, Relaxed))
        })
        .collect()
}

/// One line of the split since the last [`take`] (which it does): each phase's share of the phases' total
/// (quantization apart) and its milliseconds per `per` (a token, a pass).
pub fn summary(per: f64) -> String {
    summary_of(&[take()], per)
}

/// [`summary`] of several [`take`]s added up.
pub fn summary_of(takes: &[Vec<(&'static str, u64, u64)>], per: f64) -> String {
    let mut t: Vec<(&'static str, u64, u64)> = PHASES.iter().map(|p| (p.name(), 0, 0)).collect();
    for one in takes {
        for (sum, x) in t.iter_mut().zip(one) {
            sum.1 += x.1;
            sum.2 += x.2;
        }
    }
    let total: u64 = t
        .iter()
        .filter(|(n, _, _)| !n.starts_with('('))
        .map(|x| x.1)
        .sum();
    let mut out = format!("total {:.3} ms", total as f64 / 1e6 / per);
    for (name, ns, calls) in t {
        if calls > 0 {
            out += &format!(
                " | {name} {:.1}% {:.3} ms",
                100.0 * ns as f64 / total.max(1) as f64,
                ns as f64 / 1e6 / per
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_scope_adds_its_time_and_one_call_and_take_resets() {
        STATE.store(2, Relaxed);
        take();
        {
            let _s = scope(Phase::Act);
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
        let t = take();
        let act = t.iter().find(|x| x.0 == "act").expect("act phase");
        // (Other tests' passes may add to the counters while this one has profiling on.)
        assert!(act.2 >= 1);
        assert!(act.1 >= 2_000_000, "{} ns", act.1);
        STATE.store(0, Relaxed);
    }
}
