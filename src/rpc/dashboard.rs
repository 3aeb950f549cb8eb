//! The web dashboard (SPEC §13): its files, built into the binary, and its sign-in.
//!
//! - `GET /` and `GET /ui/<file>` serve the page (`web/` in the source tree, embedded with
//!   `include_bytes!`: nothing is fetched from another host, no build step, no files to
//!   install). Anyone who passes the browser rules may load them: they hold no data. Each
//!   answer forbids framing, sniffing and any script or connection but the daemon's own
//!   (`Content-Security-Policy`).
//! - `POST /login` with the token (a form field `token`, or the JSON `{"token": "…"}`) opens a
//!   session, sets its cookie ([`COOKIE_NAME`]: `HttpOnly`, `SameSite=Strict`, 12 hours, and
//!   `Secure` when the request came over TLS, so that the browser never sends it in clear) and
//!   answers the session's key (`{"key": "…"}`), which the page keeps in its origin's storage;
//!   `POST /logout` closes it; `GET /login` says whether the request's cookie is signed in
//!   (`{"signed_in", "auth"}`). The page then speaks JSON-RPC over a WebSocket to `/?key=…`,
//!   which the guard ([`super::http`]) admits only with the session's cookie *and* its key,
//!   and only when the request carries an `Origin` (which the guard admits only for the
//!   daemon's own origins). Why both: browsers scope cookies by host, not port, so any other
//!   service on the same host name receives the cookie when the browser visits it, and could
//!   replay it with a forged `Origin`; the key lives in storage scoped to the daemon's exact
//!   origin (scheme, host and port), which no other port can read. Another site's page can
//!   neither send the cookie (SameSite) nor be let in with it (Origin), nor knows the key.
//!
//! Sessions live in memory ([`Sessions`]): at most [`MAX_SESSIONS`] (the oldest is closed to
//! make room), each for [`SESSION_TTL`]; a restart of the daemon signs everyone out. A
//! session that ends (sign-out, expiry, a new sign-in, eviction) closes the WebSockets it
//! admitted ([`Admitted`]): what was open does not outlive it.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use http::header::{
    CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE, COOKIE, HeaderMap, HeaderValue,
    SET_COOKIE, X_CONTENT_TYPE_OPTIONS, X_FRAME_OPTIONS,
};
use http::{Method, StatusCode};
use jsonrpsee::server::{HttpBody, HttpResponse};
use tokio_util::sync::CancellationToken;

use super::http::route_error;

/// The session cookie's name.
pub const COOKIE_NAME: &str = "taskd_session";
/// How long a session lasts.
pub const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);
/// Sessions open at once, at most.
pub const MAX_SESSIONS: usize = 256;
/// Where the dashboard's files are served.
pub const ASSETS_PREFIX: &str = "/ui/";
/// Sign-in and sign-out.
pub const LOGIN_PATH: &str = "/login";
/// See [`LOGIN_PATH`].
pub const LOGOUT_PATH: &str = "/logout";

/// The page's files: path under [`ASSETS_PREFIX`] (`""` for `/`), type, bytes.
const ASSETS: &[(&str, &str, &[u8])] = &[
    ("", "text/html; charset=utf-8", include_bytes!("../../web/index.html")),
    ("app.js", "text/javascript; charset=utf-8", include_bytes!("../../web/app.js")),
    ("app.css", "text/css; charset=utf-8", include_bytes!("../../web/app.css")),
    ("favicon.svg", "image/svg+xml", include_bytes!("../../web/favicon.svg")),
];

/// What the page may do: only the daemon's own scripts, styles and connections.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
     connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// Whether `method path` is one of the dashboard's requests.
pub fn is_dashboard(method: &Method, path: &str) -> bool {
    match path {
        "/" => method == Method::GET,
        LOGIN_PATH | LOGOUT_PATH => true,
        p => p.starts_with(ASSETS_PREFIX),
    }
}

/// One of the page's files (`GET /`, `GET /ui/<file>`).
pub fn asset(method: &Method, path: &str) -> HttpResponse {
    if method != Method::GET && method != Method::HEAD {
        return route_error(StatusCode::METHOD_NOT_ALLOWED, "use GET");
    }
    let name = path.strip_prefix(ASSETS_PREFIX).unwrap_or("");
    let Some((_, kind, bytes)) = ASSETS.iter().find(|(p, _, _)| *p == name) else {
        return route_error(StatusCode::NOT_FOUND, "not found");
    };
    let mut resp = HttpResponse::new(HttpBody::from(bytes.to_vec()));
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static(kind));
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    secure(h);
    resp
}

fn secure(h: &mut HeaderMap) {
    h.insert(CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    h.insert(X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
}

/// One session: its key, its end, and what tells its connections that it ended.
#[derive(Debug, Clone)]
struct Session {
    key: String,
    until: Instant,
    ended: CancellationToken,
}

/// What a session that admitted a request says about its end: the connection it admitted
/// is to be closed once [`Admitted::ended`] (cancelled when the session is closed) or at
/// [`Admitted::until`], whichever comes first.
#[derive(Debug, Clone)]
pub struct Admitted {
    /// Cancelled when the session is closed.
    pub ended: CancellationToken,
    /// When the session expires.
    pub until: Instant,
}

/// The dashboard's open sessions.
#[derive(Debug, Default)]
pub struct Sessions {
    /// Each session by its id (the cookie).
    open: Mutex<HashMap<String, Session>>,
}

impl Sessions {
    /// Opens a session: its id (the cookie's value) and key.
    fn open(&self) -> std::io::Result<(String, String)> {
        let id = crate::state_dir::random_hex(32)?;
        let key = crate::state_dir::random_hex(32)?;
        let mut open = self.open.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = Instant::now();
        open.retain(|_, s| {
            let live = s.until > now;
            if !live {
                s.ended.cancel();
            }
            live
        });
        if open.len() >= MAX_SESSIONS
            && let Some(oldest) = open.iter().min_by_key(|(_, s)| s.until).map(|(k, _)| k.clone())
            && let Some(s) = open.remove(&oldest)
        {
            s.ended.cancel();
        }
        let session =
            Session { key: key.clone(), until: now + SESSION_TTL, ended: CancellationToken::new() };
        open.insert(id.clone(), session);
        Ok((id, key))
    }

    /// Ends session `id`, and with it the connections it admitted.
    fn close(&self, id: &str) {
        let mut open = self.open.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(s) = open.remove(id) {
            s.ended.cancel();
        }
    }

    /// The open session whose cookie `headers` carry.
    fn find(&self, headers: &HeaderMap) -> Option<Session> {
        let id = session_cookie(headers)?;
        let open = self.open.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        // Compared in constant time against each: the time taken tells nothing of the ids.
        let mut found = None;
        for (k, session) in open.iter() {
            if super::auth::token_eq(k, id) {
                found = Some(session.clone());
            }
        }
        found.filter(|s| s.until > Instant::now())
    }

    /// Whether `headers` carry the cookie of an open session and `query` (the URL's) its key:
    /// if so, how the session ends.
    pub fn admits(&self, headers: &HeaderMap, query: Option<&str>) -> Option<Admitted> {
        let presented = query
            .unwrap_or_default()
            .split('&')
            .find_map(|pair| pair.strip_prefix("key="))
            .unwrap_or_default();
        self.find(headers)
            .filter(|s| super::auth::token_eq(&s.key, presented))
            .map(|s| Admitted { ended: s.ended, until: s.until })
    }
}

/// The session cookie's value in `headers`, if any.
fn session_cookie(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE_NAME)
        .map(|(_, value)| value.trim_matches('"'))
}

/// The token a sign-in presents: a form field `token`, or JSON `{"token": "…"}`.
fn presented_token(headers: &HeaderMap, body: &[u8]) -> Option<String> {
    let json = headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if json {
        let v: serde_json::Value = serde_json::from_slice(body).ok()?;
        return v.get("token")?.as_str().map(str::to_string);
    }
    let form = std::str::from_utf8(body).ok()?;
    form.split('&').filter_map(|p| p.split_once('=')).find(|(k, _)| *k == "token").map(|(_, v)| {
        // A token is hex: only `+` (a space) and `%xx` could need decoding, and neither is
        // part of one; what does not decode to the token fails the comparison anyway.
        v.replace('+', " ")
    })
}

/// A request to [`sign`]: its method and path, and whether it came over TLS.
pub struct Sign<'a> {
    /// The request's method.
    pub method: &'a Method,
    /// The request's path.
    pub path: &'a str,
    /// It came over TLS: the cookie is `Secure`.
    pub secure: bool,
}

/// `GET /login`, `POST /login` and `POST /logout` (`token`: the daemon's, `None` without
/// auth).
pub fn sign(
    sessions: &Sessions,
    token: Option<&str>,
    req: Sign<'_>,
    headers: &HeaderMap,
    body: &[u8],
) -> HttpResponse {
    let Sign { method, path, secure: over_tls } = req;
    let attributes = if over_tls {
        "HttpOnly; SameSite=Strict; Path=/; Secure"
    } else {
        "HttpOnly; SameSite=Strict; Path=/"
    };
    let mut resp = if method == Method::GET && path == LOGIN_PATH {
        // Whether the page must ask for the token (it also needs the key it was given).
        let signed_in = token.is_none() || sessions.find(headers).is_some();
        let body = serde_json::json!({"signed_in": signed_in, "auth": token.is_some()});
        HttpResponse::new(HttpBody::from(body.to_string()))
    } else if method != Method::POST {
        return route_error(StatusCode::METHOD_NOT_ALLOWED, "use POST");
    } else if path == LOGOUT_PATH {
        if let Some(id) = session_cookie(headers) {
            sessions.close(id);
        }
        let mut resp = HttpResponse::new(HttpBody::from("{}"));
        let gone = format!("{COOKIE_NAME}=; {attributes}; Max-Age=0");
        if let Ok(v) = HeaderValue::from_str(&gone) {
            resp.headers_mut().insert(SET_COOKIE, v);
        }
        resp
    } else {
        let ok = match (token, presented_token(headers, body)) {
            (None, _) => true,
            (Some(t), Some(p)) => super::auth::token_eq(t, &p),
            (Some(_), None) => false,
        };
        if !ok {
            return route_error(
                StatusCode::UNAUTHORIZED,
                "wrong token: it is in <state-dir>/token",
            );
        }
        // Signing in again ends the session the browser had.
        if let Some(old) = session_cookie(headers) {
            sessions.close(old);
        }
        let (id, key) = match sessions.open() {
            Ok(s) => s,
            Err(e) => return route_error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
        };
        let cookie = format!("{COOKIE_NAME}={id}; {attributes}; Max-Age={}", SESSION_TTL.as_secs());
        let body = serde_json::json!({ "key": key }).to_string();
        let mut resp = HttpResponse::new(HttpBody::from(body));
        if let Ok(v) = HeaderValue::from_str(&cookie) {
            resp.headers_mut().insert(SET_COOKIE, v);
        }
        resp
    };
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    secure(h);
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_cookie(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(COOKIE, HeaderValue::from_str(v).unwrap());
        h
    }

    #[test]
    fn a_session_admits_its_cookie_with_its_key_until_closed_and_no_other() {
        let s = Sessions::default();
        let (id, key) = s.open().unwrap();
        let q = format!("key={key}");
        let admitted = s.admits(&with_cookie(&format!("a=b; {COOKIE_NAME}={id}")), Some(&q));
        let admitted = admitted.expect("its cookie with its key");
        // The cookie alone (what another port of the host receives) is not enough.
        assert!(s.admits(&with_cookie(&format!("{COOKIE_NAME}={id}")), None).is_none());
        assert!(s.admits(&with_cookie(&format!("{COOKIE_NAME}={id}")), Some("key=x")).is_none());
        assert!(s.admits(&with_cookie(&format!("{COOKIE_NAME}={id}x")), Some(&q)).is_none());
        assert!(s.admits(&with_cookie("other=1"), Some(&q)).is_none());
        assert!(s.admits(&HeaderMap::new(), Some(&q)).is_none());
        assert!(!admitted.ended.is_cancelled());
        s.close(&id);
        assert!(admitted.ended.is_cancelled(), "its connections are told");
        assert!(s.admits(&with_cookie(&format!("{COOKIE_NAME}={id}")), Some(&q)).is_none());
    }

    #[test]
    fn sessions_are_bounded() {
        let s = Sessions::default();
        let (first, key) = s.open().unwrap();
        let q = format!("key={key}");
        let admitted = s.admits(&with_cookie(&format!("{COOKIE_NAME}={first}")), Some(&q));
        let admitted = admitted.expect("open");
        for _ in 0..MAX_SESSIONS {
            s.open().unwrap();
        }
        assert_eq!(s.open.lock().unwrap().len(), MAX_SESSIONS);
        assert!(admitted.ended.is_cancelled(), "the evicted session's connections are told");
        assert!(s.admits(&with_cookie(&format!("{COOKIE_NAME}={first}")), Some(&q)).is_none());
    }

    #[test]
    fn the_token_comes_as_a_form_field_or_json() {
        let mut h = HeaderMap::new();
        assert_eq!(presented_token(&h, b"x=1&token=abc").as_deref(), Some("abc"));
        h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        assert_eq!(presented_token(&h, br#"{"token": "abc"}"#).as_deref(), Some("abc"));
        assert_eq!(presented_token(&h, b"token=abc"), None);
    }
}
