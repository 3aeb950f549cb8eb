//! `taskctl`: the command-line client of taskd.

use std::process::ExitCode;

fn main() -> ExitCode {
    taskd::cli::main()
}
