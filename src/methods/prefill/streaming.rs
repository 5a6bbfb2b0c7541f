//! Streaming heads in prefill — after Xiao et al., "DuoAttention: Efficient Long-Context LLM Inference with Retrieval
//! and Streaming Heads" (2024).
//!
//! Mechanism: retrieval heads attend to the whole prompt; streaming heads only to the attention sinks and a recent
//! window, in prefill as in decoding. The roles come from `hayloft heads`' file (per layer × KV head, retrieval =
//! score above its threshold, as `--kv duo` reads it), so a streaming head here is a KV head: every query of its group
//! reads the first `sink` keys and its last `local` keys ([`super::plan::HeadPlan`]'s A-shape). Defaults 128 + 256 are
//! the paper's sink and recent sizes.

use anyhow::Result;

use super::plan::{prefill_shape, HeadPlan};
use super::{Scope, StreamingSpec};
use crate::attention::TileSelection;
use crate::methods::duo::Roles;
use crate::model::{ModelConfig, PrefillPattern, SelectCx};

pub const DEFAULT_SINK: usize = 128;
pub const DEFAULT_LOCAL: usize = 256;

pub struct Streaming {
    /// [layer · kv_heads + head]: a retrieval head (dense).
    retrieval: Vec<bool>,
    n_kv: usize,
    sink: usize,
    local: usize,
    scope: Scope,
    plan: HeadPlan,
}

impl Streaming {
    pub fn new(spec: &StreamingSpec, mc: &ModelConfig) -> Result<Self> {
        let roles = Roles::load(&spec.heads, mc)?;
        let mut retrieval = vec![false; roles.n_streams];
        for &c in &roles.candidates {
            retrieval[c] = true;
        }
        Ok(Self {
            retrieval,
            n_kv: mc.n_kv_heads,
            sink: spec.sink,
            local: spec.local,
            scope: spec.scope.clone(),
            plan: HeadPlan::default(),
        })
    }
}

impl PrefillPattern for Streaming {
    fn pattern(&mut self, cx: &SelectCx, out: &mut TileSelection) -> bool {
        if cx.layer < self.scope.from || !prefill_shape(cx) {
            return false;
        }
        let len = cx.pos[cx.pos.len() - 1] as usize + 1;
        if len < self.scope.min_len {
            return false;
        }
        out.reset(self.n_kv, cx.pos.len());
        for h in 0..self.n_kv {
            self.plan.reset(len);
            if self.retrieval[cx.layer * self.n_kv + h] {
                self.plan.dense = true;
            } else {
                self.plan.add_a_shape(self.sink, self.local);
            }
            self.plan.emit(h, cx.pos, out);
        }
        out.finish();
        true
    }
}
