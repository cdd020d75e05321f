//! Object storage against the real S3 server of the stack: reads pinned to
//! the version first seen.

use std::time::Duration;

use importd::fetch::{self, ObjectInfo};
use tokio::io::AsyncReadExt;

use crate::helpers::TestApp;

async fn read_all(mut reader: fetch::ObjectReader) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    reader.read_to_end(&mut out).await?;
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_is_pinned_to_the_version_its_head_saw() {
    let app = TestApp::new().await;
    let storage = app.services.storage.clone().with_stream_retry(
        backon::ExponentialBuilder::default()
            .with_max_times(1)
            .with_min_delay(Duration::from_millis(10)),
    );
    let key = format!("{}/{}/pinned.csv", app.prefix, uuid::Uuid::new_v4());
    storage
        .put_bytes(&key, b"Name\nDeal 1\n", "text/csv")
        .await
        .unwrap();
    let first = storage.head(&key).await.unwrap();
    assert_eq!(first.size, 12);
    assert!(first.etag.is_some(), "the server names its versions");
    assert_eq!(
        read_all(storage.open(&key, &first, 5).await.unwrap())
            .await
            .unwrap(),
        b"Deal 1\n"
    );

    // Replaced under the same key, same size.
    storage
        .put_bytes(&key, b"Name\nLead 1\n", "text/csv")
        .await
        .unwrap();
    let second = storage.head(&key).await.unwrap();
    assert!(second.differs_from(&first));
    let err = storage.open(&key, &first, 5).await.err().expect("refused");
    assert!(matches!(err, fetch::Error::Changed), "{err}");
    assert!(!err.is_transient());
    assert_eq!(
        read_all(storage.open(&key, &second, 5).await.unwrap())
            .await
            .unwrap(),
        b"Lead 1\n"
    );
    // Without an ETag the read is not pinned.
    let unpinned = ObjectInfo {
        size: 12,
        etag: None,
    };
    assert_eq!(
        read_all(storage.open(&key, &unpinned, 0).await.unwrap())
            .await
            .unwrap(),
        b"Name\nLead 1\n"
    );
    storage.delete(&key).await.unwrap();
    app.cleanup().await;
}
