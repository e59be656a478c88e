//! What the data path writes down for the management API to read: each integration's event log,
//! its contacts, and the address book of conversations it can reach proactively. Both the data
//! path (`front`, `reply`) and `admin` use it; it imports neither.

pub mod addresses;
pub mod contacts;
pub mod events;
