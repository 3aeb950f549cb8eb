//! taskd: a task daemon and its client library.
pub mod error;
pub mod exec;
pub use error::{Error, Result};
pub mod run;
pub mod store;
pub mod unit;
pub mod registry;
