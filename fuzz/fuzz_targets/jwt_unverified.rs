//! The Authorization header up to the signature check: the bearer scheme, the size bound, the
//! three base64url parts, the header (`alg`, `kid`) and the payload's issuer.
#![no_main]

use libfuzzer_sys::fuzz_target;
use teams_router::auth::{bearer_token, inspect_unverified};

fuzz_target!(|header: &[u8]| {
    if let Ok(token) = bearer_token(Some(header)) {
        let _ = inspect_unverified(token, "https://api.botframework.com");
    }
});
