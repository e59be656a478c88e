//! The notification side: the tenants an integration serves (connections by admin consent or
//! installation). Destinations and broadcasts build on them.

pub mod tenants;

pub use tenants::{Connection, ConnectionSource, Tenants};
