//! `report.md`, `summary.json` and the PNG plots, made from every record in `results.jsonl` (so a resumed run
//! reports the whole run).
//!
//! Tables: accuracy per task × KV spec × length (and as % of the full cache when `full` ran), resources per task ×
//! spec × length (prompt tokens, peak KV bytes, TTFT, prefill and decode tok/s), the NIAH depth × length grid per
//! spec, accuracy per turn for conversations, and the harness's own time against model time.
//! Plots: NIAH heatmaps; with several specs, accuracy against KV memory (peak KV bytes as a share of the full
//! cache's on the same cases) per method; with several lengths, decode speed and TTFT against context length.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Result;
use serde::Serialize;

use super::length_label;
use super::plot;
use super::runner::{CaseResult, ResultsFile};
use crate::engine::stats::human_bytes;
use crate::methods::{CompressAt, KvSpec};

/// Means over a group of cases.
#[derive(Clone, Debug, Serialize)]
pub struct Group {
    pub task: String,
    pub kv: String,
    pub target_len: usize,
    pub cases: usize,
    pub score: f64,
    /// Score as a share of the full cache's on the same task and length (when `full` ran).
    pub pct_of_full: Option<f64>,
    pub prompt_tokens: f64,
    pub peak_kv_bytes: f64,
    /// KV bytes held at the end of the case (after compression).
    pub final_kv_bytes: f64,
    /// Mean KV bytes read per decoded token.
    pub kv_read_bytes_per_token: f64,
    /// Peak KV bytes as a share of the full cache's on the same task and length.
    pub kv_fraction: Option<f64>,
    /// The `--prefill` specs the group's cases ran under (one, unless results of several runs share a folder) and
    /// their mean share of dense prefill work ([`CaseResult::prefill_share`]).
    pub prefill: String,
    pub prefill_share: f64,
    pub ttft_ms: f64,
    pub prefill_tok_s: f64,
    pub decode_tok_s: f64,
}

#[derive(Serialize)]
pub struct NiahGrid {
    pub task: String,
    pub kv: String,
    pub lengths: Vec<usize>,
    pub depths: Vec<f64>,
    /// `scores[depth][length]`, None where no case ran.
    pub scores: Vec<Vec<Option<f64>>>,
}

#[derive(Serialize)]
pub struct PerTurn {
    pub task: String,
    pub kv: String,
    pub target_len: usize,
    pub mode: String,
    pub scores: Vec<f64>,
}

#[derive(Serialize)]
pub struct Summary {
    pub title: String,
    pub cases: usize,
    pub groups: Vec<Group>,
    pub niah: Vec<NiahGrid>,
    pub per_turn: Vec<PerTurn>,
    /// Prompt generation time over model time, in percent.
    pub harness_overhead_pct: f64,
    /// The compression protocols the results ran under (`context`, `prompt`), in first-seen order.
    pub compress_at: Vec<String>,
}

fn mean(it: impl Iterator<Item = f64>) -> f64 {
    let (s, n) = it.fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    if n == 0 {
        0.0
    } else {
        s / n as f64
    }
}

fn len_label(n: usize) -> String {
    if n == 0 {
        "data".into()
    } else {
        length_label(n)
    }
}

/// Groups per (task, kv, length), in first-seen order of tasks and specs, lengths ascending.
pub fn groups(results: &[CaseResult]) -> Vec<Group> {
    let mut order_t: Vec<&str> = Vec::new();
    let mut order_k: Vec<&str> = Vec::new();
    let mut by: BTreeMap<(usize, usize, usize), Vec<&CaseResult>> = BTreeMap::new();
    for r in results {
        let ti = order_t
            .iter()
            .position(|t| *t == r.task)
            .unwrap_or_else(|| {
                order_t.push(&r.task);
                order_t.len() - 1
            });
        let ki = order_k.iter().position(|k| *k == r.kv).unwrap_or_else(|| {
            order_k.push(&r.kv);
            order_k.len() - 1
        });
        by.entry((ti, ki, r.target_len)).or_default().push(r);
    }
    let mut out: Vec<Group> = by
        .iter()
        .map(|(&(ti, ki, len), rs)| Group {
            task: order_t[ti].to_string(),
            kv: order_k[ki].to_string(),
            target_len: len,
            cases: rs.len(),
            score: mean(rs.iter().map(|r| r.score)),
            pct_of_full: None,
            prompt_tokens: mean(rs.iter().map(|r| r.length as f64)),
            peak_kv_bytes: mean(rs.iter().map(|r| r.peak_kv_bytes as f64)),
            final_kv_bytes: mean(rs.iter().map(|r| r.final_kv_bytes as f64)),
            kv_read_bytes_per_token: mean(rs.iter().map(|r| r.kv_read_bytes_per_token)),
            kv_fraction: None,
            prefill: rs
                .iter()
                .fold(Vec::<&str>::new(), |mut specs, r| {
                    if !specs.contains(&r.prefill.as_str()) {
                        specs.push(&r.prefill);
                    }
                    specs
                })
                .join("; "),
            prefill_share: mean(rs.iter().map(|r| r.prefill_share)),
            ttft_ms: mean(rs.iter().map(|r| r.ttft_ms)),
            prefill_tok_s: mean(rs.iter().map(|r| r.prefill_tok_s)),
            decode_tok_s: mean(rs.iter().map(|r| r.decode_tok_s)),
        })
        .collect();
    let full: BTreeMap<(String, usize), (f64, f64)> = out
        .iter()
        .filter(|g| is_full(&g.kv))
        .map(|g| ((g.task.clone(), g.target_len), (g.score, g.peak_kv_bytes)))
        .collect();
    for g in &mut out {
        if let Some(&(fs, fb)) = full.get(&(g.task.clone(), g.target_len)) {
            g.pct_of_full = (fs > 0.0).then(|| 100.0 * g.score / fs);
            g.kv_fraction = (fb > 0.0).then(|| g.peak_kv_bytes / fb);
        }
    }
    out
}

fn niah_grids(results: &[CaseResult]) -> Vec<NiahGrid> {
    let mut keys: Vec<(String, String)> = Vec::new();
    for r in results.iter().filter(|r| r.depth.is_some()) {
        let k = (r.task.clone(), r.kv.clone());
        if !keys.contains(&k) {
            keys.push(k);
        }
    }
    keys.into_iter()
        .map(|(task, kv)| {
            let rs: Vec<&CaseResult> = results
                .iter()
                .filter(|r| r.task == task && r.kv == kv)
                .collect();
            let lengths: Vec<usize> = rs
                .iter()
                .map(|r| r.target_len)
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect();
            let mut depths: Vec<f64> = rs.iter().filter_map(|r| r.depth).collect();
            depths.sort_by(f64::total_cmp);
            depths.dedup();
            let scores = depths
                .iter()
                .map(|d| {
                    lengths
                        .iter()
                        .map(|l| {
                            let v: Vec<f64> = rs
                                .iter()
                                .filter(|r| r.target_len == *l && r.depth == Some(*d))
                                .map(|r| r.score)
                                .collect();
                            (!v.is_empty()).then(|| mean(v.into_iter()))
                        })
                        .collect()
                })
                .collect();
            NiahGrid {
                task,
                kv,
                lengths,
                depths,
                scores,
            }
        })
        .collect()
}

fn per_turn(results: &[CaseResult]) -> Vec<PerTurn> {
    let mut by: BTreeMap<(String, String, usize, String), Vec<&CaseResult>> = BTreeMap::new();
    for r in results.iter().filter(|r| !r.turns.is_empty()) {
        by.entry((r.task.clone(), r.kv.clone(), r.target_len, r.mode.clone()))
            .or_default()
            .push(r);
    }
    by.into_iter()
        .map(|((task, kv, target_len, mode), rs)| {
            let n = rs.iter().map(|r| r.turns.len()).max().unwrap_or(0);
            let scores = (0..n)
                .map(|i| mean(rs.iter().filter_map(|r| r.turns.get(i)).map(|t| t.score)))
                .collect();
            PerTurn {
                task,
                kv,
                target_len,
                mode,
                scores,
            }
        })
        .collect()
}

fn file_safe(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Writes report.md, summary.json and the plots for `dir/results.jsonl`. Returns the files written.
pub fn write(dir: &Path, title: &str) -> Result<Vec<PathBuf>> {
    let results = ResultsFile::load(&dir.join("results.jsonl"))?;
    let groups = groups(&results);
    let grids = niah_grids(&results);
    let turns = per_turn(&results);
    let time = HarnessTime::of(&results);
    let lengths = lengths(&groups);
    let mut written = Vec::new();
    let mut md = String::new();
    let _ = writeln!(md, "# hayloft eval: {title}\n");
    let _ = writeln!(md, "{} cases. Scores are in [0, 100].\n", results.len());
    let protocols = protocols(&results);
    let _ = writeln!(md, "{}\n", protocol_line(&protocols));
    accuracy_table(&mut md, &groups, &lengths);
    pct_of_full_table(&mut md, &groups, &lengths);
    memory_and_speed_table(&mut md, &groups);
    for grid in &grids {
        written.push(niah_grid(&mut md, dir, grid)?);
    }
    per_turn_table(&mut md, &turns);
    written.extend(accuracy_vs_kv_plot(&mut md, dir, &groups)?);
    written.extend(speed_plots(&mut md, dir, &groups, &lengths)?);
    time.write(&mut md);
    let report = dir.join("report.md");
    crate::util::write_atomic(&report, md.as_bytes())?;
    written.push(report);
    let summary = Summary {
        title: title.to_string(),
        cases: results.len(),
        groups,
        niah: grids,
        per_turn: turns,
        harness_overhead_pct: time.overhead_pct,
        compress_at: protocols,
    };
    let sp = dir.join("summary.json");
    crate::util::write_atomic(&sp, serde_json::to_string_pretty(&summary)?.as_bytes())?;
    written.push(sp);
    Ok(written)
}

/// The distinct protocols of the results, in first-seen order.
fn protocols(results: &[CaseResult]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for r in results {
        if !out.contains(&r.compress_at) {
            out.push(r.compress_at.clone());
        }
    }
    out
}

/// The report's sentence on when the cache was compressed (each compressing spec's label also carries it, `at@...`).
fn protocol_line(protocols: &[String]) -> String {
    let explain = |p: &str| {
        match p.parse::<CompressAt>() {
        Ok(CompressAt::Context) => format!(
            "`{p}` (compressed once at the end of the context, the question left out and prefilled after it; \
             kvpress's protocol)"
        ),
        Ok(CompressAt::Prompt) => format!(
            "`{p}` (compressed at the end of every prompt, question included)"
        ),
        Err(_) => format!("`{p}`"),
    }
    };
    let all: Vec<String> = protocols.iter().map(|p| explain(p)).collect();
    format!(
        "Compression protocol (`--compress-at`): {}. Decoding compresses only where a spec says every@N.",
        all.join("; ")
    )
}

/// The harness's own time (prompt generation) against model time.
struct HarnessTime {
    gen_s: f64,
    model_s: f64,
    /// `gen_s` over `model_s`, in percent.
    overhead_pct: f64,
}

impl HarnessTime {
    fn of(results: &[CaseResult]) -> Self {
        let gen_s: f64 = {
            // Generation time is paid once per case, shared by its specs.
            let mut seen = BTreeSet::new();
            results
                .iter()
                .filter(|r| {
                    seen.insert((
                        r.task.clone(),
                        r.target_len,
                        r.depth.map(f64::to_bits),
                        r.sample,
                        r.seed,
                    ))
                })
                .map(|r| r.gen_ms / 1e3)
                .sum()
        };
        let model_s: f64 = results.iter().map(|r| r.model_s).sum();
        let overhead_pct = if model_s > 0.0 {
            100.0 * gen_s / model_s
        } else {
            0.0
        };
        HarnessTime {
            gen_s,
            model_s,
            overhead_pct,
        }
    }

    fn write(&self, md: &mut String) {
        let _ = writeln!(
            md,
            "\nHarness time (prompt generation, once per case) is {:.2}% of model time ({:.2} s vs {:.1} s).",
            self.overhead_pct, self.gen_s, self.model_s
        );
    }
}

/// The target lengths of the groups, ascending.
fn lengths(groups: &[Group]) -> Vec<usize> {
    groups
        .iter()
        .map(|g| g.target_len)
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect()
}

/// The (task, kv) rows of the accuracy tables, in first-seen order.
fn rows(groups: &[Group]) -> Vec<(String, String)> {
    let mut rows: Vec<(String, String)> = Vec::new();
    for g in groups {
        let k = (g.task.clone(), g.kv.clone());
        if !rows.contains(&k) {
            rows.push(k);
        }
    }
    rows
}

fn find<'a>(groups: &'a [Group], task: &str, kv: &str, len: usize) -> Option<&'a Group> {
    groups
        .iter()
        .find(|g| g.task == task && g.kv == kv && g.target_len == len)
}

/// Task × spec rows, one column per length and the mean.
fn accuracy_table(md: &mut String, groups: &[Group], lengths: &[usize]) {
    let _ = writeln!(md, "## Accuracy\n");
    let _ = write!(md, "| task | kv |");
    for l in lengths {
        let _ = write!(md, " {} |", len_label(*l));
    }
    let _ = writeln!(md, " mean |");
    let _ = writeln!(md, "|---|---|{}---|", "---|".repeat(lengths.len()));
    for (t, k) in &rows(groups) {
        let _ = write!(md, "| {t} | {k} |");
        let mut v = Vec::new();
        for l in lengths {
            match find(groups, t, k, *l) {
                Some(g) => {
                    v.push(g.score);
                    let _ = write!(md, " {:.1} |", g.score);
                }
                None => md.push_str(" |"),
            }
        }
        let _ = writeln!(md, " {:.1} |", mean(v.into_iter()));
    }
}

/// The other specs' accuracy as a share of the full cache's (only when `full` ran beside them).
fn pct_of_full_table(md: &mut String, groups: &[Group], lengths: &[usize]) {
    if !groups
        .iter()
        .any(|g| !is_full(&g.kv) && g.pct_of_full.is_some())
    {
        return;
    }
    let _ = writeln!(md, "\n## Accuracy as % of the full cache\n");
    let _ = write!(md, "| task | kv |");
    for l in lengths {
        let _ = write!(md, " {} |", len_label(*l));
    }
    let _ = writeln!(md);
    let _ = writeln!(md, "|---|---|{}", "---|".repeat(lengths.len()));
    for (t, k) in rows(groups).iter().filter(|(_, k)| !is_full(k)) {
        let _ = write!(md, "| {t} | {k} |");
        for l in lengths {
            match find(groups, t, k, *l).and_then(|g| g.pct_of_full) {
                Some(p) => {
                    let _ = write!(md, " {p:.0}% |");
                }
                None => md.push_str(" |"),
            }
        }
        let _ = writeln!(md);
    }
}

/// One row per group: prompt tokens, KV bytes and speed.
fn memory_and_speed_table(md: &mut String, groups: &[Group]) {
    let _ = writeln!(md, "\n## Memory and speed\n");
    let _ = writeln!(
        md,
        "| task | kv | length | cases | prompt tokens | peak KV | KV vs full | KV at end | KV read/token | prefill (work done) | TTFT ms | prefill tok/s | decode tok/s |"
    );
    let _ = writeln!(md, "|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for g in groups {
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {:.0} | {} | {} | {} | {} | {} ({:.0}%) | {:.0} | {:.0} | {:.1} |",
            g.task,
            g.kv,
            len_label(g.target_len),
            g.cases,
            g.prompt_tokens,
            human_bytes(g.peak_kv_bytes as usize),
            g.kv_fraction
                .map_or("-".into(), |f| format!("{:.0}%", f * 100.0)),
            human_bytes(g.final_kv_bytes as usize),
            human_bytes(g.kv_read_bytes_per_token as usize),
            g.prefill,
            100.0 * g.prefill_share,
            g.ttft_ms,
            g.prefill_tok_s,
            g.decode_tok_s
        );
    }
}

/// A NIAH depth × length table and its heatmap; returns the heatmap's path.
fn niah_grid(md: &mut String, dir: &Path, grid: &NiahGrid) -> Result<PathBuf> {
    let _ = writeln!(md, "\n## {} depth × length ({})\n", grid.task, grid.kv);
    let _ = write!(md, "| depth |");
    for l in &grid.lengths {
        let _ = write!(md, " {} |", len_label(*l));
    }
    let _ = writeln!(md);
    let _ = writeln!(md, "|---|{}", "---|".repeat(grid.lengths.len()));
    for (d, row) in grid.depths.iter().zip(&grid.scores) {
        let _ = write!(md, "| {d}% |");
        for v in row {
            match v {
                Some(v) => {
                    let _ = write!(md, " {v:.0} |");
                }
                None => md.push_str(" - |"),
            }
        }
        let _ = writeln!(md);
    }
    let png = dir.join(format!(
        "niah_{}_{}.png",
        file_safe(&grid.task),
        file_safe(&grid.kv)
    ));
    plot::heatmap(
        &png,
        &format!("{} ({})", grid.task, grid.kv),
        "context length (tokens)",
        "needle depth",
        &grid
            .lengths
            .iter()
            .map(|l| len_label(*l))
            .collect::<Vec<_>>(),
        &grid
            .depths
            .iter()
            .map(|d| format!("{d}%"))
            .collect::<Vec<_>>(),
        &grid.scores,
    )?;
    let _ = writeln!(
        md,
        "\n![{}]({})",
        grid.task,
        png.file_name().and_then(|f| f.to_str()).unwrap_or("")
    );
    Ok(png)
}

/// Accuracy of each turn of the conversations (nothing when no case had several turns).
fn per_turn_table(md: &mut String, turns: &[PerTurn]) {
    if turns.is_empty() {
        return;
    }
    let n = turns.iter().map(|t| t.scores.len()).max().unwrap_or(0);
    let _ = writeln!(md, "\n## Accuracy per turn\n");
    let _ = write!(md, "| task | mode | kv | length |");
    for i in 0..n {
        let _ = write!(md, " turn {} |", i + 1);
    }
    let _ = writeln!(md);
    let _ = writeln!(md, "|---|---|---|---|{}", "---|".repeat(n));
    for t in turns {
        let _ = write!(
            md,
            "| {} | {} | {} | {} |",
            t.task,
            t.mode,
            t.kv,
            len_label(t.target_len)
        );
        for s in &t.scores {
            let _ = write!(md, " {s:.0} |");
        }
        let _ = writeln!(md);
    }
}

/// The KV spec labels of the groups, sorted.
fn spec_labels(groups: &[Group]) -> Vec<&str> {
    groups
        .iter()
        .map(|g| g.kv.as_str())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect()
}

/// Whether a recorded spec label is the full cache (the reference of "% of full").
fn is_full(kv: &str) -> bool {
    *kv == KvSpec::full().to_string()
}

/// The plot series a spec's points belong to: its method when it evicts (one line per method across budgets), else
/// the whole spec (`full`, `full,kivi4` are points of their own). A label that no longer parses stays as it is.
fn series_name(kv: &str) -> String {
    match kv.parse::<KvSpec>() {
        Ok(s) if s.method.build.is_some() => s.method.name.to_string(),
        Ok(s) => s.to_string(),
        Err(_) => kv.to_string(),
    }
}

/// With several specs: accuracy against KV memory per method, averaged over tasks and lengths at each spec.
fn accuracy_vs_kv_plot(md: &mut String, dir: &Path, groups: &[Group]) -> Result<Option<PathBuf>> {
    let specs = spec_labels(groups);
    if specs.len() <= 1 {
        return Ok(None);
    }
    let mut by_method: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    for kv in &specs {
        let gs: Vec<&Group> = groups
            .iter()
            .filter(|g| g.kv == *kv && g.kv_fraction.is_some())
            .collect();
        if gs.is_empty() {
            continue;
        }
        let x = mean(gs.iter().filter_map(|g| g.kv_fraction));
        let y = mean(gs.iter().map(|g| g.score));
        by_method.entry(series_name(kv)).or_default().push((x, y));
    }
    let full_name = KvSpec::full().to_string();
    if let Some(full) = by_method.get(&full_name).cloned() {
        for (m, pts) in by_method.iter_mut() {
            if *m != full_name {
                pts.extend(full.iter().copied());
            }
        }
    }
    let series: Vec<(String, Vec<(f64, f64)>)> = by_method.into_iter().collect();
    if series.is_empty() {
        return Ok(None);
    }
    let png = dir.join("accuracy_vs_kv.png");
    plot::line_chart(
        &png,
        "accuracy vs KV memory",
        "peak KV bytes / full cache",
        "score",
        &series,
        false,
    )?;
    let _ = writeln!(md, "\n![accuracy vs KV memory](accuracy_vs_kv.png)");
    Ok(Some(png))
}

/// With several lengths: decode speed and TTFT against context length, one line per spec.
fn speed_plots(
    md: &mut String,
    dir: &Path,
    groups: &[Group],
    lengths: &[usize],
) -> Result<Vec<PathBuf>> {
    if lengths.iter().filter(|l| **l > 0).count() <= 1 {
        return Ok(Vec::new());
    }
    let mut dec: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
    let mut ttft: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
    for kv in spec_labels(groups) {
        let mut d = Vec::new();
        let mut t = Vec::new();
        for l in lengths.iter().filter(|l| **l > 0) {
            let gs: Vec<&Group> = groups
                .iter()
                .filter(|g| g.kv == kv && g.target_len == *l)
                .collect();
            if gs.is_empty() {
                continue;
            }
            let x = mean(gs.iter().map(|g| g.prompt_tokens));
            d.push((x, mean(gs.iter().map(|g| g.decode_tok_s))));
            t.push((x, mean(gs.iter().map(|g| g.ttft_ms))));
        }
        dec.push((kv.to_string(), d));
        ttft.push((kv.to_string(), t));
    }
    let p1 = dir.join("decode_speed_vs_length.png");
    plot::line_chart(
        &p1,
        "decode speed vs context",
        "prompt tokens",
        "decode tok/s",
        &dec,
        true,
    )?;
    let p2 = dir.join("ttft_vs_length.png");
    plot::line_chart(
        &p2,
        "time to first token vs context",
        "prompt tokens",
        "TTFT ms",
        &ttft,
        true,
    )?;
    let _ = writeln!(
        md,
        "\n![decode speed](decode_speed_vs_length.png)\n\n![TTFT](ttft_vs_length.png)"
    );
    Ok(vec![p1, p2])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(task: &str, kv: &str, len: usize, score: f64, kv_bytes: usize) -> CaseResult {
        CaseResult {
            task: task.into(),
            target_len: len,
            length: len - 10,
            depth: None,
            sample: 0,
            seed: 1,
            kv: kv.into(),
            method: series_name(kv),
            budget: None,
            compress_at: "context".into(),
            mode: "multi-turn".into(),
            metric: "string_match_all".into(),
            score,
            output: String::new(),
            references: vec![],
            peak_kv_bytes: kv_bytes,
            final_kv_bytes: kv_bytes,
            kv_read_bytes_per_token: 0.0,
            prefill: "dense".into(),
            prefill_share: 1.0,
            ttft_ms: 10.0,
            prefill_tok_s: 100.0,
            decode_tok_s: 20.0,
            generated_tokens: 1,
            model_s: 1.0,
            gen_ms: 1.0,
            turns: vec![],
        }
    }

    #[test]
    fn groups_compare_with_the_full_cache_and_sweep_plots_are_drawn() {
        let dir = tempfile::tempdir().unwrap();
        let rs = [
            rec("t", "full", 1024, 80.0, 1000),
            rec("t", "full", 1024, 100.0, 1000),
            rec("t", "snapkv@0.5", 1024, 45.0, 500),
            rec("t", "full", 2048, 50.0, 2000),
            rec("t", "snapkv@0.5", 2048, 50.0, 1000),
        ];
        let text: String = rs
            .iter()
            .map(|r| serde_json::to_string(r).unwrap() + "\n")
            .collect();
        std::fs::write(dir.path().join("results.jsonl"), text).unwrap();
        let g = groups(&rs);
        assert_eq!(g.len(), 4);
        let s1 = g
            .iter()
            .find(|g| g.kv == "snapkv@0.5" && g.target_len == 1024)
            .unwrap();
        assert!((s1.pct_of_full.unwrap() - 50.0).abs() < 1e-9);
        assert!((s1.kv_fraction.unwrap() - 0.5).abs() < 1e-9);
        let f1 = g
            .iter()
            .find(|g| g.kv == "full" && g.target_len == 1024)
            .unwrap();
        assert_eq!(f1.cases, 2);
        assert!((f1.score - 90.0).abs() < 1e-9);
        write(dir.path(), "test").unwrap();
        let md = std::fs::read_to_string(dir.path().join("report.md")).unwrap();
        assert!(
            md.contains("% of the full cache") && md.contains("| t | snapkv@0.5 | 50% | 100% |"),
            "{md}"
        );
        // The report says which protocol the results ran under.
        assert!(
            md.contains("Compression protocol (`--compress-at`): `context` (compressed once"),
            "{md}"
        );
        for f in [
            "accuracy_vs_kv.png",
            "decode_speed_vs_length.png",
            "ttft_vs_length.png",
            "summary.json",
        ] {
            assert!(dir.path().join(f).exists(), "{f}");
        }
    }

    /// A group names the prefill specs of its cases and their mean share of dense work; a results line written
    /// before those fields reads back as dense.
    #[test]
    fn groups_name_their_prefill_and_old_results_read_as_dense() {
        let mut a = rec("t", "full", 1024, 100.0, 1000);
        (a.prefill, a.prefill_share) = ("lazyllm".into(), 0.5);
        let mut b = rec("t", "full", 1024, 100.0, 1000);
        (b.prefill, b.prefill_share) = ("lazyllm".into(), 0.7);
        let g = groups(&[a.clone(), b]);
        assert_eq!((g[0].prefill.as_str(), g.len()), ("lazyllm", 1));
        assert!((g[0].prefill_share - 0.6).abs() < 1e-9);
        let g = groups(&[a, rec("t", "full", 1024, 100.0, 1000)]);
        assert_eq!(g[0].prefill, "lazyllm; dense");
        let mut v = serde_json::to_value(rec("t", "full", 1024, 100.0, 1000)).unwrap();
        let m = v.as_object_mut().unwrap();
        m.remove("prefill");
        m.remove("prefill_share");
        let old: CaseResult = serde_json::from_value(v).unwrap();
        assert_eq!((old.prefill.as_str(), old.prefill_share), ("dense", 1.0));
    }
}
