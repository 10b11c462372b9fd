//! Treaty's runnable examples, and the pieces of them that tests reuse.
//!
//! - [`bank`]: account handlers (2PC `debit`/`credit`, saga `saga-debit`/`saga-credit`) over a
//!   sled tree, and the `Bank` inspection service (balances, barrier rows; `proto/bank.proto`).
//!   Binaries: `bank-account` (one instance of the account service) and `bank` (transfer and
//!   balances CLI).
//! - [`trip`]: flight, hotel and car booking services, and their ordered journal, for the
//!   `trip` saga binary.
//! - [`proto`]: code generated from `proto/bank.proto` by `build.rs` (protox, no `protoc`).
//! - `demo.sh`: treatyd, two bank instances and three transfers, stopped on exit.
//!
//! Command-line helpers shared by the binaries live here: [`parse_args`], [`check_http_uri`],
//! [`error_chain`].

pub mod bank;
pub mod trip;

/// Generated code of `proto/bank.proto`.
pub mod proto {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("treaty.examples.bank.v1");
}

/// `e` and its chain of causes on one line, each cause once (a wrapper often repeats its
/// source's text, and a bare "transport error" says nothing without its cause).
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cur = s.source();
    }
    out
}

/// Checks that `uri` is an `http://` or `https://` URI with a host, naming `flag` if not.
pub fn check_http_uri(flag: &str, uri: &str) -> Result<(), String> {
    let host = uri
        .strip_prefix("http://")
        .or_else(|| uri.strip_prefix("https://"));
    match host {
        Some(h) if !h.is_empty() && !h.starts_with('/') => Ok(()),
        _ => Err(format!(
            "{flag} {uri:?}: expected an http:// or https:// URI, e.g. http://127.0.0.1:7700"
        )),
    }
}

/// Parses the command line like `clap::Parser::parse`, but exits with status 1 (not clap's 2)
/// on a usage error, so that the examples' exit statuses keep one meaning each. `--help` and
/// `--version` still exit 0.
pub fn parse_args<T: clap::Parser>() -> T {
    T::try_parse().unwrap_or_else(|e| {
        let _ = e.print();
        std::process::exit(if e.use_stderr() { 1 } else { 0 })
    })
}
