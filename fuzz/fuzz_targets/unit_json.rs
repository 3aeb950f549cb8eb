//! Unit definitions as JSON (`TaskUnit.Add`'s argument): `UnitDef::from_json` and validation
//! never panic, and what they accept round-trips (see `check_definition`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use taskd::unit::UnitDef;

fuzz_target!(|data: &[u8]| {
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(data) else { return };
    if let Ok(def) = UnitDef::from_json(value) {
        taskd_fuzz::check_definition(def);
    }
});
