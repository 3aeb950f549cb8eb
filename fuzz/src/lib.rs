//! Checks and fixtures shared by the fuzz targets.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use jsonrpsee::RpcModule;
use jsonrpsee::core::server::Methods;
use jsonrpsee::types::{ErrorObject, ErrorObjectOwned};
use serde_json::Value;
use taskd::rpc::auth::ConnAuth;
use taskd::unit::{UnitConfig, UnitDef, ValidateCtx};

/// The invariants of a definition the parser accepted: its JSON form parses back to the same
/// definition, and when it validates, the filled-in form (what `TaskUnit.Get` shows) is itself
/// a definition that validates to the same filled-in form.
pub fn check_definition(def: UnitDef) {
    let again = UnitDef::from_json(def.to_json())
        .unwrap_or_else(|e| panic!("{def:?} serialises to JSON that does not parse: {e}"));
    assert_eq!(again, def, "the JSON round trip changed the definition");

    let ctx = ValidateCtx::default();
    let Ok(config) = UnitConfig::validate(def, &ctx) else { return };
    let filled = config.filled();
    let def = UnitDef::from_json(filled.clone())
        .unwrap_or_else(|e| panic!("filled definition {filled} does not parse: {e}"));
    let config = UnitConfig::validate(def, &ctx)
        .unwrap_or_else(|e| panic!("filled definition {filled} does not validate: {e}"));
    assert_eq!(config.filled(), filled, "filling in the defaults twice changed the definition");
}

/// The bearer token of the serving targets (`tcp_serve`, `http_front`).
pub const TOKEN: &str = "fuzz";

/// A few small methods for the serving targets, in place of the daemon's own (which need the
/// whole engine): calls that succeed, fail, return nothing or yield, a login for raw TCP, and
/// a subscription of three items.
pub fn methods() -> Methods {
    let mut m = RpcModule::new(());
    m.register_method("Test.Echo", |params, _, _| params.one::<Value>()).expect("register");
    m.register_method("Test.Fail", |_, _, _| {
        Err::<(), _>(ErrorObject::owned(-32010, "it failed", None::<()>))
    })
    .expect("register");
    m.register_method("Test.Null", |_, _, _| Ok::<(), ErrorObjectOwned>(())).expect("register");
    m.register_async_method("Test.Async", |params, _, _| async move {
        tokio::task::yield_now().await;
        params.one::<Value>()
    })
    .expect("register");
    m.register_method("Auth.Login", |params, _, ext| {
        let token: String = params.one()?;
        if token != TOKEN {
            return Err(ErrorObject::owned(-32001, "wrong token", None::<()>));
        }
        if let Some(flag) = ext.get::<ConnAuth>() {
            flag.set();
        }
        Ok(true)
    })
    .expect("register");
    m.register_subscription("Test.Sub", "Test.Item", "Test.Unsub", |_, pending, _, _| async move {
        let Ok(sink) = pending.accept().await else { return };
        for i in 0..3 {
            let item = serde_json::value::to_raw_value(&i).expect("json");
            if sink.send(item).await.is_err() {
                return;
            }
        }
    })
    .expect("register");
    m.into()
}

/// A host as RFC 3986 names it: an IP address, compared by value, or a registered name, lower
/// case and without the trailing dot of a fully qualified name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HostName {
    Ip(IpAddr),
    Name(String),
}

/// `uri-host [":" port]` (RFC 3986 §3.2.2-3, the grammar of `Host` in RFC 9110 §7.2 and of an
/// origin's authority), parsed without any of the daemon's code: `None` when `s` is not one.
/// An empty or missing port is `None` (the scheme's default).
pub fn parse_authority(s: &str) -> Option<(HostName, Option<u16>)> {
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (literal, after) = rest.split_once(']')?;
        let ip: Ipv6Addr = literal.parse().ok()?;
        let port = if after.is_empty() { None } else { Some(after.strip_prefix(':')?) };
        (HostName::Ip(ip.into()), port)
    } else {
        let (host, port) = match s.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (s, None),
        };
        // unreserved / pct-encoded / sub-delims: what a reg-name or an IPv4 address is made of.
        let reg_name = |b: u8| b.is_ascii_alphanumeric() || b"-._~%!$&'()*+,;=".contains(&b);
        let host = host.strip_suffix('.').unwrap_or(host);
        if host.is_empty() || !host.bytes().all(reg_name) {
            return None;
        }
        match host.parse::<Ipv4Addr>() {
            Ok(ip) => (HostName::Ip(ip.into()), port),
            Err(_) => (HostName::Name(host.to_ascii_lowercase()), port),
        }
    };
    let port = match port {
        None | Some("") => None,
        Some(p) if p.bytes().all(|b| b.is_ascii_digit()) => Some(p.parse::<u16>().ok()?),
        Some(_) => return None,
    };
    Some((host, port))
}

/// A header value without the optional whitespace (SP, HTAB) around it, if it is ASCII.
fn field_value(value: &[u8]) -> Option<&str> {
    let ows = |b: &u8| *b == b' ' || *b == b'\t';
    let start = value.iter().position(|b| !ows(b)).unwrap_or(value.len());
    let end = value.iter().rposition(|b| !ows(b)).map_or(start, |i| i + 1);
    let value = &value[start..end];
    if value.is_ascii() { std::str::from_utf8(value).ok() } else { None }
}

/// The names a daemon listening on `listen` answers to, worked out independently of
/// `HostPolicy`: `localhost`, 127.0.0.1, ::1, its own address and the address a connection
/// reached, all with its port; `--allow-host` names with their port, or with any port when
/// they have none.
#[derive(Clone, Debug)]
pub struct OwnNames {
    port: u16,
    ips: Vec<IpAddr>,
    any_port: Vec<HostName>,
    with_port: Vec<(HostName, u16)>,
}

impl OwnNames {
    pub fn new(listen: SocketAddr, local: Option<SocketAddr>, allow_hosts: &[String]) -> Self {
        let mut ips = vec![Ipv4Addr::LOCALHOST.into(), Ipv6Addr::LOCALHOST.into(), listen.ip()];
        ips.extend(local.map(|l| l.ip()));
        let (mut any_port, mut with_port) = (Vec::new(), Vec::new());
        // The operator's own list: surrounding whitespace of any kind is not part of a name.
        for entry in allow_hosts {
            match parse_authority(entry.trim()) {
                Some((name, None)) => any_port.push(name),
                Some((name, Some(port))) => with_port.push((name, port)),
                None => {}
            }
        }
        Self { port: listen.port(), ips, any_port, with_port }
    }

    /// Whether `name` with `port` is one of the daemon's own.
    pub fn names(&self, name: &HostName, port: u16) -> bool {
        self.any_port.contains(name)
            || self.with_port.iter().any(|(n, p)| n == name && *p == port)
            || port == self.port
                && match name {
                    HostName::Name(n) => n == "localhost",
                    HostName::Ip(ip) => self.ips.contains(ip),
                }
    }

    /// Whether a `Host` header value names the daemon (port 80 when it has none).
    pub fn is_own_host(&self, value: &[u8]) -> bool {
        let Some((name, port)) = field_value(value).and_then(parse_authority) else {
            return false;
        };
        self.names(&name, port.unwrap_or(80))
    }

    /// Whether an `Origin` header value is `http://` or `https://` one of the daemon's names
    /// (RFC 6454 §7: scheme, host and port, nothing else).
    pub fn is_own_origin(&self, value: &[u8]) -> bool {
        let Some((scheme, authority)) = field_value(value).and_then(|v| v.split_once("://")) else {
            return false;
        };
        let default_port = match scheme.to_ascii_lowercase().as_str() {
            "http" => 80,
            "https" => 443,
            _ => return false,
        };
        let Some((name, port)) = parse_authority(authority) else { return false };
        self.names(&name, port.unwrap_or(default_port))
    }
}

/// Whether an `Authorization` header value presents `token` as a bearer token (RFC 6750
/// §2.1: the scheme, case-insensitive, then whitespace and the token).
pub fn presents_bearer(value: &[u8], token: &str) -> bool {
    let Some(value) = field_value(value) else { return false };
    let Some((scheme, rest)) = value.split_once([' ', '\t']) else { return false };
    scheme.eq_ignore_ascii_case("bearer") && rest.trim_matches([' ', '\t']) == token
}
