//! teams-router: the front door between Microsoft Teams (the Bot Framework's Bot Connector) and
//! an enterprise's bots.
//!
//! The rooms, in the order one activity meets them, and what each may import (checked by the
//! test `rooms::imports_follow_the_map`; no room imports one that imports it back):
//!
//! | room | its job | imports |
//! |---|---|---|
//! | [`front`] | hyper server, routes, body limit, status codes, admission | activity, auth, backend, config, connector, conversation, ledger, notify, ownership, registry, reply, store, telemetry |
//! | [`auth`] | Bot Connector JWT verification, OpenID/JWKS cache, verified-token cache, clouds | clock, recent, records, telemetry |
//! | [`activity`] | the one parse on the request path (borrowed, the body copied once, fields kept as positions in it) and its envelope; mention stripping | – |
//! | [`conversation`] | one supervised actor per (integration, conversation): dedup, ordering, sessions, passivation | activity, backend, clock, config, registry, reply, store, telemetry |
//! | [`reply`] | one turn: asks the [`backend`], streams or sends through the [`connector`] | activity, backend, clock, config, connector, ledger, records, registry, telemetry |
//! | [`backend`] | the bot's brain: echo, webhook, OpenAI-compatible model; outbound policy | activity, clock, records |
//! | [`connector`] | Bot Connector REST client, outbound tokens, pacing, retries | auth, clock, config, recent, registry, telemetry |
//! | [`ledger`] | what the data path writes down for the management API: events, contacts, addresses | activity, registry, store, telemetry |
//! | [`registry`] | the live bot and integration records | auth, config, records, telemetry |
//! | [`notify`] | tenant connections (admin consent, installations), destinations, discovery, proactive messages and broadcasts | backend, clock, connector, ledger, records, registry, store, telemetry |
//! | [`ownership`] | with a shared Redis store: partition leases, their streams' readers, the hand-over to conversations | activity, clock, connector, conversation, store, telemetry |
//! | [`store`] | embedded and Redis stores, the snapshot and journal writers, the snapshot codec | clock, config, telemetry |
//! | [`records`] | the domain records (bots, integrations, accounts) | – |
//! | [`config`] | the TOML + env settings; composes the rooms' own sections | auth, backend, records |
//! | [`admin`] | the management API, setup checks, secrets at rest | any room but `app` |
//! | [`telemetry`] | metric names, the Prometheus recorder, readiness | – |
//! | [`recent`] | a thread's last answers of a shared cache (tokens, service URLs) | – |
//! | [`app`] | wires the rooms together, runs the listeners, shuts down gracefully | any room |
//!
//! The data path (`front`, `conversation`, `reply`, `connector`, `backend`) imports nothing from
//! `admin`: the front routes the management API through [`front::ManagementApi`], which `admin`
//! implements.

#![forbid(unsafe_code)]

pub mod activity;
pub mod admin;
pub mod app;
pub mod auth;
pub mod backend;
pub(crate) mod clock;
pub mod config;
pub(crate) mod connector;
pub mod conversation;
pub mod front;
pub(crate) mod ledger;
pub(crate) mod notify;
pub(crate) mod ownership;
pub(crate) mod recent;
pub mod records;
pub(crate) mod registry;
pub(crate) mod reply;
pub mod store;
pub(crate) mod telemetry;
pub mod testkit;

#[cfg(test)]
mod rooms {
    use std::collections::{BTreeMap, BTreeSet};

    /// The imports each room may have (the table above). `admin` and `app` are the top.
    const MAP: &[(&str, &[&str])] = &[
        (
            "front",
            &[
                "activity",
                "auth",
                "backend",
                "config",
                "connector",
                "conversation",
                "ledger",
                "notify",
                "ownership",
                "registry",
                "reply",
                "store",
                "telemetry",
            ],
        ),
        (
            "notify",
            &[
                "backend",
                "clock",
                "connector",
                "ledger",
                "records",
                "registry",
                "store",
                "telemetry",
            ],
        ),
        (
            "ownership",
            &[
                "activity",
                "clock",
                "connector",
                "conversation",
                "store",
                "telemetry",
            ],
        ),
        ("auth", &["clock", "recent", "records", "telemetry"]),
        ("activity", &[]),
        (
            "conversation",
            &[
                "activity",
                "backend",
                "clock",
                "config",
                "registry",
                "reply",
                "store",
                "telemetry",
            ],
        ),
        (
            "reply",
            &[
                "activity",
                "backend",
                "clock",
                "config",
                "connector",
                "ledger",
                "records",
                "registry",
                "telemetry",
            ],
        ),
        ("backend", &["activity", "clock", "records"]),
        (
            "connector",
            &["auth", "clock", "config", "recent", "registry", "telemetry"],
        ),
        ("ledger", &["activity", "registry", "store", "telemetry"]),
        ("registry", &["auth", "config", "records", "telemetry"]),
        ("store", &["clock", "config", "telemetry"]),
        ("records", &[]),
        ("config", &["auth", "backend", "records"]),
        ("telemetry", &[]),
        ("clock", &[]),
        ("recent", &[]),
    ];

    const DATA_PATH: &[&str] = &["front", "conversation", "reply", "connector", "backend"];

    /// Every `crate::room` a room's code names (comments left out).
    fn imports() -> BTreeMap<String, BTreeSet<String>> {
        let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut found: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        let mut files = vec![src.clone()];
        while let Some(path) = files.pop() {
            if path.is_dir() {
                for entry in std::fs::read_dir(&path).expect("src is readable") {
                    files.push(entry.expect("a directory entry").path());
                }
                continue;
            }
            let relative = path.strip_prefix(&src).expect("under src");
            let first = relative.components().next().expect("a file");
            let room = first
                .as_os_str()
                .to_string_lossy()
                .trim_end_matches(".rs")
                .to_owned();
            let text = std::fs::read_to_string(&path).expect("a source file");
            for line in text.lines().filter(|l| !l.trim_start().starts_with("//")) {
                for (at, _) in line.match_indices("crate::") {
                    let name: String = line[at + 7..]
                        .chars()
                        .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                        .collect();
                    if !name.is_empty() && name != room {
                        found.entry(room.clone()).or_default().insert(name);
                    }
                }
            }
        }
        found
    }

    #[test]
    fn imports_follow_the_map() {
        let map: BTreeMap<&str, &[&str]> = MAP.iter().copied().collect();
        let mut stray = Vec::new();
        for (room, names) in imports() {
            let Some(allowed) = map.get(room.as_str()) else {
                // `admin`, `app`, `testkit` and the crate root sit above every room.
                assert!(
                    ["admin", "app", "testkit", "lib", "main"].contains(&room.as_str()),
                    "room {room} is not in the map of src/lib.rs"
                );
                if room == "admin" {
                    assert!(!names.contains("app"), "admin imports app");
                }
                continue;
            };
            for name in names {
                if !allowed.contains(&name.as_str()) {
                    stray.push(format!("{room} -> {name}"));
                }
            }
        }
        assert!(stray.is_empty(), "imports outside the map: {stray:?}");
        for room in DATA_PATH {
            assert!(
                !map[room].contains(&"admin"),
                "the data path never imports admin"
            );
        }
    }

    #[test]
    fn the_map_has_no_cycles() {
        let map: BTreeMap<&str, &[&str]> = MAP.iter().copied().collect();
        fn visit<'a>(
            room: &'a str,
            map: &BTreeMap<&'a str, &'a [&'a str]>,
            path: &mut Vec<&'a str>,
        ) {
            assert!(!path.contains(&room), "import cycle: {path:?} -> {room}");
            path.push(room);
            for next in map.get(room).copied().unwrap_or_default() {
                visit(next, map, path);
            }
            path.pop();
        }
        for room in map.keys() {
            visit(room, &map, &mut Vec::new());
        }
    }
}
