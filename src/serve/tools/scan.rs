//! Call objects read from text that may stop anywhere (a stream's answer so far): where a call's name and its
//! arguments are, before the object is complete. The scan checks the object's own structure (keys, colons, commas);
//! what a value holds is checked by a JSON parser once the answer is complete.

/// How far a value (or a string) reaches.
#[derive(Debug, PartialEq)]
enum Reach {
    /// It ends before this byte.
    Done(usize),
    /// The text stops inside it.
    Cut,
    /// Not a JSON value.
    Bad,
}

fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while i < b.len() && matches!(b[i], b' ' | b'\t' | b'\n' | b'\r') {
        i += 1;
    }
    i
}

/// The string starting at `b[i] == '"'`.
fn string_end(b: &[u8], i: usize) -> Reach {
    let mut j = i + 1;
    while j < b.len() {
        match b[j] {
            b'\\' => j += 2,
            b'"' => return Reach::Done(j + 1),
            _ => j += 1,
        }
    }
    Reach::Cut
}

/// The value starting at `b[i]`: a string, an object or array (brackets counted outside strings), or a literal.
fn value_end(b: &[u8], i: usize) -> Reach {
    match b[i] {
        b'"' => string_end(b, i),
        b'{' | b'[' => {
            let mut depth = 0usize;
            let mut j = i;
            while j < b.len() {
                match b[j] {
                    b'"' => match string_end(b, j) {
                        Reach::Done(e) => {
                            j = e;
                            continue;
                        }
                        r => return r,
                    },
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return Reach::Done(j + 1);
                        }
                    }
                    _ => {}
                }
                j += 1;
            }
            Reach::Cut
        }
        _ => {
            let mut j = i;
            while j < b.len()
                && (b[j].is_ascii_alphanumeric() || matches!(b[j], b'.' | b'+' | b'-'))
            {
                j += 1;
            }
            match j {
                _ if j == b.len() => Reach::Cut, // a number or literal may go on
                _ if j == i => Reach::Bad,
                _ => Reach::Done(j),
            }
        }
    }
}

/// Where the JSON value that starts `t` ends, once the text has all of it.
pub fn value_len(t: &str) -> Option<usize> {
    match t.bytes().next().map(|_| value_end(t.as_bytes(), 0)) {
        Some(Reach::Done(e)) => Some(e),
        _ => None,
    }
}

/// What a call object, `{"name": ..., "arguments": {...}}`, holds so far.
#[derive(Debug, Default, PartialEq)]
pub struct CallScan {
    /// The name, once its string is complete.
    pub name: Option<String>,
    /// Where the arguments value (`arguments`, or Llama 3's `parameters`) is so far, in bytes of the text.
    pub args: Option<(usize, usize)>,
    /// Whether that value is complete.
    pub args_done: bool,
    /// The byte after the object's closing brace, once it is complete.
    pub end: Option<usize>,
}

/// Scans the object that starts `t` (at `{`); None when what there is of it is not a JSON object.
pub fn scan_call(t: &str) -> Option<CallScan> {
    let b = t.as_bytes();
    if b.first() != Some(&b'{') {
        return None;
    }
    let mut out = CallScan::default();
    let mut i = skip_ws(b, 1);
    if b.get(i) == Some(&b'}') {
        out.end = Some(i + 1);
        return Some(out);
    }
    loop {
        if i >= b.len() {
            return Some(out);
        }
        if b[i] != b'"' {
            return None;
        }
        let key_end = match string_end(b, i) {
            Reach::Done(e) => e,
            _ => return Some(out),
        };
        let key: String = serde_json::from_str(&t[i..key_end]).ok()?;
        i = skip_ws(b, key_end);
        if i >= b.len() {
            return Some(out);
        }
        if b[i] != b':' {
            return None;
        }
        i = skip_ws(b, i + 1);
        if i >= b.len() {
            return Some(out);
        }
        let is_args = key == "arguments" || key == "parameters";
        let start = i;
        match value_end(b, i) {
            Reach::Bad => return None,
            Reach::Cut => {
                if is_args {
                    out.args = Some((start, b.len()));
                }
                return Some(out);
            }
            Reach::Done(e) => {
                if key == "name" {
                    out.name = Some(serde_json::from_str::<String>(&t[start..e]).ok()?);
                }
                if is_args {
                    out.args = Some((start, e));
                    out.args_done = true;
                }
                i = skip_ws(b, e);
            }
        }
        match b.get(i) {
            None => return Some(out),
            Some(b',') => i = skip_ws(b, i + 1),
            Some(b'}') => {
                out.end = Some(i + 1);
                return Some(out);
            }
            Some(_) => return None,
        }
    }
}

/// JSON text without the whitespace between its tokens (strings kept as written). On a prefix of a text it gives a
/// prefix of what it gives on the whole, so a stream can send arguments as they come.
pub fn compact(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    let (mut in_string, mut escaped) = (false, false);
    for c in raw.chars() {
        if in_string {
            out.push(c);
            match c {
                _ if escaped => escaped = false,
                '\\' => escaped = true,
                '"' => in_string = false,
                _ => {}
            }
        } else if !matches!(c, ' ' | '\t' | '\n' | '\r') {
            in_string = c == '"';
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_call_object_is_read_as_far_as_it_goes() {
        let full = r#"{"name": "get_weather", "id": 7, "arguments": {"city": "Z\"ü rich", "n": [1, {"a": 2}]}}"#;
        let s = scan_call(full).unwrap();
        assert_eq!(s.name.as_deref(), Some("get_weather"));
        let (a, e) = s.args.unwrap();
        assert_eq!(&full[a..e], r#"{"city": "Z\"ü rich", "n": [1, {"a": 2}]}"#);
        assert!(s.args_done);
        assert_eq!(s.end, Some(full.len()));
        // Every prefix scans as a prefix: the name once its string closes, the arguments growing, no end.
        let mut seen_name = false;
        for (cut, _) in full.char_indices().skip(1) {
            let s = scan_call(&full[..cut]).unwrap_or_else(|| panic!("{cut}"));
            assert_eq!(s.end, None);
            seen_name |= s.name.is_some();
            if let Some((a, e)) = s.args {
                assert!(seen_name);
                assert!(full[a..].starts_with(&full[a..e]));
                let c = compact(&full[a..e]);
                assert!(
                    compact(r#"{"city": "Z\"ü rich", "n": [1, {"a": 2}]}"#).starts_with(&c),
                    "{c}"
                );
            }
        }
        assert_eq!(
            compact(r#"{"city": "Z\"ü rich", "n": [1, {"a": 2}]}"#),
            r#"{"city":"Z\"ü rich","n":[1,{"a":2}]}"#
        );
        // Llama 3's key; no arguments; not objects.
        let s = scan_call(r#"{"name": "f", "parameters": {}}"#).unwrap();
        assert_eq!(s.args, Some((28, 30)));
        let s = scan_call(r#"{"name": "f"}"#).unwrap();
        assert_eq!((s.args, s.end), (None, Some(13)));
        for bad in [
            r#"["name"]"#,
            r#"{"name" "f"}"#,
            r#"{name: 1}"#,
            r#"{"a": 1 "b"}"#,
            r#"{"name": 3}"#,
        ] {
            assert_eq!(scan_call(bad), None, "{bad}");
        }
        // A number at the end of the text may go on: not done.
        let s = scan_call(r#"{"name": "f", "arguments": 12"#).unwrap();
        assert!(!s.args_done);
    }
}
