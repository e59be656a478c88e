//! The request path's parse: any bytes either give a routable activity or a 400 reason, and an
//! activity the front would acknowledge can be replayed: its journaled bytes parse again to the
//! same envelope, and the parse serializes back to JSON (what a webhook is sent).
#![no_main]

use libfuzzer_sys::fuzz_target;
use teams_router::activity::{admissible, parse_turn};

fuzz_target!(|body: &[u8]| {
    if admissible(body).is_err() {
        return;
    }
    let Ok(activity) = parse_turn(body) else {
        return;
    };
    let Ok(envelope) = activity.envelope() else {
        return;
    };
    let again = parse_turn(body).expect("a parse that succeeded once succeeds again");
    let replayed = again.envelope().expect("the same envelope");
    assert_eq!(
        (envelope.kind, envelope.id, envelope.conversation_id),
        (replayed.kind, replayed.id, replayed.conversation_id)
    );
    if let Err(error) = serde_json::to_vec(&activity) {
        panic!("acknowledged but not serializable for a webhook: {error}");
    }
});
