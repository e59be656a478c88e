//! teams-router: the front door between Microsoft Teams (the Bot Framework's Bot Connector) and
//! an enterprise's bots.
//!
//! The path of one activity, and the module that owns each step:
//!
//! - [`front`]: hyper server, routes, body limit, status codes.
//! - [`auth`]: Bot Connector JWT verification, OpenID/JWKS cache, verified-token cache.
//! - [`activity`]: the borrowed simd-json envelope on the request path; the owned turn activity
//!   and mention stripping off it.
//! - [`conversation`]: one supervised actor per (integration, conversation): dedup, ordering,
//!   bounded mailbox, idle passivation.
//! - [`reply`]: one actor per turn: asks the [`backend`], sends through the [`connector`].
//! - [`backend`]: the bot's brain (echo today).
//! - [`connector`]: Bot Connector REST client, outbound tokens, retries.
//! - [`registry`]: the live bot and integration records; [`config`]: the TOML + env settings.
//! - [`admin`]: the management API (bots, integrations, setup checks, events, contacts) and
//!   secrets at rest.
//! - [`telemetry`]: metric names, the Prometheus recorder, readiness.
//! - [`app`]: wires the rooms together, runs the listeners, shuts down gracefully.
//!
//! Data flows one way: front → auth → activity → conversation → reply → backend/connector.

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
pub(crate) mod registry;
pub(crate) mod reply;
pub mod store;
pub(crate) mod telemetry;
pub mod testkit;
