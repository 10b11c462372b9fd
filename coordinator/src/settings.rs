//! `treatyd`'s settings, each defined once in [`SETTINGS`]: one row gives the flag
//! (`--call-timeout-ms`), and from it the environment variable (`TREATY_CALL_TIMEOUT_MS`) and
//! the TOML key (`call_timeout_ms`); the help text; and how the value is read from and shown
//! on a [`Daemon`]. The default is whatever [`Daemon::default`] holds (built on
//! [`Config::default`]), shown through the same row, so `--help` cannot disagree with it.
//!
//! Precedence (DESIGN section 10): flag, then `TREATY_*` environment variable, then the TOML
//! file given by `--config` / `TREATY_CONFIG`, then the default. [`Daemon::load`] applies the
//! sources in the reverse order over the defaults, each value through the row's one parser, so
//! a value means the same wherever it comes from. An unknown TOML key, a bad value or a bad
//! combination ([`Config::validate`]) is an error naming the source and the setting.
//!
//! Adding a setting is one row (and the field it sets).

use crate::config::Config;
use crate::log::sled::SledLogOptions;
use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

/// Log output format of `treatyd`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Human,
    Json,
}

impl FromStr for LogFormat {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "human" => Ok(LogFormat::Human),
            "json" => Ok(LogFormat::Json),
            _ => Err("must be `human` or `json`".into()),
        }
    }
}

impl std::fmt::Display for LogFormat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            LogFormat::Human => "human",
            LogFormat::Json => "json",
        })
    }
}

/// Everything `treatyd` is configured with: the coordinator's [`Config`] and the daemon's own
/// settings (where to listen, where the log lives, how to log).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Daemon {
    pub listen: SocketAddr,
    /// Where to serve the admin HTTP routes (metrics, health); `None`: not at all.
    pub admin_listen: Option<SocketAddr>,
    pub data_dir: PathBuf,
    /// The PostgreSQL log (`postgres://...`) instead of sled in `data_dir`; `None`: sled.
    pub store: Option<String>,
    pub log_format: LogFormat,
    pub log_level: String,
    /// sled's page cache.
    pub cache_bytes: u64,
    /// With `store` and `sslmode=require`: the CA of the database server's certificate.
    pub store_ca: Option<PathBuf>,
    /// With `store`: how long this coordinator's ownership of its transactions outlives its
    /// last renewal, before another coordinator of the database takes them over.
    pub lease: Duration,
    /// Where to export traces (OTLP over gRPC); `None`: no exporter, no spans.
    pub otlp_endpoint: Option<String>,
    /// The `service.name` of exported spans.
    pub otlp_service_name: String,
    pub config: Config,
}

impl Default for Daemon {
    fn default() -> Self {
        Daemon {
            listen: SocketAddr::from(([127, 0, 0, 1], 7700)),
            admin_listen: None,
            data_dir: PathBuf::from("./treaty-data"),
            store: None,
            log_format: LogFormat::Human,
            log_level: "info".into(),
            cache_bytes: SledLogOptions::default().cache_capacity_bytes,
            lease: crate::log::postgres::DEFAULT_LEASE,
            store_ca: None,
            otlp_endpoint: None,
            otlp_service_name: crate::otel::SERVICE_NAME_DEFAULT.into(),
            config: Config::default(),
        }
    }
}

/// One setting. See the module documentation.
pub struct Setting {
    /// The flag without `--`; the TOML key and environment variable derive from it.
    pub flag: &'static str,
    /// What the value is, in `--help` (`MS`, `BYTES`, ...).
    pub value_name: &'static str,
    pub help: &'static str,
    /// The value of this setting in `d`, as a flag would spell it.
    pub get: fn(&Daemon) -> String,
    /// Parse `value` and set it in `d`; the error says what is wrong with the value.
    pub set: fn(&mut Daemon, &str) -> Result<(), String>,
}

impl Setting {
    /// The TOML key: the flag with `_` for `-`.
    pub fn key(&self) -> String {
        self.flag.replace('-', "_")
    }

    /// The environment variable: `TREATY_` and the key in upper case.
    pub fn env(&self) -> String {
        format!("TREATY_{}", self.key().to_uppercase())
    }

    /// The default, as `--help` shows it.
    pub fn default_value(&self) -> String {
        (self.get)(&Daemon::default())
    }
}

fn parse<T: FromStr>(v: &str) -> Result<T, String>
where
    T::Err: std::fmt::Display,
{
    v.trim().parse::<T>().map_err(|e| e.to_string())
}

/// A row whose value is stored as is (`FromStr` and `Display`).
macro_rules! plain {
    ($flag:literal, $value_name:literal, $help:literal, $($field:ident).+) => {
        Setting {
            flag: $flag,
            value_name: $value_name,
            help: $help,
            get: |d| d.$($field).+.to_string(),
            set: |d, v| {
                d.$($field).+ = parse(v)?;
                Ok(())
            },
        }
    };
}

/// A row holding a [`Duration`] in the unit `$unit` (`millis` or `secs`).
macro_rules! duration {
    ($flag:literal, $value_name:literal, $help:literal, $unit:ident, $($field:ident).+) => {
        Setting {
            flag: $flag,
            value_name: $value_name,
            help: $help,
            get: |d| duration!(@get $unit, d.$($field).+),
            set: |d, v| {
                d.$($field).+ = duration!(@set $unit, parse::<u64>(v)?);
                Ok(())
            },
        }
    };
    (@get millis, $d:expr) => { $d.as_millis().to_string() };
    (@get secs, $d:expr) => { $d.as_secs().to_string() };
    (@set millis, $n:expr) => { Duration::from_millis($n) };
    (@set secs, $n:expr) => { Duration::from_secs($n) };
}

/// A row holding an optional file path (empty: unset).
macro_rules! path {
    ($flag:literal, $help:literal, $($field:ident).+) => {
        Setting {
            flag: $flag,
            value_name: "FILE",
            help: $help,
            get: |d| d.$($field).+.as_ref().map(|p| p.display().to_string()).unwrap_or_default(),
            set: |d, v| {
                d.$($field).+ = (!v.is_empty()).then(|| PathBuf::from(v));
                Ok(())
            },
        }
    };
}

/// Every `treatyd` setting but `--config` (which names the file, so it cannot be in it).
pub const SETTINGS: &[Setting] = &[
    plain!(
        "listen",
        "ADDR",
        "Address to serve gRPC on (Coordinator, health, reflection).",
        listen
    ),
    Setting {
        flag: "admin-listen",
        value_name: "ADDR",
        help: "Address to serve the admin HTTP routes on: /metrics (Prometheus), /healthz, \
               /readyz and the web dashboard (/dashboard/, its API under /api/). Empty: off.",
        get: |d| d.admin_listen.map(|a| a.to_string()).unwrap_or_default(),
        set: |d, v| {
            d.admin_listen = if v.trim().is_empty() {
                None
            } else {
                Some(parse(v)?)
            };
            Ok(())
        },
    },
    Setting {
        flag: "data-dir",
        value_name: "DIR",
        help: "Directory of the durable transaction log; locked while treatyd runs.",
        get: |d| d.data_dir.display().to_string(),
        set: |d, v| {
            if v.is_empty() {
                return Err("must not be empty".into());
            }
            d.data_dir = PathBuf::from(v);
            Ok(())
        },
    },
    Setting {
        flag: "store",
        value_name: "URL",
        help: "Keep the transaction log in PostgreSQL at this URL \
               (postgres://USER[:PASSWORD]@HOST:PORT/DATABASE; tables are created on first \
               use; add ?sslmode=require and --store-ca for TLS) instead of sled in --data-dir. Coordinators of one database share \
               one log identity. Empty: sled. Not together with --data-dir.",
        get: |d| d.store.clone().unwrap_or_default(),
        set: |d, v| {
            let v = v.trim();
            d.store = if v.is_empty() {
                None
            } else {
                crate::log::postgres::parse_url(v)?;
                Some(v.to_string())
            };
            Ok(())
        },
    },
    path!(
        "store-ca",
        "With --store and sslmode=require in its URL: the CA (PEM) that signed the database \
         server's certificate; the connection is TLS, the certificate and host name checked \
         against it. Without sslmode=require the connection is plain TCP.",
        store_ca
    ),
    Setting {
        flag: "lease-ms",
        value_name: "MS",
        help: "With --store: how long a coordinator owns its transactions after its last \
               lease renewal (renewed every third of it). When it dies or is cut off, another \
               coordinator of the database takes them over after this. At least 300.",
        get: |d| d.lease.as_millis().to_string(),
        set: |d, v| {
            let ms = parse::<u64>(v)?;
            if ms < 300 {
                return Err("must be at least 300 (ms)".into());
            }
            d.lease = Duration::from_millis(ms);
            Ok(())
        },
    },
    plain!("log-format", "human|json", "Log output format.", log_format),
    Setting {
        flag: "log-level",
        value_name: "FILTER",
        help: "Log filter, in tracing's EnvFilter syntax (e.g. `info,treaty_coordinator=debug`).",
        get: |d| d.log_level.clone(),
        set: |d, v| {
            tracing_subscriber::EnvFilter::try_new(v).map_err(|e| e.to_string())?;
            d.log_level = v.to_string();
            Ok(())
        },
    },
    duration!(
        "default-deadline-ms",
        "MS",
        "Phase-one / forward-run deadline when a transaction sets none.",
        millis,
        config.default_deadline
    ),
    duration!(
        "max-deadline-ms",
        "MS",
        "Largest deadline a client may ask for.",
        millis,
        config.max_deadline
    ),
    duration!(
        "call-timeout-ms",
        "MS",
        "Timeout of one participant call.",
        millis,
        config.call_timeout
    ),
    duration!(
        "initial-backoff-ms",
        "MS",
        "Retry backoff bound after the first failed attempt; doubles per failed attempt up \
         to --max-backoff-ms, and each wait is uniform in [0, bound] (full jitter).",
        millis,
        config.initial_backoff
    ),
    duration!(
        "max-backoff-ms",
        "MS",
        "Backoff cap.",
        millis,
        config.max_backoff
    ),
    plain!(
        "stuck-after-attempts",
        "N",
        "Failed phase-two attempts after which a transaction is flagged stuck.",
        config.stuck_after_attempts
    ),
    duration!(
        "default-wait-ms",
        "MS",
        "Bound of Begin with `wait` when the client sets none.",
        millis,
        config.default_wait
    ),
    duration!(
        "max-wait-ms",
        "MS",
        "Largest wait a client may ask for (longer ones are capped).",
        millis,
        config.max_wait
    ),
    duration!(
        "retention-secs",
        "SECS",
        "How long finished transactions are kept.",
        secs,
        config.retention
    ),
    duration!(
        "gc-interval-secs",
        "SECS",
        "How often finished transactions past retention are collected.",
        secs,
        config.gc_interval
    ),
    duration!(
        "tombstone-retention-secs",
        "SECS",
        "How long the tombstone (gid, outcome) of a collected transaction is kept; until then \
         a Begin reusing the gid is answered from it.",
        secs,
        config.tombstone_retention
    ),
    duration!(
        "shutdown-grace-ms",
        "MS",
        "On SIGTERM/SIGINT, how long in-flight work may finish.",
        millis,
        config.shutdown_grace
    ),
    plain!(
        "max-branches",
        "N",
        "Most branches per transaction.",
        config.limits.max_branches
    ),
    plain!(
        "max-payload-bytes",
        "BYTES",
        "Largest payload (or compensation payload) of one branch.",
        config.limits.max_payload_bytes
    ),
    plain!(
        "max-tx-bytes",
        "BYTES",
        "Largest transaction (all payloads, handlers and endpoints).",
        config.limits.max_tx_bytes
    ),
    plain!(
        "max-gid-bytes",
        "BYTES",
        "Longest gid.",
        config.limits.max_gid_bytes
    ),
    plain!(
        "max-handler-bytes",
        "BYTES",
        "Longest handler name.",
        config.limits.max_handler_bytes
    ),
    plain!(
        "max-live-transactions",
        "N",
        "Live transactions at most; past it Begin answers RESOURCE_EXHAUSTED.",
        config.max_live_transactions
    ),
    plain!(
        "max-live-bytes",
        "BYTES",
        "Bytes of definitions live transactions may hold in memory; past it Begin answers \
         RESOURCE_EXHAUSTED.",
        config.max_live_bytes
    ),
    plain!(
        "max-begins-per-caller-per-sec",
        "N",
        "Begin calls a second each caller (its remote IP, or its authenticated identity) may \
         make, as many at once; past it that caller's Begin answers RESOURCE_EXHAUSTED while \
         others go on. 0: no per-caller limit.",
        config.max_begins_per_caller_per_sec
    ),
    plain!("cache-bytes", "BYTES", "sled page cache size.", cache_bytes),
    Setting {
        flag: "otlp-endpoint",
        value_name: "URL",
        help: "Export OpenTelemetry traces over OTLP/gRPC to this collector (e.g. \
               http://127.0.0.1:4317; plaintext http:// only): a span per transaction and per \
               branch call, continuing the client's trace (W3C traceparent) and passed on to \
               participants. Empty: no traces, nothing exported.",
        get: |d| d.otlp_endpoint.clone().unwrap_or_default(),
        set: |d, v| {
            let v = v.trim();
            if v.is_empty() {
                d.otlp_endpoint = None;
            } else {
                crate::otel::check_endpoint(v)?;
                d.otlp_endpoint = Some(v.to_string());
            }
            // Spans are made exactly when they are exported.
            d.config.traces = d.otlp_endpoint.is_some();
            Ok(())
        },
    },
    Setting {
        flag: "otlp-service-name",
        value_name: "NAME",
        help: "service.name of the spans exported with --otlp-endpoint.",
        get: |d| d.otlp_service_name.clone(),
        set: |d, v| {
            if v.trim().is_empty() {
                return Err("must not be empty".into());
            }
            d.otlp_service_name = v.trim().to_string();
            Ok(())
        },
    },
    Setting {
        flag: "advertise-url",
        value_name: "URL",
        help: "gRPC URI participants use to ask this coordinator about outcomes, sent with \
               every branch call. Unset: http://<listen address> (https:// with --tls-cert), unless it is 0.0.0.0 or [::].",
        get: |d| d.config.advertise_url.clone().unwrap_or_default(),
        set: |d, v| {
            d.config.advertise_url = (!v.is_empty()).then(|| v.to_string());
            Ok(())
        },
    },
    path!(
        "tls-cert",
        "Certificate chain (PEM) to serve the Coordinator API and the admin listener over \
         TLS with; needs --tls-key. Unset: plaintext.",
        config.security.tls_cert
    ),
    path!(
        "tls-key",
        "Private key (PEM) of --tls-cert.",
        config.security.tls_key
    ),
    path!(
        "tls-client-ca",
        "CA bundle (PEM): clients of the API and of the admin listener must present a \
         certificate it signed (mTLS).",
        config.security.tls_client_ca
    ),
    path!(
        "participant-ca",
        "CA bundle (PEM) that participants' certificates must chain to; needed for https:// \
         branch endpoints (refused without it).",
        config.security.participant_ca
    ),
    path!(
        "participant-client-cert",
        "Client certificate (PEM) presented to https:// participants (mTLS); needs \
         --participant-client-key.",
        config.security.participant_client_cert
    ),
    path!(
        "participant-client-key",
        "Private key (PEM) of --participant-client-cert.",
        config.security.participant_client_key
    ),
    path!(
        "auth-tokens",
        "Token file: lines `TOKEN = submit, read, operate` (or `cert-sha256:FINGERPRINT = \
         roles` for client certificates). Set, every API call must authenticate, and the \
         dashboard's API needs a bearer token (read; operate for retry and resolve); unset, \
         every caller may do everything (trusted networks only).",
        config.security.auth_tokens
    ),
    path!(
        "participant-token-file",
        "File holding the token sent as `authorization: Bearer` on every branch call, for \
         participants that require it.",
        config.security.participant_token_file
    ),
];

/// The `--config` flag (and `TREATY_CONFIG`): the TOML file, if any.
pub const CONFIG_FLAG: &str = "config";

/// The `treatyd` command line: one flag per [`SETTINGS`] row, plus `--config`. `--help`
/// shows each flag with its environment variable and default.
pub fn command() -> clap::Command {
    let mut cmd = clap::Command::new("treatyd")
        .version(env!("CARGO_PKG_VERSION"))
        .about(
            "Treaty coordinator daemon: drives distributed transactions (two-phase commit and \
             saga) to their end through crashes, restarts, timeouts and lost messages.",
        )
        .after_help(
            "Every option can also be set with the environment variable shown, or in the TOML \
             file given by --config (keys are the option names with '_' for '-', e.g. \
             `call_timeout_ms = 2000`; unknown keys are refused). Precedence: flag, then \
             environment, then file, then default.",
        )
        .arg(
            clap::Arg::new(CONFIG_FLAG)
                .long(CONFIG_FLAG)
                .value_name("FILE")
                .help("TOML configuration file. [env: TREATY_CONFIG]"),
        );
    for s in SETTINGS {
        let default = s.default_value();
        let default = if default.is_empty() {
            String::new()
        } else {
            format!(" [default: {default}]")
        };
        cmd = cmd.arg(
            clap::Arg::new(s.flag)
                .long(s.flag)
                .value_name(s.value_name)
                .help(format!("{} [env: {}]{default}", s.help, s.env())),
        );
    }
    cmd
}

impl Daemon {
    /// Settings from the command line `args` (without the program name), the environment
    /// (read through `env`, so tests need not touch the process's), the TOML file named by
    /// `--config` / `TREATY_CONFIG`, and the defaults, checked with [`Config::validate`].
    ///
    /// `Err` is a message for the operator; `--help`, `--version` and malformed command
    /// lines come back as clap's own error (which knows how to print and exit).
    pub fn load(
        args: impl IntoIterator<Item = OsString>,
        env: impl Fn(&str) -> Option<OsString>,
    ) -> Result<Daemon, LoadError> {
        let matches = command()
            .try_get_matches_from(std::iter::once(OsString::from("treatyd")).chain(args))
            .map_err(LoadError::Cli)?;
        // An empty variable is unset, as shells and container runtimes often leave them.
        let env = |name: &str| -> Result<Option<String>, LoadError> {
            match env(name) {
                None => Ok(None),
                Some(v) if v.is_empty() => Ok(None),
                Some(v) => v
                    .into_string()
                    .map(Some)
                    .map_err(|v| LoadError::Invalid(format!("{name}={v:?}: not valid UTF-8"))),
            }
        };
        let mut d = Daemon::default();
        let file = match matches.get_one::<String>(CONFIG_FLAG) {
            Some(f) => Some(PathBuf::from(f)),
            None => env("TREATY_CONFIG")?.map(PathBuf::from),
        };
        if let Some(path) = file {
            d.apply_file(&path).map_err(LoadError::Invalid)?;
        }
        for s in SETTINGS {
            if let Some(v) = env(&s.env())? {
                (s.set)(&mut d, &v)
                    .map_err(|e| LoadError::Invalid(format!("{}={v:?}: {e}", s.env())))?;
            }
        }
        for s in SETTINGS {
            if let Some(v) = matches.get_one::<String>(s.flag) {
                (s.set)(&mut d, v)
                    .map_err(|e| LoadError::Invalid(format!("--{} {v:?}: {e}", s.flag)))?;
            }
        }
        d.config.validate().map_err(LoadError::Invalid)?;
        if d.store.is_some() && d.data_dir != Daemon::default().data_dir {
            return Err(LoadError::Invalid(
                "--store and --data-dir both given: the log lives either in PostgreSQL \
                 (--store) or in sled (--data-dir); drop one"
                    .into(),
            ));
        }
        Ok(d)
    }

    fn apply_file(&mut self, path: &Path) -> Result<(), String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read config file {}: {e}", path.display()))?;
        let table: toml::Table =
            toml::from_str(&text).map_err(|e| format!("config file {}: {e}", path.display()))?;
        for (key, value) in table {
            let Some(s) = SETTINGS.iter().find(|s| s.key() == key) else {
                return Err(format!(
                    "config file {}: unknown setting `{key}`; known settings: {}",
                    path.display(),
                    SETTINGS
                        .iter()
                        .map(Setting::key)
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
            };
            let text = match &value {
                toml::Value::String(v) => v.clone(),
                toml::Value::Integer(v) => v.to_string(),
                other => {
                    return Err(format!(
                        "config file {}: `{key}` must be a string or an integer, got {}",
                        path.display(),
                        other.type_str()
                    ))
                }
            };
            (s.set)(self, &text)
                .map_err(|e| format!("config file {}: `{key} = {value}`: {e}", path.display()))?;
        }
        Ok(())
    }
}

/// Why [`Daemon::load`] gave no settings.
#[derive(Debug)]
pub enum LoadError {
    /// From clap: `--help`, `--version`, an unknown flag, a flag without its value. Print
    /// it with `exit()`, which also picks the exit status.
    Cli(clap::Error),
    /// A bad value or combination: the message names the setting and where it came from.
    Invalid(String),
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn load(args: &[&str], env: &[(&str, &str)]) -> Result<Daemon, String> {
        let env: HashMap<String, OsString> = env
            .iter()
            .map(|(k, v)| (k.to_string(), OsString::from(v)))
            .collect();
        Daemon::load(args.iter().map(OsString::from), |k| env.get(k).cloned()).map_err(
            |e| match e {
                LoadError::Cli(e) => e.to_string(),
                LoadError::Invalid(e) => e,
            },
        )
    }

    fn file(text: &str) -> (tempfile::TempDir, String) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("treaty.toml");
        std::fs::write(&path, text).unwrap();
        let path = path.display().to_string();
        (dir, path)
    }

    #[test]
    fn nothing_set_gives_the_defaults() {
        assert_eq!(load(&[], &[]).unwrap(), Daemon::default());
    }

    #[test]
    fn a_flag_beats_the_environment_beats_the_file_beats_the_default() {
        let (_dir, path) = file("call_timeout_ms = 1\nmax_branches = 2\nmax_gid_bytes = 3\n");
        let d = load(
            &["--config", &path, "--call-timeout-ms", "10"],
            &[
                ("TREATY_CALL_TIMEOUT_MS", "20"),
                ("TREATY_MAX_BRANCHES", "30"),
            ],
        )
        .unwrap();
        assert_eq!(d.config.call_timeout, Duration::from_millis(10), "flag");
        assert_eq!(d.config.limits.max_branches, 30, "environment");
        assert_eq!(d.config.limits.max_gid_bytes, 3, "file");
        assert_eq!(d.config.max_wait, Config::default().max_wait, "default");
        // The file may also be named by the environment.
        let d = load(&[], &[("TREATY_CONFIG", &path)]).unwrap();
        assert_eq!(d.config.limits.max_branches, 2);
    }

    const SETTINGS_PATHS: [&str; 9] = [
        "store-ca",
        "tls-cert",
        "tls-key",
        "tls-client-ca",
        "participant-ca",
        "participant-client-cert",
        "participant-client-key",
        "auth-tokens",
        "participant-token-file",
    ];

    #[test]
    fn every_setting_reads_the_same_from_each_source() {
        // Each setting, set to a non-default value that passes validation, from each source.
        // `store` excludes `data-dir`: it has its own test below.
        let values: Vec<(&Setting, String)> = SETTINGS
            .iter()
            .filter(|s| s.flag != "store")
            .map(|s| {
                let v = match s.flag {
                    "listen" => "127.0.0.1:9".to_string(),
                    "admin-listen" => "127.0.0.1:10".into(),
                    "data-dir" => "/tmp/x".into(),
                    "log-format" => "json".into(),
                    "log-level" => "debug".into(),
                    "advertise-url" => "http://10.0.0.1:7".into(),
                    "max-gid-bytes" | "max-handler-bytes" => "100".into(),
                    "max-deadline-ms" => "90000000".into(),
                    "tombstone-retention-secs" => "7776001".into(),
                    "max-wait-ms" => "300001".into(),
                    "max-backoff-ms" => "30001".into(),
                    "otlp-endpoint" => "http://127.0.0.1:4317".into(),
                    "otlp-service-name" => "treatyd-eu-1".into(),
                    // Paths are only read when serving; load() checks that they go together.
                    f if SETTINGS_PATHS.contains(&f) => format!("/etc/treaty/{f}.pem"),
                    _ => (s.default_value().parse::<u64>().unwrap() + 1).to_string(),
                };
                (s, v)
            })
            .collect();
        let mut args = Vec::new();
        let mut env = Vec::new();
        let mut toml = String::new();
        for (s, v) in &values {
            args.push(format!("--{}", s.flag));
            args.push(v.clone());
            env.push((s.env(), v.clone()));
            toml.push_str(&format!("{} = {:?}\n", s.key(), v));
        }
        let (_dir, path) = file(&toml);
        let env_ref: Vec<(&str, &str)> = env.iter().map(|(k, v)| (&k[..], &v[..])).collect();
        let args_ref: Vec<&str> = args.iter().map(|a| &a[..]).collect();
        let from_flags = load(&args_ref, &[]).unwrap();
        let from_env = load(&[], &env_ref).unwrap();
        let from_file = load(&["--config", &path], &[]).unwrap();
        assert_eq!(from_flags, from_env);
        assert_eq!(from_flags, from_file);
        for (s, v) in &values {
            assert_eq!(&(s.get)(&from_flags), v, "{}", s.flag);
            assert_ne!((s.get)(&from_flags), s.default_value(), "{}", s.flag);
        }
    }

    #[test]
    fn store_takes_a_postgres_url_from_each_source_and_excludes_data_dir() {
        let url = "postgres://treaty@127.0.0.1:5432/treaty";
        assert_eq!(
            load(&["--store", url], &[]).unwrap().store.as_deref(),
            Some(url)
        );
        assert_eq!(
            load(&[], &[("TREATY_STORE", url)])
                .unwrap()
                .store
                .as_deref(),
            Some(url)
        );
        let (_dir, path) = file(&format!("store = {url:?}\n"));
        assert_eq!(
            load(&["--config", &path], &[]).unwrap().store.as_deref(),
            Some(url)
        );
        assert_eq!(load(&[], &[]).unwrap().store, None, "sled by default");
        let err = load(&["--store", "mysql://x/y"], &[]).unwrap_err();
        assert!(
            err.starts_with("--store \"mysql://x/y\": ") && err.contains("not a PostgreSQL URL"),
            "{err}"
        );
        let err = load(&["--store", "postgres://u@h:notaport/db"], &[]).unwrap_err();
        assert!(err.contains("bad PostgreSQL URL"), "{err}");
        let err = load(&["--store", url, "--data-dir", "/tmp/x"], &[]).unwrap_err();
        assert!(err.contains("--store and --data-dir both given"), "{err}");
    }

    #[test]
    fn lease_ms_is_read_and_a_too_short_lease_is_refused() {
        assert_eq!(
            load(&["--lease-ms", "1500"], &[]).unwrap().lease,
            Duration::from_millis(1500)
        );
        assert_eq!(
            load(&[], &[]).unwrap().lease,
            crate::log::postgres::DEFAULT_LEASE
        );
        let err = load(&[], &[("TREATY_LEASE_MS", "100")]).unwrap_err();
        assert!(err.contains("at least 300"), "{err}");
    }

    #[test]
    fn an_unknown_file_key_is_refused_by_name() {
        let (_dir, path) = file("call_timeout_ms = 5\nno_such_setting = 1\n");
        let err = load(&["--config", &path], &[]).unwrap_err();
        assert!(
            err.contains("unknown setting `no_such_setting`") && err.contains("call_timeout_ms"),
            "{err}"
        );
    }

    #[test]
    fn bad_values_name_the_setting_and_the_source() {
        let err = load(&["--call-timeout-ms", "soon"], &[]).unwrap_err();
        assert!(
            err.starts_with("--call-timeout-ms \"soon\": invalid digit"),
            "{err}"
        );
        let err = load(&[], &[("TREATY_MAX_BRANCHES", "-1")]).unwrap_err();
        assert!(
            err.starts_with("TREATY_MAX_BRANCHES=\"-1\": invalid digit"),
            "{err}"
        );
        let (_dir, path) = file("log_format = \"xml\"\n");
        let err = load(&["--config", &path], &[]).unwrap_err();
        assert!(
            err.contains("`log_format = \"xml\"`: must be `human` or `json`"),
            "{err}"
        );
        let (_dir, path) = file("max_branches = [1]\n");
        let err = load(&["--config", &path], &[]).unwrap_err();
        assert!(
            err.contains("`max_branches` must be a string or an integer"),
            "{err}"
        );
        let err = load(&["--log-level", "[[["], &[]).unwrap_err();
        assert!(err.starts_with("--log-level"), "{err}");
        let err = load(&["--otlp-endpoint", "https://c:4317"], &[]).unwrap_err();
        assert!(
            err.starts_with("--otlp-endpoint \"https://c:4317\": https:// is not supported"),
            "{err}"
        );
        // A combination is checked once every source is applied.
        let err = load(&["--call-timeout-ms", "0"], &[]).unwrap_err();
        assert_eq!(err, "call-timeout must be greater than zero");
        let err = load(&["--config", "/no/such/file.toml"], &[]).unwrap_err();
        assert!(
            err.starts_with("cannot read config file /no/such/file.toml"),
            "{err}"
        );
    }

    #[test]
    fn help_documents_every_setting_with_its_env_var_and_default() {
        let help = command().render_long_help().to_string();
        for s in SETTINGS {
            assert!(
                help.contains(&format!("--{} <{}>", s.flag, s.value_name)),
                "{}",
                s.flag
            );
            assert!(help.contains(&format!("[env: {}]", s.env())), "{}", s.flag);
            let default = s.default_value();
            if !default.is_empty() {
                assert!(
                    help.contains(&format!("[default: {default}]")),
                    "{} default {default}",
                    s.flag
                );
            }
        }
        assert!(help.contains("--config <FILE>") && help.contains("[env: TREATY_CONFIG]"));
    }

    #[test]
    fn spans_are_made_exactly_when_an_otlp_endpoint_is_set() {
        assert!(!load(&[], &[]).unwrap().config.traces);
        let d = load(&[], &[("TREATY_OTLP_ENDPOINT", "http://127.0.0.1:4317")]).unwrap();
        assert!(d.config.traces);
        assert_eq!(d.otlp_service_name, "treatyd");
        // A flag that empties it wins over the environment, and turns spans off again.
        let d = load(
            &["--otlp-endpoint", ""],
            &[("TREATY_OTLP_ENDPOINT", "http://127.0.0.1:4317")],
        )
        .unwrap();
        assert!(!d.config.traces && d.otlp_endpoint.is_none());
    }

    #[test]
    fn flags_and_keys_are_unique() {
        let mut seen = std::collections::HashSet::new();
        for s in SETTINGS {
            assert!(seen.insert(s.flag), "{} defined twice", s.flag);
            assert_ne!(s.flag, CONFIG_FLAG);
        }
    }
}
