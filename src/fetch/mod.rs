//! Object storage: an S3 object → a byte stream (`impl AsyncRead`), plus the
//! few other object operations importd needs (upload, presign).
//!
//! Knows buckets and keys, not CSV. Guarantees:
//! - Streaming: the object is never held in memory; bytes flow as the
//!   consumer reads them (backpressure through the reader).
//! - A stream that breaks mid-way (timeout, reset, 5xx) is reopened with a
//!   ranged GET at the byte it had reached, with exponential backoff and
//!   jitter, so the consumer sees one uninterrupted byte sequence or an
//!   error after the retries are spent. rust-s3 applies its request timeout
//!   to the whole body, so streams use their own, longer timeout.
//! - A missing object is [`Error::NotFound`], matched on the HTTP status.
//! - Every GET of an object is pinned to the version its HEAD saw (an
//!   `If-Match` on its ETag): a file replaced under the same key while it
//!   is read is [`Error::Changed`], never bytes of the new file read from
//!   an offset of the old one. (Between two runs of an import, the pipeline
//!   compares their HEADs.) A weak ETag is not pinned (`If-Match` compares
//!   strongly), nor is a read from a server that refuses the very ETag its
//!   HEAD still names (some S3 implementations cannot evaluate
//!   `If-Match`): a warning, and the read goes on unpinned.

use std::io;
use std::pin::Pin;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder, Retryable};
use bytes::Bytes;
use futures::{Stream, StreamExt};
use reqwest::header::{HeaderValue, IF_MATCH};
use s3::creds::Credentials;
use s3::error::S3Error;
use s3::request::Request as _;
use s3::request::tokio_backend::ReqwestRequest;
use s3::{Bucket, Region};
use secrecy::ExposeSecret;
use tokio_util::io::StreamReader;

use crate::config::S3Settings;

/// Errors of the storage layer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// No object at this key.
    #[error("object not found")]
    NotFound,
    /// A HEAD that names no size (`Content-Length`): not read as an empty
    /// file, which it need not be.
    #[error("the storage did not give the object's size")]
    NoSize,
    /// The object is no longer the version first read (412 on `If-Match`).
    #[error("the object was replaced while it was read")]
    Changed,
    /// The storage failed (see [`Error::is_transient`]).
    #[error("object storage: {}", brief(.0))]
    S3(#[from] S3Error),
    /// Reading a local file to upload failed.
    #[error("reading {path}: {source}")]
    Local {
        /// The file.
        path: String,
        /// Why.
        source: io::Error,
    },
}

impl Error {
    /// Whether retrying later may succeed (5xx, 408, 429, network trouble).
    pub fn is_transient(&self) -> bool {
        match self {
            Self::NotFound | Self::Changed | Self::NoSize | Self::Local { .. } => false,
            Self::S3(e) => s3_transient(e),
        }
    }
}

/// An S3 error for a log line: an HTTP failure by its status only (its
/// body may quote the object key).
fn brief(e: &S3Error) -> String {
    match e {
        S3Error::HttpFailWithBody(status, _) => format!("HTTP {status}"),
        e => e.to_string(),
    }
}

fn s3_transient(e: &S3Error) -> bool {
    match e {
        S3Error::HttpFailWithBody(status, _) => *status >= 500 || *status == 408 || *status == 429,
        S3Error::Http(_) | S3Error::Io(_) | S3Error::Reqwest(_) => true,
        _ => false,
    }
}

fn classify(e: S3Error) -> Error {
    match e {
        S3Error::HttpFailWithBody(404, _) => Error::NotFound,
        S3Error::HttpFailWithBody(412, _) => Error::Changed,
        e => Error::S3(e),
    }
}

/// Result alias of this layer.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What a HEAD tells: which version of the object, and its size.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectInfo {
    /// Size in bytes.
    pub size: u64,
    /// The version's ETag, as the server quotes it (`None` if it sends
    /// none, or only a weak one: reads are then not pinned, and only the
    /// size tells versions apart).
    pub etag: Option<String>,
}

impl ObjectInfo {
    /// Whether `self` (a HEAD now) may be a different object than
    /// `earlier` (pure): another size, or another ETag when both have one.
    pub fn differs_from(&self, earlier: &ObjectInfo) -> bool {
        self.size != earlier.size
            || matches!((&self.etag, &earlier.etag), (Some(a), Some(b)) if a != b)
    }
}

/// Retry policy of a broken stream: exponential backoff with jitter.
pub fn default_stream_retry() -> ExponentialBuilder {
    // About two minutes of trying in all: an S3 outage of tens of seconds
    // costs a pause, not the import.
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(250))
        .with_max_delay(Duration::from_secs(20))
        .with_max_times(10)
        .with_jitter()
}

/// The configured bucket.
#[derive(Clone)]
pub struct Storage {
    bucket: Box<Bucket>,
    stream_bucket: Box<Bucket>,
    retry: ExponentialBuilder,
}

/// A readable object: the bytes from some offset to the end.
pub type ObjectReader = StreamReader<Pin<Box<dyn Stream<Item = io::Result<Bytes>> + Send>>, Bytes>;

impl Storage {
    /// Builds the client; no request is made.
    pub fn new(settings: &S3Settings) -> Result<Self> {
        let region = Region::Custom {
            region: settings.region.clone(),
            endpoint: settings.endpoint.clone(),
        };
        let credentials = Credentials::new(
            Some(settings.access_key.expose_secret()),
            Some(settings.secret_key.expose_secret()),
            None,
            None,
            None,
        )
        .map_err(|e| Error::S3(S3Error::Credentials(e)))?;
        let mut bucket = Bucket::new(&settings.bucket, region, credentials)?;
        if settings.path_style {
            bucket = bucket.with_path_style();
        }
        Ok(Self {
            stream_bucket: bucket.with_request_timeout(settings.stream_timeout)?,
            bucket: bucket.with_request_timeout(settings.request_timeout)?,
            retry: default_stream_retry(),
        })
    }

    /// Overrides the stream retry policy (tests use short delays).
    pub fn with_stream_retry(mut self, retry: ExponentialBuilder) -> Self {
        self.retry = retry;
        self
    }

    /// Size of the object at `key`. Transient failures are retried with
    /// the stream retry policy (an S3 outage of tens of seconds costs a
    /// pause, not an attempt of the import).
    pub async fn head(&self, key: &str) -> Result<ObjectInfo> {
        (|| self.head_once(key))
            .retry(self.retry)
            .when(Error::is_transient)
            .notify(|e, d| tracing::warn!(error = %e, delay_ms = d.as_millis() as u64, "S3 HEAD failed; retrying"))
            .await
    }

    async fn head_once(&self, key: &str) -> Result<ObjectInfo> {
        let (head, status) = self.bucket.head_object(key).await.map_err(classify)?;
        if status == 404 {
            return Err(Error::NotFound);
        }
        Ok(ObjectInfo {
            size: head
                .content_length
                .and_then(|n| u64::try_from(n).ok())
                .ok_or(Error::NoSize)?,
            etag: head.e_tag.filter(|t| !t.is_empty() && !t.starts_with("W/")),
        })
    }

    async fn open_range(
        &self,
        key: &str,
        etag: Option<&str>,
        start: u64,
    ) -> Result<s3::request::DataStream> {
        let command = s3::command::Command::GetObjectRange { start, end: None };
        let pinned;
        let bucket = match etag.map(HeaderValue::from_str) {
            Some(Ok(tag)) => {
                let mut headers = self.stream_bucket.extra_headers.clone();
                headers.insert(IF_MATCH, tag);
                pinned = self.stream_bucket.with_extra_headers(headers)?;
                &pinned
            }
            // An ETag that is no header value cannot be sent: unpinned.
            Some(Err(_)) | None => &*self.stream_bucket,
        };
        let request = ReqwestRequest::new(bucket, key, command).await?;
        let response = request.response_data_to_stream().await.map_err(classify)?;
        if start > 0 && response.status_code != 206 {
            // A server (or proxy) that ignores `Range` sends the whole
            // object: its bytes before `start` must not be read as rows
            // after it.
            tracing::warn!(
                start,
                status = response.status_code,
                "The storage ignored the byte range; skipping to the offset"
            );
            return Ok(Box::pin(skip_bytes(response.bytes, start)));
        }
        Ok(response.bytes)
    }

    /// Streams the version `object` (from [`Storage::head`]) of the object
    /// at `key` from byte `start` to its end. The first request happens
    /// here, so a missing or replaced object fails now rather than at the
    /// first read; one replaced later fails the read with an
    /// [`io::Error`] wrapping [`Error::Changed`] (see [`is_changed`]).
    pub async fn open(&self, key: &str, object: &ObjectInfo, start: u64) -> Result<ObjectReader> {
        let size = object.size;
        if start >= size {
            let empty: Pin<Box<dyn Stream<Item = io::Result<Bytes>> + Send>> =
                Box::pin(futures::stream::empty());
            return Ok(StreamReader::new(empty));
        }
        let mut etag = object.etag.clone();
        let get = |etag: Option<String>| async move {
            (|| self.open_range(key, etag.as_deref(), start))
                .retry(self.retry)
                .when(Error::is_transient)
                .notify(|e, d| tracing::warn!(error = %e, delay_ms = d.as_millis() as u64, "S3 GET failed; retrying"))
                .await
        };
        let first = match get(etag.clone()).await {
            Err(Error::Changed)
                if etag.is_some() && !self.head(key).await?.differs_from(object) =>
            {
                // Refused an ETag its HEAD still names: this server cannot
                // evaluate `If-Match`.
                tracing::warn!(
                    "The storage refuses If-Match on an unchanged object; reading unpinned"
                );
                etag = None;
                get(None).await?
            }
            other => other?,
        };
        let state = Resumable {
            storage: self.clone(),
            key: key.to_owned(),
            etag,
            offset: start,
            size,
            current: Some(first),
            delays: self.retry.build(),
            failures: 0,
            done: false,
        };
        let stream: Pin<Box<dyn Stream<Item = io::Result<Bytes>> + Send>> =
            Box::pin(futures::stream::unfold(state, Resumable::next));
        Ok(StreamReader::new(stream))
    }

    /// Uploads a local file (streamed; multipart above 8 MiB).
    pub async fn put_file(&self, key: &str, path: &std::path::Path) -> Result<()> {
        let local = |source| Error::Local {
            path: path.display().to_string(),
            source,
        };
        let mut file = tokio::fs::File::open(path).await.map_err(local)?;
        self.bucket
            .put_object_stream_with_content_type(&mut file, key, "text/csv")
            .await
            .map_err(classify)?;
        Ok(())
    }

    /// Uploads bytes.
    pub async fn put_bytes(&self, key: &str, bytes: &[u8], content_type: &str) -> Result<()> {
        self.bucket
            .put_object_with_content_type(key, bytes, content_type)
            .await
            .map_err(classify)?;
        Ok(())
    }

    /// A presigned GET URL valid for `expiry` (at most 7 days, S3's limit).
    pub async fn presign_get(&self, key: &str, expiry: Duration) -> Result<String> {
        let secs = u32::try_from(expiry.as_secs())
            .unwrap_or(u32::MAX)
            .clamp(1, 604_800);
        Ok(self.bucket.presign_get(key, secs, None).await?)
    }

    /// Deletes the object (missing is fine).
    pub async fn delete(&self, key: &str) -> Result<()> {
        self.bucket.delete_object(key).await.map_err(classify)?;
        Ok(())
    }
}

/// Whether a read failed because the object was replaced under it.
pub fn is_changed(e: &io::Error) -> bool {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<Error>())
        .is_some_and(|e| matches!(e, Error::Changed))
}

/// `stream` without its first `n` bytes.
fn skip_bytes(
    stream: s3::request::DataStream,
    mut n: u64,
) -> impl Stream<Item = s3::request::StreamItem> + Send {
    stream.filter_map(move |chunk| {
        let chunk = match chunk {
            Ok(mut bytes) if n > 0 => {
                let drop = n.min(bytes.len() as u64);
                n -= drop;
                let rest = bytes.split_off(drop as usize);
                (!rest.is_empty()).then_some(Ok(rest))
            }
            other => Some(other),
        };
        futures::future::ready(chunk)
    })
}

struct Resumable {
    storage: Storage,
    key: String,
    etag: Option<String>,
    offset: u64,
    size: u64,
    current: Option<s3::request::DataStream>,
    delays: backon::ExponentialBackoff,
    failures: u32,
    done: bool,
}

impl Resumable {
    async fn next(mut self) -> Option<(io::Result<Bytes>, Self)> {
        loop {
            if self.done || self.offset >= self.size {
                return None;
            }
            let failure = match self.current.as_mut() {
                None => match (self.storage)
                    .open_range(&self.key, self.etag.as_deref(), self.offset)
                    .await
                {
                    Ok(s) => {
                        self.current = Some(s);
                        continue;
                    }
                    Err(e) if e.is_transient() => e.to_string(),
                    Err(e @ Error::Changed) => return self.fail(io::Error::other(e)),
                    Err(e) => return self.fail(io::Error::other(e.to_string())),
                },
                Some(stream) => match stream.next().await {
                    Some(Ok(chunk)) => {
                        self.offset += chunk.len() as u64;
                        if self.failures > 0 {
                            self.failures = 0;
                            self.delays = self.storage.retry.build();
                        }
                        return Some((Ok(chunk), self));
                    }
                    Some(Err(e)) => e.to_string(),
                    // Ended before `size`: the connection was cut.
                    None => format!("stream ended at byte {} of {}", self.offset, self.size),
                },
            };
            self.current = None;
            self.failures += 1;
            let Some(delay) = self.delays.next() else {
                return self.fail(io::Error::other(failure));
            };
            tracing::warn!(
                offset = self.offset,
                attempt = self.failures,
                error = %failure,
                "Object stream broke; reopening at the byte reached"
            );
            tokio::time::sleep(delay).await;
        }
    }

    fn fail(mut self, e: io::Error) -> Option<(io::Result<Bytes>, Self)> {
        self.done = true;
        Some((Err(e), self))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn another_size_or_etag_is_another_object() {
        let info = |size, etag: Option<&str>| ObjectInfo {
            size,
            etag: etag.map(str::to_owned),
        };
        let first = info(10, Some("\"a\""));
        assert!(!info(10, Some("\"a\"")).differs_from(&first));
        assert!(info(10, Some("\"b\"")).differs_from(&first));
        assert!(info(11, Some("\"a\"")).differs_from(&first));
        // Without an ETag on either side only the size tells.
        assert!(!info(10, None).differs_from(&first));
        assert!(!first.differs_from(&info(10, None)));
        assert!(info(9, None).differs_from(&info(10, None)));
    }

    #[test]
    fn a_changed_object_is_told_through_an_io_error() {
        assert!(is_changed(&io::Error::other(Error::Changed)));
        assert!(!is_changed(&io::Error::other(Error::NotFound)));
        assert!(!is_changed(&io::Error::other("reset")));
    }

    #[test]
    fn skipping_drops_exactly_the_first_bytes_across_chunks() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        for n in 0..=9u64 {
            let chunks: Vec<s3::request::StreamItem> = ["abc", "de", "", "fgh", "i"]
                .into_iter()
                .map(|c| Ok(Bytes::from_static(c.as_bytes())))
                .collect();
            let stream: s3::request::DataStream = Box::pin(futures::stream::iter(chunks));
            let got: Vec<u8> = rt.block_on(async {
                skip_bytes(stream, n)
                    .map(|c| c.unwrap().to_vec())
                    .concat()
                    .await
            });
            assert_eq!(got, &b"abcdefghi"[n as usize..], "skip {n}");
        }
    }
}
