//! Unit files (`<units-dir>/<name>.toml`): `UnitDef::from_toml` and validation never panic,
//! a file that parses names the unit it was read for, and the definition round-trips (see
//! `check_definition`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use taskd::unit::UnitDef;

fuzz_target!(|text: &str| {
    if let Ok(def) = UnitDef::from_toml(text, "fuzz") {
        assert_eq!(def.name, "fuzz");
        taskd_fuzz::check_definition(def);
    }
});
