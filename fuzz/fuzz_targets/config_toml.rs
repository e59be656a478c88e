//! The config parser: TOML text (after a NUL, `NAME=value` lines as environment overrides) is
//! either a valid config or a clear error, never a panic; a valid one prints masked.
#![no_main]

use libfuzzer_sys::fuzz_target;
use teams_router::config::Config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (toml_text, env_text) = text.split_once('\0').unwrap_or((text, ""));
    let env = env_text.lines().filter_map(|line| {
        let (name, value) = line.split_once('=')?;
        Some((name.to_owned(), value.to_owned()))
    });
    if let Ok(config) = Config::from_sources(toml_text, env) {
        let _ = config.to_masked_toml();
    }
});
