//! JSON-RPC: the wire types, one file per method group, the server context, the transports
//! (one listener for raw TCP, HTTP and WebSocket), the shared middleware, authentication and
//! the client.

pub mod agents;
pub mod api;
pub mod audit;
pub mod auth;
pub mod client;
pub mod conn;
pub mod daemon;
pub mod dashboard;
pub mod discover;
pub mod events;
pub mod files;
mod follow;
pub mod http;
pub mod link;
pub mod listener;
pub mod middleware;
pub mod rest;
pub mod routes;
pub mod run;
pub mod tcp;
pub mod types;
pub mod unit;
