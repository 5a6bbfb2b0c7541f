//! Token texts in one buffer, with an open-addressing index from text to id (no per-token allocations:
//! a 262K-token vocabulary loads in a few milliseconds).

use std::hash::Hasher;

use super::FxHasher;

pub(crate) struct Vocab {
    data: String,
    /// Token i is `data[off[i]..off[i + 1]]`.
    off: Vec<u32>,
    /// Id + 1 per slot (0 = empty); linear probing.
    slots: Vec<u32>,
    mask: usize,
}

fn hash(s: &str) -> usize {
    let mut h = FxHasher::default();
    h.write(s.as_bytes());
    h.finish() as usize
}

impl Vocab {
    /// Duplicate texts resolve to the last id, as in llama.cpp's `token_to_id`.
    pub fn new<'a>(texts: impl ExactSizeIterator<Item = &'a str>) -> Self {
        let n = texts.len();
        let mut data = String::new();
        let mut off = Vec::with_capacity(n + 1);
        off.push(0u32);
        for t in texts {
            data.push_str(t);
            off.push(data.len() as u32);
        }
        let cap = (2 * n).next_power_of_two().max(16);
        let mut v = Vocab {
            data,
            off,
            slots: vec![0; cap],
            mask: cap - 1,
        };
        for id in 0..n as u32 {
            let s = v.text(id);
            let mut i = hash(s) & v.mask;
            loop {
                match v.slots[i] {
                    0 => {
                        v.slots[i] = id + 1;
                        break;
                    }
                    other if v.text(other - 1) == s => {
                        v.slots[i] = id + 1;
                        break;
                    }
                    _ => i = (i + 1) & v.mask,
                }
            }
        }
        v
    }

    pub fn len(&self) -> usize {
        self.off.len() - 1
    }

    /// Text of token `id` (which must be < len).
    #[inline]
    pub fn text(&self, id: u32) -> &str {
        &self.data[self.off[id as usize] as usize..self.off[id as usize + 1] as usize]
    }

    #[inline]
    pub fn get(&self, s: &str) -> Option<u32> {
        let mut i = hash(s) & self.mask;
        loop {
            match self.slots[i] {
                0 => return None,
                id if self.text(id - 1) == s => return Some(id - 1),
                _ => i = (i + 1) & self.mask,
            }
        }
    }

    pub fn total_bytes(&self) -> usize {
        self.data.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookup() {
        let v = Vocab::new(["a", "bb", "", "a", "ccc"].into_iter());
        assert_eq!(v.len(), 5);
        assert_eq!(v.get("a"), Some(3), "last duplicate wins");
        assert_eq!(v.get("bb"), Some(1));
        assert_eq!(v.get(""), Some(2));
        assert_eq!(v.get("ccc"), Some(4));
        assert_eq!(v.get("c"), None);
        assert_eq!(v.text(4), "ccc");
    }
}
