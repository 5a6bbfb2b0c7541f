//! Stop strings over streamed text: text that might be the start of a stop string is held back until the next
//! piece tells, so a client never sees part of a stop string.

pub struct StopMatcher {
    stops: Vec<String>,
    /// Text not yet released: a suffix that some stop string starts with.
    held: String,
}

impl StopMatcher {
    pub fn new(stops: Vec<String>) -> Self {
        StopMatcher {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            held: String::new(),
        }
    }

    /// Adds `piece`; returns the text that is safe to release and whether a stop string was reached (then the text
    /// released ends just before it and the rest is dropped).
    pub fn push(&mut self, piece: &str) -> (String, bool) {
        if self.stops.is_empty() {
            return (piece.to_string(), false);
        }
        self.held.push_str(piece);
        if let Some(at) = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min()
        {
            let out = self.held[..at].to_string();
            self.held.clear();
            return (out, true);
        }
        // Hold back the longest suffix that is a proper prefix of a stop string.
        let keep = self
            .held
            .char_indices()
            .map(|(i, _)| i)
            .find(|&i| {
                let tail = &self.held[i..];
                self.stops.iter().any(|s| s.starts_with(tail))
            })
            .unwrap_or(self.held.len());
        let out = self.held[..keep].to_string();
        self.held.drain(..keep);
        (out, false)
    }

    /// The held text, at the end of generation (no stop string was completed).
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_back_a_partial_stop_and_cuts_at_a_full_one() {
        let mut m = StopMatcher::new(vec!["\n\n".into(), "END".into()]);
        assert_eq!(m.push("hello"), ("hello".into(), false));
        assert_eq!(m.push(" wor\n"), (" wor".into(), false));
        assert_eq!(m.push("x"), ("\nx".into(), false));
        assert_eq!(m.push("aE"), ("a".into(), false));
        assert_eq!(m.push("NDtail"), ("".into(), true));
        let mut m = StopMatcher::new(vec!["stop".into()]);
        assert_eq!(m.push("a st"), ("a ".into(), false));
        assert_eq!(m.flush(), "st");
        let mut m = StopMatcher::new(vec![]);
        assert_eq!(m.push("é"), ("é".into(), false));
        // A stop string inside one piece: the text before it comes out.
        let mut m = StopMatcher::new(vec!["ö".into()]);
        assert_eq!(m.push("aöb"), ("a".into(), true));
    }
}
