//! The clients Rust callers use (taskctl, tests, agents) over a newline-delimited JSON raw-TCP
//! connection to the daemon's listener.
//!
//! - [`Client`]: jsonrpsee's async client. [`Client::rpc`] (or deref) gives a
//!   `jsonrpsee::core::client::Client`, which implements `ClientT` and `SubscriptionClientT`,
//!   so the macro-generated `…ApiClient` traits work on it, subscriptions included.
//! - [`CallClient`]: one call after another on a blocking socket, with no runtime, background
//!   task or timer thread behind it. It implements `ClientT` only. A short-lived process that
//!   makes a call or two (most `taskctl` commands) starts and finishes faster with it.

use std::io::{self, BufRead, Read as _, Write};
use std::net::{TcpStream as StdTcpStream, ToSocketAddrs};
use std::sync::Mutex;
use std::time::Duration;

use jsonrpsee::core::ClientError as RpcError;
use jsonrpsee::core::client::{
    BatchResponse, ClientBuilder, ClientT, ReceivedMessage, TransportReceiverT, TransportSenderT,
};
use jsonrpsee::core::params::BatchRequestBuilder;
use jsonrpsee::core::traits::ToRpcParams;
use jsonrpsee::rpc_params;
use jsonrpsee::types::ErrorObjectOwned;
use serde::de::DeserializeOwned;
use serde_json::value::RawValue;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

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
pub struct NdjsonSender(Box<dyn tokio::io::AsyncWrite + Send + Unpin>);

impl std::fmt::Debug for NdjsonSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NdjsonSender")
    }
}

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

/// Bytes the receiving half reads at a time: a list of a thousand units is half a MiB, which
/// 8 KiB reads (the default) take sixty system calls and wake-ups to bring in.
const READ_BUFFER: usize = 64 * 1024;

/// Receiving half of the NDJSON transport: one message per line.
pub struct NdjsonReceiver(BufReader<Box<dyn tokio::io::AsyncRead + Send + Unpin>>);

impl std::fmt::Debug for NdjsonReceiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NdjsonReceiver")
    }
}

impl TransportReceiverT for NdjsonReceiver {
    type Error = io::Error;

    async fn receive(&mut self) -> Result<ReceivedMessage, io::Error> {
        let mut line = Vec::new();
        loop {
            line.clear();
            let n = (&mut self.0).take(MAX_MESSAGE_SIZE).read_until(b'\n', &mut line).await?;
            if is_message(&line, n)? {
                break;
            }
        }
        String::from_utf8(line)
            .map(ReceivedMessage::Text)
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    }
}

/// Whether `line`, read with a limit of [`MAX_MESSAGE_SIZE`] (`n` bytes), is a message: blank
/// lines carry nothing and are skipped; the end of the stream and a line past the limit are
/// errors.
fn is_message(line: &[u8], n: usize) -> io::Result<bool> {
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
    Ok(line.iter().any(|b| !b.is_ascii_whitespace()))
}

/// Splits a connected stream into the NDJSON transport halves.
pub fn ndjson_transport<S>(stream: S) -> (NdjsonSender, NdjsonReceiver)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + 'static,
{
    let (rd, wr) = tokio::io::split(stream);
    (
        NdjsonSender(Box::new(wr)),
        NdjsonReceiver(BufReader::with_capacity(READ_BUFFER, Box::new(rd))),
    )
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
        Self::connect_tls(addr, token, None).await
    }

    /// As [`Client::connect`], over TLS when `tls` is given (its verifier decides whom to
    /// trust: a pinned fingerprint or a CA).
    pub async fn connect_tls(
        addr: &str,
        token: Option<&str>,
        tls: Option<std::sync::Arc<rustls::ClientConfig>>,
    ) -> Result<Client, ClientError> {
        let connect_err = |source| ClientError::Connect { addr: addr.to_owned(), source };
        let stream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(addr))
            .await
            .map_err(|_| connect_err(io::Error::new(io::ErrorKind::TimedOut, "timed out")))?
            .map_err(connect_err)?;
        let _ = stream.set_nodelay(true);
        let (tx, rx) = match tls {
            None => ndjson_transport(stream),
            Some(config) => {
                let name = crate::tls::server_name(addr)
                    .map_err(|e| connect_err(io::Error::new(io::ErrorKind::InvalidInput, e)))?;
                let connector = tokio_rustls::TlsConnector::from(config);
                let tls = tokio::time::timeout(CONNECT_TIMEOUT, connector.connect(name, stream))
                    .await
                    .map_err(|_| {
                        connect_err(io::Error::new(io::ErrorKind::TimedOut, "TLS timed out"))
                    })?
                    .map_err(connect_err)?;
                ndjson_transport(tls)
            }
        };
        let inner = ClientBuilder::default()
            .request_timeout(REQUEST_TIMEOUT)
            // A replay of stored events or a log backlog arrives in a burst; the client
            // must not give up on a subscription because it came fast.
            .max_buffer_capacity_per_subscription(SUBSCRIPTION_BUFFER)
            .build_with_tokio(tx, rx);
        if let Some(token) = token {
            login(&inner, token).await?;
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

/// Calls `Auth.Login` with `token` on a fresh connection.
async fn login(client: &impl ClientT, token: &str) -> Result<(), ClientError> {
    let ok: bool =
        client.request("Auth.Login", rpc_params![token]).await.map_err(ClientError::Login)?;
    if !ok {
        return Err(ClientError::Login(RpcError::Custom("the daemon refused the token".into())));
    }
    Ok(())
}

/// A connection for calls made one after another: a blocking socket, with no async runtime,
/// background task or timer thread behind it, so a short-lived process pays only for the
/// connect and the calls.
///
/// It implements `ClientT`, so the generated `…ApiClient` traits without subscriptions work on
/// it. Its futures block the thread that polls them until the answer is in, and calls made
/// from several tasks at once wait for each other: it is for a program that makes one call at
/// a time, not for a server. After a broken connection, a timed-out call or an answer it could
/// not read, every later call fails with a transport error (a late answer must not be taken
/// for the next call's).
#[derive(Debug)]
pub struct CallClient {
    conn: Mutex<Option<CallConn>>,
}

#[derive(Debug)]
struct CallConn {
    stream: io::BufReader<Box<dyn Duplex>>,
    next_id: u64,
}

/// An answer as [`CallClient`] reads it: the result is decoded as it is read, in one pass.
#[derive(serde::Deserialize)]
#[serde(bound(deserialize = "R: DeserializeOwned"))]
struct Answer<R> {
    #[serde(default)]
    id: Option<u64>,
    #[serde(default = "Option::default")]
    result: Option<R>,
    #[serde(default)]
    error: Option<ErrorObjectOwned>,
}

/// A blocking byte stream both ways: a socket, or TLS over one.
pub trait Duplex: io::Read + io::Write + Send {}

impl<T: io::Read + io::Write + Send> Duplex for T {}

impl std::fmt::Debug for dyn Duplex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Duplex")
    }
}

impl CallClient {
    /// Connects to a taskd listener at `addr` (raw TCP), and calls `Auth.Login` with `token`
    /// if given. Blocks for at most [`CONNECT_TIMEOUT`] per address `addr` resolves to.
    pub async fn connect(addr: &str, token: Option<&str>) -> Result<CallClient, ClientError> {
        Self::connect_tls(addr, token, None).await
    }

    /// As [`CallClient::connect`], over TLS when `tls` is given (the handshake happens with
    /// the first call: a refused certificate fails the login).
    pub async fn connect_tls(
        addr: &str,
        token: Option<&str>,
        tls: Option<std::sync::Arc<rustls::ClientConfig>>,
    ) -> Result<CallClient, ClientError> {
        let connect_err = |source| ClientError::Connect { addr: addr.to_owned(), source };
        let socket = connect_blocking(addr).map_err(connect_err)?;
        let stream: Box<dyn Duplex> = match tls {
            None => Box::new(socket),
            Some(config) => {
                let invalid = |e: String| io::Error::new(io::ErrorKind::InvalidInput, e);
                let name = crate::tls::server_name(addr)
                    .map_err(|e| connect_err(invalid(e.to_string())))?;
                let tls = rustls::ClientConnection::new(config, name)
                    .map_err(|e| connect_err(invalid(e.to_string())))?;
                Box::new(rustls::StreamOwned::new(tls, socket))
            }
        };
        let conn = CallConn { stream: io::BufReader::new(stream), next_id: 0 };
        let client = CallClient { conn: Mutex::new(Some(conn)) };
        if let Some(token) = token {
            login(&client, token).await?;
        }
        Ok(client)
    }

    /// Sends one request (with `answer`, reading its answer) or notification; a broken
    /// connection or a timed-out call leaves the client unusable.
    fn exchange<R: DeserializeOwned>(
        &self,
        method: &str,
        params: Option<Box<RawValue>>,
        answer: bool,
    ) -> Result<Option<R>, RpcError> {
        let mut guard = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        let Some(conn) = guard.as_mut() else {
            return Err(transport("the connection to the daemon is broken"));
        };
        let result = conn.exchange(method, params, answer);
        // An answer that could not be read may have been another call's: stop here rather
        // than risk reading answers out of step.
        if matches!(
            result,
            Err(RpcError::Transport(_) | RpcError::RequestTimeout | RpcError::ParseError(_))
        ) {
            *guard = None;
        }
        result
    }
}

impl CallConn {
    fn exchange<R: DeserializeOwned>(
        &mut self,
        method: &str,
        params: Option<Box<RawValue>>,
        answer: bool,
    ) -> Result<Option<R>, RpcError> {
        match self.send(method, params, answer)? {
            Some(id) => self.read_answer(id).map(Some),
            None => Ok(None),
        }
    }

    /// Writes a request (`answer`: with an id, which is returned) or a notification.
    fn send(
        &mut self,
        method: &str,
        params: Option<Box<RawValue>>,
        answer: bool,
    ) -> Result<Option<u64>, RpcError> {
        let mut msg = String::from(r#"{"jsonrpc":"2.0","#);
        let id = answer.then(|| {
            self.next_id += 1;
            self.next_id
        });
        if let Some(id) = id {
            msg.push_str(&format!(r#""id":{id},"#));
        }
        msg.push_str(r#""method":"#);
        msg.push_str(&serde_json::to_string(method)?);
        if let Some(params) = params {
            msg.push_str(r#","params":"#);
            msg.push_str(params.get());
        }
        msg.push_str("}\n");
        self.stream.get_mut().write_all(msg.as_bytes()).map_err(io_error)?;
        Ok(id)
    }

    /// Reads lines until the answer to request `id` and decodes its result.
    fn read_answer<R: DeserializeOwned>(&mut self, id: u64) -> Result<R, RpcError> {
        let mut line = Vec::new();
        loop {
            line.clear();
            let n = (&mut self.stream)
                .take(MAX_MESSAGE_SIZE)
                .read_until(b'\n', &mut line)
                .map_err(io_error)?;
            if !is_message(&line, n).map_err(io_error)? {
                continue;
            }
            let answer: Answer<R> = serde_json::from_slice(&line)?;
            // With one call in flight, an error without an id (the daemon could not read the
            // request) is this call's; anything else not for `id` (a notification) is skipped.
            if let Some(err) = answer.error.filter(|_| answer.id.is_none_or(|a| a == id)) {
                return Err(RpcError::Call(err));
            }
            if answer.id != Some(id) {
                continue;
            }
            return match answer.result {
                Some(r) => Ok(r),
                // `"result": null`, for a method that answers nothing.
                None => Ok(serde_json::from_str("null")?),
            };
        }
    }
}

impl ClientT for CallClient {
    async fn notification<Params>(&self, method: &str, params: Params) -> Result<(), RpcError>
    where
        Params: ToRpcParams + Send,
    {
        self.exchange::<()>(method, params.to_rpc_params()?, false).map(drop)
    }

    async fn request<R, Params>(&self, method: &str, params: Params) -> Result<R, RpcError>
    where
        R: DeserializeOwned,
        Params: ToRpcParams + Send,
    {
        let answer = self.exchange(method, params.to_rpc_params()?, true)?;
        answer.ok_or_else(|| RpcError::Custom("no answer to a call".into()))
    }

    async fn batch_request<'a, R>(
        &self,
        _batch: BatchRequestBuilder<'a>,
    ) -> Result<BatchResponse<'a, R>, RpcError>
    where
        R: DeserializeOwned + std::fmt::Debug + 'a,
    {
        Err(RpcError::Custom("CallClient makes one call at a time; use Client for batches".into()))
    }
}

/// Connects a blocking socket to the first address `addr` resolves to that answers, each
/// attempt bounded by [`CONNECT_TIMEOUT`], with reads bounded by [`REQUEST_TIMEOUT`].
fn connect_blocking(addr: &str) -> io::Result<StdTcpStream> {
    let mut last = io::Error::new(io::ErrorKind::InvalidInput, "the address resolves to nothing");
    for sa in addr.to_socket_addrs()? {
        match StdTcpStream::connect_timeout(&sa, CONNECT_TIMEOUT) {
            Ok(stream) => {
                let _ = stream.set_nodelay(true);
                stream.set_read_timeout(Some(REQUEST_TIMEOUT))?;
                return Ok(stream);
            }
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// A transport error with `msg`.
fn transport(msg: &str) -> RpcError {
    RpcError::Transport(io::Error::other(msg.to_string()).into())
}

/// An I/O error of a blocking call: a read that timed out is the call's timeout.
fn io_error(e: io::Error) -> RpcError {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => RpcError::RequestTimeout,
        _ => RpcError::Transport(e.into()),
    }
}
