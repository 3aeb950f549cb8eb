//! Checks shared by the fuzz targets.

use taskd::unit::{UnitConfig, UnitDef, ValidateCtx};

/// The invariants of a definition the parser accepted: its JSON form parses back to the same
/// definition, and when it validates, the filled-in form (what `TaskUnit.Get` shows) is itself
/// a definition that validates to the same filled-in form.
pub fn check_definition(def: UnitDef) {
    let again = UnitDef::from_json(def.to_json())
        .unwrap_or_else(|e| panic!("{def:?} serialises to JSON that does not parse: {e}"));
    assert_eq!(again, def, "the JSON round trip changed the definition");

    let ctx = ValidateCtx::default();
    let Ok(config) = UnitConfig::validate(def, &ctx) else { return };
    let filled = config.filled();
    let def = UnitDef::from_json(filled.clone())
        .unwrap_or_else(|e| panic!("filled definition {filled} does not parse: {e}"));
    let config = UnitConfig::validate(def, &ctx)
        .unwrap_or_else(|e| panic!("filled definition {filled} does not validate: {e}"));
    assert_eq!(config.filled(), filled, "filling in the defaults twice changed the definition");
}
