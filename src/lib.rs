//! taskd: a task daemon and its client library.
pub mod error;
pub mod rpc;
pub use error::{Error, Result};
