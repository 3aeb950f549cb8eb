//! Units: their definitions and validation, their schedules, and the per-unit loop that
//! turns fires, starts and stops into runs.

pub mod definition;
pub mod dispatch;
pub mod handle;
pub mod runner;
pub mod schedule;

pub use definition::{UnitConfig, UnitDef, ValidateCtx};
pub use handle::{Control, DispatchOp, UnitHandle, UnitState, UnitStatus};
pub use runner::{InitialState, RunnerEnv};
pub use schedule::Schedule;
