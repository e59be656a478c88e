//! The notification side, on the same connector, pacer and store as the conversations: the
//! tenants an integration serves (connections by admin consent or installation), the
//! destinations notifications go to and how they are found (rosters, Microsoft Graph),
//! proactive messages, and broadcasts to many recipients (with Workflows webhooks among them).

pub mod broadcasts;
pub mod destinations;
pub mod graph;
pub mod proactive;
pub mod tenants;
pub mod workflows;

pub use destinations::Destinations;
pub use tenants::{Connection, ConnectionSource, Tenants};
