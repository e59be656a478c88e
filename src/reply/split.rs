//! Teams refuses a message over about 100 KB, counted in UTF-16 (413 `MessageSizeTooBig`;
//! protocol.md §3.2; Microsoft advises 80 KB at most). An answer whose message would be larger is
//! sent as several messages, in order, cut at paragraph boundaries, else at line breaks, else
//! between words, and only as a last resort inside a word; nothing is lost (the parts put
//! together are the answer).

use serde_json::Value;

/// Bytes `value` takes as a JSON document in UTF-16, the way Teams counts a message's size.
pub fn message_size(value: &Value) -> usize {
    serde_json::to_string(value).map_or(0, |json| utf16_bytes(&json))
}

fn utf16_bytes(text: &str) -> usize {
    text.chars().map(char::len_utf16).sum::<usize>() * 2
}

/// What `c` adds to a JSON string in UTF-16 bytes (escapes included).
fn char_cost(c: char) -> usize {
    match c {
        '"' | '\\' | '\n' | '\r' | '\t' | '\u{08}' | '\u{0c}' => 4,
        c if (c as u32) < 0x20 => 12,
        c => c.len_utf16() * 2,
    }
}

/// Bytes `text` adds to a message as its `text` field (UTF-16, JSON-escaped).
pub fn text_cost(text: &str) -> usize {
    text.chars().map(char_cost).sum()
}

/// `text` in parts of at most `budget` bytes each (see [`text_cost`]); one part when it fits.
pub fn split(text: &str, budget: usize) -> Vec<String> {
    // A part holds one character at least, whatever the budget.
    let budget = budget.max(12);
    if text_cost(text) <= budget {
        return vec![text.to_owned()];
    }
    let mut parts = Vec::new();
    split_at(text, budget, &["\n\n", "\n", " "], &mut parts);
    parts
}

/// Appends `text`'s parts to `parts`, cutting after the first of `separators` that makes pieces
/// small enough (each piece keeps its separator at its end).
fn split_at(text: &str, budget: usize, separators: &[&str], parts: &mut Vec<String>) {
    let Some((separator, finer)) = separators.split_first() else {
        split_chars(text, budget, parts);
        return;
    };
    let mut current = String::new();
    let mut current_cost = 0;
    for piece in text.split_inclusive(separator) {
        let cost = text_cost(piece);
        if current_cost + cost <= budget {
            current.push_str(piece);
            current_cost += cost;
            continue;
        }
        if !current.is_empty() {
            parts.push(std::mem::take(&mut current));
            current_cost = 0;
        }
        if cost <= budget {
            current.push_str(piece);
            current_cost = cost;
        } else {
            split_at(piece, budget, finer, parts);
        }
    }
    if !current.is_empty() {
        parts.push(current);
    }
}

fn split_chars(text: &str, budget: usize, parts: &mut Vec<String>) {
    let mut current = String::new();
    let mut current_cost = 0;
    for c in text.chars() {
        let cost = char_cost(c);
        if current_cost + cost > budget && !current.is_empty() {
            parts.push(std::mem::take(&mut current));
            current_cost = 0;
        }
        current.push(c);
        current_cost += cost;
    }
    if !current.is_empty() {
        parts.push(current);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_text_that_fits_is_one_part() {
        assert_eq!(split("hello", 100), ["hello"]);
    }

    #[test]
    fn paragraphs_first_then_lines_then_words_then_characters() {
        let paragraphs = "aaaa\n\nbbbb\n\ncccc";
        // 4 characters and the two newlines: (4 + 2×2) × 2 bytes = 16 bytes.
        assert_eq!(split(paragraphs, 20), ["aaaa\n\n", "bbbb\n\n", "cccc"]);
        let lines = "aaaa\nbbbb\ncccc";
        assert_eq!(split(lines, 20), ["aaaa\n", "bbbb\ncccc"]);
        let words = "aaaa bbbb cccc";
        assert_eq!(split(words, 20), ["aaaa bbbb ", "cccc"]);
        let word = "abcdefghij";
        assert_eq!(split(word, 12), ["abcdef", "ghij"]);
    }

    #[test]
    fn nothing_is_lost_and_every_part_fits() {
        let text: String = (0..2000)
            .map(|i| match i % 37 {
                0 => "\n\n".to_owned(),
                5 => "\n".to_owned(),
                _ => format!("wörd{i}😀 \"q\" "),
            })
            .collect();
        for budget in [50, 333, 4_000] {
            let parts = split(&text, budget);
            assert_eq!(parts.concat(), text);
            assert!(parts.iter().all(|p| text_cost(p) <= budget), "{budget}");
        }
    }

    #[test]
    fn sizes_are_counted_in_utf16() {
        // "é" is one UTF-16 unit, "😀" two; the quotes of the JSON string count too.
        assert_eq!(message_size(&Value::String("é😀".into())), (2 + 1 + 2) * 2);
        assert_eq!(text_cost("a\"b"), 2 + 4 + 2);
    }
}
