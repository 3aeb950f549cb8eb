//! `HostPolicy` alone: `new` with arbitrary `--allow-host` entries, `check` with arbitrary
//! `Host` and `Origin` bytes. Nothing panics; a refusal says why in a bounded message; and what
//! is accepted names the daemon, as `OwnNames` (a parser of its own, in `fuzz/src/lib.rs`)
//! reads the headers: the `Host` is one of the own names, and so is the `Origin`, when there
//! is one, with an `http` or `https` scheme.
//!
//! Input: a flags byte (bit 0: a `Host`; bit 1: an `Origin`; bit 2: the address the connection
//! reached is known; bits 3-4: the listener's IP; bits 5-6: that reached address), the port
//! (two bytes, big-endian), then NUL-separated fields: the `Host`, the `Origin`, and the
//! `--allow-host` entries. (A header value cannot hold a NUL; `check` gets any other bytes.)
#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use libfuzzer_sys::fuzz_target;
use taskd::rpc::http::HostPolicy;
use taskd_fuzz::OwnNames;

const LISTEN_IPS: [IpAddr; 4] = [
    IpAddr::V4(Ipv4Addr::LOCALHOST),
    IpAddr::V6(Ipv6Addr::LOCALHOST),
    IpAddr::V4(Ipv4Addr::UNSPECIFIED),
    IpAddr::V4(Ipv4Addr::new(192, 168, 1, 10)),
];

const LOCAL_IPS: [IpAddr; 4] = [
    IpAddr::V4(Ipv4Addr::LOCALHOST),
    IpAddr::V4(Ipv4Addr::new(10, 1, 2, 3)),
    IpAddr::V6(Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 1)),
    IpAddr::V6(Ipv6Addr::new(0, 0, 0, 0, 0, 0xffff, 0x7f00, 1)),
];

/// Refusals quote the value, cut to 80 characters (each at most 10 once escaped).
const MAX_REFUSAL: usize = 1024;

fuzz_target!(|data: &[u8]| {
    let [flags, hi, lo, rest @ ..] = data else { return };
    let port = u16::from_be_bytes([*hi, *lo]);
    let listen = SocketAddr::new(LISTEN_IPS[usize::from(flags >> 3 & 3)], port);
    let local =
        (flags & 4 != 0).then(|| SocketAddr::new(LOCAL_IPS[usize::from(flags >> 5 & 3)], port));
    let mut fields = rest.split(|&b| b == 0);
    let host = fields.next().filter(|_| flags & 1 != 0);
    let origin = fields.next().filter(|_| flags & 2 != 0);
    let allow: Vec<String> = fields.map(|f| String::from_utf8_lossy(f).into_owned()).collect();

    let policy = HostPolicy::new(listen, &allow);
    let own = OwnNames::new(listen, local, &allow);
    match policy.check(host, origin, local) {
        Ok(()) => {
            let host = host.expect("a request without Host accepted");
            assert!(
                own.is_own_host(host),
                "Host {:?} accepted, which is not one of {own:?}",
                host.escape_ascii().to_string()
            );
            if let Some(origin) = origin {
                assert!(
                    own.is_own_origin(origin),
                    "Origin {:?} accepted, which is not one of {own:?}",
                    origin.escape_ascii().to_string()
                );
            }
        }
        Err(why) => assert!(why.len() <= MAX_REFUSAL, "a refusal of {} bytes: {why}", why.len()),
    }
});
