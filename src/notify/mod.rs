//! The notification side: the tenants an integration serves (connections by admin consent or
//! installation) and the destinations notifications go to. Broadcasts build on them.

pub mod broadcasts;
pub mod destinations;
pub mod graph;
pub mod proactive;
pub mod tenants;
pub mod workflows;

pub use destinations::Destinations;
pub use tenants::{Connection, ConnectionSource, Tenants};
