//! The request path's parse: any bytes either give a routable envelope or a 400 reason, and an
//! activity the front would acknowledge always parses again as the turn's activity in the actor
//! (an acknowledged activity that the actor cannot read would be lost).
#![no_main]

use libfuzzer_sys::fuzz_target;
use teams_router::activity::{TurnActivity, admissible, with_envelope};

fuzz_target!(|body: &[u8]| {
    let routable = with_envelope(body, |envelope| envelope.is_ok());
    if routable && admissible(body).is_ok() {
        if let Err(error) = TurnActivity::parse(body) {
            panic!("acknowledged but unreadable by the actor: {error}");
        }
    }
});
