//! `taskctl`: the command-line client.

use std::process::ExitCode;

/// Runs `taskctl` with the process's arguments.
pub fn main() -> ExitCode {
    ExitCode::from(2)
}
