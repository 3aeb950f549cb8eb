//! TLS on the daemon's one port, and the client side that trusts a server by the SHA-256
//! fingerprint of its certificate (as `kubeadm join` does) or by a CA.
//!
//! The server's certificate is either given (`--tls-cert`, `--tls-key`) or, with `--tls auto`,
//! created self-signed in `<state-dir>/tls/` on first start (ECDSA P-256, kept 0600) and reused
//! after. Its fingerprint rides in every join token, so a new agent trusts exactly that server
//! without a CA. rustls on ring only; TLS 1.2 and 1.3; no ALPN (browsers stay on HTTP/1.1,
//! which WebSocket upgrades need).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, verify_tls12_signature, verify_tls13_signature};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha2::{Digest, Sha256};

/// The crypto every TLS config here uses.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// SHA-256 of `bytes`, lowercase hex: certificates' fingerprints, and the hashes the store
/// keeps of credentials and join tokens.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// The SHA-256 fingerprint of a certificate (its DER bytes), lowercase hex.
pub fn fingerprint(der: &[u8]) -> String {
    sha256_hex(der)
}

/// A fingerprint as given by a user: hex, with or without `:` separators, any case, with or
/// without a `sha256:` prefix; normalised to lowercase hex without separators.
pub fn normalise_fingerprint(s: &str) -> Option<String> {
    let s = s.trim();
    let s = s.strip_prefix("sha256:").or_else(|| s.strip_prefix("SHA256:")).unwrap_or(s);
    let hex: String = s.chars().filter(|c| *c != ':').collect::<String>().to_ascii_lowercase();
    (hex.len() == 64 && hex.chars().all(|c| c.is_ascii_hexdigit())).then_some(hex)
}

/// The server's TLS: what accepts connections, and the fingerprint clients pin.
#[derive(Clone)]
pub struct ServerTls {
    /// Accepts TLS connections.
    pub acceptor: tokio_rustls::TlsAcceptor,
    /// SHA-256 of the certificate, lowercase hex.
    pub fingerprint: String,
    /// Where the certificate is.
    pub cert_path: PathBuf,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls").field("fingerprint", &self.fingerprint).finish()
    }
}

impl ServerTls {
    /// The certificate and key `cert`/`key` (PEM), or with `auto_dir` the self-signed pair in
    /// it, created for `names` (host names and addresses) when missing.
    pub fn load(
        cert: Option<&Path>,
        key: Option<&Path>,
        auto_dir: Option<&Path>,
        names: &[String],
    ) -> anyhow::Result<ServerTls> {
        let (cert_path, key_path) = match (cert, key, auto_dir) {
            (Some(c), Some(k), _) => (c.to_path_buf(), k.to_path_buf()),
            (None, None, Some(dir)) => {
                let (c, k) = (dir.join("cert.pem"), dir.join("key.pem"));
                match (c.exists(), k.exists()) {
                    (false, false) => create_self_signed(dir, names)?,
                    (true, true) => {}
                    // Not made again: agents pinned its fingerprint.
                    _ => anyhow::bail!(
                        "{}: one of cert.pem and key.pem is missing; restore it, or remove both \
                         for a new certificate (agents then need new join tokens)",
                        dir.display()
                    ),
                }
                (c, k)
            }
            _ => anyhow::bail!("--tls-cert and --tls-key go together"),
        };
        let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cert_path)
            .map_err(|e| anyhow::anyhow!("{}: {e}", cert_path.display()))?
            .collect::<Result<_, _>>()
            .map_err(|e| anyhow::anyhow!("{}: {e}", cert_path.display()))?;
        let first = certs
            .first()
            .ok_or_else(|| anyhow::anyhow!("{}: no certificate in it", cert_path.display()))?;
        let fingerprint = fingerprint(first);
        let key = PrivateKeyDer::from_pem_file(&key_path)
            .map_err(|e| anyhow::anyhow!("{}: {e}", key_path.display()))?;
        let config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(certs, key)?;
        Ok(ServerTls {
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
            fingerprint,
            cert_path,
        })
    }
}

/// Writes a self-signed certificate for `names` and its key into `dir` (0700; files 0600).
fn create_self_signed(dir: &Path, names: &[String]) -> anyhow::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
    let ck = rcgen::generate_simple_self_signed(names.to_vec())?;
    crate::state_dir::write_private(dir, "key.pem", ck.signing_key.serialize_pem().as_bytes())?;
    crate::state_dir::write_private(dir, "cert.pem", ck.cert.pem().as_bytes())?;
    tracing::info!(dir = %dir.display(), "created a self-signed TLS certificate");
    Ok(())
}

/// How a client trusts the server it connects to over TLS.
#[derive(Debug, Clone)]
pub enum Trust {
    /// The server's certificate has this SHA-256 fingerprint (lowercase hex).
    Fingerprint(String),
    /// The server's certificate is signed by the CA in this PEM file (and names the address).
    Ca(PathBuf),
    /// The server's certificate is signed by one of this machine's CAs (`/etc/ssl/certs`).
    System,
    /// No server: for a configuration that is there but never meant to connect (a
    /// PostgreSQL store asked for no TLS).
    Nobody,
}

/// A client configuration that trusts as `trust` says.
pub fn client_config(trust: &Trust) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?;
    let config = match trust {
        Trust::Fingerprint(fp) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(Pinned {
                sha256: fp.clone(),
                provider: provider(),
            }))
            .with_no_client_auth(),
        Trust::Ca(path) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_file_iter(path)
                .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?
            {
                roots.add(c.map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?)?;
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        Trust::Nobody => {
            builder.with_root_certificates(rustls::RootCertStore::empty()).with_no_client_auth()
        }
        Trust::System => {
            let mut roots = rustls::RootCertStore::empty();
            let found = rustls_native_certs::load_native_certs();
            let (added, _) = roots.add_parsable_certificates(found.certs);
            if added == 0 {
                tracing::warn!(errors = ?found.errors, "no CA certificates found on this machine");
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
    };
    Ok(Arc::new(config))
}

/// The host part of `addr` (`host:port`, `[v6]:port`).
pub fn host_of(addr: &str) -> &str {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    host.trim_start_matches('[').trim_end_matches(']')
}

/// The name a client presents (SNI) and checks with a CA: the host part of `addr`.
pub fn server_name(addr: &str) -> anyhow::Result<ServerName<'static>> {
    let host = host_of(addr);
    ServerName::try_from(host.to_string()).map_err(|e| anyhow::anyhow!("{host}: {e}"))
}

/// Trusts exactly the certificate with a given fingerprint; still checks that the server
/// holds its key (the handshake's signature).
#[derive(Debug)]
struct Pinned {
    sha256: String,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let got = fingerprint(end_entity);
        if got == self.sha256 {
            return Ok(ServerCertVerified::assertion());
        }
        Err(rustls::Error::General(format!(
            "the server's certificate has fingerprint sha256:{got}, not the expected sha256:{}",
            self.sha256
        )))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_are_read_as_people_write_them() {
        let hex = "ab".repeat(32);
        let colons: Vec<String> = (0..32).map(|_| "AB".to_string()).collect();
        assert_eq!(normalise_fingerprint(&colons.join(":")), Some(hex.clone()));
        assert_eq!(normalise_fingerprint(&format!("sha256:{hex}")), Some(hex));
        assert_eq!(normalise_fingerprint("abc"), None);
    }
}
