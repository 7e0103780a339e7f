//! `tesserad.toml` and `agents.d/<name>.toml` as the daemon reads them: parsed, validated,
//! and (for a config that passes) turned into the settings every part of the daemon takes.
//! The first byte picks which; the rest is the file (`name \0 text` for an agent file).

#![no_main]

mod common;

use std::time::Duration;

use libfuzzer_sys::fuzz_target;
use tesserad::agents::agents_dir::check_text;
use tesserad::runtime::config::Config;

fuzz_target!(|data: &[u8]| {
    let Some((&pick, rest)) = data.split_first() else {
        return;
    };
    if pick & 1 == 0 {
        let Ok(text) = std::str::from_utf8(rest) else {
            return;
        };
        if let Ok(cfg) = Config::parse(text, "fuzz.toml") {
            let _ = cfg.ids();
            let _ = cfg.host_id();
            let _ = cfg.agents_settings();
            let _ = cfg.credentials_settings();
            let _ = cfg.door_settings();
            let _ = cfg.workload_socket();
        }
    } else {
        let (name, text) = common::split(rest, 0);
        let (Ok(name), Ok(text)) = (std::str::from_utf8(name), std::str::from_utf8(text)) else {
            return;
        };
        let _ = check_text(
            text,
            name,
            "fuzz.toml",
            Duration::from_secs(3600),
            Duration::from_secs(86_400),
        );
    }
    let _ = tesserad::duration::parse_duration(&String::from_utf8_lossy(rest));
});
