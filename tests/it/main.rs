//! Integration tests: a real `taskd` in a temporary directory, driven through real clients.

pub mod agents;
mod children;
mod cli;
mod clients;
mod cluster;
mod common;
mod dashboard;
mod engine;
mod faults;
mod files;
pub mod go;
mod integrations;
mod load;
mod netns;
mod redis;
mod rpc;
mod security;
