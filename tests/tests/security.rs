//! TLS, mTLS and tokens end to end (issue 11, "Secure"): a real `treatyd` process serving
//! the Coordinator API over TLS and calling an in-process SDK participant over mTLS with a
//! shared token; certificates are generated here (rcgen) into a temporary directory.

use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use treaty_proto::v1 as pb;
use treaty_proto::v1::participant_client::ParticipantClient;
use treaty_sdk::{
    BranchContext, Client, ClientError, ClientOptions, HandlerResult, Outcome, Participant,
    ServerTls, SledStore, TlsConfig, TwoPhaseHandler, Txn,
};
use treaty_tests::{wait_until, Treatyd};

const WAIT: Duration = Duration::from_secs(30);
const PARTICIPANT_TOKEN: &str = "coordinator-only-8f3a";

/// A CA and, signed by it, a server certificate for `localhost`/127.0.0.1 and a client
/// certificate, all as PEM files in a temporary directory.
struct Pki {
    dir: tempfile::TempDir,
    ca: PathBuf,
    server_cert: PathBuf,
    server_key: PathBuf,
    client_cert: PathBuf,
    client_key: PathBuf,
    /// SHA-256 of the client certificate's DER encoding, as the token file names it.
    client_fingerprint: String,
    /// A second client certificate from the same CA, listed nowhere.
    stranger_cert: PathBuf,
    stranger_key: PathBuf,
}

impl Pki {
    fn new() -> Pki {
        use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
        let dir = tempfile::tempdir().expect("temp dir");
        let write = |name: &str, pem: String| {
            let p = dir.path().join(name);
            std::fs::write(&p, pem).expect("write pem");
            p
        };
        let ca_key = KeyPair::generate().unwrap();
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "treaty test CA");
        let ca_cert = ca_params.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_params, ca_key);
        let leaf = |names: Vec<String>, cn: &str| {
            let key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::new(names).unwrap();
            params.distinguished_name.push(DnType::CommonName, cn);
            let cert = params.signed_by(&key, &issuer).unwrap();
            (cert.pem(), key.serialize_pem(), cert.der().to_vec())
        };
        let (server_cert, server_key, _) = leaf(
            vec!["localhost".into(), "127.0.0.1".into()],
            "treaty server",
        );
        let (client_cert, client_key, client_der) = leaf(vec!["treatyd.client".into()], "treatyd");
        let (stranger_cert, stranger_key, _) = leaf(vec!["stranger.client".into()], "stranger");
        use sha2::Digest;
        let client_fingerprint = sha2::Sha256::digest(&client_der)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        Pki {
            ca: write("ca.pem", ca_cert.pem()),
            server_cert: write("server.pem", server_cert),
            server_key: write("server.key", server_key),
            client_cert: write("client.pem", client_cert),
            client_key: write("client.key", client_key),
            client_fingerprint,
            stranger_cert: write("stranger.pem", stranger_cert),
            stranger_key: write("stranger.key", stranger_key),
            dir,
        }
    }

    fn file(&self, name: &str, text: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::write(&p, text).expect("write file");
        p
    }
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// Records each operation as a key `op/gid` in the participant's tree.
struct Mark;

fn mark(op: &str, ctx: &BranchContext, tx: &mut Txn<'_, SledStore>) -> HandlerResult {
    tx.insert(format!("{op}/{}", ctx.gid).as_bytes(), b"1".as_slice())?;
    Ok(())
}

impl TwoPhaseHandler<SledStore> for Mark {
    async fn prepare(
        &self,
        c: &BranchContext,
        tx: &mut Txn<'_, SledStore>,
        _: &[u8],
    ) -> HandlerResult {
        mark("prepare", c, tx)
    }
    async fn commit(
        &self,
        c: &BranchContext,
        tx: &mut Txn<'_, SledStore>,
        _: &[u8],
    ) -> HandlerResult {
        mark("commit", c, tx)
    }
    async fn abort(
        &self,
        c: &BranchContext,
        tx: &mut Txn<'_, SledStore>,
        _: &[u8],
    ) -> HandlerResult {
        mark("abort", c, tx)
    }
}

/// An SDK participant served over mTLS (client certificates from the test CA required),
/// refusing branch calls without the coordinator's token. Stops on drop.
struct SecureParticipant {
    participant: Participant<SledStore>,
    uri: String,
    _stop: oneshot::Sender<()>,
    _dir: tempfile::TempDir,
}

impl SecureParticipant {
    async fn start(pki: &Pki) -> SecureParticipant {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = SledStore::open_dir(dir.path(), "business").expect("store");
        let participant = Participant::builder(store)
            .two_phase("mark", Mark)
            .require_token(PARTICIPANT_TOKEN)
            .build()
            .expect("participant");
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let uri = format!(
            "https://localhost:{}",
            listener.local_addr().unwrap().port()
        );
        let tls = ServerTls::files(&pki.server_cert, &pki.server_key).client_ca_file(&pki.ca);
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(participant.clone().serve_tls(listener, tls, async {
            let _ = stopped.await;
        }));
        SecureParticipant {
            participant,
            uri,
            _stop: stop,
            _dir: dir,
        }
    }

    fn has(&self, op: &str, gid: &str) -> bool {
        let tree = self.participant.store().tree();
        tree.get(format!("{op}/{gid}")).unwrap().is_some()
    }
}

/// treatyd over TLS, calling participants over mTLS with the shared token, with `extra`
/// flags.
fn secure_treatyd(pki: &Pki, dir: &Path, extra: &[&str]) -> Treatyd {
    let token_file = pki.file("participant-token", &format!("{PARTICIPANT_TOKEN}\n"));
    let mut args = vec![
        "--tls-cert",
        s(&pki.server_cert),
        "--tls-key",
        s(&pki.server_key),
        "--participant-ca",
        s(&pki.ca),
        "--participant-client-cert",
        s(&pki.client_cert),
        "--participant-client-key",
        s(&pki.client_key),
    ];
    let token_arg = token_file.to_str().unwrap().to_string();
    args.push("--participant-token-file");
    args.push(&token_arg);
    args.extend_from_slice(extra);
    Treatyd::start(dir, &args, &[]).expect("treatyd")
}

fn https(t: &Treatyd) -> String {
    format!("https://localhost:{}", t.proc.addr.port())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_transaction_over_https_to_an_mtls_participant_commits() {
    let pki = Pki::new();
    let p = SecureParticipant::start(&pki).await;
    let dir = tempfile::tempdir().unwrap();
    let treatyd = secure_treatyd(&pki, dir.path(), &[]);
    let options = ClientOptions::new().tls(TlsConfig::new().ca_file(&pki.ca));
    let client = Client::connect_with(https(&treatyd), &options)
        .await
        .expect("connect over TLS");
    let done = client
        .two_phase()
        .branch(treaty_sdk::Branch::new(&p.uri, "mark"))
        .submit_and_wait(WAIT)
        .await
        .expect("submit");
    assert_eq!(done.outcome, Outcome::Committed);
    assert!(p.has("prepare", &done.gid));
    // The outcome is told once the decision is durable; the commit follows.
    wait_until("the commit over mTLS", WAIT, || async {
        p.has("commit", &done.gid).then_some(())
    })
    .await;

    // The same API in plaintext is not served: a TLS listener does not speak clear HTTP/2.
    let plain = format!("http://{}", treatyd.proc.addr);
    let refused = match Client::connect(plain).await {
        Err(_) => true,
        Ok(c) => c.get(&done.gid).await.is_err(),
    };
    assert!(refused, "a plaintext client must not reach a TLS treatyd");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_forged_commit_is_refused_and_nothing_is_applied() {
    let pki = Pki::new();
    let p = SecureParticipant::start(&pki).await;
    // The forger holds a certificate from the right CA (the TLS layer lets it in) but not
    // the coordinator's token; then one that guesses a token.
    let tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(
            std::fs::read(&pki.ca).unwrap(),
        ))
        .identity(tonic::transport::Identity::from_pem(
            std::fs::read(&pki.client_cert).unwrap(),
            std::fs::read(&pki.client_key).unwrap(),
        ));
    let channel = tonic::transport::Endpoint::from_shared(p.uri.clone())
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .expect("the TLS handshake itself succeeds");
    let mut forger = ParticipantClient::new(channel);
    let branch = pb::BranchRequest {
        gid: "forged-1".into(),
        branch_id: 0,
        handler: "mark".into(),
        attempt: 1,
        ..Default::default()
    };
    for token in [None, Some("Bearer guess")] {
        for op in ["prepare", "commit"] {
            let mut req = tonic::Request::new(branch.clone());
            if let Some(t) = token {
                req.metadata_mut()
                    .insert("authorization", t.parse().unwrap());
            }
            let status = match op {
                "prepare" => forger.prepare(req).await.map(|_| ()),
                _ => forger.commit(req).await.map(|_| ()),
            }
            .expect_err("a forged call must be refused");
            assert_eq!(
                status.code(),
                tonic::Code::Unauthenticated,
                "{op}: {status:?}"
            );
        }
    }
    assert!(!p.has("prepare", "forged-1") && !p.has("commit", "forged-1"));
    let rows = p.participant.store().try_rows("forged-1").unwrap();
    assert!(
        rows.is_empty(),
        "no barrier row for a refused call: {rows:?}"
    );

    // With the coordinator's token the same commit is taken (the check is the token, not
    // something else about the call).
    let mut req = tonic::Request::new(branch);
    req.metadata_mut().insert(
        "authorization",
        format!("Bearer {PARTICIPANT_TOKEN}").parse().unwrap(),
    );
    forger
        .commit(req)
        .await
        .expect("the coordinator's token is accepted");
}

#[tokio::test(flavor = "multi_thread")]
async fn mtls_refuses_a_client_without_a_certificate() {
    let pki = Pki::new();
    let dir = tempfile::tempdir().unwrap();
    let treatyd = secure_treatyd(&pki, dir.path(), &["--tls-client-ca", s(&pki.ca)]);
    let without = ClientOptions::new().tls(TlsConfig::new().ca_file(&pki.ca));
    // TLS 1.3 may finish the client's side of the handshake before the server refuses it,
    // so the refusal shows at connect or at the first call.
    let refused = match Client::connect_with(https(&treatyd), &without).await {
        Err(_) => true,
        Ok(c) => c.get("no-such-gid").await.is_err_and(|e| !e.is_not_found()),
    };
    assert!(refused, "a client without a certificate must not be served");

    let with = ClientOptions::new().tls(
        TlsConfig::new()
            .ca_file(&pki.ca)
            .identity_files(&pki.client_cert, &pki.client_key),
    );
    let client = Client::connect_with(https(&treatyd), &with)
        .await
        .expect("connect with a client certificate");
    let err = client.get("no-such-gid").await.unwrap_err();
    assert!(err.is_not_found(), "served once authenticated: {err:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn tokens_authenticate_callers_and_roles_authorise_calls() {
    let pki = Pki::new();
    let p = SecureParticipant::start(&pki).await;
    let tokens = pki.file(
        "tokens",
        "# token = roles\nsubmitter = submit, read\nreader = read\noperator = operate, read\n",
    );
    let dir = tempfile::tempdir().unwrap();
    let treatyd = secure_treatyd(&pki, dir.path(), &["--auth-tokens", s(&tokens)]);
    let connect = |token: Option<&str>| {
        let mut o = ClientOptions::new().tls(TlsConfig::new().ca_file(&pki.ca));
        if let Some(t) = token {
            o = o.token(t);
        }
        let uri = https(&treatyd);
        async move { Client::connect_with(uri, &o).await.expect("connect") }
    };
    let code = |e: ClientError| match e {
        ClientError::Rejected { code, .. } => code,
        other => panic!("expected a rejection, got {other:?}"),
    };

    // No token, or an unknown one: UNAUTHENTICATED, for a read as for a submit.
    let anonymous = connect(None).await;
    let e = anonymous.get("g").await.unwrap_err();
    assert_eq!(code(e), tonic::Code::Unauthenticated);
    let e = connect(Some("wrong")).await.retry("g").await.unwrap_err();
    assert_eq!(code(e), tonic::Code::Unauthenticated);

    let submitter = connect(Some("submitter")).await;
    let done = submitter
        .two_phase()
        .branch(treaty_sdk::Branch::new(&p.uri, "mark"))
        .submit_and_wait(WAIT)
        .await
        .expect("submit with the submit role");
    assert_eq!(done.outcome, Outcome::Committed);

    // A read-only token reads, and may not steer: PERMISSION_DENIED, never INTERNAL.
    let reader = connect(Some("reader")).await;
    reader
        .get(&done.gid)
        .await
        .expect("read with the read role");
    let e = reader.retry(&done.gid).await.unwrap_err();
    assert_eq!(code(e), tonic::Code::PermissionDenied);
    let e = reader
        .two_phase()
        .branch(treaty_sdk::Branch::new(&p.uri, "mark"))
        .submit()
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            ClientError::Rejected {
                code: tonic::Code::PermissionDenied,
                ..
            }
        ),
        "{e:?}"
    );

    // The operate role may retry.
    let operator = connect(Some("operator")).await;
    operator
        .retry(&done.gid)
        .await
        .expect("retry with the operate role");
}

/// A caller authenticated by its client certificate alone (mTLS, no token) gets the roles
/// the token file gives that certificate's fingerprint; a certificate from the same CA that
/// the file does not list is UNAUTHENTICATED; and every refusal is counted on `/metrics` by
/// its gRPC status.
#[tokio::test(flavor = "multi_thread")]
async fn mtls_identities_carry_roles_and_refusals_are_counted() {
    let pki = Pki::new();
    let tokens = pki.file(
        "tokens",
        &format!(
            "cert-sha256:{} = read\noperator = operate, read\n",
            pki.client_fingerprint
        ),
    );
    let dir = tempfile::tempdir().unwrap();
    let treatyd = secure_treatyd(
        &pki,
        dir.path(),
        &[
            "--tls-client-ca",
            s(&pki.ca),
            "--auth-tokens",
            s(&tokens),
            "--admin-listen",
            "127.0.0.1:0",
        ],
    );
    let with_cert = |cert: &Path, key: &Path| {
        ClientOptions::new().tls(TlsConfig::new().ca_file(&pki.ca).identity_files(cert, key))
    };
    let code = |e: ClientError| match e {
        ClientError::Rejected { code, .. } => code,
        other => panic!("expected a rejection, got {other:?}"),
    };

    // The listed certificate reads (an unknown gid is NOT_FOUND, past the auth check) ...
    let reader = Client::connect_with(
        https(&treatyd),
        &with_cert(&pki.client_cert, &pki.client_key),
    )
    .await
    .expect("connect with the listed certificate");
    let e = reader.get("no-such-gid").await.unwrap_err();
    assert!(
        e.is_not_found(),
        "the certificate's read role lets it in: {e:?}"
    );
    // ... and may not steer.
    let e = reader.retry("no-such-gid").await.unwrap_err();
    assert_eq!(code(e), tonic::Code::PermissionDenied);

    // A certificate the CA signed but the token file does not list has no roles at all.
    let stranger = Client::connect_with(
        https(&treatyd),
        &with_cert(&pki.stranger_cert, &pki.stranger_key),
    )
    .await
    .expect("the TLS handshake succeeds: the CA signed it");
    let e = stranger.get("no-such-gid").await.unwrap_err();
    assert_eq!(code(e), tonic::Code::Unauthenticated);

    // A token, when sent, decides over the certificate: the operator may retry (an unknown
    // gid is NOT_FOUND, past the role check).
    let operator = Client::connect_with(
        https(&treatyd),
        &with_cert(&pki.stranger_cert, &pki.stranger_key).token("operator"),
    )
    .await
    .expect("connect");
    let e = operator.retry("no-such-gid").await.unwrap_err();
    assert!(e.is_not_found(), "the operate role passes the check: {e:?}");

    // Each refusal is counted by its status: one PERMISSION_DENIED, one UNAUTHENTICATED.
    let admin = treatyd.proc.admin_addr(WAIT).expect("admin address");
    // The admin listener serves TLS with the API's certificate and, with --tls-client-ca,
    // wants a client certificate too.
    let scrape = || {
        let body = https_get(admin, "/metrics", &pki).expect("GET /metrics");
        assert!(body.starts_with("HTTP/1.1 200"), "{body}");
        body
    };
    let count = |body: &str, reason: &str| {
        treaty_tests::metric_value(
            body,
            &format!("treaty_requests_rejected_total{{reason=\"{reason}\"}}"),
        )
    };
    let body = wait_until("the refusals on /metrics", WAIT, || {
        let body = scrape();
        let seen = count(&body, "permission_denied").is_some()
            && count(&body, "unauthenticated").is_some();
        async move { seen.then_some(body) }
    })
    .await;
    assert_eq!(count(&body, "permission_denied"), Some(1.0), "{body}");
    assert_eq!(count(&body, "unauthenticated"), Some(1.0), "{body}");
    assert_eq!(count(&body, "internal"), None, "never INTERNAL: {body}");
}

#[test]
fn treatyd_refuses_to_start_with_a_missing_certificate_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope.pem");
    let mut cmd = std::process::Command::new(treaty_tests::treatyd_bin());
    cmd.args(["--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path().join("data"))
        .arg("--tls-cert")
        .arg(&missing)
        .arg("--tls-key")
        .arg(&missing);
    let (status, _out, err) =
        treaty_tests::run_to_end(cmd, Duration::from_secs(60)).expect("treatyd runs");
    assert_eq!(status, 2, "{err}");
    assert!(
        err.contains("tls-cert") && err.contains("nope.pem"),
        "{err}"
    );
    assert!(
        !dir.path().join("data").exists(),
        "refused before the log was created"
    );
}

/// `GET path` over TLS from the admin listener at `addr`, trusting the test CA and presenting
/// the listed client certificate; the whole response (status line, headers, body).
fn https_get(addr: std::net::SocketAddr, path: &str, pki: &Pki) -> Result<String, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use std::io::{Read, Write};
    use std::sync::Arc;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(&pki.ca).map_err(|e| e.to_string())? {
        roots
            .add(c.map_err(|e| e.to_string())?)
            .map_err(|e| e.to_string())?;
    }
    let certs = CertificateDer::pem_file_iter(&pki.client_cert)
        .map_err(|e| e.to_string())?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    let key = PrivateKeyDer::from_pem_file(&pki.client_key).map_err(|e| e.to_string())?;
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_client_auth_cert(certs, key)
        .map_err(|e| e.to_string())?;
    let name = ServerName::try_from("localhost").map_err(|e| e.to_string())?;
    let conn = rustls::ClientConnection::new(Arc::new(config), name).map_err(|e| e.to_string())?;
    let tcp = std::net::TcpStream::connect(addr).map_err(|e| e.to_string())?;
    tcp.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
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
