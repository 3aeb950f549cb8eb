//! `taskctl`: the command-line client.
