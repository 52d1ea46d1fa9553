//! Generated tokens to the text a client sees: whole UTF-8 characters only, cut at the
//! first stop string, and text that could still become a stop string held back until
//! it cannot (so a streamed answer never shows part of a stop string).

/// The text of one answer as its tokens arrive.
pub struct AnswerText {
    stops: Vec<String>,
    /// Bytes of a character split over tokens, not yet part of `text`.
    pending: Vec<u8>,
    text: String,
    /// Bytes of `text` already handed out.
    sent: usize,
}

/// What one token changed.
#[derive(Debug, PartialEq, Eq)]
pub enum Piece {
    /// Text to hand out now (maybe empty).
    More(String),
    /// A stop string appeared: the text before it, and the answer ends.
    Stopped(String),
}

impl AnswerText {
    pub fn new(stops: Vec<String>) -> AnswerText {
        AnswerText { stops, pending: Vec::new(), text: String::new(), sent: 0 }
    }

    /// Adds the bytes of one token.
    pub fn push(&mut self, bytes: &[u8]) -> Piece {
        self.pending.extend_from_slice(bytes);
        let valid = match std::str::from_utf8(&self.pending) {
            Ok(_) => self.pending.len(),
            Err(e) if e.error_len().is_none() => e.valid_up_to(),
            Err(_) => self.pending.len(), // not UTF-8 at all: pass it on lossily
        };
        let done: Vec<u8> = self.pending.drain(..valid).collect();
        self.text.push_str(&String::from_utf8_lossy(&done));
        // A stop string can only start where it could not have been found before.
        let longest = self.stops.iter().map(|s| s.len()).max().unwrap_or(0);
        let mut from = self.sent.saturating_sub(longest);
        while !self.text.is_char_boundary(from) {
            from -= 1;
        }
        let hit = self.stops.iter().filter_map(|s| self.text[from..].find(s.as_str()).map(|i| from + i)).min();
        if let Some(at) = hit {
            let out = self.text[self.sent.min(at)..at].to_string();
            self.sent = self.text.len();
            return Piece::Stopped(out);
        }
        let hold = self.held_back();
        let end = self.text.len() - hold;
        let out = if end > self.sent { self.text[self.sent..end].to_string() } else { String::new() };
        self.sent = self.sent.max(end);
        Piece::More(out)
    }

    /// The end of the answer (not at a stop string): whatever was held back.
    pub fn finish(&mut self) -> String {
        if !self.pending.is_empty() {
            let rest: Vec<u8> = std::mem::take(&mut self.pending);
            self.text.push_str(&String::from_utf8_lossy(&rest));
        }
        let out = self.text[self.sent..].to_string();
        self.sent = self.text.len();
        out
    }

    /// Bytes at the end of the text that begin some stop string.
    fn held_back(&self) -> usize {
        let mut best = 0;
        for s in &self.stops {
            for k in (1..s.len().min(self.text.len() + 1)).rev() {
                let start = self.text.len() - k;
                if k <= best {
                    break;
                }
                if self.text.is_char_boundary(start)
                    && s.is_char_boundary(k)
                    && s.as_bytes().starts_with(&self.text.as_bytes()[start..])
                {
                    best = k;
                    break;
                }
            }
        }
        best
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], tokens: &[&[u8]]) -> (String, bool) {
        let mut a = AnswerText::new(stops.iter().map(|s| s.to_string()).collect());
        let mut out = String::new();
        for t in tokens {
            match a.push(t) {
                Piece::More(s) => out.push_str(&s),
                Piece::Stopped(s) => return (out + &s, true),
            }
        }
        (out + &a.finish(), false)
    }

    #[test]
    fn without_stops_the_text_passes_through() {
        assert_eq!(run(&[], &[b"Hel", b"lo"]), ("Hello".into(), false));
    }

    #[test]
    fn a_stop_string_split_over_tokens_ends_the_answer_before_it() {
        assert_eq!(run(&["\n\n"], &[b"one", b"\n", b"\ntwo"]), ("one".into(), true));
        assert_eq!(run(&["END"], &[b"aE", b"N", b"D b"]), ("a".into(), true));
    }

    #[test]
    fn a_false_start_of_a_stop_string_is_handed_out_once_it_cannot_match() {
        let mut a = AnswerText::new(vec!["END".into()]);
        assert_eq!(a.push(b"xE"), Piece::More("x".into()));
        assert_eq!(a.push(b"N"), Piece::More(String::new()));
        assert_eq!(a.push(b"d"), Piece::More("ENd".into()));
        assert_eq!(a.finish(), "");
    }

    #[test]
    fn characters_split_over_tokens_come_out_whole() {
        let e = "é".as_bytes();
        let mut a = AnswerText::new(vec![]);
        assert_eq!(a.push(&e[..1]), Piece::More(String::new()));
        assert_eq!(a.push(&e[1..]), Piece::More("é".into()));
        assert_eq!(run(&["é!"], &[b"a", &e[..1], &e[1..], b"!"]), ("a".into(), true));
    }

    #[test]
    fn held_text_is_returned_at_the_end() {
        assert_eq!(run(&["STOP"], &[b"abc", b"ST"]), ("abcST".into(), false));
    }
}
