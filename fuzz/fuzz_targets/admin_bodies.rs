//! Management API request bodies: the first byte picks the endpoint's body type, the rest is the
//! body. Parsing then the same checks the handlers run must never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use teams_router::admin::MessageRequest;
use teams_router::admin::model::{
    CreateBot, CreateIntegration, NoFields, UpdateBot, UpdateIntegration, check_backend,
    check_meta, check_session_duration, check_text, parse_body,
};

fuzz_target!(|data: &[u8]| {
    let Some((&which, body)) = data.split_first() else {
        return;
    };
    match which % 6 {
        0 => {
            if let Ok(bot) = parse_body::<CreateBot>(body) {
                let _ = check_text("name", bot.name.as_deref(), 256);
                let _ = check_backend(&bot.backend);
            }
        }
        1 => {
            if let Ok(UpdateBot {
                backend: Some(backend),
                ..
            }) = parse_body::<UpdateBot>(body)
            {
                let _ = check_backend(&backend);
            }
        }
        2 => {
            if let Ok(integration) = parse_body::<CreateIntegration>(body) {
                let _ = check_session_duration(integration.session_duration.unwrap_or(0));
                if let Some(meta) = integration.meta {
                    let _ = check_meta(&meta.into_iter().collect());
                }
            }
        }
        3 => {
            let _ = parse_body::<UpdateIntegration>(body);
        }
        4 => {
            let _ = parse_body::<MessageRequest>(body);
        }
        _ => {
            let _ = parse_body::<NoFields>(body);
        }
    }
});
