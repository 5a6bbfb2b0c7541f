//! SentencePiece BPE (GGUF `tokenizer.ggml.model = "llama"`), as llama.cpp's `llm_tokenizer_spm` runs it:
//! spaces become "▁", the text is cut into UTF-8 characters, and the adjacent pair whose concatenation is a
//! vocabulary token with the highest score is merged until none is left (ties: leftmost). Characters that are
//! not tokens come out as byte-fallback tokens `<0xXX>`.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use super::vocab::Vocab;
use super::NONE;

pub(crate) struct Spm {
    pub scores: Vec<f32>,
    /// Token of each byte: `<0xXX>`, else the one-byte string, else NONE.
    pub byte_tok: [u32; 256],
}

#[derive(Clone, Copy)]
struct Sym {
    start: u32,
    len: u32,
    prev: u32,
    next: u32,
}

struct Bigram {
    score: f32,
    left: u32,
    right: u32,
    size: u32,
}

impl PartialEq for Bigram {
    fn eq(&self, o: &Self) -> bool {
        self.cmp(o) == Ordering::Equal
    }
}
impl Eq for Bigram {}
impl PartialOrd for Bigram {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Bigram {
    /// Max-heap order: higher score first, then the leftmost pair.
    fn cmp(&self, o: &Self) -> Ordering {
        self.score
            .total_cmp(&o.score)
            .then_with(|| o.left.cmp(&self.left))
    }
}

impl Spm {
    pub fn new(vocab: &Vocab, scores: Vec<f32>) -> Self {
        let mut byte_tok = [NONE; 256];
        for (b, slot) in byte_tok.iter_mut().enumerate() {
            let hex = format!("<0x{b:02X}>");
            *slot = match vocab.get(&hex) {
                Some(id) => id,
                None => std::str::from_utf8(&[b as u8])
                    .ok()
                    .and_then(|s| vocab.get(s))
                    .unwrap_or(NONE),
            };
        }
        debug_assert_eq!(scores.len(), vocab.len());
        Spm { scores, byte_tok }
    }

    /// Tokenizes `text` (raw text of one fragment, space prefix already added if wanted).
    /// Returns the first byte that has no token, if any (llama.cpp throws there).
    pub fn encode(&self, text: &str, vocab: &Vocab, out: &mut Vec<u32>) -> Result<(), u8> {
        if text.is_empty() {
            return Ok(());
        }
        let esc = text.replace(' ', "\u{2581}");
        let mut syms: Vec<Sym> = Vec::with_capacity(esc.len());
        for (i, c) in esc.char_indices() {
            let idx = syms.len() as u32;
            syms.push(Sym {
                start: i as u32,
                len: c.len_utf8() as u32,
                prev: if idx == 0 { NONE } else { idx - 1 },
                next: idx + 1,
            });
        }
        syms.last_mut().unwrap().next = NONE;

        let mut heap: BinaryHeap<Bigram> = BinaryHeap::with_capacity(syms.len());
        let try_add = |syms: &[Sym], heap: &mut BinaryHeap<Bigram>, l: u32, r: u32| {
            if l == NONE || r == NONE {
                return;
            }
            let (a, b) = (syms[l as usize], syms[r as usize]);
            let s = &esc[a.start as usize..(a.start + a.len + b.len) as usize];
            if let Some(id) = vocab.get(s) {
                heap.push(Bigram {
                    score: self.scores[id as usize],
                    left: l,
                    right: r,
                    size: a.len + b.len,
                });
            }
        };
        for i in 1..syms.len() as u32 {
            try_add(&syms, &mut heap, i - 1, i);
        }
        while let Some(bg) = heap.pop() {
            let (a, b) = (syms[bg.left as usize], syms[bg.right as usize]);
            if a.len == 0 || b.len == 0 || a.len + b.len != bg.size {
                continue;
            }
            syms[bg.left as usize].len += b.len;
            syms[bg.left as usize].next = b.next;
            syms[bg.right as usize].len = 0;
            if b.next != NONE {
                syms[b.next as usize].prev = bg.left;
            }
            try_add(&syms, &mut heap, a.prev, bg.left);
            try_add(&syms, &mut heap, bg.left, b.next);
        }

        let mut i = 0u32;
        while i != NONE {
            let s = syms[i as usize];
            let piece = &esc[s.start as usize..(s.start + s.len) as usize];
            match vocab.get(piece) {
                Some(id) => out.push(id),
                None => {
                    for &byte in piece.as_bytes() {
                        match self.byte_tok[byte as usize] {
                            NONE => return Err(byte),
                            id => out.push(id),
                        }
                    }
                }
            }
            i = s.next;
        }
        Ok(())
    }
}
