//! List paging, shared by every `list` endpoint: `order` (`desc`, newest first, by default, or
//! `asc`), `take` (default 20, at most `admin.list_max_take`), an opaque `cursor` (the position
//! after the last item of the previous page), and `meta[key]=value` filters. Positions are
//! (creation order, id) pairs, so a page never repeats or skips an item that existed when the
//! listing began, however many items are inserted meanwhile.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use super::model::Invalid;

pub const DEFAULT_TAKE: usize = 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    Asc,
    Desc,
}

/// Where an item sits in a listing.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Position {
    pub order: u64,
    pub id: String,
}

#[derive(Debug)]
pub struct ListQuery {
    pub order: Order,
    pub take: usize,
    pub cursor: Option<Position>,
    /// `meta[key]=value` pairs; an item matches when every key holds the value.
    pub meta: Vec<(String, String)>,
    /// Other parameters, for endpoints that take more (e.g. `integrationId`).
    pub extra: Vec<(String, String)>,
}

impl ListQuery {
    pub fn parse(query: Option<&str>, max_take: usize) -> Result<Self, Invalid> {
        let mut parsed = Self {
            order: Order::Desc,
            take: DEFAULT_TAKE.min(max_take),
            cursor: None,
            meta: Vec::new(),
            extra: Vec::new(),
        };
        for (key, value) in url::form_urlencoded::parse(query.unwrap_or("").as_bytes()) {
            match key.as_ref() {
                "order" => {
                    parsed.order = match value.as_ref() {
                        "asc" => Order::Asc,
                        "desc" => Order::Desc,
                        _ => return Err(Invalid::field("order", "order: asc or desc")),
                    }
                }
                "take" => {
                    let take: usize = value
                        .parse()
                        .ok()
                        .filter(|t| *t > 0)
                        .ok_or_else(|| Invalid::field("take", "take: a positive integer"))?;
                    parsed.take = take.min(max_take);
                }
                "cursor" => {
                    if !value.is_empty() {
                        parsed.cursor = Some(decode_cursor(&value)?);
                    }
                }
                other => match other
                    .strip_prefix("meta[")
                    .and_then(|rest| rest.strip_suffix(']'))
                {
                    Some(meta_key) if !meta_key.is_empty() => {
                        parsed.meta.push((meta_key.to_owned(), value.into_owned()))
                    }
                    Some(_) => return Err(Invalid::field("meta", "meta[key]: the key is empty")),
                    None => parsed.extra.push((other.to_owned(), value.into_owned())),
                },
            }
        }
        Ok(parsed)
    }

    pub fn extra(&self, name: &str) -> Option<&str> {
        self.extra
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// One page of `items` (in any order) and the cursor of the next page, if there is one.
    pub fn page<T>(&self, mut items: Vec<(Position, T)>) -> (Vec<T>, Option<String>) {
        items.sort_by(|a, b| a.0.cmp(&b.0));
        if self.order == Order::Desc {
            items.reverse();
        }
        let after = |p: &Position| match (&self.cursor, self.order) {
            (None, _) => true,
            (Some(c), Order::Asc) => p > c,
            (Some(c), Order::Desc) => p < c,
        };
        let mut rest = items.into_iter().filter(|(p, _)| after(p));
        let page: Vec<(Position, T)> = rest.by_ref().take(self.take).collect();
        let more = rest.next().is_some();
        let cursor = if more {
            page.last().map(|(p, _)| encode_cursor(p))
        } else {
            None
        };
        (page.into_iter().map(|(_, t)| t).collect(), cursor)
    }
}

/// Whether `meta` holds every filter; a non-string value matches its JSON form (`meta[n]=3`).
pub fn meta_matches(
    meta: &std::collections::BTreeMap<String, serde_json::Value>,
    filters: &[(String, String)],
) -> bool {
    filters.iter().all(|(key, wanted)| match meta.get(key) {
        Some(serde_json::Value::String(s)) => s == wanted,
        Some(other) => {
            serde_json::from_str::<serde_json::Value>(wanted)
                .ok()
                .as_ref()
                == Some(other)
        }
        None => false,
    })
}

pub fn encode_cursor(position: &Position) -> String {
    URL_SAFE_NO_PAD.encode(format!("{}:{}", position.order, position.id))
}

fn decode_cursor(cursor: &str) -> Result<Position, Invalid> {
    let bad = || Invalid::field("cursor", "cursor: not a cursor returned by this list");
    let bytes = URL_SAFE_NO_PAD.decode(cursor).map_err(|_| bad())?;
    let text = String::from_utf8(bytes).map_err(|_| bad())?;
    let (order, id) = text.split_once(':').ok_or_else(bad)?;
    Ok(Position {
        order: order.parse().map_err(|_| bad())?,
        id: id.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn items(n: u64) -> Vec<(Position, u64)> {
        (0..n)
            .map(|i| {
                (
                    Position {
                        order: i,
                        id: format!("id{i}"),
                    },
                    i,
                )
            })
            .collect()
    }

    #[test]
    fn pages_cover_everything_once_in_both_orders() {
        for (order, expected) in [
            ("asc", (0..45).collect::<Vec<u64>>()),
            ("desc", (0..45).rev().collect()),
        ] {
            let mut seen = Vec::new();
            let mut cursor: Option<String> = None;
            loop {
                let q = format!(
                    "order={order}&take=10{}",
                    cursor
                        .as_ref()
                        .map(|c| format!("&cursor={c}"))
                        .unwrap_or_default()
                );
                let query = ListQuery::parse(Some(&q), 100).unwrap();
                let (page, next) = query.page(items(45));
                seen.extend(page);
                match next {
                    Some(c) => cursor = Some(c),
                    None => break,
                }
            }
            assert_eq!(seen, expected);
        }
    }

    #[test]
    fn bad_parameters_are_refused() {
        for q in ["take=0", "take=x", "order=up", "cursor=%%%", "meta[]=x"] {
            assert!(ListQuery::parse(Some(q), 100).is_err(), "{q}");
        }
        assert_eq!(ListQuery::parse(Some("take=1000"), 100).unwrap().take, 100);
    }
}
