//! The bundled load-test harness of teams-router. This library holds the faithful mock of the
//! Microsoft side ([`mock`]: OpenID metadata + JWKS, token endpoint, Bot Connector), the token
//! signing it uses ([`keys`]), and a handle on a router process ([`router`]); the router's tests
//! and the harness share them.

pub mod keys;
pub mod mock;
pub mod redis;
pub mod router;
