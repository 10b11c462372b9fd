//! The admin listener serves TLS with the API's certificate (`--tls-cert`, `--tls-key`), and
//! requires a client certificate when the API does (`--tls-client-ca`): the coordinator runs
//! in-process on port 0, certificates are made here with rcgen.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use treaty_coordinator::config::Config;
use treaty_coordinator::log::memory::MemoryLog;
use treaty_coordinator::security::Security;
use treaty_coordinator::server::{run_with, Extras};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

struct Pki {
    _dir: tempfile::TempDir,
    ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    client_cert: String,
    client_key: String,
}

fn pki() -> Pki {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    let dir = tempfile::tempdir().unwrap();
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "admin test CA");
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let leaf = |names: Vec<String>| {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(names)
            .unwrap()
            .signed_by(&key, &issuer)
            .unwrap();
        (cert.pem(), key.serialize_pem())
    };
    let (server_cert, server_key) = leaf(vec!["localhost".into(), "127.0.0.1".into()]);
    let (client_cert, client_key) = leaf(vec!["operator.client".into()]);
    let write = |name: &str, pem: &str| {
        let p = dir.path().join(name);
        std::fs::write(&p, pem).unwrap();
        p
    };
    Pki {
        ca: write("ca.pem", &ca_cert.pem()),
        server_cert: write("server.pem", &server_cert),
        server_key: write("server.key", &server_key),
        client_cert,
        client_key,
        _dir: dir,
    }
}

/// A coordinator with an admin listener and `security`; its admin address, and a guard that
/// stops it when dropped.
async fn start(security: Security) -> (SocketAddr, tokio::sync::oneshot::Sender<()>) {
    let api = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = admin.local_addr().unwrap();
    let config = Config {
        security,
        ..Config::default()
    };
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let extras = Extras {
        admin_listener: Some(admin),
        ..Extras::default()
    };
    tokio::spawn(run_with(
        api,
        Arc::new(MemoryLog::new()),
        config,
        extras,
        async {
            let _ = stopped.await;
        },
    ));
    (addr, stop)
}

/// `GET path` over TLS trusting `ca`, presenting `client` (cert, key PEM) if given; the
/// response's text, or the error.
fn https_get(
    addr: SocketAddr,
    path: &str,
    ca: &PathBuf,
    client: Option<(&str, &str)>,
) -> Result<String, String> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let config = match client {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => builder
            .with_client_auth_cert(
                CertificateDer::pem_slice_iter(cert.as_bytes())
                    .collect::<Result<Vec<_>, _>>()
                    .unwrap(),
                PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
            )
            .unwrap(),
    };
    let conn =
        rustls::ClientConnection::new(Arc::new(config), ServerName::try_from("localhost").unwrap())
            .unwrap();
    let tcp = std::net::TcpStream::connect(addr).map_err(|e| e.to_string())?;
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    write!(
        tls,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    match tls.read_to_end(&mut out) {
        Ok(_) => Ok(String::from_utf8_lossy(&out).into_owned()),
        // A peer that closes without close_notify after a full answer is fine here.
        Err(e) if !out.is_empty() && e.kind() == std::io::ErrorKind::UnexpectedEof => {
            Ok(String::from_utf8_lossy(&out).into_owned())
        }
        Err(e) => Err(e.to_string()),
    }
}

/// Plain HTTP to the port: what a client that does not speak TLS gets.
fn http_get(addr: SocketAddr, path: &str) -> String {
    let mut tcp = std::net::TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = write!(
        tcp,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    );
    let mut out = Vec::new();
    let _ = tcp.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(f).await.unwrap()
}

#[tokio::test]
async fn the_admin_listener_serves_tls_with_the_api_certificate() {
    let pki = pki();
    let (addr, _stop) = start(Security {
        tls_cert: Some(pki.server_cert.clone()),
        tls_key: Some(pki.server_key.clone()),
        ..Security::default()
    })
    .await;
    let ca = pki.ca.clone();
    let got = blocking(move || https_get(addr, "/healthz", &ca, None)).await;
    let got = got.expect("https GET /healthz");
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
    assert!(got.ends_with("ok\n"), "{got}");
    let ca = pki.ca.clone();
    let page = blocking(move || https_get(addr, "/dashboard/", &ca, None))
        .await
        .unwrap();
    assert!(page.contains("Treaty dashboard"), "{page}");
    let plain = blocking(move || http_get(addr, "/healthz")).await;
    assert!(
        !plain.contains("200 OK"),
        "plaintext is not served: {plain}"
    );
}

#[tokio::test]
async fn with_a_client_ca_the_admin_listener_requires_a_client_certificate() {
    let pki = pki();
    let (addr, _stop) = start(Security {
        tls_cert: Some(pki.server_cert.clone()),
        tls_key: Some(pki.server_key.clone()),
        tls_client_ca: Some(pki.ca.clone()),
        ..Security::default()
    })
    .await;
    let ca = pki.ca.clone();
    let anonymous = blocking(move || https_get(addr, "/healthz", &ca, None)).await;
    assert!(
        anonymous.as_ref().map_or(true, |t| !t.contains("200 OK")),
        "no client certificate, no answer: {anonymous:?}"
    );
    let (ca, cert, key) = (
        pki.ca.clone(),
        pki.client_cert.clone(),
        pki.client_key.clone(),
    );
    let got = blocking(move || https_get(addr, "/healthz", &ca, Some((&cert, &key))))
        .await
        .expect("mTLS GET /healthz");
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
    assert!(got.ends_with("ok\n"), "{got}");
}
