//! The client every Rust caller uses (taskctl, tests, agents): jsonrpsee's async client over a
//! newline-delimited JSON raw-TCP connection to the daemon's listener.
//!
//! [`Client::rpc`] (or deref) gives a `jsonrpsee::core::client::Client`, which implements
//! `ClientT` and `SubscriptionClientT`, so the macro-generated `…ApiClient` traits work on it.

use std::io;
use std::time::Duration;

use jsonrpsee::core::ClientError as RpcError;
use jsonrpsee::core::client::{
    ClientBuilder, ClientT, ReceivedMessage, TransportReceiverT, TransportSenderT,
};
use jsonrpsee::rpc_params;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

/// How long a connection attempt may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// How long one call may take before it fails with `RequestTimeout`.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// Notifications a subscription may have waiting before the client drops it.
pub const SUBSCRIPTION_BUFFER: usize = 1 << 16;

/// Largest message the client accepts from the daemon, in bytes.
const MAX_MESSAGE_SIZE: u64 = 64 * 1024 * 1024;

/// Why [`Client::connect`] failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The daemon could not be reached at all.
    #[error("cannot connect to taskd at {addr}: {source}")]
    Connect {
        /// The address dialled.
        addr: String,
        /// What went wrong.
        source: io::Error,
    },
    /// `Auth.Login` failed: a wrong token, or the connection broke during it.
    #[error("login to taskd failed: {0}")]
    Login(#[source] RpcError),
}

impl ClientError {
    /// Whether the daemon could not be reached (taskctl exits 3), as opposed to refusing us.
    pub fn is_unreachable(&self) -> bool {
        match self {
            ClientError::Connect { .. } => true,
            ClientError::Login(e) => is_connection_error(e),
        }
    }
}

/// Whether a call failed because the connection to the daemon is gone or unusable, rather
/// than because the daemon answered with an error.
pub fn is_connection_error(err: &RpcError) -> bool {
    matches!(err, RpcError::Transport(_) | RpcError::RestartNeeded(_) | RpcError::RequestTimeout)
}

/// The JSON-RPC error code the daemon answered with, if the call got an error answer.
pub fn error_code(err: &RpcError) -> Option<i32> {
    match err {
        RpcError::Call(e) => Some(e.code()),
        _ => None,
    }
}

/// Sending half of the NDJSON transport: one message and `\n` per write.
#[derive(Debug)]
pub struct NdjsonSender(OwnedWriteHalf);

impl TransportSenderT for NdjsonSender {
    type Error = io::Error;

    async fn send(&mut self, msg: String) -> Result<(), io::Error> {
        let mut buf = msg.into_bytes();
        buf.push(b'\n');
        self.0.write_all(&buf).await
    }

    async fn close(&mut self) -> Result<(), io::Error> {
        self.0.shutdown().await
    }
}

/// Receiving half of the NDJSON transport: one message per line.
#[derive(Debug)]
pub struct NdjsonReceiver(BufReader<OwnedReadHalf>);

impl TransportReceiverT for NdjsonReceiver {
    type Error = io::Error;

    async fn receive(&mut self) -> Result<ReceivedMessage, io::Error> {
        let mut line = Vec::new();
        loop {
            line.clear();
            let n = (&mut self.0).take(MAX_MESSAGE_SIZE).read_until(b'\n', &mut line).await?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the daemon closed the connection",
                ));
            }
            if line.last() != Some(&b'\n') && n as u64 >= MAX_MESSAGE_SIZE {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "message from the daemon is too large",
                ));
            }
            // Blank lines carry nothing; skip them rather than hand the client an empty text.
            if line.iter().any(|b| !b.is_ascii_whitespace()) {
                break;
            }
        }
        String::from_utf8(line)
            .map(ReceivedMessage::Text)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    }
}

/// Splits a connected stream into the NDJSON transport halves.
pub fn ndjson_transport(stream: TcpStream) -> (NdjsonSender, NdjsonReceiver) {
    let (rd, wr) = stream.into_split();
    (NdjsonSender(wr), NdjsonReceiver(BufReader::new(rd)))
}

/// A connection to a taskd daemon.
#[derive(Debug)]
pub struct Client {
    inner: jsonrpsee::core::client::Client,
}

impl Client {
    /// Connects to a taskd listener at `addr` (raw TCP), and calls `Auth.Login` with `token`
    /// if given.
    pub async fn connect(addr: &str, token: Option<&str>) -> Result<Client, ClientError> {
        let connect_err = |source| ClientError::Connect { addr: addr.to_owned(), source };
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
            .await
            .map_err(|_| connect_err(io::Error::new(io::ErrorKind::TimedOut, "timed out")))?
            .map_err(connect_err)?;
        let _ = stream.set_nodelay(true);
        let (tx, rx) = ndjson_transport(stream);
        let inner = ClientBuilder::default()
            .request_timeout(REQUEST_TIMEOUT)
            // A replay of stored events or a log backlog arrives in a burst; the client
            // must not give up on a subscription because it came fast.
            .max_buffer_capacity_per_subscription(SUBSCRIPTION_BUFFER)
            .build_with_tokio(tx, rx);
        if let Some(token) = token {
            let ok: bool = inner
                .request("Auth.Login", rpc_params![token])
                .await
                .map_err(ClientError::Login)?;
            if !ok {
                return Err(ClientError::Login(RpcError::Custom(
                    "the daemon refused the token".into(),
                )));
            }
        }
        Ok(Client { inner })
    }

    /// The jsonrpsee client, for `ClientT`, `SubscriptionClientT` and generated API traits.
    pub fn rpc(&self) -> &jsonrpsee::core::client::Client {
        &self.inner
    }
}

impl std::ops::Deref for Client {
    type Target = jsonrpsee::core::client::Client;

    fn deref(&self) -> &Self::Target {
        &self.inner
    }
}
