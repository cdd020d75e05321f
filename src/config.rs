//! Configuration: `config/default.toml`, then `config/{IMPORTD_ENV}.toml`
//! (default `local`), then `IMPORTD__SECTION__KEY` environment variables.
//!
//! The files are deserialised into raw structs, then validated once into the
//! typed [`Settings`] (durations, non-zero counts, enums). An invalid value
//! fails start-up with an [`Error`] naming its key. Secrets are
//! [`SecretString`]s: they never reach a log line or `Debug` output, and
//! [`Settings::masked`] is the only way the configuration is printed.
//!
//! This module reads files and the environment and nothing else.

use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroUsize};
use std::path::{Path, PathBuf};
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

/// A configuration problem; the message names the key.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read or a value has the wrong type.
    #[error("configuration: {0}")]
    Load(#[from] config::ConfigError),
    /// A value has the right type but is not acceptable.
    #[error("configuration key `{key}`: {message}")]
    Invalid {
        /// Dotted key, e.g. `scheduler.lease_seconds`.
        key: &'static str,
        /// What is wrong and what is accepted.
        message: String,
    },
}

/// Result alias of this layer.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Shortest `app_secret` accepted when tokens are verified or minted.
pub const MIN_APP_SECRET_CHARS: usize = 16;

fn invalid(key: &'static str, message: impl Into<String>) -> Error {
    Error::Invalid {
        key,
        message: message.into(),
    }
}

// ---------------------------------------------------------------------------
// Raw shape of the files.

#[derive(Deserialize)]
struct Raw {
    app_secret: SecretString,
    mongodb: RawMongo,
    s3: RawS3,
    smtp: RawSmtp,
    scheduler: RawScheduler,
    import: RawImport,
    notify: RawNotify,
    retention: RawRetention,
    http: RawHttp,
    crm: RawCrm,
    log: RawLog,
}

#[derive(Deserialize)]
struct RawMongo {
    uri: SecretString,
    database: String,
}

#[derive(Deserialize)]
struct RawS3 {
    endpoint: String,
    region: String,
    bucket: String,
    access_key: SecretString,
    secret_key: SecretString,
    path_style: bool,
    request_timeout_seconds: u64,
    stream_timeout_seconds: u64,
}

#[derive(Deserialize)]
struct RawSmtp {
    host: String,
    port: u16,
    username: String,
    password: SecretString,
    tls: String,
    from: String,
    timeout_seconds: u64,
}

#[derive(Deserialize)]
struct RawScheduler {
    tick: String,
    lease_seconds: u64,
    max_concurrent_imports: usize,
    max_attempts: u32,
    rescue_interval_seconds: u64,
    shutdown_grace_seconds: u64,
}

#[derive(Deserialize)]
struct RawImport {
    batch_size: usize,
    writers: usize,
    channel_batches: usize,
    contact_cache: usize,
    max_file_bytes: u64,
    max_rows: u64,
    max_field_chars: usize,
    max_new_stages: usize,
    number_locale: String,
    date_order: String,
    progress_interval_ms: u64,
}

#[derive(Deserialize)]
struct RawNotify {
    report_link_days: u64,
    retry_attempts: usize,
    retry_min_delay_ms: u64,
    retry_max_delay_ms: u64,
    redeliver_after_seconds: u64,
    rescue_grace_seconds: u64,
    max_rounds: u32,
}

#[derive(Deserialize)]
struct RawRetention {
    days: u32,
    sweep_interval_seconds: u64,
}

#[derive(Deserialize)]
struct RawHttp {
    enabled: bool,
    bind: String,
}

#[derive(Deserialize)]
struct RawCrm {
    webhook_url: String,
}

#[derive(Deserialize)]
struct RawLog {
    format: String,
    filter: String,
}

// ---------------------------------------------------------------------------
// Validated settings.

/// The daemon's whole configuration, validated.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Name of the environment file that was applied (`local`, `production`).
    pub env: String,
    /// HS256 key shared with the dashboard (status API, webhook token).
    pub app_secret: SecretString,
    /// MongoDB connection.
    pub mongodb: MongoSettings,
    /// Object storage.
    pub s3: S3Settings,
    /// Outgoing mail.
    pub smtp: SmtpSettings,
    /// Claiming and leases.
    pub scheduler: SchedulerSettings,
    /// The import pipeline.
    pub import: ImportSettings,
    /// Summary email, error report link, webhook delivery.
    pub notify: NotifySettings,
    /// How long an import's per-line data is kept.
    pub retention: RetentionSettings,
    /// Health, metrics and status API listener.
    pub http: HttpSettings,
    /// CRM integration.
    pub crm: CrmSettings,
    /// Logging.
    pub log: LogSettings,
}

/// MongoDB connection.
#[derive(Clone, Debug)]
pub struct MongoSettings {
    /// Connection string; secret because it may carry a password.
    pub uri: SecretString,
    /// Database holding `queues`, `deals` and the rest.
    pub database: String,
}

/// S3-compatible object storage.
#[derive(Clone, Debug)]
pub struct S3Settings {
    /// e.g. `http://127.0.0.1:9000` or `https://s3.wasabisys.com`.
    pub endpoint: String,
    /// Signing region; must equal the server's.
    pub region: String,
    /// Bucket of uploads and error reports.
    pub bucket: String,
    /// Access key id.
    pub access_key: SecretString,
    /// Secret access key.
    pub secret_key: SecretString,
    /// Path-style addressing (`endpoint/bucket/key`) instead of virtual hosts.
    pub path_style: bool,
    /// Timeout of one ordinary request.
    pub request_timeout: Duration,
    /// Timeout of one streaming GET (covers the whole body).
    pub stream_timeout: Duration,
}

/// How the SMTP connection is secured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SmtpTls {
    /// Plain text (local catcher only).
    None,
    /// Plain connection upgraded with STARTTLS.
    StartTls,
    /// TLS from the first byte (port 465).
    Tls,
}

/// Outgoing mail.
#[derive(Clone, Debug)]
pub struct SmtpSettings {
    /// Server host name.
    pub host: String,
    /// Server port.
    pub port: u16,
    /// Login; `None` when no AUTH is used.
    pub username: Option<String>,
    /// Password for `username`.
    pub password: SecretString,
    /// Transport security.
    pub tls: SmtpTls,
    /// `From:` mailbox, e.g. `CRM Imports <imports@example.com>`.
    pub from: String,
    /// Timeout of one SMTP conversation.
    pub timeout: Duration,
}

/// Claiming and leases.
#[derive(Clone, Debug)]
pub struct SchedulerSettings {
    /// Cron expression (with seconds) of the claim tick.
    pub tick: String,
    /// Lease of a claimed import; renewed every third of it.
    pub lease: Duration,
    /// Imports one daemon runs at once.
    pub max_concurrent_imports: NonZeroUsize,
    /// Claims after which an import fails with `too_many_attempts`.
    pub max_attempts: u32,
    /// Interval of the expired-lease rescue.
    pub rescue_interval: Duration,
    /// Time allowed on SIGTERM to checkpoint and release leases.
    pub shutdown_grace: Duration,
}

/// Decimal separator of numbers in CSV cells.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NumberLocale {
    /// `5,000.50`
    Dot,
    /// `5.000,50`
    Comma,
}

/// Order of day and month in numeric dates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DateOrder {
    /// 31/12/2025
    Dmy,
    /// 12/31/2025
    Mdy,
}

impl DateOrder {
    /// The last day of 2025, written in this order.
    pub fn example(self) -> &'static str {
        match self {
            Self::Dmy => "31/12/2025",
            Self::Mdy => "12/31/2025",
        }
    }
}

/// The import pipeline.
#[derive(Clone, Debug)]
pub struct ImportSettings {
    /// Rows per bulk write.
    pub batch_size: NonZeroUsize,
    /// Bulk writes in flight per import.
    pub writers: NonZeroUsize,
    /// Batches buffered between parser and writers.
    pub channel_batches: NonZeroUsize,
    /// Emails whose contact id one import keeps at hand.
    pub contact_cache: NonZeroUsize,
    /// Largest accepted object (bytes); `None` = no limit.
    pub max_file_bytes: Option<u64>,
    /// Most accepted data rows; `None` = no limit.
    pub max_rows: Option<u64>,
    /// Longest accepted field value, in characters.
    pub max_field_chars: usize,
    /// New pipeline stages one import may create.
    pub max_new_stages: usize,
    /// Decimal separator of `value`.
    pub number_locale: NumberLocale,
    /// Day/month order of numeric dates.
    pub date_order: DateOrder,
    /// Least time between two progress updates of one import.
    pub progress_interval: Duration,
}

/// Summary email, error report link and webhook delivery.
#[derive(Clone, Debug)]
pub struct NotifySettings {
    /// Validity of the report's presigned link.
    pub report_link: Duration,
    /// Tries in one delivery round.
    pub retry_attempts: usize,
    /// First backoff of a round.
    pub retry_min_delay: Duration,
    /// Largest backoff of a round.
    pub retry_max_delay: Duration,
    /// Pause between two rounds.
    pub redeliver_after: Duration,
    /// Rounds before the failure is final.
    pub max_rounds: u32,
    /// Wait before a round whose sender went quiet is claimed again.
    pub rescue_grace: Duration,
}

/// How long an import's per-line data (outcomes, before images, the
/// summary's failed lines, the error report) is kept after it ends.
#[derive(Clone, Debug)]
pub struct RetentionSettings {
    /// Days after `completed_at` (`None`: kept for ever).
    pub days: Option<NonZeroU32>,
    /// How often imports past it are looked for.
    pub sweep_interval: Duration,
}

/// HTTP listener.
#[derive(Clone, Debug)]
pub struct HttpSettings {
    /// Whether the listener runs.
    pub enabled: bool,
    /// Address to bind; port 0 picks a free port.
    pub bind: SocketAddr,
}

/// CRM integration.
#[derive(Clone)]
pub struct CrmSettings {
    /// Completion webhook; `None` = off. Its path and query may carry a
    /// secret, so it is only ever shown masked (scheme, host and port).
    pub webhook_url: Option<String>,
}

impl std::fmt::Debug for CrmSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CrmSettings")
            .field("webhook_url", &self.webhook_url.as_deref().map(mask_url))
            .finish()
    }
}

/// Log output format.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    /// One JSON object per line (journald).
    Json,
    /// Human-readable.
    Pretty,
}

/// Logging.
#[derive(Clone, Debug)]
pub struct LogSettings {
    /// Output format.
    pub format: LogFormat,
    /// `EnvFilter` directive.
    pub filter: String,
}

/// Where the configuration files are and which environment file applies.
#[derive(Clone, Debug)]
pub struct Source {
    /// Directory holding `default.toml` and the environment files.
    pub dir: PathBuf,
    /// Environment file name without `.toml`.
    pub env: String,
}

impl Source {
    /// `IMPORTD_CONFIG_DIR` (default `./config`) and `IMPORTD_ENV`
    /// (default `local`).
    pub fn from_env() -> Self {
        Self {
            dir: std::env::var_os("IMPORTD_CONFIG_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("config")),
            env: std::env::var("IMPORTD_ENV").unwrap_or_else(|_| "local".to_owned()),
        }
    }

    /// Like [`Source::from_env`], with an explicit directory.
    pub fn with_dir(dir: impl AsRef<Path>) -> Self {
        Self {
            dir: dir.as_ref().to_owned(),
            ..Self::from_env()
        }
    }
}

impl Settings {
    /// Loads files and `IMPORTD__…` environment variables, then validates.
    pub fn load(source: &Source) -> Result<Self> {
        let default = source.dir.join("default.toml");
        if !default.is_file() {
            return Err(invalid(
                "IMPORTD_CONFIG_DIR",
                format!("{} not found", default.display()),
            ));
        }
        let env_file = source.dir.join(format!("{}.toml", source.env));
        if !env_file.is_file() {
            return Err(invalid(
                "IMPORTD_ENV",
                format!("no environment file {}", env_file.display()),
            ));
        }
        let raw: Raw = config::Config::builder()
            .add_source(config::File::from(default))
            .add_source(config::File::from(env_file))
            .add_source(
                config::Environment::with_prefix("IMPORTD")
                    .prefix_separator("__")
                    .separator("__")
                    .try_parsing(false),
            )
            .build()?
            .try_deserialize()?;
        Self::validate(raw, source.env.clone())
    }

    fn validate(raw: Raw, env: String) -> Result<Self> {
        let positive = |key: &'static str, v: usize| {
            NonZeroUsize::new(v).ok_or_else(|| invalid(key, "must be at least 1"))
        };
        let smtp_tls = match raw.smtp.tls.as_str() {
            "none" => SmtpTls::None,
            "starttls" => SmtpTls::StartTls,
            "tls" => SmtpTls::Tls,
            other => {
                return Err(invalid(
                    "smtp.tls",
                    format!("`{other}` is not one of none, starttls, tls"),
                ));
            }
        };
        if raw.smtp.from.parse::<lettre::message::Mailbox>().is_err() {
            return Err(invalid(
                "smtp.from",
                "not a mailbox like `Name <user@example.com>`",
            ));
        }
        if raw.scheduler.lease_seconds < 3 {
            return Err(invalid("scheduler.lease_seconds", "must be at least 3"));
        }
        if raw.scheduler.max_attempts == 0 {
            return Err(invalid("scheduler.max_attempts", "must be at least 1"));
        }
        validate_cron(&raw.scheduler.tick)?;
        if raw.import.batch_size > 10_000 {
            // One outcome document per batch must stay far below 16 MB.
            return Err(invalid("import.batch_size", "must be at most 10000"));
        }
        if raw.import.max_field_chars == 0 {
            return Err(invalid("import.max_field_chars", "must be at least 1"));
        }
        if !(1..=1000).contains(&raw.import.max_new_stages) {
            // Their labels are listed on the queue document.
            return Err(invalid("import.max_new_stages", "must be from 1 to 1000"));
        }
        let number_locale = match raw.import.number_locale.as_str() {
            "dot" => NumberLocale::Dot,
            "comma" => NumberLocale::Comma,
            other => {
                return Err(invalid(
                    "import.number_locale",
                    format!("`{other}` is not one of dot, comma"),
                ));
            }
        };
        let date_order = match raw.import.date_order.as_str() {
            "dmy" => DateOrder::Dmy,
            "mdy" => DateOrder::Mdy,
            other => {
                return Err(invalid(
                    "import.date_order",
                    format!("`{other}` is not one of dmy, mdy"),
                ));
            }
        };
        let bind = raw.http.bind.parse().map_err(|_| {
            invalid(
                "http.bind",
                format!("`{}` is not an address like 127.0.0.1:8080", raw.http.bind),
            )
        })?;
        let webhook_url = match raw.crm.webhook_url.trim() {
            "" => None,
            url => Some(webhook_url(url).map_err(|why| invalid("crm.webhook_url", why))?),
        };
        // The status API verifies dashboard tokens and the webhook signs
        // its own with this key: an empty or short one would let anyone
        // mint a valid token.
        if (raw.http.enabled || webhook_url.is_some())
            && raw.app_secret.expose_secret().chars().count() < MIN_APP_SECRET_CHARS
        {
            return Err(invalid(
                "app_secret",
                format!(
                    "must be at least {MIN_APP_SECRET_CHARS} characters when http.enabled or crm.webhook_url is set"
                ),
            ));
        }
        if !(raw.s3.endpoint.starts_with("http://") || raw.s3.endpoint.starts_with("https://")) {
            return Err(invalid("s3.endpoint", "must be an http(s) URL"));
        }
        if raw.s3.bucket.is_empty() {
            return Err(invalid("s3.bucket", "must not be empty"));
        }
        if raw.mongodb.database.is_empty() {
            return Err(invalid("mongodb.database", "must not be empty"));
        }
        if !(1..=7).contains(&raw.notify.report_link_days) {
            return Err(invalid(
                "notify.report_link_days",
                "must be 1 to 7 (S3 presigned URL limit)",
            ));
        }
        if raw.retention.days > 36_500 {
            return Err(invalid(
                "retention.days",
                "must be 0 (keep for ever) to 36500",
            ));
        }
        if raw.retention.days != 0 && u64::from(raw.retention.days) < raw.notify.report_link_days {
            return Err(invalid(
                "retention.days",
                "must be 0 or at least notify.report_link_days (the error report an email links is kept until its link expires)",
            ));
        }
        if raw.retention.sweep_interval_seconds == 0 {
            return Err(invalid(
                "retention.sweep_interval_seconds",
                "must be at least 1",
            ));
        }
        let format = match raw.log.format.as_str() {
            "json" => LogFormat::Json,
            "pretty" => LogFormat::Pretty,
            other => {
                return Err(invalid(
                    "log.format",
                    format!("`{other}` is not one of json, pretty"),
                ));
            }
        };
        let nonzero = |v: u64| (v > 0).then_some(v);
        Ok(Self {
            env,
            app_secret: raw.app_secret,
            mongodb: MongoSettings {
                uri: raw.mongodb.uri,
                database: raw.mongodb.database,
            },
            s3: S3Settings {
                endpoint: raw.s3.endpoint.trim_end_matches('/').to_owned(),
                region: raw.s3.region,
                bucket: raw.s3.bucket,
                access_key: raw.s3.access_key,
                secret_key: raw.s3.secret_key,
                path_style: raw.s3.path_style,
                request_timeout: Duration::from_secs(raw.s3.request_timeout_seconds.max(1)),
                stream_timeout: Duration::from_secs(raw.s3.stream_timeout_seconds.max(1)),
            },
            smtp: SmtpSettings {
                host: raw.smtp.host,
                port: raw.smtp.port,
                username: Some(raw.smtp.username).filter(|u| !u.is_empty()),
                password: raw.smtp.password,
                tls: smtp_tls,
                from: raw.smtp.from,
                timeout: Duration::from_secs(raw.smtp.timeout_seconds.max(1)),
            },
            scheduler: SchedulerSettings {
                tick: raw.scheduler.tick,
                lease: Duration::from_secs(raw.scheduler.lease_seconds),
                max_concurrent_imports: positive(
                    "scheduler.max_concurrent_imports",
                    raw.scheduler.max_concurrent_imports,
                )?,
                max_attempts: raw.scheduler.max_attempts,
                rescue_interval: Duration::from_secs(raw.scheduler.rescue_interval_seconds.max(1)),
                shutdown_grace: Duration::from_secs(raw.scheduler.shutdown_grace_seconds),
            },
            import: ImportSettings {
                batch_size: positive("import.batch_size", raw.import.batch_size)?,
                writers: positive("import.writers", raw.import.writers)?,
                channel_batches: positive("import.channel_batches", raw.import.channel_batches)?,
                contact_cache: positive("import.contact_cache", raw.import.contact_cache)?,
                max_file_bytes: nonzero(raw.import.max_file_bytes),
                max_rows: nonzero(raw.import.max_rows),
                max_field_chars: raw.import.max_field_chars,
                max_new_stages: raw.import.max_new_stages,
                number_locale,
                date_order,
                progress_interval: Duration::from_millis(raw.import.progress_interval_ms),
            },
            notify: NotifySettings {
                report_link: Duration::from_secs(raw.notify.report_link_days * 86_400),
                retry_attempts: raw.notify.retry_attempts,
                retry_min_delay: Duration::from_millis(raw.notify.retry_min_delay_ms),
                retry_max_delay: Duration::from_millis(raw.notify.retry_max_delay_ms),
                redeliver_after: Duration::from_secs(raw.notify.redeliver_after_seconds),
                rescue_grace: Duration::from_secs(raw.notify.rescue_grace_seconds),
                max_rounds: raw.notify.max_rounds.max(1),
            },
            retention: RetentionSettings {
                days: NonZeroU32::new(raw.retention.days),
                sweep_interval: Duration::from_secs(raw.retention.sweep_interval_seconds),
            },
            http: HttpSettings {
                enabled: raw.http.enabled,
                bind,
            },
            crm: CrmSettings { webhook_url },
            log: LogSettings {
                format,
                filter: raw.log.filter,
            },
        })
    }

    /// The effective configuration as TOML, every secret masked.
    pub fn masked(&self) -> String {
        fn secret(s: &SecretString) -> &'static str {
            if s.expose_secret().is_empty() {
                "\"\" # (not set)"
            } else {
                "\"********\""
            }
        }
        let opt = |v: Option<u64>| v.map_or_else(|| "0 # (no limit)".to_owned(), |v| v.to_string());
        format!(
            r#"# environment: {env}
app_secret = {app_secret}

[mongodb]
uri = "{uri}"
database = "{database}"

[s3]
endpoint = "{endpoint}"
region = "{region}"
bucket = "{bucket}"
access_key = {access_key}
secret_key = {secret_key}
path_style = {path_style}
request_timeout_seconds = {req_timeout}
stream_timeout_seconds = {stream_timeout}

[smtp]
host = "{smtp_host}"
port = {smtp_port}
username = "{smtp_user}"
password = {smtp_password}
tls = "{smtp_tls}"
from = "{smtp_from}"
timeout_seconds = {smtp_timeout}

[scheduler]
tick = "{tick}"
lease_seconds = {lease}
max_concurrent_imports = {max_concurrent}
max_attempts = {max_attempts}
rescue_interval_seconds = {rescue}
shutdown_grace_seconds = {grace}

[import]
batch_size = {batch_size}
writers = {writers}
channel_batches = {channel_batches}
contact_cache = {contact_cache}
max_file_bytes = {max_file_bytes}
max_rows = {max_rows}
max_field_chars = {max_field_chars}
max_new_stages = {max_new_stages}
number_locale = "{number_locale}"
date_order = "{date_order}"
progress_interval_ms = {progress_ms}

[notify]
report_link_days = {link_days}
retry_attempts = {n_attempts}
retry_min_delay_ms = {n_min}
retry_max_delay_ms = {n_max}
redeliver_after_seconds = {n_redeliver}
max_rounds = {n_rounds}
rescue_grace_seconds = {n_grace}

[retention]
days = {retention_days}
sweep_interval_seconds = {retention_sweep}

[http]
enabled = {http_enabled}
bind = "{http_bind}"

[crm]
webhook_url = "{webhook}"

[log]
format = "{log_format}"
filter = "{log_filter}"
"#,
            env = self.env,
            app_secret = secret(&self.app_secret),
            uri = mask_uri(self.mongodb.uri.expose_secret()),
            database = self.mongodb.database,
            endpoint = self.s3.endpoint,
            region = self.s3.region,
            bucket = self.s3.bucket,
            access_key = secret(&self.s3.access_key),
            secret_key = secret(&self.s3.secret_key),
            path_style = self.s3.path_style,
            req_timeout = self.s3.request_timeout.as_secs(),
            stream_timeout = self.s3.stream_timeout.as_secs(),
            smtp_host = self.smtp.host,
            smtp_port = self.smtp.port,
            smtp_user = self.smtp.username.as_deref().unwrap_or(""),
            smtp_password = secret(&self.smtp.password),
            smtp_tls = match self.smtp.tls {
                SmtpTls::None => "none",
                SmtpTls::StartTls => "starttls",
                SmtpTls::Tls => "tls",
            },
            smtp_from = self.smtp.from,
            smtp_timeout = self.smtp.timeout.as_secs(),
            tick = self.scheduler.tick,
            lease = self.scheduler.lease.as_secs(),
            max_concurrent = self.scheduler.max_concurrent_imports,
            max_attempts = self.scheduler.max_attempts,
            rescue = self.scheduler.rescue_interval.as_secs(),
            grace = self.scheduler.shutdown_grace.as_secs(),
            batch_size = self.import.batch_size,
            writers = self.import.writers,
            channel_batches = self.import.channel_batches,
            contact_cache = self.import.contact_cache,
            max_file_bytes = opt(self.import.max_file_bytes),
            max_rows = opt(self.import.max_rows),
            max_field_chars = self.import.max_field_chars,
            max_new_stages = self.import.max_new_stages,
            number_locale = match self.import.number_locale {
                NumberLocale::Dot => "dot",
                NumberLocale::Comma => "comma",
            },
            date_order = match self.import.date_order {
                DateOrder::Dmy => "dmy",
                DateOrder::Mdy => "mdy",
            },
            progress_ms = self.import.progress_interval.as_millis(),
            link_days = self.notify.report_link.as_secs() / 86_400,
            n_attempts = self.notify.retry_attempts,
            n_min = self.notify.retry_min_delay.as_millis(),
            n_max = self.notify.retry_max_delay.as_millis(),
            n_redeliver = self.notify.redeliver_after.as_secs(),
            n_grace = self.notify.rescue_grace.as_secs(),
            n_rounds = self.notify.max_rounds,
            retention_days = self
                .retention
                .days
                .map_or_else(|| "0 # (kept for ever)".to_owned(), |d| d.to_string()),
            retention_sweep = self.retention.sweep_interval.as_secs(),
            http_enabled = self.http.enabled,
            http_bind = self.http.bind,
            webhook = self
                .crm
                .webhook_url
                .as_deref()
                .map(mask_url)
                .unwrap_or_default(),
            log_format = match self.log.format {
                LogFormat::Json => "json",
                LogFormat::Pretty => "pretty",
            },
            log_filter = self.log.filter,
        )
    }
}

fn validate_cron(expr: &str) -> Result<()> {
    // Same parser and options as tokio-cron-scheduler, so what passes here
    // schedules there.
    croner::parser::CronParser::builder()
        .seconds(croner::parser::Seconds::Required)
        .build()
        .parse(expr)
        .map(|_| ())
        .map_err(|e| {
            invalid(
                "scheduler.tick",
                format!("`{expr}` is not a cron expression with seconds ({e})"),
            )
        })
}

/// Masks the credentials of a connection URI: the password of
/// `scheme://user:password@host`, and the values of query options that
/// carry a secret (`tlsCertificateKeyFilePassword`,
/// `authMechanismProperties` with its session token, ...).
fn mask_uri(uri: &str) -> String {
    let (base, query) = match uri.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (uri, None),
    };
    let mut masked = mask_userinfo(base);
    if let Some(query) = query {
        let options: Vec<String> = query
            .split('&')
            .map(|option| match option.split_once('=') {
                Some((key, _)) if secret_option(key) => format!("{key}=********"),
                _ => option.to_owned(),
            })
            .collect();
        masked.push('?');
        masked.push_str(&options.join("&"));
    }
    masked
}

/// Whether a URI query option's value is a credential.
fn secret_option(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    [
        "password",
        "secret",
        "token",
        "credential",
        "authmechanismproperties",
    ]
    .iter()
    .any(|s| key.contains(s))
}

/// `scheme://userinfo@rest` split in three, if the URI has a userinfo.
/// The userinfo ends at the last `@` (as the MongoDB driver reads it): a
/// password with an unescaped `/` or `@` is still all userinfo. `uri` is
/// the part before any `?`.
fn userinfo(uri: &str) -> Option<(&str, &str, &str)> {
    let (scheme, rest) = uri.split_once("://")?;
    let at = rest.rfind('@')?;
    Some((scheme, &rest[..at], &rest[at + 1..]))
}

/// `scheme://user:password@rest` with the password masked.
fn mask_userinfo(uri: &str) -> String {
    match userinfo(uri) {
        Some((scheme, info, rest)) => {
            let user = info.split(':').next().unwrap_or("");
            format!("{scheme}://{user}:********@{rest}")
        }
        None => uri.to_owned(),
    }
}

/// Checks `crm.webhook_url`. A user name or password in it would make the
/// HTTP client send `Authorization: Basic` next to the Bearer token, and
/// receivers that read the first header would refuse every call.
fn webhook_url(url: &str) -> Result<String, String> {
    let parsed = reqwest::Url::parse(url).map_err(|_| "must be an http(s) URL or empty")?;
    if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
        return Err("must be an http(s) URL or empty".into());
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(
            "must not carry a user name or password: the webhook authenticates \
             with a Bearer token signed with app_secret"
                .into(),
        );
    }
    Ok(url.to_owned())
}

/// Webhook URLs may carry a token anywhere after the host (Slack-style
/// paths, `?token=`): only the scheme, host and port are shown.
fn mask_url(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(parsed) if parsed.host_str().is_some() => {
            let host = parsed.host_str().unwrap_or_default();
            let port = parsed.port().map(|p| format!(":{p}")).unwrap_or_default();
            let rest = match parsed.path() {
                "" | "/" if parsed.query().is_none() => "",
                _ => "/********",
            };
            format!("{}://{host}{port}{rest}", parsed.scheme())
        }
        _ => "********".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uri_password_is_masked() {
        assert_eq!(
            mask_uri("mongodb://app:hunter2@db.example.com:27017/crm?tls=true"),
            "mongodb://app:********@db.example.com:27017/crm?tls=true"
        );
        assert_eq!(
            mask_uri("mongodb://127.0.0.1:27017/?directConnection=true"),
            "mongodb://127.0.0.1:27017/?directConnection=true"
        );
        assert_eq!(
            mask_uri(
                "mongodb://db/?tls=true&tlsCertificateKeyFilePassword=pem-pass\
                 &authMechanism=MONGODB-AWS&authMechanismProperties=AWS_SESSION_TOKEN:tok"
            ),
            "mongodb://db/?tls=true&tlsCertificateKeyFilePassword=********\
             &authMechanism=MONGODB-AWS&authMechanismProperties=********"
        );
    }

    #[test]
    fn a_password_with_a_slash_or_at_sign_is_still_masked() {
        assert_eq!(
            mask_uri("mongodb://importd:Zm9v/YmFy@db1,db2/?replicaSet=rs0"),
            "mongodb://importd:********@db1,db2/?replicaSet=rs0"
        );
        assert_eq!(
            mask_uri("mongodb://importd:p@ss/w@db1:27017/crm"),
            "mongodb://importd:********@db1:27017/crm"
        );
    }

    #[test]
    fn webhook_url_shows_only_scheme_host_and_port() {
        assert_eq!(
            mask_url("https://crm.example.com:8443/services/T0/B1/s3cr3t?token=t0ken"),
            "https://crm.example.com:8443/********"
        );
        assert_eq!(
            mask_url("https://crm.example.com/"),
            "https://crm.example.com"
        );
        assert_eq!(mask_url("not a url"), "********");
        let crm = CrmSettings {
            webhook_url: Some("https://crm.example.com/hook/s3cr3t".into()),
        };
        assert!(!format!("{crm:?}").contains("s3cr3t"));
    }

    #[test]
    fn webhook_url_must_be_http_without_credentials() {
        assert!(webhook_url("https://crm.example.com/import-done").is_ok());
        assert!(webhook_url("ftp://crm.example.com/x").is_err());
        assert!(webhook_url("crm.example.com/x").is_err());
        let refused = webhook_url("https://hook:pa55@crm.example.com/done").unwrap_err();
        assert!(refused.contains("user name or password"), "{refused}");
    }

    #[test]
    fn cron_with_seconds_is_required() {
        assert!(validate_cron("*/5 * * * * *").is_ok());
        assert!(validate_cron("every five seconds").is_err());
    }
}
