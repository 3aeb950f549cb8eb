//! JSON-RPC: transports (one listener for raw TCP, HTTP and WebSocket), the shared middleware,
//! authentication, the client, and (in their own files) the method groups.

pub mod auth;
pub mod client;
pub mod listener;
pub mod middleware;
pub mod tcp;
