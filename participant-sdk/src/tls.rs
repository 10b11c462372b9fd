//! TLS and credentials, shared by everything in the SDK that talks gRPC: the [`crate::Client`]
//! and the participant's connection to its coordinator dial through [`ClientOptions`] (one
//! channel builder); the participant's own server takes a [`ServerTls`].
//!
//! Certificates and keys are PEM, from files or bytes. A file that cannot be read or holds no
//! certificate or key is an error naming it, when the option is used (at connect or build
//! time), never a panic.

use std::path::PathBuf;
use std::time::Duration;
use tonic::metadata::AsciiMetadataValue;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig};

/// The metadata key of credentials: `authorization: Bearer <token>`, as `treatyd` sends to
/// participants and expects from callers when it runs with `--auth-tokens`.
pub const AUTHORIZATION: &str = "authorization";

/// PEM data, or the file holding it.
#[derive(Clone, Debug)]
enum Pem {
    File(PathBuf),
    Bytes(Vec<u8>),
}

impl Pem {
    fn read(&self, what: &str) -> Result<Vec<u8>, String> {
        match self {
            Pem::File(p) => {
                std::fs::read(p).map_err(|e| format!("{what}: cannot read {}: {e}", p.display()))
            }
            Pem::Bytes(b) => Ok(b.clone()),
        }
    }

    fn name(&self, what: &str) -> String {
        match self {
            Pem::File(p) => format!("{what} {}", p.display()),
            Pem::Bytes(_) => format!("{what} (PEM given in memory)"),
        }
    }

    /// One or more certificates, checked to parse.
    fn certificates(&self, what: &str) -> Result<Vec<u8>, String> {
        use rustls_pki_types::pem::PemObject;
        use rustls_pki_types::CertificateDer;
        let pem = self.read(what)?;
        let mut n = 0;
        for c in CertificateDer::pem_slice_iter(&pem) {
            c.map_err(|e| format!("{} is not valid PEM: {e}", self.name(what)))?;
            n += 1;
        }
        if n == 0 {
            return Err(format!(
                "{} holds no certificate (expected PEM `BEGIN CERTIFICATE`)",
                self.name(what)
            ));
        }
        Ok(pem)
    }

    fn private_key(&self, what: &str) -> Result<Vec<u8>, String> {
        use rustls_pki_types::pem::PemObject;
        use rustls_pki_types::PrivateKeyDer;
        let pem = self.read(what)?;
        PrivateKeyDer::from_pem_slice(&pem).map_err(|e| {
            format!(
                "{} holds no usable private key (expected PEM `BEGIN PRIVATE KEY`): {e}",
                self.name(what)
            )
        })?;
        Ok(pem)
    }
}

fn identity(cert: &Pem, key: &Pem) -> Result<Identity, String> {
    Ok(Identity::from_pem(
        cert.certificates("certificate")?,
        key.private_key("private key")?,
    ))
}

/// How to check a server's certificate, and which certificate to present (mTLS). Used for
/// `https://` URIs; `http://` ones are dialled in plaintext.
#[derive(Clone, Debug, Default)]
pub struct TlsConfig {
    ca: Option<Pem>,
    identity: Option<(Pem, Pem)>,
    domain_name: Option<String>,
}

impl TlsConfig {
    /// Server certificates checked against the system's roots, no client certificate.
    pub fn new() -> TlsConfig {
        TlsConfig::default()
    }

    /// Trust only the CA certificates in this PEM file (instead of the system's roots).
    pub fn ca_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.ca = Some(Pem::File(path.into()));
        self
    }

    /// [`TlsConfig::ca_file`], from PEM in memory.
    pub fn ca_pem(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.ca = Some(Pem::Bytes(pem.into()));
        self
    }

    /// Present this certificate chain and key (PEM files) to the server: mTLS.
    pub fn identity_files(mut self, cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> Self {
        self.identity = Some((Pem::File(cert.into()), Pem::File(key.into())));
        self
    }

    /// [`TlsConfig::identity_files`], from PEM in memory.
    pub fn identity_pem(mut self, cert: impl Into<Vec<u8>>, key: impl Into<Vec<u8>>) -> Self {
        self.identity = Some((Pem::Bytes(cert.into()), Pem::Bytes(key.into())));
        self
    }

    /// The name the server's certificate must carry, when it is not the URI's host.
    pub fn domain_name(mut self, name: impl Into<String>) -> Self {
        self.domain_name = Some(name.into());
        self
    }

    /// tonic's config, with every file read and checked.
    pub fn client_config(&self) -> Result<ClientTlsConfig, String> {
        let mut tls = ClientTlsConfig::new();
        tls = match &self.ca {
            Some(ca) => tls.ca_certificate(Certificate::from_pem(ca.certificates("CA")?)),
            None => tls.with_native_roots(),
        };
        if let Some((cert, key)) = &self.identity {
            tls = tls.identity(identity(cert, key)?);
        }
        if let Some(name) = &self.domain_name {
            tls = tls.domain_name(name.clone());
        }
        Ok(tls)
    }
}

/// The participant server's TLS: its certificate and key, and optionally the CA whose
/// client certificates it requires (mTLS: then only callers holding one, such as a `treatyd`
/// started with `--participant-client-cert`, can connect at all).
#[derive(Clone, Debug)]
pub struct ServerTls {
    cert: Pem,
    key: Pem,
    client_ca: Option<Pem>,
}

impl ServerTls {
    /// Serve with this certificate chain and private key (PEM files).
    pub fn files(cert: impl Into<PathBuf>, key: impl Into<PathBuf>) -> ServerTls {
        ServerTls {
            cert: Pem::File(cert.into()),
            key: Pem::File(key.into()),
            client_ca: None,
        }
    }

    /// [`ServerTls::files`], from PEM in memory.
    pub fn pem(cert: impl Into<Vec<u8>>, key: impl Into<Vec<u8>>) -> ServerTls {
        ServerTls {
            cert: Pem::Bytes(cert.into()),
            key: Pem::Bytes(key.into()),
            client_ca: None,
        }
    }

    /// Require a client certificate signed by a CA in this PEM file (mTLS).
    pub fn client_ca_file(mut self, path: impl Into<PathBuf>) -> Self {
        self.client_ca = Some(Pem::File(path.into()));
        self
    }

    /// [`ServerTls::client_ca_file`], from PEM in memory.
    pub fn client_ca_pem(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.client_ca = Some(Pem::Bytes(pem.into()));
        self
    }

    /// tonic's config, with every file read and checked.
    pub fn server_config(&self) -> Result<ServerTlsConfig, String> {
        let mut tls = ServerTlsConfig::new().identity(identity(&self.cert, &self.key)?);
        if let Some(ca) = &self.client_ca {
            tls = tls.client_ca_root(Certificate::from_pem(ca.certificates("client CA")?));
        }
        Ok(tls)
    }
}

/// How the SDK dials a coordinator: TLS for `https://` URIs and a bearer token. Used by
/// [`crate::Client::connect_with`] and [`crate::ParticipantBuilder::coordinator_options`].
#[derive(Clone, Debug, Default)]
pub struct ClientOptions {
    tls: Option<TlsConfig>,
    token: Option<String>,
}

impl ClientOptions {
    /// Plaintext for `http://`, the system's roots for `https://`, no token.
    pub fn new() -> ClientOptions {
        ClientOptions::default()
    }

    /// TLS settings for `https://` URIs.
    pub fn tls(mut self, tls: TlsConfig) -> Self {
        self.tls = Some(tls);
        self
    }

    /// Send `authorization: Bearer <token>` on every call (a token from `treatyd`'s
    /// `--auth-tokens` file).
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// The endpoint for `uri`: TLS set up for `https://`, connect and call timeouts set.
    pub(crate) fn endpoint(&self, uri: &str, timeout: Duration) -> Result<Endpoint, String> {
        let mut ep = Endpoint::from_shared(uri.to_string())
            .map_err(|e| format!("coordinator URI {uri:?} is invalid: {e}"))?
            .connect_timeout(timeout);
        if ep.uri().scheme_str() == Some("https") {
            let tls = self.tls.clone().unwrap_or_default().client_config()?;
            ep = ep
                .tls_config(tls)
                .map_err(|e| format!("TLS settings for {uri:?}: {e}"))?;
        }
        Ok(ep)
    }

    /// The endpoint for `uri` (an address), checking TLS against the name `host` it was
    /// resolved from.
    pub(crate) fn endpoint_for_host(
        &self,
        uri: &str,
        host: &str,
        timeout: Duration,
    ) -> Result<Endpoint, String> {
        let mut ep = Endpoint::from_shared(uri.to_string())
            .map_err(|e| format!("coordinator URI {uri:?} is invalid: {e}"))?
            .connect_timeout(timeout);
        if ep.uri().scheme_str() == Some("https") {
            let tls = self
                .tls
                .clone()
                .unwrap_or_default()
                .client_config()?
                .domain_name(host);
            ep = ep
                .tls_config(tls)
                .map_err(|e| format!("TLS settings for {uri:?}: {e}"))?;
        }
        Ok(ep)
    }

    /// The `authorization` value to send, if a token is set.
    pub(crate) fn bearer(&self) -> Result<Option<AsciiMetadataValue>, String> {
        self.token
            .as_deref()
            .map(|t| {
                format!("Bearer {t}")
                    .parse()
                    .map_err(|_| "the token must be printable ASCII".to_string())
            })
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_and_bad_files_are_errors_naming_them() {
        let e = TlsConfig::new()
            .ca_file("/nonexistent/ca.pem")
            .client_config()
            .unwrap_err();
        assert!(e.contains("/nonexistent/ca.pem"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "hello").unwrap();
        let e = ServerTls::files(&junk, &junk).server_config().unwrap_err();
        assert!(
            e.contains("junk.pem") && e.contains("no certificate"),
            "{e}"
        );
        let c = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let cert = dir.path().join("cert.pem");
        std::fs::write(&cert, c.cert.pem()).unwrap();
        let e = ServerTls::files(&cert, &junk).server_config().unwrap_err();
        assert!(e.contains("junk.pem") && e.contains("private key"), "{e}");
        let ok = ServerTls::pem(c.cert.pem(), c.signing_key.serialize_pem()).server_config();
        assert!(ok.is_ok());
    }
}
