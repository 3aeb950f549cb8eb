//! Webhooks (`notify`, SPEC §12): when a run ends in one of a webhook's outcomes, a JSON body
//! (the unit, the run as `Run.Get` shows it, the last lines of its output) is POSTed to the
//! webhook's URL, tried again with back-off, and how it went is recorded on the run
//! (`notified`: attempts, last status or error).
//!
//! Mechanism: the unit loop hands the ended run to [`Notifier::run_ended`], which only puts it
//! in a bounded queue (`try_send`): a unit loop never waits for a webhook. A dispatcher takes
//! jobs from the queue, renders each body once, and hands every webhook's delivery to the
//! queue of its endpoint (`host:port`). Each endpoint has its own worker, started on its first
//! delivery and gone after [`HOST_IDLE`] without one, sending at most [`PER_HOST`] at once: an
//! endpoint that hangs or fails holds up only its own deliveries, never another's. The run's
//! `notified` record is written once all of its webhooks are through.
//!
//! Invariants and limits:
//! - whatever an endpoint does (hangs, answers 500, refuses), a run and its unit's loop go on:
//!   an attempt ends after [`ATTEMPT_TIMEOUT`], a webhook after [`ATTEMPTS`] attempts;
//! - memory is bounded: [`QUEUED`] jobs wait at most, [`HOST_QUEUED`] deliveries per endpoint,
//!   [`HOSTS`] endpoints at once; what finds its queue full is recorded `dropped` without an
//!   attempt (and logged);
//! - answers 2xx succeed; 408, 429, 5xx and network errors are tried again; other 4xx are not
//!   (the request itself is wrong);
//! - `https://` checks the endpoint's certificate against this machine's CAs;
//! - on shutdown (after the runs stopped, so their ends are queued) what is queued is sent
//!   once, without further attempts, for as long as the daemon waits for it; the next daemon
//!   does not try again: a notification is at most once per attempt, not guaranteed.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Uri};
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use jiff::Timestamp;
use serde_json::{Value, json};
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::run::RunRecord;
use crate::store::Store;
use crate::store::logs::LogQuery;
use crate::unit::definition::Webhook;

/// Ended runs waiting to be notified, at most.
pub const QUEUED: usize = 1024;
/// Deliveries to one endpoint waiting, at most.
pub const HOST_QUEUED: usize = 256;
/// Deliveries to one endpoint in flight at once, at most.
pub const PER_HOST: usize = 4;
/// Endpoints with deliveries under way, at most.
pub const HOSTS: usize = 256;
/// An endpoint's worker ends after this long without a delivery.
const HOST_IDLE: Duration = Duration::from_secs(60);
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
    fn dropped(url: String, why: &str) -> Outcome {
        Outcome { url, attempts: 0, status: None, error: Some(format!("dropped: {why}")) }
    }

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
    /// Starts the dispatcher, in `tasks`, which records outcomes in `store`, reads run output
    /// from it, and shows runs as `render` does. After `stop`, what is queued is sent once.
    pub fn start(
        store: Store,
        render: RenderRun,
        stop: CancellationToken,
        tasks: &TaskTracker,
    ) -> Notifier {
        let (tx, rx) = mpsc::channel(QUEUED);
        let d = Dispatcher {
            store: store.clone(),
            render,
            tls: https_connector(),
            stop,
            tasks: tasks.clone(),
            hosts: HashMap::new(),
        };
        tasks.spawn(d.run(rx));
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
        // Full, or closed once the daemon stopped: recorded as not sent.
        if let Err(e) = self.tx.try_send(job) {
            let job = e.into_inner();
            tracing::warn!(run = job.run.id, "too many notifications waiting; this one is dropped");
            let outcomes = job.hooks.iter().map(|h| {
                Outcome::dropped(h.url.to_string(), "too many notifications waiting").to_json()
            });
            self.store.set_notified(job.run.id, Value::Array(outcomes.collect()).to_string());
        }
    }
}

fn https_connector() -> Option<tokio_rustls::TlsConnector> {
    match crate::tls::client_config(&crate::tls::Trust::System) {
        Ok(c) => Some(tokio_rustls::TlsConnector::from(c)),
        Err(e) => {
            tracing::warn!(error = %e, "no TLS for https webhooks");
            None
        }
    }
}

/// Takes jobs from the queue and hands their deliveries to their endpoints' workers.
struct Dispatcher {
    store: Store,
    render: RenderRun,
    tls: Option<tokio_rustls::TlsConnector>,
    stop: CancellationToken,
    tasks: TaskTracker,
    /// Each endpoint's queue (its worker ends, closing it, once idle).
    hosts: HashMap<String, mpsc::Sender<Delivery>>,
}

impl Dispatcher {
    async fn run(mut self, mut rx: mpsc::Receiver<Job>) {
        loop {
            let job = tokio::select! {
                biased;
                () = self.stop.cancelled() => break,
                job = rx.recv() => job,
            };
            let Some(job) = job else { return };
            self.dispatch(job).await;
        }
        // Stopping: the runs have stopped, so their ends are queued; each is sent once.
        rx.close();
        while let Some(job) = rx.recv().await {
            self.dispatch(job).await;
        }
    }

    /// Renders `job`'s body and queues a delivery per webhook at its endpoint.
    async fn dispatch(&mut self, job: Job) {
        let q = LogQuery { tail: Some(OUTPUT_LINES), limit: OUTPUT_BYTES, ..LogQuery::default() };
        let output =
            self.store.logs().read(job.run.id, q).await.map(|s| s.data).unwrap_or_default();
        let body = json!({
            "unit": job.unit,
            "run": (self.render)(&job.run),
            "output": output,
            "sent_at": Timestamp::now().to_string(),
        });
        let body = Bytes::from(body.to_string());
        let pending = Arc::new(Pending {
            run: job.run.id,
            store: self.store.clone(),
            outcomes: Mutex::new(vec![None; job.hooks.len()]),
        });
        if self.hosts.len() >= HOSTS {
            self.hosts.retain(|_, tx| !tx.is_closed());
        }
        for (index, hook) in job.hooks.into_iter().enumerate() {
            let key = endpoint(&hook.url);
            let d = Delivery { url: hook.url, body: body.clone(), index, pending: pending.clone() };
            self.queue(key, d);
        }
    }

    /// Queues `d` at endpoint `key`, starting its worker when it has none.
    fn queue(&mut self, key: String, d: Delivery) {
        let d = match self.hosts.get(&key) {
            Some(tx) => match tx.try_send(d) {
                Ok(()) => return,
                Err(mpsc::error::TrySendError::Full(d)) => {
                    return d.dropped("too many notifications waiting for this endpoint");
                }
                // Its worker ended, idle.
                Err(mpsc::error::TrySendError::Closed(d)) => d,
            },
            None if self.hosts.len() >= HOSTS => {
                return d.dropped("too many webhook endpoints busy");
            }
            None => d,
        };
        let (tx, rx) = mpsc::channel(HOST_QUEUED);
        let _ = tx.try_send(d);
        self.hosts.insert(key, tx);
        let w = HostWorker { tls: self.tls.clone(), stop: self.stop.clone() };
        self.tasks.spawn(w.run(rx));
    }
}

/// `host:port` of a webhook's URL: what its deliveries share.
fn endpoint(url: &Uri) -> String {
    let https = url.scheme_str() == Some("https");
    let port = url.port_u16().unwrap_or(if https { 443 } else { 80 });
    format!("{}:{port}", url.host().unwrap_or_default())
}

/// One webhook of one run, on its way.
struct Delivery {
    url: Uri,
    body: Bytes,
    /// Which of the run's webhooks.
    index: usize,
    pending: Arc<Pending>,
}

impl Delivery {
    fn done(self, o: Outcome) {
        self.pending.done(self.index, o);
    }

    fn dropped(self, why: &str) {
        let o = Outcome::dropped(self.url.to_string(), why);
        self.done(o);
    }
}

/// A run whose webhooks are under way: recorded once all of them are through.
struct Pending {
    run: i64,
    store: Store,
    outcomes: Mutex<Vec<Option<Outcome>>>,
}

impl Pending {
    fn done(&self, index: usize, o: Outcome) {
        if o.status.is_none_or(|s| !(200..300).contains(&s)) {
            tracing::warn!(run = self.run, url = %o.url, attempts = o.attempts, error = ?o.error, status = ?o.status, "webhook failed");
        }
        let mut outcomes = self.outcomes.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        outcomes[index] = Some(o);
        if let Some(all) = outcomes
            .iter()
            .map(|o| o.as_ref().map(Outcome::to_json))
            .collect::<Option<Vec<Value>>>()
        {
            self.store.set_notified(self.run, Value::Array(all).to_string());
        }
    }
}

/// Sends one endpoint's deliveries, [`PER_HOST`] at once, until idle for [`HOST_IDLE`].
struct HostWorker {
    tls: Option<tokio_rustls::TlsConnector>,
    stop: CancellationToken,
}

impl HostWorker {
    async fn run(self, mut rx: mpsc::Receiver<Delivery>) {
        let slots = Arc::new(Semaphore::new(PER_HOST));
        let sending = TaskTracker::new();
        loop {
            match tokio::time::timeout(HOST_IDLE, rx.recv()).await {
                Ok(Some(d)) => {
                    let Ok(slot) = slots.clone().acquire_owned().await else { break };
                    let (tls, stop) = (self.tls.clone(), self.stop.clone());
                    sending.spawn(async move {
                        let o = deliver(&d.url, d.body.clone(), tls.as_ref(), &stop).await;
                        d.done(o);
                        drop(slot);
                    });
                }
                Ok(None) => break,
                // Idle: new deliveries go to a new worker; those queued meanwhile are sent.
                Err(_) if sending.is_empty() => rx.close(),
                Err(_) => {}
            }
        }
        sending.close();
        sending.wait().await;
    }
}

/// Whether a status is worth another attempt.
fn retryable(status: u16) -> bool {
    matches!(status, 408 | 429) || status >= 500
}

/// POSTs `body` to `url` until it is taken, refused for good, or [`ATTEMPTS`] are spent (after
/// `stop`, no further attempt is made).
async fn deliver(
    url: &Uri,
    body: Bytes,
    tls: Option<&tokio_rustls::TlsConnector>,
    stop: &CancellationToken,
) -> Outcome {
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
        if out.attempts >= ATTEMPTS || stop.is_cancelled() {
            return out;
        }
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = stop.cancelled() => return out,
        }
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
