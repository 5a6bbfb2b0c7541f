//! Scorers. Every score is in [0, 100].
//!
//! - RULER: `string_match_all` (share of references contained in the output, case-insensitive) and
//!   `string_match_part` (any reference contained).
//! - Ada-LEval TSort: exact order (the first k segment numbers in the output equal the original order).
//! - LongBench (its `metrics.py`, re-implemented): `qa_f1` (token F1 after SQuAD normalisation: lower case, no
//!   punctuation, no articles), `rouge` (ROUGE-L F as the `rouge` 1.0.1 package computes it: sentences split at '.',
//!   summary-level union LCS over distinct words), `classification`, `retrieval`, `count`, and `code_sim` (the first
//!   line that is not a comment or fence, `fuzz.ratio` as LongBench's requirements install it: difflib's
//!   `SequenceMatcher` ratio, rounded to a whole percent). The Chinese variants tokenise by characters where LongBench uses jieba (an approximation).
//!   A sample's score is the best over its references.
//! - SCBench (its `compute_scores.py`): `kv_retrieval` (`label in pred`, case-sensitive: kv, prefix_suffix),
//!   `math_find` (the first number in the output, `\d+\.\d+|\d+`, truncated to an integer, equals the label: mf),
//!   `longdialogue_qa_eng` (any label in the stripped, upper-cased output: many_shot); vt uses `string_match_all`.

use std::collections::{HashMap, HashSet};

/// How an output is compared with the references.
#[derive(Clone, Debug, PartialEq)]
pub enum Metric {
    StringMatchAll,
    StringMatchPart,
    /// The references are the original order of k segments ("1", "3", ...).
    Order,
    QaF1,
    QaF1Zh,
    RougeL,
    RougeLZh,
    Classification(Vec<String>),
    Retrieval,
    RetrievalZh,
    Count,
    CodeSim,
    /// Scores only the first line of the output (LongBench's few-shot datasets).
    FirstLine(Box<Metric>),
    /// SCBench `kv_retrieval`: a reference contained in the output, case-sensitive.
    Contains,
    /// SCBench `math_find`: the output's first number, as an integer, equals the (integer) reference.
    FirstNumber,
    /// SCBench `longdialogue_qa_eng`: a reference contained in the stripped output, both upper-cased.
    ContainsUpper,
}

impl Metric {
    pub fn name(&self) -> String {
        match self {
            Metric::StringMatchAll => "string_match_all".into(),
            Metric::StringMatchPart => "string_match_part".into(),
            Metric::Order => "exact_order".into(),
            Metric::QaF1 => "qa_f1".into(),
            Metric::QaF1Zh => "qa_f1_zh".into(),
            Metric::RougeL => "rouge".into(),
            Metric::RougeLZh => "rouge_zh".into(),
            Metric::Classification(_) => "classification".into(),
            Metric::Retrieval => "retrieval".into(),
            Metric::RetrievalZh => "retrieval_zh".into(),
            Metric::Count => "count".into(),
            Metric::CodeSim => "code_sim".into(),
            Metric::FirstLine(m) => m.name(),
            Metric::Contains => "kv_retrieval".into(),
            Metric::FirstNumber => "math_find".into(),
            Metric::ContainsUpper => "longdialogue_qa_eng".into(),
        }
    }

    /// Score of `pred` against `refs`, in [0, 100].
    pub fn score(&self, pred: &str, refs: &[String]) -> f64 {
        if refs.is_empty() {
            return 0.0;
        }
        let best = |f: &dyn Fn(&str, &str) -> f64| -> f64 {
            refs.iter().map(|r| f(pred, r)).fold(0.0, f64::max) * 100.0
        };
        match self {
            Metric::StringMatchAll => string_match_all(pred, refs),
            Metric::StringMatchPart => string_match_part(pred, refs),
            Metric::Order => exact_order(pred, refs),
            Metric::QaF1 => best(&qa_f1),
            Metric::QaF1Zh => best(&qa_f1_zh),
            Metric::RougeL => best(&rouge_l),
            Metric::RougeLZh => best(&|p, r| rouge_l(&spaced_chars(p), &spaced_chars(r))),
            Metric::Classification(classes) => best(&|p, r| classification(p, r, classes)),
            Metric::Retrieval => best(&|p, r| retrieval(p, r, "Paragraph ")),
            Metric::RetrievalZh => best(&|p, r| retrieval(p, r, "段落")),
            Metric::Count => best(&count),
            Metric::CodeSim => best(&code_sim),
            Metric::Contains => best(&|p, r| p.contains(r) as u8 as f64),
            Metric::FirstNumber => best(&|p, r| first_number_is(p, r) as u8 as f64),
            Metric::ContainsUpper => {
                let p = pred.trim().to_uppercase();
                best(&|_, r| p.contains(&r.to_uppercase()) as u8 as f64)
            }
            Metric::FirstLine(m) => {
                let first = pred
                    .trim_start_matches('\n')
                    .split('\n')
                    .next()
                    .unwrap_or("");
                m.score(first, refs)
            }
        }
    }
}

/// RULER: share of references contained in the prediction (case-insensitive) × 100.
pub fn string_match_all(pred: &str, refs: &[String]) -> f64 {
    let p = pred.to_lowercase();
    let hit = refs
        .iter()
        .filter(|r| p.contains(&r.to_lowercase()))
        .count();
    100.0 * hit as f64 / refs.len() as f64
}

/// RULER: 100 if any reference is contained in the prediction (case-insensitive).
pub fn string_match_part(pred: &str, refs: &[String]) -> f64 {
    let p = pred.to_lowercase();
    if refs.iter().any(|r| p.contains(&r.to_lowercase())) {
        100.0
    } else {
        0.0
    }
}

/// SCBench `math_find` with an integer label: the first match of `\d+\.\d+|\d+` in `pred`, `int(float(·))`,
/// equals `label`. False when `pred` has no number or `label` is not an integer.
pub fn first_number_is(pred: &str, label: &str) -> bool {
    let Ok(want) = label.trim().parse::<i128>() else {
        return false;
    };
    let b = pred.as_bytes();
    let Some(start) = b.iter().position(u8::is_ascii_digit) else {
        return false;
    };
    let end = start + b[start..].iter().take_while(|c| c.is_ascii_digit()).count();
    // A fraction only truncates; the integer part decides. Past f64's exact range Python's float rounds; such
    // numbers never match a label here.
    let digits = pred[start..end].trim_start_matches('0');
    if digits.len() > 15 {
        return false;
    }
    digits.parse::<i128>().unwrap_or(0) == want
}

/// All runs of ASCII digits in `s`.
pub fn numbers(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i].is_ascii_digit() {
            let st = i;
            while i < b.len() && b[i].is_ascii_digit() {
                i += 1;
            }
            out.push(&s[st..i]);
        } else {
            i += 1;
        }
    }
    out
}

/// TSort: 100 if the first `refs.len()` numbers in the output are the original order, else 0.
pub fn exact_order(pred: &str, refs: &[String]) -> f64 {
    let got: Vec<&str> = numbers(pred).into_iter().take(refs.len()).collect();
    if got.len() == refs.len() && got.iter().zip(refs).all(|(g, r)| *g == r.as_str()) {
        100.0
    } else {
        0.0
    }
}

/// SQuAD/LongBench answer normalisation: lower case, punctuation removed, articles removed, whitespace collapsed.
pub fn normalize_answer(s: &str) -> String {
    let lower = s.to_lowercase();
    let no_punc: String = lower
        .chars()
        .filter(|c| !c.is_ascii_punctuation())
        .collect();
    no_punc
        .split_whitespace()
        .filter(|w| !matches!(*w, "a" | "an" | "the"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Token F1 between two token lists (multiset overlap).
pub fn f1_tokens<T: std::hash::Hash + Eq>(pred: &[T], gold: &[T]) -> f64 {
    let mut counts: HashMap<&T, usize> = HashMap::new();
    for g in gold {
        *counts.entry(g).or_default() += 1;
    }
    let mut same = 0usize;
    for p in pred {
        if let Some(c) = counts.get_mut(p) {
            if *c > 0 {
                *c -= 1;
                same += 1;
            }
        }
    }
    if same == 0 {
        return 0.0;
    }
    let precision = same as f64 / pred.len() as f64;
    let recall = same as f64 / gold.len() as f64;
    2.0 * precision * recall / (precision + recall)
}

/// LongBench `qa_f1_score`, in [0, 1].
pub fn qa_f1(pred: &str, gold: &str) -> f64 {
    let p = normalize_answer(pred);
    let g = normalize_answer(gold);
    let pt: Vec<&str> = p.split_whitespace().collect();
    let gt: Vec<&str> = g.split_whitespace().collect();
    f1_tokens(&pt, &gt)
}

fn is_zh_punct(c: char) -> bool {
    c.is_ascii_punctuation() || "！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣､、〃》「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿–—‘’‛“”„‟…‧﹏.".contains(c)
}

/// LongBench `qa_f1_zh_score` with characters as tokens (LongBench uses jieba words), in [0, 1].
pub fn qa_f1_zh(pred: &str, gold: &str) -> f64 {
    let toks = |s: &str| -> Vec<char> {
        s.to_lowercase()
            .chars()
            .filter(|c| !c.is_whitespace() && !is_zh_punct(*c))
            .collect()
    };
    f1_tokens(&toks(pred), &toks(gold))
}

fn spaced_chars(s: &str) -> String {
    let mut out = String::new();
    for c in s.chars().filter(|c| !c.is_whitespace()) {
        if !out.is_empty() {
            out.push(' ');
        }
        out.push(c);
    }
    out
}

/// The words of the LCS of `x` and `y` picked as the `rouge` package's reconstruction picks them.
fn lcs_words<'a>(x: &[&'a str], y: &[&str]) -> Vec<&'a str> {
    let (n, m) = (x.len(), y.len());
    let mut t = vec![0u32; (n + 1) * (m + 1)];
    let at = |i: usize, j: usize| i * (m + 1) + j;
    for i in 1..=n {
        for j in 1..=m {
            t[at(i, j)] = if x[i - 1] == y[j - 1] {
                t[at(i - 1, j - 1)] + 1
            } else {
                t[at(i - 1, j)].max(t[at(i, j - 1)])
            };
        }
    }
    let (mut i, mut j) = (n, m);
    let mut out = Vec::new();
    while i > 0 && j > 0 {
        if x[i - 1] == y[j - 1] {
            out.push(x[i - 1]);
            i -= 1;
            j -= 1;
        } else if t[at(i - 1, j)] > t[at(i, j - 1)] {
            i -= 1;
        } else {
            j -= 1;
        }
    }
    out
}

/// ROUGE-L F as LongBench gets it from the `rouge` package (`Rouge().get_scores(...)["rouge-l"]["f"]`), in [0, 1];
/// 0 where the package raises (an empty side).
pub fn rouge_l(pred: &str, gold: &str) -> f64 {
    let sents = |s: &str| -> Vec<String> {
        s.split('.')
            .filter(|x| !x.is_empty())
            .map(|x| x.split_whitespace().collect::<Vec<_>>().join(" "))
            .collect()
    };
    let hyp = sents(pred);
    let refs = sents(gold);
    if hyp.is_empty() || refs.is_empty() {
        return 0.0;
    }
    // Words as Python's `sentence.split(" ")` gives them (an empty sentence is one empty word).
    let words = |s: &Vec<String>| -> Vec<Vec<String>> {
        s.iter()
            .map(|x| x.split(' ').map(str::to_string).collect())
            .collect()
    };
    let hw = words(&hyp);
    let rw = words(&refs);
    let n = hw.iter().flatten().collect::<HashSet<_>>().len();
    let m = rw.iter().flatten().collect::<HashSet<_>>().len();
    let mut union: HashSet<&str> = HashSet::new();
    for r in &rw {
        let r: Vec<&str> = r.iter().map(String::as_str).collect();
        for h in &hw {
            let h: Vec<&str> = h.iter().map(String::as_str).collect();
            union.extend(lcs_words(&r, &h));
        }
    }
    let l = union.len() as f64;
    let (r, p) = (l / m as f64, l / n as f64);
    2.0 * (p * r) / (p + r + 1e-8)
}

/// LongBench `classification_score` (including its skipping of the element after a removed one), in [0, 1].
pub fn classification(pred: &str, gold: &str, classes: &[String]) -> f64 {
    let mut hits: Vec<&str> = classes
        .iter()
        .map(String::as_str)
        .filter(|c| pred.contains(c))
        .collect();
    let mut i = 0;
    while i < hits.len() {
        let t = hits[i];
        if gold.contains(t) && t != gold {
            if let Some(k) = hits.iter().position(|h| *h == t) {
                hits.remove(k);
            }
        }
        i += 1;
    }
    if hits.contains(&gold) {
        1.0 / hits.len() as f64
    } else {
        0.0
    }
}

/// LongBench `retrieval_score`: share of the numbers in the output that are the gold paragraph's, in [0, 1].
pub fn retrieval(pred: &str, gold: &str, marker: &str) -> f64 {
    let id = gold.match_indices(marker).find_map(|(i, _)| {
        let rest = &gold[i + marker.len()..];
        let d = rest.bytes().take_while(u8::is_ascii_digit).count();
        (d > 0).then(|| &rest[..d])
    });
    let Some(id) = id else { return 0.0 };
    let nums = numbers(pred);
    if nums.is_empty() {
        return 0.0;
    }
    nums.iter().filter(|n| **n == id).count() as f64 / nums.len() as f64
}

/// LongBench `count_score`: share of the numbers in the output equal to the gold count, in [0, 1].
pub fn count(pred: &str, gold: &str) -> f64 {
    let nums = numbers(pred);
    if nums.is_empty() {
        return 0.0;
    }
    nums.iter().filter(|n| **n == gold).count() as f64 / nums.len() as f64
}

/// Python's `difflib.SequenceMatcher(None, a, b).ratio()`: 2·M / (|a| + |b|) with M the characters of the matching
/// blocks its longest-match recursion finds (earliest in `a`, then in `b`, on ties), characters of `b` more common than
/// 1 % + 1 left out of the search when `b` has 200 or more (its `autojunk`), as Python does.
pub fn sequence_matcher_ratio(a: &str, b: &str) -> f64 {
    let a: Vec<char> = a.chars().collect();
    let b: Vec<char> = b.chars().collect();
    if a.is_empty() && b.is_empty() {
        return 1.0;
    }
    let mut b2j: HashMap<char, Vec<usize>> = HashMap::new();
    for (j, &c) in b.iter().enumerate() {
        b2j.entry(c).or_default().push(j);
    }
    if b.len() >= 200 {
        let ntest = b.len() / 100 + 1;
        b2j.retain(|_, js| js.len() <= ntest);
    }
    let longest = |alo: usize, ahi: usize, blo: usize, bhi: usize| -> (usize, usize, usize) {
        let (mut bi, mut bj, mut bk) = (alo, blo, 0usize);
        let mut j2len: HashMap<usize, usize> = HashMap::new();
        for (i, c) in a.iter().enumerate().take(ahi).skip(alo) {
            let mut next: HashMap<usize, usize> = HashMap::new();
            for &j in b2j.get(c).map_or(&[][..], |v| &v[..]) {
                if j < blo {
                    continue;
                }
                if j >= bhi {
                    break;
                }
                let k = j
                    .checked_sub(1)
                    .and_then(|p| j2len.get(&p))
                    .copied()
                    .unwrap_or(0)
                    + 1;
                next.insert(j, k);
                if k > bk {
                    (bi, bj, bk) = (i + 1 - k, j + 1 - k, k);
                }
            }
            j2len = next;
        }
        while bi > alo && bj > blo && a[bi - 1] == b[bj - 1] {
            (bi, bj, bk) = (bi - 1, bj - 1, bk + 1);
        }
        while bi + bk < ahi && bj + bk < bhi && a[bi + bk] == b[bj + bk] {
            bk += 1;
        }
        (bi, bj, bk)
    };
    let mut matched = 0usize;
    let mut queue = vec![(0, a.len(), 0, b.len())];
    while let Some((alo, ahi, blo, bhi)) = queue.pop() {
        let (i, j, k) = longest(alo, ahi, blo, bhi);
        if k > 0 {
            matched += k;
            if alo < i && blo < j {
                queue.push((alo, i, blo, j));
            }
            if i + k < ahi && j + k < bhi {
                queue.push((i + k, ahi, j + k, bhi));
            }
        }
    }
    2.0 * matched as f64 / (a.len() + b.len()) as f64
}

/// fuzzywuzzy's `fuzz.ratio` as LongBench's requirements install it (without python-Levenshtein: difflib's
/// ratio), a whole percent rounded half to even as Python's `round`.
pub fn fuzz_ratio(a: &str, b: &str) -> f64 {
    if a == b {
        return 100.0;
    }
    if a.is_empty() || b.is_empty() {
        return 0.0;
    }
    (100.0 * sequence_matcher_ratio(a, b)).round_ties_even()
}

/// LongBench `code_sim_score`, in [0, 1].
pub fn code_sim(pred: &str, gold: &str) -> f64 {
    let line = pred
        .trim_start_matches('\n')
        .split('\n')
        .find(|l| !l.contains('`') && !l.contains('#') && !l.contains("//"))
        .unwrap_or("");
    fuzz_ratio(line, gold) / 100.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    fn close(a: f64, b: f64) {
        assert!((a - b).abs() < 1e-6, "{a} != {b}");
    }

    #[test]
    fn ruler_matches() {
        let refs = s(&["1234567", "ABC-def"]);
        close(
            string_match_all("the numbers are 1234567 and abc-DEF.", &refs),
            100.0,
        );
        close(string_match_all("only 1234567", &refs), 50.0);
        close(string_match_all("none", &refs), 0.0);
        close(string_match_part("only abc-def", &refs), 100.0);
        close(string_match_part("nothing here", &refs), 0.0);
    }

    // Expected values computed with LongBench's metric code (rouge 1.0.1, fuzzywuzzy) on the same pairs.
    #[test]
    fn qa_f1_matches_longbench() {
        close(
            qa_f1("The Eiffel Tower, in Paris!", "Eiffel tower"),
            2.0 / 3.0,
        );
        close(qa_f1("an apple a day", "the apple"), 2.0 / 3.0);
        close(qa_f1("nothing", "something else"), 0.0);
        close(qa_f1("Paris Paris France", "Paris"), 0.5);
        close(Metric::QaF1.score("Paris", &s(&["London", "paris"])), 100.0);
    }

    #[test]
    fn rouge_l_matches_the_rouge_package() {
        close(
            rouge_l(
                "the cat sat on the mat. it was happy.",
                "the cat was on the mat. the cat was happy.",
            ),
            0.8571428522448981,
        );
        close(rouge_l("a b c d", "a c e"), 0.5714285665306124);
        close(rouge_l("hello world", "goodbye"), 0.0);
        close(rouge_l("x y. y x. z", "x y z. z y x"), 0.999999995);
        close(rouge_l("", "abc"), 0.0);
    }

    #[test]
    fn code_sim_matches_fuzz_ratio() {
        close(code_sim("def foo(x):", "def foo(y):"), 0.91);
        close(
            code_sim("\n# comment\n    return a + b", "return a+b"),
            0.77,
        );
        close(code_sim("abc", ""), 0.0);
        close(sequence_matcher_ratio("kitten", "sitting"), 8.0 / 13.0);
    }

    #[test]
    fn classification_retrieval_count() {
        let classes = s(&["Location", "Number", "Number of people", "Person"]);
        // Both "Number" and "Number of people" appear; gold "Number of people" → "Number" is removed → 1/1.
        close(
            classification("Number of people", "Number of people", &classes),
            1.0,
        );
        close(
            classification("Location or Person", "Person", &classes),
            0.5,
        );
        close(classification("Description", "Person", &classes), 0.0);
        close(
            retrieval("Paragraph 3, maybe 3 or 5", "Paragraph 3", "Paragraph "),
            2.0 / 3.0,
        );
        close(retrieval("no idea", "Paragraph 3", "Paragraph "), 0.0);
        close(retrieval("段落12", "段落12", "段落"), 1.0);
        close(count("There are 7 unique paragraphs, not 8", "7"), 0.5);
        close(
            Metric::FirstLine(Box::new(Metric::QaF1)).score("\nParis\nLondon", &s(&["London"])),
            0.0,
        );
    }

    #[test]
    fn order_and_zh() {
        let refs = s(&["2", "1", "3"]);
        close(exact_order("The order is [2, 1, 3].", &refs), 100.0);
        close(exact_order("2, 3, 1", &refs), 0.0);
        close(exact_order("2, 1", &refs), 0.0);
        close(qa_f1_zh("北京。", "北京市"), 0.8);
    }
}
