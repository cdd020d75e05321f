//! Telling the user how an import went: the error report, the summary email
//! (lettre over SMTP; the only SMTP user) and the completion webhook.
//!
//! Exactly one email per import: a round starts only by winning
//! `Claimer::claim_notification` (an atomic `pending → sending` on the queue
//! document) and ends with one guarded update (`sent`, `skipped`, `failed`,
//! or `pending` again for a later round). SMTP trouble is retried with
//! backoff within a round (`notify.retry_*`), then in later rounds
//! (`notify.redeliver_after_seconds`, up to `notify.max_rounds`); the
//! import's own status never changes because of mail, and every failure is
//! recorded on the queue document (`notify.error`). A user without an email
//! address gets `notify.state: skipped` with a warning, not a failed import.
//!
//! The completion webhook has the same machine under `webhook.*`: it becomes
//! due (`pending`) in the very update that records the email round's final
//! result, so a crash between the two loses nothing, and any daemon's
//! rescue tick posts a due webhook. A 4xx other than 408/429 ends it
//! `failed` at once; other failures are retried within the round, then in
//! later rounds up to `notify.max_rounds`.

use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use bson::oid::ObjectId;
use bson::{Bson, DateTime, Document, doc};
use lettre::message::{Mailbox, MultiPart};
use lettre::transport::smtp::authentication::Credentials;
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use secrecy::ExposeSecret;
use tracing::{Instrument, info, info_span, warn};

use super::errors_csv::{report_key, write_report};
use super::summary::{Ending, ImportSummary};
use super::undo_summary::UndoSummary;
use super::webhook::{self, Principal};
use crate::claim::{Channel, Claimer};
use crate::config::{SmtpSettings, SmtpTls};
use crate::domain::{RecordKind, collections};
use crate::outcomes;
use crate::pipeline::Services;
use crate::telemetry::error_chain;
use crate::telemetry::metrics as m;
use crate::undo::UndoCounts;

/// Errors of a delivery.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Building the SMTP transport or message failed.
    #[error("mail set-up: {0}")]
    Setup(String),
    /// The SMTP conversation failed.
    #[error("SMTP: {0}")]
    Smtp(#[from] lettre::transport::smtp::Error),
    /// Rendering a template failed.
    #[error("template: {0}")]
    Template(#[from] askama::Error),
    /// Reading the import's data failed.
    #[error(transparent)]
    Mongo(#[from] mongodb::error::Error),
    /// The queue-state guard failed.
    #[error(transparent)]
    Claim(#[from] crate::claim::Error),
    /// Building the error report failed.
    #[error(transparent)]
    Report(#[from] super::errors_csv::Error),
    /// Presigning the report link failed.
    #[error(transparent)]
    Storage(#[from] crate::fetch::Error),
    /// A round claimed past `notify.max_rounds` (the last one's sender
    /// stopped before recording its result): nothing is sent.
    #[error("the last round's sender stopped before recording its result; no rounds are left")]
    NoRoundsLeft,
}

impl Error {
    /// A permanent (5xx) answer of the SMTP server: retrying within the
    /// round cannot help (later rounds still try: a fixed configuration, a
    /// mailbox back).
    pub fn is_permanent(&self) -> bool {
        matches!(self, Self::Smtp(e) if e.is_permanent())
    }
}

/// Sends email over the configured SMTP server.
#[derive(Clone)]
pub struct Mailer {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    from: Mailbox,
}

impl Mailer {
    /// Builds the transport (no connection is made yet).
    pub fn new(s: &SmtpSettings) -> Result<Self, Error> {
        let builder = match s.tls {
            SmtpTls::None => AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(&s.host),
            SmtpTls::StartTls => AsyncSmtpTransport::<Tokio1Executor>::starttls_relay(&s.host)?,
            SmtpTls::Tls => AsyncSmtpTransport::<Tokio1Executor>::relay(&s.host)?,
        };
        let mut builder = builder.port(s.port).timeout(Some(s.timeout));
        if let Some(user) = &s.username {
            builder = builder.credentials(Credentials::new(
                user.clone(),
                s.password.expose_secret().to_owned(),
            ));
        }
        let from = s
            .from
            .parse()
            .map_err(|e| Error::Setup(format!("smtp.from: {e}")))?;
        Ok(Self {
            transport: builder.build(),
            from,
        })
    }

    /// Sends one multipart (text + HTML) message with the `Message-ID`
    /// `message_id` (without its angle brackets).
    pub async fn send(
        &self,
        to: Mailbox,
        message_id: &str,
        subject: &str,
        text: String,
        html: String,
    ) -> Result<(), Error> {
        let message = Message::builder()
            .from(self.from.clone())
            .to(to)
            .message_id(Some(format!("<{message_id}>")))
            .subject(subject)
            .multipart(MultiPart::alternative_plain_html(text, html))
            .map_err(|e| Error::Setup(e.to_string()))?;
        self.transport.send(message).await?;
        Ok(())
    }
}

/// Delivers notifications of final imports.
#[derive(Clone)]
pub struct Notifier {
    services: Services,
    claimer: Claimer,
    mailer: Mailer,
    http: reqwest::Client,
    /// Once cancelled (the daemon stops), no new round is claimed.
    stopping: tokio_util::sync::CancellationToken,
}

/// A notification round's lease, renewed every third of it while the round
/// runs: a daemon killed mid-round gives the round up within a minute.
const ROUND_LEASE: Duration = Duration::from_secs(60);

impl Notifier {
    /// A notifier sending as `claimer`'s owner.
    pub fn new(services: Services, claimer: Claimer) -> Result<Self, Error> {
        let mailer = Mailer::new(&services.settings.smtp)?;
        let http = webhook::client().map_err(|e| Error::Setup(e.to_string()))?;
        Ok(Self {
            services,
            claimer,
            mailer,
            http,
            stopping: tokio_util::sync::CancellationToken::new(),
        })
    }

    /// Claims no new round once `token` is cancelled (rounds under way end
    /// normally).
    pub fn stopping_on(mut self, token: tokio_util::sync::CancellationToken) -> Self {
        self.stopping = token;
        self
    }

    fn retry(&self) -> ExponentialBuilder {
        let n = &self.services.settings.notify;
        ExponentialBuilder::default()
            .with_min_delay(n.retry_min_delay)
            .with_max_delay(n.retry_max_delay)
            .with_max_times(n.retry_attempts.saturating_sub(1))
            .with_jitter()
    }

    /// Delivers the notification of `queue_id` if it is due and nobody else
    /// has it.
    pub async fn deliver(&self, queue_id: ObjectId) {
        for due in self.deliver_on(Channel::Email, Some(queue_id)).await {
            self.deliver_on(Channel::Webhook, Some(due)).await;
        }
    }

    /// Sends the undo email of `queue_id`, if due (right after its undo).
    pub async fn deliver_undo(&self, queue_id: ObjectId) {
        self.deliver_on(Channel::UndoEmail, Some(queue_id)).await;
    }

    /// Delivers every due notification (after restarts and failed rounds):
    /// emails, then webhooks, then undo emails.
    pub async fn deliver_due(&self) {
        // The webhooks these rounds make due are among the next step's.
        self.deliver_on(Channel::Email, None).await;
        self.deliver_on(Channel::Webhook, None).await;
        self.deliver_on(Channel::UndoEmail, None).await;
    }

    /// Runs rounds on `channel` for `queue_id` (or for every import) while
    /// one is due. Ends: each round leaves its delivery sent, failed, or
    /// due only later. Returns the imports whose webhook the email rounds
    /// made due.
    async fn deliver_on(&self, channel: Channel, queue_id: Option<ObjectId>) -> Vec<ObjectId> {
        let mut webhooks_due = Vec::new();
        if channel == Channel::Webhook && self.services.settings.crm.webhook_url.is_none() {
            return webhooks_due;
        }
        while !self.stopping.is_cancelled() {
            match self
                .claimer
                .claim_notification(channel, queue_id, ROUND_LEASE)
                .await
            {
                Ok(Some(doc)) => match channel {
                    Channel::Email => webhooks_due.extend(self.round(doc).await),
                    Channel::Webhook => self.webhook_round(doc).await,
                    Channel::UndoEmail => self.undo_round(doc).await,
                },
                Ok(None) => return webhooks_due,
                Err(e) => {
                    warn!(channel = channel.field(), error = %error_chain(&e), "Could not look for due deliveries");
                    return webhooks_due;
                }
            }
        }
        webhooks_due
    }

    /// Renews the round's lease every third of it; returns when the round
    /// is lost, or at two thirds of the lease after the last renewal that
    /// succeeded was sent (the round could soon expire and be taken): a
    /// hanging renewal cannot keep the round's work running past that.
    async fn hold_round(&self, channel: Channel, queue_id: ObjectId, round: i64) {
        use tokio::time::{Instant, sleep_until, timeout_at};
        let mut valid_from = Instant::now();
        loop {
            let deadline = valid_from + ROUND_LEASE * 2 / 3;
            sleep_until((Instant::now() + ROUND_LEASE / 3).min(deadline)).await;
            if Instant::now() >= deadline {
                return;
            }
            let sent = Instant::now();
            let renewed = timeout_at(
                deadline,
                self.claimer
                    .renew_notification(channel, queue_id, round, ROUND_LEASE),
            )
            .await
            .unwrap_or_else(|_| Err(crate::claim::Error::Timeout));
            match renewed {
                Ok(true) => valid_from = sent,
                Ok(false) => return,
                Err(e) => {
                    warn!(error = %error_chain(&e), "Could not renew the notification round");
                }
            }
        }
    }

    /// Records a round's result, retrying a database blip (the round's
    /// lease is renewed meanwhile, so no other daemon redoes a delivery that
    /// happened). Returns whether this round recorded it.
    async fn finish_round(
        &self,
        channel: Channel,
        queue_id: ObjectId,
        round: i64,
        state: &str,
        fields: Document,
    ) -> bool {
        if state == "sent" {
            return self
                .record_delivered(channel, queue_id, round, fields)
                .await;
        }
        let record = (|| {
            self.claimer
                .finish_notification(channel, queue_id, round, state, fields.clone())
        })
        .retry(
            ExponentialBuilder::default()
                .with_min_delay(Duration::from_millis(200))
                .with_max_delay(Duration::from_secs(5))
                .with_max_times(12)
                .with_jitter(),
        )
        .when(crate::claim::Error::is_transient)
        .notify(|e, _| warn!(error = %error_chain(e), "Recording the round failed; retrying"));
        tokio::select! {
            // The result first: a send that completed is not discarded for a
            // lease deadline that fell due in the same wake-up.
            biased;
            recorded = record => match recorded {
                Ok(true) => {
                    info!(channel = channel.field(), state, "Round ended");
                    true
                }
                Ok(false) => {
                    warn!(channel = channel.field(), "Round was taken over; not recorded");
                    false
                }
                Err(e) => {
                    warn!(channel = channel.field(), error = %error_chain(&e), "Could not record the round; it will be redone");
                    false
                }
            },
            () = self.hold_round(channel, queue_id, round) => {
                warn!(channel = channel.field(), "Round lease lost while recording");
                false
            }
        }
    }

    /// Records a delivery that happened. Not bound to the round's lease: a
    /// database outage that outlasts it must not make the rescue's next
    /// round deliver again, so this keeps trying for minutes (the rescue
    /// holds the round back for its grace after each expiry) and succeeds
    /// unless a later round was claimed meanwhile.
    async fn record_delivered(
        &self,
        channel: Channel,
        queue_id: ObjectId,
        round: i64,
        fields: Document,
    ) -> bool {
        let recorded = (|| {
            self.claimer
                .record_delivered(channel, queue_id, round, fields.clone())
        })
        .retry(
            ExponentialBuilder::default()
                .with_min_delay(Duration::from_millis(200))
                .with_max_delay(Duration::from_secs(5))
                .with_max_times(60)
                .with_jitter(),
        )
        .when(crate::claim::Error::is_transient)
        .notify(|e, _| warn!(error = %error_chain(e), "Recording the delivery failed; retrying"))
        .await;
        match recorded {
            Ok(true) => {
                info!(channel = channel.field(), state = "sent", "Round ended");
                true
            }
            Ok(false) => {
                warn!(
                    channel = channel.field(),
                    "A later round was claimed; delivered twice"
                );
                false
            }
            Err(e) => {
                warn!(channel = channel.field(), error = %error_chain(&e), "Could not record the delivery; it may be redone");
                false
            }
        }
    }

    /// The state and fields a round of `channel` records when its email
    /// was not delivered: due again after `notify.redeliver_after`, or
    /// `failed` after `notify.max_rounds`.
    fn undelivered(&self, channel: Channel, round: i64, e: &Error) -> (&'static str, Document) {
        let notify = &self.services.settings.notify;
        let last = round >= i64::from(notify.max_rounds);
        let what = match channel {
            Channel::UndoEmail => "Undo email not delivered",
            _ => "Summary email not delivered",
        };
        warn!(channel = channel.field(), error = %error_chain(e), rounds = round, final_failure = last, "{what}");
        let now = self.claimer.clock().now();
        let mut fields = doc! {
            format!("{}.error", channel.field()): error_chain(e),
            format!("{}.failed_at", channel.field()): now,
        };
        if !last {
            let next = DateTime::from_millis(
                now.timestamp_millis() + notify.redeliver_after.as_millis() as i64,
            );
            fields.insert(format!("{}.next_attempt_at", channel.field()), next);
        }
        if matches!(e, Error::NoRoundsLeft) {
            // The quiet round may still record its delivery over this.
            fields.insert(format!("{}.gave_up", channel.field()), true);
        }
        (if last { "failed" } else { "pending" }, fields)
    }

    /// Whether `round` was claimed past `notify.max_rounds`: the last
    /// round went quiet (its sender stopped before recording a result, and
    /// the rescue's grace passed); this one only records the failure.
    fn past_last(&self, round: i64) -> bool {
        round > i64::from(self.services.settings.notify.max_rounds)
    }

    /// The importing user's address, if usable.
    async fn recipient(&self, q: &Document) -> Result<Option<(Mailbox, Option<String>)>, Error> {
        let user = match q.get_object_id("user_id") {
            Ok(id) => {
                self.services
                    .db
                    .collection::<Document>(collections::USERS)
                    .find_one(doc! { "_id": id })
                    .await?
            }
            Err(_) => None,
        };
        let email = user
            .as_ref()
            .and_then(|u| u.get_str("email").ok())
            .filter(|e| !e.trim().is_empty());
        let first_name = user
            .as_ref()
            .and_then(|u| u.get_str("first_name").ok())
            .map(str::to_owned);
        Ok(email.and_then(|e| {
            e.trim()
                .parse::<lettre::Address>()
                .ok()
                .map(|a| (Mailbox::new(first_name.clone(), a), first_name))
        }))
    }

    /// One round of the undo email: sent once per undo, like the summary.
    async fn undo_round(&self, doc: Document) {
        let Ok(queue_id) = doc.get_object_id("_id") else {
            return;
        };
        let round = Channel::UndoEmail.round_of(&doc);
        let span = info_span!("undo_notify", queue_id = %queue_id);
        async {
            let sent = if self.past_last(round) {
                Err(Error::NoRoundsLeft)
            } else {
                tokio::select! {
                    // The result first: a send that completed is not discarded for a
                    // lease deadline that fell due in the same wake-up.
                    biased;
                    sent = self.send_undo_summary(queue_id, &doc) => sent,
                    () = self.hold_round(Channel::UndoEmail, queue_id, round) => {
                        warn!("Undo email round lease lost; stopped");
                        return;
                    }
                }
            };
            let (state, fields) = match sent {
                Ok(outcome) => outcome,
                Err(e) => self.undelivered(Channel::UndoEmail, round, &e),
            };
            let result = if state == "pending" { "retry" } else { state };
            metrics::counter!(m::NOTIFICATIONS, "channel" => "undo_email", "result" => result)
                .increment(1);
            self.finish_round(Channel::UndoEmail, queue_id, round, state, fields)
                .await;
        }
        .instrument(span)
        .await
    }

    /// Sends the email saying what the undo of `q` did.
    async fn send_undo_summary(
        &self,
        queue_id: ObjectId,
        q: &Document,
    ) -> Result<(&'static str, Document), Error> {
        let Some((to, first_name)) = self.recipient(q).await? else {
            warn!("The importing user has no usable email address; no undo email");
            return Ok((
                "skipped",
                doc! { "undo_notify.warning": "The importing user has no usable email address." },
            ));
        };
        let summary = UndoSummary {
            kind: q
                .get_str("source")
                .ok()
                .and_then(RecordKind::from_source)
                .unwrap_or(RecordKind::Deals),
            first_name,
            file_name: file_name(q),
            counts: UndoCounts::from_doc(&q.get_document("undo").cloned().unwrap_or_default()),
        };
        let (subject, text, html) = (summary.subject(), summary.text()?, summary.html()?);
        // One Message-ID per undo, as for the summary.
        let message_id = format!("import-undo.{}@importd", queue_id.to_hex());
        (|| {
            self.mailer
                .send(to.clone(), &message_id, &subject, text.clone(), html.clone())
        })
        .retry(self.retry())
        .when(|e| !e.is_permanent())
        .notify(|e, d| warn!(error = %error_chain(e), delay_ms = d.as_millis() as u64, "Sending the undo email failed; retrying"))
        .await?;
        info!("Undo email sent");
        Ok((
            "sent",
            doc! {
                "undo_notify.sent_at": self.claimer.clock().now(),
                "undo_notify.to": to.email.to_string(),
                "undo_notify.subject": subject,
            },
        ))
    }

    /// One email round; returns the import if it made its webhook due.
    async fn round(&self, doc: Document) -> Option<ObjectId> {
        let Ok(queue_id) = doc.get_object_id("_id") else {
            return None;
        };
        let round = Channel::Email.round_of(&doc);
        let span = info_span!("notify", queue_id = %queue_id);
        async {
            let sent = if self.past_last(round) {
                Err(Error::NoRoundsLeft)
            } else {
                tokio::select! {
                    // The result first: a send that completed is not discarded for a
                    // lease deadline that fell due in the same wake-up.
                    biased;
                    sent = self.send_summary(queue_id, &doc, round) => sent,
                    () = self.hold_round(Channel::Email, queue_id, round) => {
                        // Another daemon may take the round from here on: stop
                        // before it could send a second email.
                        warn!("Notification round lease lost; stopped");
                        return None;
                    }
                }
            };
            let (state, mut fields) = match sent {
                Ok(outcome) => outcome,
                Err(e) => self.undelivered(Channel::Email, round, &e),
            };
            let result = if state == "pending" { "retry" } else { state };
            metrics::counter!(m::NOTIFICATIONS, "channel" => "email", "result" => result)
                .increment(1);
            // A dry run changed nothing the CRM's automations could act on.
            let webhook_due = state != "pending"
                && self.services.settings.crm.webhook_url.is_some()
                && !is_dry_run(&doc);
            if webhook_due {
                // Due from the moment the email's result is recorded, in
                // the same update: a crash right after loses no webhook.
                fields.insert("webhook.state", "pending");
            }
            let ours = self
                .finish_round(Channel::Email, queue_id, round, state, fields)
                .await;
            (ours && webhook_due).then_some(queue_id)
        }
        .instrument(span)
        .await
    }

    /// Builds the report and summary and sends the email. Returns the final
    /// notification state and the fields to record.
    async fn send_summary(
        &self,
        queue_id: ObjectId,
        q: &Document,
        round: i64,
    ) -> Result<(&'static str, Document), Error> {
        let db = &self.services.db;
        let settings = &self.services.settings;
        let account_id = q.get_object_id("account_id").ok();
        let totals = outcomes::totals(db, queue_id).await?;
        let first_failures = outcomes::failures(db, queue_id, 10).await?;
        let mut fields = Document::new();
        let mut report_unavailable = false;

        let report_url = match (totals.failed, account_id) {
            (0, _) | (_, None) => None,
            (_, Some(account_id)) => {
                let key = report_key(&account_id, &queue_id);
                let columns: Vec<String> = q
                    .get_array("columns")
                    .map(|a| {
                        a.iter()
                            .filter_map(Bson::as_str)
                            .map(str::to_owned)
                            .collect()
                    })
                    .unwrap_or_default();
                let made = async {
                    let rows =
                        write_report(db, &self.services.storage, queue_id, &columns, &key).await?;
                    let expires = DateTime::from_millis(
                        DateTime::now().timestamp_millis()
                            + settings.notify.report_link.as_millis() as i64,
                    );
                    let report = doc! { "key": &key, "rows": rows as i64, "expires_at": expires };
                    // Recorded at once, not with the round's result: the
                    // object is there whether or not this round's email
                    // goes out (the dashboard links it, retention deletes
                    // it by this key).
                    db.collection::<Document>(collections::QUEUES)
                        .update_one(
                            doc! { "_id": queue_id },
                            doc! { "$set": { "report": &report } },
                        )
                        .await?;
                    let url = self
                        .services
                        .storage
                        .presign_get(&key, settings.notify.report_link)
                        .await?;
                    Ok::<_, Error>((url, report))
                }
                .await;
                match made {
                    Ok((url, report)) => {
                        fields.insert("report", report);
                        Some(url)
                    }
                    // Rounds are left: this one fails and a later one makes
                    // the report, then sends. The last one sends without it
                    // rather than not at all.
                    Err(e) if round < i64::from(settings.notify.max_rounds) => return Err(e),
                    Err(e) => {
                        let e = error_chain(&e);
                        warn!(error = %e, "The error report could not be made; the summary goes without it");
                        fields.insert("notify.report_error", e);
                        report_unavailable = true;
                        None
                    }
                }
            }
        };

        let Some((to, first_name)) = self.recipient(q).await? else {
            warn!("The importing user has no usable email address; no summary email");
            fields.insert(
                "notify.warning",
                "The importing user has no usable email address.",
            );
            return Ok(("skipped", fields));
        };

        // Only a pipeline of the import's own account is named (a queue
        // naming another's fails with `pipeline_not_found`).
        let pipeline_name = match (
            q.get_document("additional_data")
                .ok()
                .and_then(|a| a.get_object_id("pipeline_id").ok()),
            account_id,
        ) {
            (Some(id), Some(account_id)) => db
                .collection::<Document>(collections::PIPELINES)
                .find_one(doc! { "_id": id, "account_id": account_id })
                .await?
                .and_then(|p| p.get_str("name").ok().map(str::to_owned)),
            _ => None,
        };
        let ending = match q.get_str("status") {
            Ok("cancelled") => Ending::Cancelled,
            Ok("failed") => {
                let e = q.get_document("error").ok();
                Ending::Failed {
                    code: e
                        .and_then(|e| e.get_str("code").ok())
                        .unwrap_or("unknown")
                        .to_owned(),
                    message: e
                        .and_then(|e| e.get_str("message").ok())
                        .unwrap_or("")
                        .to_owned(),
                }
            }
            _ => Ending::Completed,
        };
        let started = q
            .get_datetime("started_at")
            .map(|d| d.timestamp_millis())
            .ok();
        let completed = q
            .get_datetime("completed_at")
            .map(|d| d.timestamp_millis())
            .ok();
        let summary = ImportSummary {
            kind: q
                .get_str("source")
                .ok()
                .and_then(RecordKind::from_source)
                .unwrap_or(RecordKind::Deals),
            dry_run: is_dry_run(q),
            first_name,
            file_name: file_name(q),
            ending,
            totals,
            duration_secs: match (started, completed) {
                (Some(s), Some(c)) if c >= s => ((c - s) / 1000) as u64,
                _ => 0,
            },
            pipeline_name,
            stages_created: q
                .get_array("stages_created")
                .map(|a| {
                    a.iter()
                        .filter_map(Bson::as_str)
                        .map(str::to_owned)
                        .collect()
                })
                .unwrap_or_default(),
            first_failures,
            report_url,
            report_unavailable,
            report_link_days: settings.notify.report_link.as_secs() / 86_400,
        };
        let (subject, text, html) = (summary.subject(), summary.text()?, summary.html()?);
        // One Message-ID per import, whichever round sends it: should a
        // daemon die after the server accepted the message and before the
        // round recorded it (the one window no guard closes), the second
        // copy is the same message to mail systems that collapse
        // duplicates by Message-ID.
        let message_id = format!("import-summary.{}@importd", queue_id.to_hex());
        (|| {
            self.mailer
                .send(to.clone(), &message_id, &subject, text.clone(), html.clone())
        })
            .retry(self.retry())
            .when(|e| !e.is_permanent())
            .notify(|e, d| warn!(error = %error_chain(e), delay_ms = d.as_millis() as u64, "Sending the summary failed; retrying"))
            .await?;
        info!("Summary email sent");
        fields.insert("notify.sent_at", self.claimer.clock().now());
        fields.insert("notify.to", to.email.to_string());
        fields.insert("notify.subject", subject);
        Ok(("sent", fields))
    }

    /// Posts the completion webhook, if configured; records the result.
    /// One webhook round: post (retried within the round), then record
    /// `sent`, `failed`, or `pending` for a later round.
    async fn webhook_round(&self, doc: Document) {
        let Ok(queue_id) = doc.get_object_id("_id") else {
            return;
        };
        let round = Channel::Webhook.round_of(&doc);
        let span = info_span!("webhook", queue_id = %queue_id);
        async {
            let posted = if self.past_last(round) {
                Some(Err(webhook::Error::NoRoundsLeft))
            } else {
                tokio::select! {
                    // The result first: a send that completed is not discarded for a
                    // lease deadline that fell due in the same wake-up.
                    biased;
                    posted = self.post_webhook(queue_id, &doc) => posted,
                    () = self.hold_round(Channel::Webhook, queue_id, round) => {
                        warn!("Webhook round lease lost; stopped");
                        return;
                    }
                }
            };
            let Some(result) = posted else { return };
            let now = self.claimer.clock().now();
            let (state, fields) = match &result {
                Ok(status) => (
                    "sent",
                    doc! { "webhook.status": i32::from(*status), "webhook.at": now },
                ),
                Err(e) => {
                    let rounds = round;
                    let last = !e.is_transient()
                        || rounds >= i64::from(self.services.settings.notify.max_rounds);
                    warn!(error = %e, rounds, final_failure = last, "Webhook not delivered");
                    let mut fields = doc! { "webhook.error": e.to_string(), "webhook.at": now };
                    if matches!(e, webhook::Error::NoRoundsLeft) {
                        fields.insert("webhook.gave_up", true);
                    }
                    if !last {
                        let next = now.timestamp_millis()
                            + self.services.settings.notify.redeliver_after.as_millis() as i64;
                        fields.insert("webhook.next_attempt_at", DateTime::from_millis(next));
                    }
                    (if last { "failed" } else { "pending" }, fields)
                }
            };
            let label = if state == "pending" { "retry" } else { state };
            metrics::counter!(m::NOTIFICATIONS, "channel" => "webhook", "result" => label)
                .increment(1);
            self.finish_round(Channel::Webhook, queue_id, round, state, fields)
                .await;
        }
        .instrument(span)
        .await
    }

    /// Posts the summary of `q` to `crm.webhook_url`, retried with backoff
    /// on transient failures. `None` when no webhook is configured.
    async fn post_webhook(
        &self,
        queue_id: ObjectId,
        q: &Document,
    ) -> Option<Result<u16, webhook::Error>> {
        let settings = &self.services.settings;
        let url = settings.crm.webhook_url.as_deref()?;
        let hex = |k: &str| q.get_object_id(k).map(|i| i.to_hex()).unwrap_or_default();
        let who = Principal {
            uid: hex("user_id"),
            account_id: hex("account_id"),
            parent_account: hex("parent_account"),
            client_id: hex("client_id"),
        };
        // Totals that cannot be read fail the post (retried later): a
        // webhook never reports zeros it did not count.
        let totals = match outcomes::totals(&self.services.db, queue_id).await {
            Ok(t) => t,
            Err(e) => return Some(Err(webhook::Error::Totals(error_chain(&e)))),
        };
        let body = serde_json::json!({
            "event": "import.finished",
            "queue_id": queue_id.to_hex(),
            "source": q.get_str("source").unwrap_or("deals"),
            "status": q.get_str("status").unwrap_or(""),
            "file_name": file_name(q),
            "account_id": who.account_id,
            "user_id": who.uid,
            "pipeline_id": q.get_document("additional_data").ok().and_then(|a| a.get_object_id("pipeline_id").ok()).map(|p| p.to_hex()),
            "totals": {
                "rows": totals.rows, "imported": totals.imported, "updated": totals.updated,
                "skipped": totals.skipped, "failed": totals.failed,
                "contacts_created": totals.contacts_created,
            },
            "error": q.get_document("error").ok().map(|e| serde_json::json!({
                "code": e.get_str("code").unwrap_or(""), "message": e.get_str("message").unwrap_or(""),
            })),
        });
        Some(
            (|| webhook::post(&self.http, url, &settings.app_secret, &who, &body))
                .retry(self.retry())
                .when(webhook::Error::is_transient)
                .notify(|e, _| warn!(error = %e, "Webhook failed; retrying"))
                .await,
        )
    }
}

/// Whether the queue document asks for a dry run.
fn is_dry_run(q: &Document) -> bool {
    q.get_document("additional_data")
        .and_then(|a| a.get_bool("dry_run"))
        .unwrap_or(false)
}

fn file_name(q: &Document) -> String {
    q.get_array("csv")
        .ok()
        .and_then(|a| a.first())
        .and_then(Bson::as_document)
        .and_then(|c| c.get_str("name").ok())
        .unwrap_or("import.csv")
        .to_owned()
}
