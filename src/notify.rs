//! Webhooks (`notify`, SPEC §12): when a run ends in one of a webhook's outcomes, a JSON body
//! (the unit, the run as `Run.Get` shows it, the last lines of its output) is POSTed to the
//! webhook's URL, tried again with back-off, and how it went is recorded on the run
//! (`notified`: attempts, last status or error).
//!
//! Mechanism: the unit loop hands the ended run to [`Notifier::run_ended`], which only puts it
//! in a bounded queue (`try_send`): a unit loop never waits for a webhook. One worker takes
//! jobs from the queue and runs at most [`IN_FLIGHT`] of them at once, each trying its
//! webhooks side by side; the queue holds the rest.
//!
//! Invariants and limits:
//! - whatever an endpoint does (hangs, answers 500, refuses), a run and its unit's loop go on:
//!   an attempt ends after [`ATTEMPT_TIMEOUT`], a webhook after [`ATTEMPTS`] attempts;
//! - memory is bounded: [`QUEUED`] jobs wait at most; a run ending while the queue is full is
//!   recorded `dropped` without an attempt (and logged);
//! - answers 2xx succeed; 408, 429, 5xx and network errors are tried again; other 4xx are not
//!   (the request itself is wrong);
//! - `https://` checks the endpoint's certificate against this machine's CAs;
//! - jobs still queued or in flight when the daemon stops are not tried again by the next
//!   daemon: a notification is at most once per attempt, not guaranteed.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Uri};
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use jiff::Timestamp;
use serde_json::{Value, json};
use tokio::sync::{Semaphore, mpsc};

use crate::run::RunRecord;
use crate::store::Store;
use crate::store::logs::LogQuery;
use crate::unit::definition::Webhook;

/// Ended runs waiting to be notified, at most.
pub const QUEUED: usize = 1024;
/// Jobs (runs) notified at once, at most.
pub const IN_FLIGHT: usize = 16;
/// Tries per webhook, at most.
pub const ATTEMPTS: u32 = 5;
/// How long one attempt (connect, TLS, request, response head) may take.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);
/// The delay before the second attempt; it doubles after each.
const FIRST_DELAY: Duration = Duration::from_secs(1);
/// Lines of output a notification carries, at most, and their bytes.
const OUTPUT_LINES: usize = 20;
const OUTPUT_BYTES: usize = 4096;

/// One ended run to notify.
struct Job {
    unit: String,
    hooks: Vec<Webhook>,
    run: RunRecord,
}

/// How one webhook went, as recorded on the run.
#[derive(Debug, Clone, PartialEq)]
struct Outcome {
    url: String,
    attempts: u32,
    status: Option<u16>,
    error: Option<String>,
}

impl Outcome {
    fn to_json(&self) -> Value {
        json!({"url": self.url, "attempts": self.attempts, "status": self.status,
               "error": self.error})
    }
}

/// How a run is shown in a notification: as the API shows it (the daemon passes the RPC
/// layer's rendering, which the engine does not import).
pub type RenderRun = fn(&RunRecord) -> Value;

/// The daemon's webhook sender: a cheap-to-clone handle to its queue.
#[derive(Clone)]
pub struct Notifier {
    tx: mpsc::Sender<Job>,
    store: Store,
}

impl std::fmt::Debug for Notifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Notifier").finish_non_exhaustive()
    }
}

impl Notifier {
    /// Starts the worker, which records outcomes in `store`, reads run output from it, and
    /// shows runs as `render` does.
    pub fn start(store: Store, render: RenderRun) -> Notifier {
        let (tx, rx) = mpsc::channel(QUEUED);
        tokio::spawn(worker(rx, store.clone(), render));
        Notifier { tx, store }
    }

    /// Run `run` of `unit` ended (its end is recorded): its webhooks whose outcomes include
    /// its state are notified. Never waits.
    pub fn run_ended(&self, unit: &str, hooks: &[Webhook], run: &RunRecord) {
        let hooks: Vec<Webhook> =
            hooks.iter().filter(|h| h.on.contains(&run.state)).cloned().collect();
        if hooks.is_empty() {
            return;
        }
        let job = Job { unit: unit.to_string(), hooks, run: run.clone() };
        if let Err(mpsc::error::TrySendError::Full(job)) = self.tx.try_send(job) {
            tracing::warn!(run = job.run.id, "too many notifications waiting; this one is dropped");
            let dropped: Vec<Value> = job
                .hooks
                .iter()
                .map(|h| {
                    Outcome {
                        url: h.url.to_string(),
                        attempts: 0,
                        status: None,
                        error: Some("dropped: too many notifications waiting".into()),
                    }
                    .to_json()
                })
                .collect();
            self.store.set_notified(job.run.id, Value::Array(dropped).to_string());
        }
    }
}

async fn worker(mut rx: mpsc::Receiver<Job>, store: Store, render: RenderRun) {
    let slots = Arc::new(Semaphore::new(IN_FLIGHT));
    let tls = match crate::tls::client_config(&crate::tls::Trust::System) {
        Ok(c) => Some(tokio_rustls::TlsConnector::from(c)),
        Err(e) => {
            tracing::warn!(error = %e, "no TLS for https webhooks");
            None
        }
    };
    while let Some(job) = rx.recv().await {
        let Ok(slot) = slots.clone().acquire_owned().await else { return };
        let (store, tls) = (store.clone(), tls.clone());
        tokio::spawn(async move {
            notify(&store, tls.as_ref(), render, job).await;
            drop(slot);
        });
    }
}

/// Sends `job`'s notifications and records how they went.
async fn notify(
    store: &Store,
    tls: Option<&tokio_rustls::TlsConnector>,
    render: RenderRun,
    job: Job,
) {
    let q = LogQuery { tail: Some(OUTPUT_LINES), limit: OUTPUT_BYTES, ..LogQuery::default() };
    let output = store.logs().read(job.run.id, q).await.map(|s| s.data).unwrap_or_default();
    let body = json!({
        "unit": job.unit,
        "run": render(&job.run),
        "output": output,
        "sent_at": Timestamp::now().to_string(),
    });
    let body = Bytes::from(body.to_string());
    let tries = job.hooks.iter().map(|h| deliver(&h.url, body.clone(), tls));
    let outcomes = futures_util::future::join_all(tries).await;
    for o in outcomes.iter().filter(|o| o.status.is_none_or(|s| !(200..300).contains(&s))) {
        tracing::warn!(run = job.run.id, url = %o.url, attempts = o.attempts, error = ?o.error, status = ?o.status, "webhook failed");
    }
    let recorded: Vec<Value> = outcomes.iter().map(Outcome::to_json).collect();
    store.set_notified(job.run.id, Value::Array(recorded).to_string());
}

/// Whether a status is worth another attempt.
fn retryable(status: u16) -> bool {
    matches!(status, 408 | 429) || status >= 500
}

/// POSTs `body` to `url` until it is taken, refused for good, or [`ATTEMPTS`] are spent.
async fn deliver(url: &Uri, body: Bytes, tls: Option<&tokio_rustls::TlsConnector>) -> Outcome {
    let mut out = Outcome { url: url.to_string(), attempts: 0, status: None, error: None };
    let mut delay = FIRST_DELAY;
    loop {
        out.attempts += 1;
        let attempt = tokio::time::timeout(ATTEMPT_TIMEOUT, post(url, body.clone(), tls)).await;
        match attempt {
            Ok(Ok(status)) => {
                out.status = Some(status);
                out.error = None;
                if (200..300).contains(&status) || !retryable(status) {
                    return out;
                }
            }
            Ok(Err(e)) => {
                out.status = None;
                out.error = Some(e);
            }
            Err(_) => {
                out.status = None;
                out.error = Some(format!("no answer within {ATTEMPT_TIMEOUT:?}"));
            }
        }
        if out.attempts >= ATTEMPTS {
            return out;
        }
        tokio::time::sleep(delay).await;
        delay *= 2;
    }
}

/// One POST of `body` to `url`: its answer's status.
async fn post(
    url: &Uri,
    body: Bytes,
    tls: Option<&tokio_rustls::TlsConnector>,
) -> Result<u16, String> {
    let host = url.host().ok_or("no host")?;
    let https = url.scheme_str() == Some("https");
    let port = url.port_u16().unwrap_or(if https { 443 } else { 80 });
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let tcp = tokio::net::TcpStream::connect((bare, port))
        .await
        .map_err(|e| format!("cannot connect to {host}:{port}: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let path = url.path_and_query().map_or("/", |p| p.as_str());
    let authority = url.authority().map_or(host, |a| a.as_str());
    let req = Request::post(path)
        .header(http::header::HOST, authority)
        .header(http::header::CONTENT_TYPE, "application/json")
        .header(http::header::USER_AGENT, concat!("taskd/", env!("CARGO_PKG_VERSION")))
        .body(Full::new(body))
        .map_err(|e| e.to_string())?;
    if https {
        let tls = tls.ok_or("https is not available (no TLS configuration)")?;
        let name = rustls::pki_types::ServerName::try_from(bare.to_string())
            .map_err(|e| format!("{host}: {e}"))?;
        let stream = tls.connect(name, tcp).await.map_err(|e| format!("TLS: {e}"))?;
        send(stream, req).await
    } else {
        send(tcp, req).await
    }
}

async fn send<S>(stream: S, req: Request<Full<Bytes>>) -> Result<u16, String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    // The connection is driven beside the request; dropped (and closed) with this call.
    let conn = tokio_util::task::AbortOnDropHandle::new(tokio::spawn(conn));
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    drop(conn);
    Ok(resp.status().as_u16())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_transient_failures_are_tried_again() {
        for s in [408, 429, 500, 502, 503] {
            assert!(retryable(s), "{s}");
        }
        for s in [400, 401, 404, 410] {
            assert!(!retryable(s), "{s}");
        }
    }
}
