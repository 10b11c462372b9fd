//! TLS and authentication for `treatyd` (DESIGN section 13): what the Coordinator API serves
//! with, how callers are authorised, and how the coordinator presents itself to participants.
//!
//! - [`Security`]: the file paths `treatyd` is configured with (one `settings.rs` row each),
//!   checked for consistency by [`Security::validate`] and read by [`Security::server_tls`],
//!   [`Security::auth`] and [`Security::outbound`]. Every read error names the file and the
//!   setting; nothing here panics.
//! - [`Auth`]: the token file (`--auth-tokens`): bearer tokens and client-certificate
//!   fingerprints mapped to [`Role`]s, checked by [`Auth::check`] at the top of every API
//!   method. Without the file every caller may do everything (trusted networks only).
//! - [`Outbound`]: the TLS client config and the shared token sent on every branch call.

use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use tonic::metadata::AsciiMetadataValue;
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};
use tonic::{Request, Status};

/// The metadata key carrying credentials, on Coordinator API calls and on branch calls:
/// `authorization: Bearer <token>`.
pub const AUTHORIZATION: &str = "authorization";

/// The TLS and authentication files `treatyd` is configured with; all unset by default
/// (plaintext, no authentication: for trusted networks only).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Security {
    /// Certificate chain (PEM) the Coordinator API serves TLS with; needs `tls_key`.
    pub tls_cert: Option<PathBuf>,
    /// Private key (PEM) of `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// CA bundle (PEM) client certificates must chain to: set, the API requires one (mTLS).
    pub tls_client_ca: Option<PathBuf>,
    /// CA bundle (PEM) participants' certificates must chain to; needed for `https://`
    /// branch endpoints.
    pub participant_ca: Option<PathBuf>,
    /// Client certificate (PEM) presented to participants (mTLS); needs the key.
    pub participant_client_cert: Option<PathBuf>,
    pub participant_client_key: Option<PathBuf>,
    /// The token file ([`Auth::parse`]); set, every API call must authenticate.
    pub auth_tokens: Option<PathBuf>,
    /// A file holding the token sent to participants on every branch call.
    pub participant_token_file: Option<PathBuf>,
}

/// What a caller may do on the Coordinator API.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// `Begin`.
    Submit,
    /// `Get`, `List`, `Watch`, `Outcome` (participants' in-doubt inquiries included).
    Read,
    /// `Retry`, `Resolve`.
    Operate,
}

impl Role {
    const ALL: [Role; 3] = [Role::Submit, Role::Read, Role::Operate];

    fn name(self) -> &'static str {
        match self {
            Role::Submit => "submit",
            Role::Read => "read",
            Role::Operate => "operate",
        }
    }

    fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

/// A set of [`Role`]s.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Roles(u8);

impl Roles {
    pub fn has(self, role: Role) -> bool {
        self.0 & role.bit() != 0
    }
}

/// Who may call the Coordinator API, from the `--auth-tokens` file. Tokens are kept as
/// SHA-256 digests, so a lookup does not compare secrets byte by byte.
#[derive(Debug, Default)]
pub struct Auth {
    tokens: HashMap<[u8; 32], Roles>,
    /// Client certificates by SHA-256 fingerprint of their DER encoding.
    certs: HashMap<[u8; 32], Roles>,
}

/// The prefix of a line of the token file that names a client certificate instead of a
/// token: `cert-sha256:<64 hex digits> = read`.
pub const CERT_PREFIX: &str = "cert-sha256:";

impl Auth {
    /// Parses a token file: one `credential = role, role` per line, `#` comments (whole lines
    /// or after the roles) and blank lines ignored. A credential is a bearer token (printable ASCII, no spaces) or
    /// `cert-sha256:` and the hex SHA-256 fingerprint of a client certificate (mTLS). Roles
    /// are `submit`, `read`, `operate`. `source` names the file in errors.
    pub fn parse(text: &str, source: &str) -> Result<Auth, String> {
        let mut auth = Auth::default();
        for (i, line) in text.lines().enumerate() {
            let at = format!("{source}, line {}", i + 1);
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            // Tokens may end in '=' (base64 padding); roles never contain one.
            let Some((cred, roles)) = line.rsplit_once('=') else {
                return Err(format!("{at}: expected `token = role, role`"));
            };
            let cred = cred.trim();
            if cred.is_empty() || !cred.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(format!(
                    "{at}: the token must be non-empty printable ASCII without spaces"
                ));
            }
            // A comment may follow the roles (tokens themselves may hold '#').
            let roles = roles.split('#').next().unwrap_or_default();
            let mut set = Roles::default();
            for r in roles.split(',').map(str::trim).filter(|r| !r.is_empty()) {
                let role = Role::ALL
                    .into_iter()
                    .find(|x| x.name() == r)
                    .ok_or_else(|| {
                        format!("{at}: unknown role {r:?}; roles are submit, read, operate")
                    })?;
                set.0 |= role.bit();
            }
            if set == Roles::default() {
                return Err(format!("{at}: no role given"));
            }
            let (table, key) = match cred.strip_prefix(CERT_PREFIX) {
                Some(hex) => (
                    &mut auth.certs,
                    parse_fingerprint(hex).map_err(|e| format!("{at}: {e}"))?,
                ),
                None => (&mut auth.tokens, digest(cred.as_bytes())),
            };
            if table.insert(key, set).is_some() {
                return Err(format!("{at}: this credential is listed twice"));
            }
        }
        Ok(auth)
    }

    /// Whether `req` may do what needs `role` (`method` names the call in the answer).
    /// A bearer token, when sent, decides; otherwise the client certificate's fingerprint.
    /// No or an unknown credential is UNAUTHENTICATED; a known one without the role is
    /// PERMISSION_DENIED.
    pub fn check<T>(&self, req: &Request<T>, role: Role, method: &str) -> Result<(), Status> {
        let roles = match req.metadata().get(AUTHORIZATION) {
            Some(value) => {
                let token = value
                    .to_str()
                    .ok()
                    .and_then(|v| v.strip_prefix("Bearer "))
                    .map(str::trim)
                    .ok_or_else(|| {
                        Status::unauthenticated("authorization metadata must be `Bearer <token>`")
                    })?;
                *self
                    .tokens
                    .get(&digest(token.as_bytes()))
                    .ok_or_else(|| Status::unauthenticated("unknown token"))?
            }
            None => {
                let cert = req.peer_certs();
                let known = cert
                    .as_ref()
                    .and_then(|c| c.first())
                    .and_then(|c| self.certs.get(&digest(c.as_ref())));
                match (known, cert.is_some()) {
                    (Some(r), _) => *r,
                    (None, true) => {
                        return Err(Status::unauthenticated(
                            "no token sent, and the client certificate is not in the token file",
                        ))
                    }
                    (None, false) => {
                        return Err(Status::unauthenticated(
                            "no credentials: send `authorization: Bearer <token>` metadata",
                        ))
                    }
                }
            }
        };
        if roles.has(role) {
            Ok(())
        } else {
            Err(Status::permission_denied(format!(
                "{method} needs the `{}` role, which this caller does not have",
                role.name()
            )))
        }
    }
}

fn digest(bytes: &[u8]) -> [u8; 32] {
    Sha256::digest(bytes).into()
}

fn parse_fingerprint(hex: &str) -> Result<[u8; 32], String> {
    let hex: String = hex.chars().filter(|c| *c != ':').collect();
    let bad = || {
        format!("{CERT_PREFIX} needs 64 hex digits (SHA-256 of the DER certificate), got {hex:?}")
    };
    if hex.len() != 64 {
        return Err(bad());
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
    }
    Ok(out)
}

/// What the coordinator uses on calls to participants: the TLS client config for `https://`
/// endpoints and the token sent as `authorization: Bearer <token>` on every branch call.
#[derive(Clone, Debug, Default)]
pub struct Outbound {
    pub tls: Option<ClientTlsConfig>,
    pub token: Option<AsciiMetadataValue>,
}

impl Security {
    /// Checks that the settings go together (files are read later, by the loaders).
    pub fn validate(&self) -> Result<(), String> {
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            return Err("tls-cert and tls-key must be given together".into());
        }
        if self.tls_client_ca.is_some() && self.tls_cert.is_none() {
            return Err("tls-client-ca needs tls-cert and tls-key (mTLS is TLS first)".into());
        }
        if self.participant_client_cert.is_some() != self.participant_client_key.is_some() {
            return Err(
                "participant-client-cert and participant-client-key must be given together".into(),
            );
        }
        if self.participant_client_cert.is_some() && self.participant_ca.is_none() {
            return Err("participant-client-cert needs participant-ca".into());
        }
        Ok(())
    }

    /// Whether the Coordinator API is served over TLS.
    pub fn serves_tls(&self) -> bool {
        self.tls_cert.is_some()
    }

    /// The API's TLS config, if `tls_cert` is set.
    pub fn server_tls(&self) -> Result<Option<ServerTlsConfig>, String> {
        let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) else {
            return Ok(None);
        };
        let mut tls =
            ServerTlsConfig::new().identity(identity(("tls-cert", cert), ("tls-key", key))?);
        if let Some(ca) = &self.tls_client_ca {
            tls = tls.client_ca_root(certificates("tls-client-ca", ca)?);
        }
        Ok(Some(tls))
    }

    /// The token table, if `auth_tokens` is set.
    pub fn auth(&self) -> Result<Option<Auth>, String> {
        let Some(path) = &self.auth_tokens else {
            return Ok(None);
        };
        let text = read_text("auth-tokens", path)?;
        Auth::parse(&text, &format!("auth-tokens file {}", path.display())).map(Some)
    }

    /// What calls to participants use.
    pub fn outbound(&self) -> Result<Outbound, String> {
        let tls = match &self.participant_ca {
            None => None,
            Some(ca) => {
                let mut tls =
                    ClientTlsConfig::new().ca_certificate(certificates("participant-ca", ca)?);
                if let (Some(c), Some(k)) =
                    (&self.participant_client_cert, &self.participant_client_key)
                {
                    tls = tls.identity(identity(
                        ("participant-client-cert", c),
                        ("participant-client-key", k),
                    )?);
                }
                Some(tls)
            }
        };
        let token = match &self.participant_token_file {
            None => None,
            Some(path) => {
                let text = read_text("participant-token-file", path)?;
                let token = text.trim();
                if token.is_empty() || !token.bytes().all(|b| b.is_ascii_graphic()) {
                    return Err(format!(
                        "participant-token-file {}: must hold one token of printable ASCII \
                         without spaces",
                        path.display()
                    ));
                }
                Some(
                    format!("Bearer {token}")
                        .parse()
                        .map_err(|e| format!("participant-token-file {}: {e}", path.display()))?,
                )
            }
        };
        Ok(Outbound { tls, token })
    }
}

impl Security {
    /// The admin listener's TLS config (`crate::admin`): the API's certificate and key, and
    /// with `tls_client_ca` a client certificate chained to it required, as on the API
    /// (mTLS). HTTP/1.1 only (the admin router). `None` when the API serves plaintext.
    pub fn admin_tls(&self) -> Result<Option<std::sync::Arc<rustls::ServerConfig>>, String> {
        use rustls_pki_types::pem::PemObject;
        use rustls_pki_types::{CertificateDer, PrivateKeyDer};
        let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) else {
            return Ok(None);
        };
        let ders = |setting: &str, path: &Path| -> Result<Vec<CertificateDer<'static>>, String> {
            let pem = certificates(setting, path)?.into_inner();
            CertificateDer::pem_slice_iter(&pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| format!("{setting}: {} is not valid PEM: {e}", path.display()))
        };
        let chain = ders("tls-cert", cert)?;
        let key = PrivateKeyDer::from_pem_file(key).map_err(|e| {
            format!(
                "tls-key: {} holds no usable private key (expected PEM `BEGIN PRIVATE KEY`): {e}",
                key.display()
            )
        })?;
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("admin TLS: {e}"))?;
        let builder = match &self.tls_client_ca {
            None => builder.with_no_client_auth(),
            Some(ca) => {
                let mut roots = rustls::RootCertStore::empty();
                for c in ders("tls-client-ca", ca)? {
                    roots.add(c).map_err(|e| {
                        format!(
                            "tls-client-ca: {}: unusable CA certificate: {e}",
                            ca.display()
                        )
                    })?;
                }
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    std::sync::Arc::new(roots),
                    provider,
                )
                .build()
                .map_err(|e| format!("tls-client-ca: {}: {e}", ca.display()))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut config = builder
            .with_single_cert(chain, key)
            .map_err(|e| format!("tls-cert/tls-key: cannot serve the admin listener: {e}"))?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Some(std::sync::Arc::new(config)))
    }
}

fn read_text(setting: &str, path: &Path) -> Result<String, String> {
    std::fs::read_to_string(path)
        .map_err(|e| format!("{setting}: cannot read {}: {e}", path.display()))
}

/// A PEM file of one or more certificates, checked to hold at least one.
fn certificates(setting: &str, path: &Path) -> Result<Certificate, String> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::CertificateDer;
    let pem = std::fs::read(path)
        .map_err(|e| format!("{setting}: cannot read {}: {e}", path.display()))?;
    let mut n = 0;
    for c in CertificateDer::pem_slice_iter(&pem) {
        c.map_err(|e| format!("{setting}: {} is not valid PEM: {e}", path.display()))?;
        n += 1;
    }
    if n == 0 {
        return Err(format!(
            "{setting}: {} holds no certificate (expected PEM `BEGIN CERTIFICATE`)",
            path.display()
        ));
    }
    Ok(Certificate::from_pem(pem))
}

/// A certificate chain and its private key, each checked to parse.
fn identity(cert: (&str, &Path), key: (&str, &Path)) -> Result<Identity, String> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::PrivateKeyDer;
    let chain = certificates(cert.0, cert.1)?;
    let key_pem = std::fs::read(key.1)
        .map_err(|e| format!("{}: cannot read {}: {e}", key.0, key.1.display()))?;
    PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| {
        format!(
            "{}: {} holds no usable private key (expected PEM `BEGIN PRIVATE KEY`): {e}",
            key.0,
            key.1.display()
        )
    })?;
    Ok(Identity::from_pem(chain.into_inner(), key_pem))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(auth: Option<&str>) -> Request<()> {
        let mut r = Request::new(());
        if let Some(a) = auth {
            r.metadata_mut().insert(AUTHORIZATION, a.parse().unwrap());
        }
        r
    }

    #[test]
    fn tokens_map_to_roles_and_failures_have_precise_codes() {
        let auth = Auth::parse(
            "# comment\n\nsubmitter = submit, read\nreader=read # dashboards\nops/b64== = operate,read\n",
            "t",
        )
        .unwrap();
        let code = |a: Option<&str>, role| auth.check(&req(a), role, "X").map_err(|s| s.code());
        assert_eq!(code(Some("Bearer submitter"), Role::Submit), Ok(()));
        assert_eq!(code(Some("Bearer ops/b64=="), Role::Operate), Ok(()));
        assert_eq!(
            code(Some("Bearer reader"), Role::Operate),
            Err(tonic::Code::PermissionDenied)
        );
        assert_eq!(
            code(Some("Bearer nope"), Role::Read),
            Err(tonic::Code::Unauthenticated)
        );
        assert_eq!(
            code(Some("reader"), Role::Read),
            Err(tonic::Code::Unauthenticated)
        );
        assert_eq!(code(None, Role::Read), Err(tonic::Code::Unauthenticated));
    }

    #[test]
    fn bad_token_files_name_the_line() {
        for (text, says) in [
            ("tok = admin", "unknown role"),
            ("tok", "expected"),
            ("tok =", "no role"),
            ("a = read\na = submit", "twice"),
            ("cert-sha256:abc = read", "64 hex"),
        ] {
            let err = Auth::parse(text, "f").unwrap_err();
            assert!(
                err.contains(says) && err.contains("f, line"),
                "{text:?}: {err}"
            );
        }
    }

    #[test]
    fn missing_files_are_named_errors() {
        let s = Security {
            tls_cert: Some("/nonexistent/cert.pem".into()),
            tls_key: Some("/nonexistent/key.pem".into()),
            auth_tokens: Some("/nonexistent/tokens".into()),
            ..Security::default()
        };
        let e = s.server_tls().unwrap_err();
        assert!(
            e.contains("tls-cert") && e.contains("/nonexistent/cert.pem"),
            "{e}"
        );
        let e = s.auth().unwrap_err();
        assert!(
            e.contains("auth-tokens") && e.contains("/nonexistent/tokens"),
            "{e}"
        );
        let dir = tempfile::tempdir().unwrap();
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not a certificate").unwrap();
        let s = Security {
            participant_ca: Some(junk.clone()),
            ..Security::default()
        };
        let e = s.outbound().unwrap_err();
        assert!(
            e.contains("participant-ca") && e.contains("junk.pem"),
            "{e}"
        );
    }
}
