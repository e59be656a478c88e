//! The bundled load-test harness of teams-router. This library holds the faithful mock of the
//! Microsoft side ([`mock`]: OpenID metadata + JWKS, token endpoint, Bot Connector), the token
//! signing it uses ([`keys`]), a handle on a router process ([`router`]) and a Redis server
//! ([`redis`]), which the router's tests share, the bare reference endpoint ([`reference`]), and
//! the harness itself: broadcast runs ([`broadcast`]), scenarios
//! ([`scenario`]), traffic ([`traffic`]), the run ([`harness`]), the report ([`report`]) and the
//! spawned setup ([`spawn`]). The `loadtest` binary drives them.

#![forbid(unsafe_code)]

pub mod broadcast;
pub mod harness;
pub mod keys;
pub mod mock;
pub mod redis;
pub mod reference;
pub mod report;
pub mod router;
pub mod scenario;
pub mod spawn;
pub mod traffic;
