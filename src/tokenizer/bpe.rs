//! Byte-level BPE (GGUF `tokenizer.ggml.model = "gpt2"`), as llama.cpp runs it.
//!
//! Text is first split into words by the pre-tokenizer named in `tokenizer.ggml.pre` (the hand-written
//! equivalents of the GPT-2 / Llama-3 / Qwen2 split regexes that llama.cpp uses, ported rule for rule),
//! then each word is BPE-merged on its bytes: the vocabulary spells byte `b` as the GPT-2 "byte char"
//! `BYTE_CHARS[b]`, and merges are looked up by token-id pairs (strings that only occur in merges get ids
//! past the vocabulary, so even odd merge lists behave as llama.cpp's string-keyed lookup does).

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use super::unicode::{flags, ANY_F, LETTER_F, NUMBER_F, SPACE_F};
use super::vocab::Vocab;
use super::{FxHashMap, NONE};

/// The word splitter of a BPE vocabulary.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PreTokenizer {
    /// `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`
    Gpt2,
    /// Every \p{N} code point split off on its own first, then `Gpt2` (starcoder, smollm, command-r, ...).
    DigitsThenGpt2,
    /// `(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,max_digits}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+`
    /// (max_digits 3: llama3; 1: qwen2).
    Llama3 { max_digits: usize },
    /// GPT-4o's (o200k) split as llama.cpp runs it (`gpt-4o`, `llama4`, ...: Phi-4-mini, Llama 4): words are
    /// `[^\r\n\p{L}\p{N}]?U*L+'c?` or `[^\r\n\p{L}\p{N}]?U+L*'c?`, with U a letter other than a-z, L a letter other
    /// than A-Z and 'c an English contraction of either case, then
    /// `\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+`. (llama.cpp reads the tokenizer's Lu/Lt/Lm/Lo
    /// and Ll classes as "not a-z" and "not A-Z" letters, so every letter outside ASCII is both.) Tekken (Mistral
    /// Nemo, Mistral Small 3, Ministral) is the same without the contractions and with one digit a word.
    Gpt4o {
        contractions: bool,
        max_digits: usize,
    },
}

/// Settings llama.cpp derives from `tokenizer.ggml.pre` for the vocabularies we support.
pub(crate) struct PreConfig {
    pub pre: PreTokenizer,
    pub ignore_merges: bool,
    /// Default of add_bos_token when the GGUF does not say.
    pub add_bos: bool,
    /// chatglm: no BOS at all.
    pub no_bos: bool,
}

pub(crate) fn pre_config(pre: &str) -> Option<PreConfig> {
    let cfg = |pre, ignore_merges, add_bos, no_bos| PreConfig {
        pre,
        ignore_merges,
        add_bos,
        no_bos,
    };
    use PreTokenizer::*;
    Some(match pre {
        "gpt-2" | "phi-2" | "jina-es" | "jina-de" | "gigachat" | "jina-v2-es" | "jina-v2-de"
        | "a.x-4.0" | "mellum" | "modern-bert" | "jina-v1-en" | "jina-v2-code" | "roberta-bpe"
        | "exaone4" | "mpt" | "olmo" | "jais" | "trillion" | "granite-docling" => {
            cfg(Gpt2, false, false, false)
        }
        "starcoder" | "refact" | "command-r" | "smollm" | "codeshell" | "exaone" | "minerva-7b"
        | "mellum2" => cfg(DigitsThenGpt2, false, false, false),
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0"
        | "lfm2" | "jina-v5-nano" => cfg(Llama3 { max_digits: 3 }, true, true, false),
        "dbrx" | "smaug-bpe" => cfg(Llama3 { max_digits: 3 }, false, false, false),
        "chatglm-bpe" => cfg(Llama3 { max_digits: 3 }, false, false, true),
        "glm4" | "glm5" => cfg(Llama3 { max_digits: 3 }, true, false, true),
        "qwen2" | "deepseek-r1-qwen" | "kormo" | "f2llmv2" | "megrez" | "stablelm2" | "hunyuan"
        | "solar-open" | "grok-2" => cfg(Llama3 { max_digits: 1 }, false, false, false),
        "gpt-4o" | "llama4" | "kanana2" | "talkie" => cfg(
            Gpt4o {
                contractions: true,
                max_digits: 3,
            },
            false,
            false,
            false,
        ),
        "tekken" => cfg(
            Gpt4o {
                contractions: false,
                max_digits: 1,
            },
            true,
            true,
            false,
        ),
        _ => return None,
    })
}

/// GPT-2's printable stand-in for each byte.
pub(crate) fn byte_chars() -> [char; 256] {
    let mut out = ['\0'; 256];
    let mut n = 0u32;
    for b in 0..256u32 {
        let printable =
            (0x21..=0x7E).contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b);
        out[b as usize] = if printable {
            char::from_u32(b).unwrap()
        } else {
            n += 1;
            char::from_u32(255 + n).unwrap()
        };
    }
    out
}

/// Splits `text` into pre-tokenized words, as byte ranges.
pub(crate) fn split_words(text: &str, pre: PreTokenizer) -> Vec<(usize, usize)> {
    let mut cpts: Vec<char> = Vec::with_capacity(text.len());
    let mut starts: Vec<usize> = Vec::with_capacity(text.len() + 1);
    for (i, c) in text.char_indices() {
        cpts.push(c);
        starts.push(i);
    }
    starts.push(text.len());
    let fl: Vec<u8> = cpts.iter().map(|&c| flags(c)).collect();

    let mut ends: Vec<usize> = Vec::with_capacity(cpts.len() / 3 + 1);
    match pre {
        PreTokenizer::Gpt2 => split_gpt2(&cpts, &fl, 0, cpts.len(), &mut ends),
        PreTokenizer::DigitsThenGpt2 => {
            // `\p{N}` over the whole text: each number code point is a piece, and so is each run between them.
            let mut s = 0;
            for i in 0..cpts.len() {
                if fl[i] & NUMBER_F != 0 {
                    if s < i {
                        split_gpt2(&cpts, &fl, s, i, &mut ends);
                    }
                    ends.push(i + 1);
                    s = i + 1;
                }
            }
            if s < cpts.len() {
                split_gpt2(&cpts, &fl, s, cpts.len(), &mut ends);
            }
        }
        PreTokenizer::Llama3 { max_digits } => {
            split_llama3(&cpts, &fl, 0, cpts.len(), max_digits, &mut ends)
        }
        PreTokenizer::Gpt4o {
            contractions,
            max_digits,
        } => split_gpt4o(&cpts, &fl, contractions, max_digits, &mut ends),
    }
    let mut out = Vec::with_capacity(ends.len());
    let mut prev = 0;
    for e in ends {
        out.push((starts[prev], starts[e]));
        prev = e;
    }
    out
}

/// Appends the end (exclusive, in code points) of each word of `cpts[ini..end]` to `out`.
/// A port of llama.cpp's `unicode_regex_split_custom_gpt2`.
fn split_gpt2(cpts: &[char], fl: &[u8], ini: usize, end: usize, out: &mut Vec<usize>) {
    let f = |p: usize| if p < end { fl[p] } else { 0 };
    let mut pos = ini;
    let mut prev = ini;
    let mut add = |e: usize| {
        if e > prev {
            out.push(e);
        }
        prev = e;
    };
    while pos < end {
        let cpt = cpts[pos];
        // 's|'t|'re|'ve|'m|'ll|'d
        if cpt == '\'' && pos + 1 < end {
            let n = cpts[pos + 1];
            if matches!(n, 's' | 't' | 'm' | 'd') {
                pos += 2;
                add(pos);
                continue;
            }
            if pos + 2 < end {
                let nn = cpts[pos + 2];
                if matches!((n, nn), ('r', 'e') | ('v', 'e') | ('l', 'l')) {
                    pos += 3;
                    add(pos);
                    continue;
                }
            }
        }
        let sp = (cpt == ' ') as usize;
        let mut f2 = if cpt == ' ' { f(pos + 1) } else { f(pos) };
        // <space>?\p{L}+
        if f2 & LETTER_F != 0 {
            pos += sp;
            while f2 & LETTER_F != 0 {
                pos += 1;
                f2 = f(pos);
            }
            add(pos);
            continue;
        }
        // <space>?\p{N}+
        if f2 & NUMBER_F != 0 {
            pos += sp;
            while f2 & NUMBER_F != 0 {
                pos += 1;
                f2 = f(pos);
            }
            add(pos);
            continue;
        }
        // <space>?[^\s\p{L}\p{N}]+
        if f2 & (SPACE_F | LETTER_F | NUMBER_F) == 0 && f2 & ANY_F != 0 {
            pos += sp;
            while f2 & (SPACE_F | LETTER_F | NUMBER_F) == 0 && f2 & ANY_F != 0 {
                pos += 1;
                f2 = f(pos);
            }
            add(pos);
            continue;
        }
        let mut n_ws = 0;
        while f(pos + n_ws) & SPACE_F != 0 {
            n_ws += 1;
        }
        // \s+(?!\S)
        if n_ws > 1 && pos + n_ws < end {
            pos += n_ws - 1;
            add(pos);
            continue;
        }
        // \s+
        if n_ws > 0 {
            pos += n_ws;
            add(pos);
            continue;
        }
        // no match
        pos += 1;
        add(pos);
    }
}

/// A port of llama.cpp's `unicode_regex_split_custom_llama3` (max_digits 3) and `_qwen2` (max_digits 1).
fn split_llama3(
    cpts: &[char],
    fl: &[u8],
    ini: usize,
    end: usize,
    max_digits: usize,
    out: &mut Vec<usize>,
) {
    let f = |p: usize| if p < end { fl[p] } else { 0 };
    let get = |p: usize| if p < end { Some(cpts[p]) } else { None };
    let mut pos = ini;
    let mut prev = ini;
    let mut add = |e: usize| {
        if e > prev {
            out.push(e);
        }
        prev = e;
    };
    while pos < end {
        let cpt = cpts[pos];
        let fc = fl[pos];
        // (?i:'s|'t|'re|'ve|'m|'ll|'d): no code point outside ASCII lowercases to one of these letters.
        if cpt == '\'' && pos + 1 < end {
            let n = cpts[pos + 1].to_ascii_lowercase();
            if matches!(n, 's' | 't' | 'm' | 'd') {
                pos += 2;
                add(pos);
                continue;
            }
            if pos + 2 < end {
                let nn = cpts[pos + 2].to_ascii_lowercase();
                if matches!((n, nn), ('r', 'e') | ('v', 'e') | ('l', 'l')) {
                    pos += 3;
                    add(pos);
                    continue;
                }
            }
        }
        // [^\r\n\p{L}\p{N}]?\p{L}+
        if !(cpt == '\r' || cpt == '\n' || fc & NUMBER_F != 0)
            && (fc & LETTER_F != 0 || f(pos + 1) & LETTER_F != 0)
        {
            pos += 1;
            while f(pos) & LETTER_F != 0 {
                pos += 1;
            }
            add(pos);
            continue;
        }
        // \p{N}{1,max_digits}
        if fc & NUMBER_F != 0 {
            let mut ini_n = pos;
            while f(pos) & NUMBER_F != 0 {
                pos += 1;
                if pos - ini_n >= max_digits {
                    add(pos);
                    ini_n = pos;
                }
            }
            add(pos);
            continue;
        }
        // <space>?[^\s\p{L}\p{N}]+[\r\n]*  (llama.cpp tests the flags of `pos` itself for "defined", not of pos+1)
        let mut f2 = if cpt == ' ' { f(pos + 1) } else { fc };
        if f2 & (SPACE_F | LETTER_F | NUMBER_F) == 0 && fc & ANY_F != 0 {
            pos += (cpt == ' ') as usize;
            while f2 & (SPACE_F | LETTER_F | NUMBER_F) == 0 && f2 & ANY_F != 0 {
                pos += 1;
                f2 = f(pos);
            }
            while matches!(get(pos), Some('\r' | '\n')) {
                pos += 1;
            }
            add(pos);
            continue;
        }
        let mut n_ws = 0;
        let mut last_rn = 0;
        while f(pos + n_ws) & SPACE_F != 0 {
            if matches!(cpts[pos + n_ws], '\r' | '\n') {
                last_rn = pos + n_ws + 1;
            }
            n_ws += 1;
        }
        // \s*[\r\n]+
        if last_rn > 0 {
            pos = last_rn;
            add(pos);
            continue;
        }
        // \s+(?!\S)
        if n_ws > 1 && pos + n_ws < end {
            pos += n_ws - 1;
            add(pos);
            continue;
        }
        // \s+
        if n_ws > 0 {
            pos += n_ws;
            add(pos);
            continue;
        }
        pos += 1;
        add(pos);
    }
}

/// Appends the end (exclusive, in code points) of each word of `cpts` to `out`: [`PreTokenizer::Gpt4o`]'s regex, each
/// alternative tried in order at each position as an ECMAScript engine tries it (leftmost alternative first, greedy
/// repeats giving back one code point at a time), which is how llama.cpp runs it (`std::regex` over the text with
/// every code point outside ASCII collapsed to its class).
fn split_gpt4o(
    cpts: &[char],
    fl: &[u8],
    contractions: bool,
    max_digits: usize,
    out: &mut Vec<usize>,
) {
    let end = cpts.len();
    let f = |p: usize| if p < end { fl[p] } else { 0 };
    let letter = |p: usize| f(p) & LETTER_F != 0;
    // U: a letter other than a-z; L: a letter other than A-Z.
    let upper = |p: usize| letter(p) && !cpts[p].is_ascii_lowercase();
    let lower = |p: usize| letter(p) && !cpts[p].is_ascii_uppercase();
    let run = |mut p: usize, class: &dyn Fn(usize) -> bool| {
        while p < end && class(p) {
            p += 1;
        }
        p
    };
    // (?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])?
    let contraction = |p: usize| -> usize {
        if !contractions || p + 1 >= end || cpts[p] != '\'' {
            return p;
        }
        let n = cpts[p + 1].to_ascii_lowercase();
        if matches!(n, 's' | 't' | 'm' | 'd') {
            return p + 2;
        }
        if p + 2 < end {
            let nn = cpts[p + 2].to_ascii_lowercase();
            if matches!((n, nn), ('r', 'e') | ('v', 'e') | ('l', 'l')) {
                return p + 3;
            }
        }
        p
    };
    // U*L+ from j: U* as long as it goes, then given back one at a time until L+ takes at least one.
    let upper_then_lower = |j: usize| -> Option<usize> {
        let a0 = run(j, &upper) - j;
        (0..=a0).rev().find_map(|a| {
            let e = run(j + a, &lower);
            (e > j + a).then_some(e)
        })
    };
    // U+L* from j.
    let upper_run_then_lower = |j: usize| -> Option<usize> {
        let e = run(j, &upper);
        (e > j).then(|| run(e, &lower))
    };
    let mut pos = 0;
    while pos < end {
        let c = cpts[pos];
        let fc = fl[pos];
        // The two word alternatives; the optional lead-in [^\r\n\p{L}\p{N}] is taken when a letter follows it.
        let j = if fc & (LETTER_F | NUMBER_F) == 0 && c != '\r' && c != '\n' && letter(pos + 1) {
            pos + 1
        } else {
            pos
        };
        if let Some(e) = upper_then_lower(j).or_else(|| upper_run_then_lower(j)) {
            pos = contraction(e);
            out.push(pos);
            continue;
        }
        // \p{N}{1,max_digits}
        if fc & NUMBER_F != 0 {
            let mut e = pos;
            while e < end && e - pos < max_digits && fl[e] & NUMBER_F != 0 {
                e += 1;
            }
            pos = e;
            out.push(pos);
            continue;
        }
        // ` ?[^\s\p{L}\p{N}]+[\r\n/]*`
        let punct = |p: usize| p < end && fl[p] & (SPACE_F | LETTER_F | NUMBER_F) == 0;
        let k = if c == ' ' && punct(pos + 1) {
            pos + 1
        } else {
            pos
        };
        if punct(k) {
            let mut e = run(k, &punct);
            while e < end && matches!(cpts[e], '\r' | '\n' | '/') {
                e += 1;
            }
            pos = e;
            out.push(pos);
            continue;
        }
        // Whitespace from here on: `\s*[\r\n]+` (to the last line break of the run), `\s+(?!\S)` (all but the run's
        // last space when a non-space follows), `\s+`.
        let e = run(pos, &|p| f(p) & SPACE_F != 0);
        if let Some(q) = (pos..e).rev().find(|&q| matches!(cpts[q], '\r' | '\n')) {
            pos = q + 1;
        } else if e < end && e - pos > 1 {
            pos = e - 1;
        } else {
            pos = e.max(pos + 1);
        }
        out.push(pos);
    }
}

/// Merge tables of one vocabulary.
pub(crate) struct Bpe {
    pub pre: PreTokenizer,
    pub ignore_merges: bool,
    n_vocab: u32,
    /// (left id, right id) -> (rank, id of the merged string; ids >= n_vocab name strings outside the vocabulary).
    merges: FxHashMap<(u32, u32), (u32, u32)>,
    /// Id of the byte char of each byte, or NONE.
    byte_sym: [u32; 256],
    /// Id of each one-character ASCII string, or NONE (llama.cpp's last-resort fallback).
    ascii_tok: [u32; 128],
    /// Raw bytes of each (byte-decodable) token -> id; only filled when `ignore_merges`.
    whole_word: FxHashMap<Box<[u8]>, u32>,
}

/// Candidate merges: (rank, left, right, left len, right len); the lengths tell stale entries apart.
type MergeHeap = BinaryHeap<Reverse<(u32, u32, u32, u32, u32)>>;

#[derive(Clone, Copy)]
struct Sym {
    start: u32,
    len: u32,
    id: u32,
    prev: u32,
    next: u32,
}

impl Bpe {
    /// `merges` are "left right" strings in rank order.
    pub fn new<'a>(pre: &PreConfig, vocab: &Vocab, merges: impl Iterator<Item = &'a str>) -> Self {
        let n_vocab = vocab.len() as u32;
        let mut extra: FxHashMap<String, u32> = FxHashMap::default();
        let intern = |s: &str, extra: &mut FxHashMap<String, u32>| -> u32 {
            if let Some(id) = vocab.get(s) {
                return id;
            }
            let next = n_vocab + extra.len() as u32;
            *extra.entry(s.to_string()).or_insert(next)
        };
        let mut table: FxHashMap<(u32, u32), (u32, u32)> = FxHashMap::default();
        table.reserve(vocab.len());
        let mut concat = String::new();
        for (rank, m) in merges.enumerate() {
            // llama.cpp splits at the first space after the first byte; a line without one is ("", "").
            let Some(sp) = m
                .as_bytes()
                .iter()
                .skip(1)
                .position(|&c| c == b' ')
                .map(|i| i + 1)
            else {
                continue;
            };
            let (l, r) = (&m[..sp], &m[sp + 1..]);
            let li = intern(l, &mut extra);
            let ri = intern(r, &mut extra);
            concat.clear();
            concat.push_str(l);
            concat.push_str(r);
            let mi = intern(&concat, &mut extra);
            table.entry((li, ri)).or_insert((rank as u32, mi));
        }
        let chars = byte_chars();
        let mut byte_sym = [NONE; 256];
        let mut buf = [0u8; 4];
        for b in 0..256 {
            let s: &str = chars[b].encode_utf8(&mut buf);
            byte_sym[b] = vocab
                .get(s)
                .or_else(|| extra.get(s).copied())
                .unwrap_or(NONE);
        }
        let mut ascii_tok = [NONE; 128];
        for (b, slot) in ascii_tok.iter_mut().enumerate() {
            let s = [b as u8];
            *slot = vocab.get(std::str::from_utf8(&s).unwrap()).unwrap_or(NONE);
        }
        let mut whole_word = FxHashMap::default();
        if pre.ignore_merges {
            let decode = byte_decoder(&chars);
            for id in 0..n_vocab {
                if let Some(bytes) = vocab
                    .text(id)
                    .chars()
                    .map(&decode)
                    .collect::<Option<Vec<u8>>>()
                {
                    whole_word.insert(bytes.into_boxed_slice(), id);
                }
            }
        }
        Bpe {
            pre: pre.pre,
            ignore_merges: pre.ignore_merges,
            n_vocab,
            merges: table,
            byte_sym,
            ascii_tok,
            whole_word,
        }
    }

    /// Tokenizes a piece of raw text (no special tokens in it) and appends the ids.
    pub fn encode(&self, text: &str, out: &mut Vec<u32>) {
        let mut syms: Vec<Sym> = Vec::new();
        let mut heap = MergeHeap::new();
        for (s, e) in split_words(text, self.pre) {
            self.encode_word(&text.as_bytes()[s..e], &mut syms, &mut heap, out);
        }
    }

    fn encode_word(
        &self,
        word: &[u8],
        syms: &mut Vec<Sym>,
        heap: &mut MergeHeap,
        out: &mut Vec<u32>,
    ) {
        if self.ignore_merges {
            if let Some(&id) = self.whole_word.get(word) {
                out.push(id);
                return;
            }
        }
        syms.clear();
        heap.clear();
        let n = word.len() as u32;
        for (i, &b) in word.iter().enumerate() {
            let i = i as u32;
            syms.push(Sym {
                start: i,
                len: 1,
                id: self.byte_sym[b as usize],
                prev: if i == 0 { NONE } else { i - 1 },
                next: if i + 1 == n { NONE } else { i + 1 },
            });
        }
        // Heap entries: (rank, left, right, left len, right len); the lengths tell stale entries apart.
        let push = |syms: &[Sym], heap: &mut MergeHeap, l: u32, r: u32| {
            if l == NONE || r == NONE {
                return;
            }
            let (a, b) = (syms[l as usize], syms[r as usize]);
            if let Some(&(rank, _)) = self.merges.get(&(a.id, b.id)) {
                heap.push(Reverse((rank, l, r, a.len, b.len)));
            }
        };
        for i in 1..n {
            push(syms, heap, i - 1, i);
        }
        while let Some(Reverse((_, l, r, ll, rl))) = heap.pop() {
            let (a, b) = (syms[l as usize], syms[r as usize]);
            if a.len != ll || b.len != rl || a.len == 0 || b.len == 0 {
                continue;
            }
            let merged = self.merges[&(a.id, b.id)].1;
            let left = &mut syms[l as usize];
            left.len += b.len;
            left.id = merged;
            left.next = b.next;
            syms[r as usize].len = 0;
            if b.next != NONE {
                syms[b.next as usize].prev = l;
            }
            let prev = syms[l as usize].prev;
            let next = syms[l as usize].next;
            push(syms, heap, prev, l);
            push(syms, heap, l, next);
        }
        let mut i = 0u32;
        while i != NONE {
            let s = syms[i as usize];
            if s.id < self.n_vocab {
                out.push(s.id);
            } else {
                // Not a vocabulary string: llama.cpp looks up each byte of its byte-char spelling as a
                // one-byte string, which only ever finds printable ASCII.
                for &b in &word[s.start as usize..(s.start + s.len) as usize] {
                    if (0x21..=0x7E).contains(&b) && self.ascii_tok[b as usize] != NONE {
                        out.push(self.ascii_tok[b as usize]);
                    }
                }
            }
            i = s.next;
        }
    }
}

/// Inverse of `byte_chars`.
pub(crate) fn byte_decoder(chars: &[char; 256]) -> impl Fn(char) -> Option<u8> {
    let mut table: FxHashMap<char, u8> = FxHashMap::default();
    for (b, &c) in chars.iter().enumerate() {
        table.insert(c, b as u8);
    }
    move |c| table.get(&c).copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(text: &str, pre: PreTokenizer) -> Vec<&str> {
        split_words(text, pre)
            .into_iter()
            .map(|(s, e)| &text[s..e])
            .collect()
    }

    #[test]
    fn byte_chars_are_gpt2s() {
        let c = byte_chars();
        assert_eq!(c[b' ' as usize], 'Ġ');
        assert_eq!(c[b'\n' as usize], 'Ċ');
        assert_eq!(c[b'A' as usize], 'A');
        assert_eq!(c[0], 'Ā');
        assert_eq!(c[0xAD], 'Ń');
        let mut sorted = c.to_vec();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), 256);
    }

    #[test]
    fn gpt2_split() {
        use PreTokenizer::*;
        assert_eq!(words("Hello world", Gpt2), ["Hello", " world"]);
        assert_eq!(
            words("I'm  fine!!\n\n x", Gpt2),
            ["I", "'m", " ", " fine", "!!", "\n\n", " x"]
        );
        assert_eq!(words("a   ", Gpt2), ["a", "   "]);
        assert_eq!(words("abc 1234", Gpt2), ["abc", " 1234"]);
        assert_eq!(
            words("abc 1234", DigitsThenGpt2),
            ["abc", " ", "1", "2", "3", "4"]
        );
        assert_eq!(words("x\u{0301}y", Gpt2), ["x", "\u{0301}", "y"]);
    }

    #[test]
    fn llama3_split() {
        let l3 = PreTokenizer::Llama3 { max_digits: 3 };
        let q2 = PreTokenizer::Llama3 { max_digits: 1 };
        assert_eq!(words("Hello world", l3), ["Hello", " world"]);
        assert_eq!(words("1234567", l3), ["123", "456", "7"]);
        assert_eq!(words("1234", q2), ["1", "2", "3", "4"]);
        assert_eq!(
            words("I'M ok.\n\n  x", l3),
            ["I", "'M", " ok", ".\n\n", " ", " x"]
        );
        assert_eq!(words("a \n b", l3), ["a", " \n", " b"]);
    }

    /// Qwen2's split (`tokenizer.ggml.pre = "qwen2"`) on tricky text: case-insensitive contractions, every digit on its
    /// own (ASCII and not), CJK runs glued to a leading punctuation mark, newline runs, trailing spaces. The expected
    /// words are what Python's `regex` module gives for the regex of Qwen2's tokenizer.json:
    /// `(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+`.
    #[test]
    fn qwen2_split_follows_its_regex() {
        let pre = pre_config("qwen2").expect("qwen2 is supported").pre;
        assert_eq!(pre, PreTokenizer::Llama3 { max_digits: 1 });
        let cases: &[(&str, &[&str])] = &[
            (
                "I'm sure it's fine; they'LL say we'VE done what we'd like. DON'T",
                &[
                    "I", "'m", " sure", " it", "'s", " fine", ";", " they", "'LL", " say", " we",
                    "'VE", " done", " what", " we", "'d", " like", ".", " DON", "'T",
                ],
            ),
            (
                "x = 12345 + 3.14 - ٣٤٥ ½",
                &[
                    "x", " =", " ", "1", "2", "3", "4", "5", " +", " ", "3", ".", "1", "4", " -",
                    " ", "٣", "٤", "٥", " ", "½",
                ],
            ),
            (
                "日本語のテキスト，中文字符。한국어",
                &["日本語のテキスト", "，中文字符", "。한국어"],
            ),
            (
                "def f():\n\treturn 1\n\n\n  x",
                &[
                    "def", " f", "():\n", "\treturn", " ", "1", "\n\n\n", " ", " x",
                ],
            ),
            (
                "a \n b\r\n\r\n  c   ",
                &["a", " \n", " b", "\r\n\r\n", " ", " c", "   "],
            ),
            (
                "$$hello!!\n\n(world)",
                &["$$", "hello", "!!\n\n", "(world", ")"],
            ),
            ("   leading", &["  ", " leading"]),
            (
                "__init__ --flag=\"x\" 🦙🦙",
                &["__", "init", "__", " --", "flag", "=\"", "x", "\"", " 🦙🦙"],
            ),
            (
                "don't 're' ' x",
                &["don", "'t", " '", "re", "'", " '", " x"],
            ),
        ];
        for (text, want) in cases {
            assert_eq!(words(text, pre), *want, "{text:?}");
        }
    }
}
