//! `importd check-config`: effective configuration with secrets masked; an
//! invalid value exits non-zero naming its key.

use std::process::Command;

use crate::helpers::config_dir;

fn check_config(env: &[(&str, &str)]) -> (bool, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_importd"));
    cmd.arg("check-config")
        .env("IMPORTD_CONFIG_DIR", config_dir())
        .env("IMPORTD_ENV", "local");
    for (k, _) in std::env::vars() {
        if k.starts_with("IMPORTD__") {
            cmd.env_remove(k);
        }
    }
    cmd.envs(env.iter().copied());
    let out = cmd.output().expect("binary runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn secrets_are_masked_and_env_overrides_apply() {
    let (ok, out, err) = check_config(&[
        ("IMPORTD__S3__SECRET_KEY", "s3-very-secret"),
        ("IMPORTD__SMTP__PASSWORD", "smtp-very-secret"),
        ("IMPORTD__APP_SECRET", "app-very-secret-for-tests"),
        (
            "IMPORTD__MONGODB__URI",
            "mongodb://app:mongo-very-secret@db.internal:27017/crm",
        ),
        (
            "IMPORTD__CRM__WEBHOOK_URL",
            "https://crm.internal/hooks/very-secret?token=very-secret",
        ),
        ("IMPORTD__SCHEDULER__LEASE_SECONDS", "90"),
        // Strings that look like numbers stay as written (secrets too).
        ("IMPORTD__MONGODB__DATABASE", "0012345678901234567890123"),
        ("IMPORTD__S3__PATH_STYLE", "false"),
    ]);
    assert!(ok, "{err}");
    assert!(
        out.contains("database = \"0012345678901234567890123\""),
        "{out}"
    );
    assert!(out.contains("path_style = false"), "{out}");
    assert!(!out.contains("very-secret"), "a secret leaked:\n{out}");
    assert!(
        out.contains("uri = \"mongodb://app:********@db.internal:27017/crm\""),
        "{out}"
    );
    assert!(
        out.contains("webhook_url = \"https://crm.internal/********\""),
        "{out}"
    );
    assert!(out.contains("lease_seconds = 90"), "{out}");
    assert!(out.contains("tick = \"*/5 * * * * *\""), "{out}");
    for key in ["app_secret", "access_key", "secret_key", "password"] {
        assert!(
            out.lines().any(|l| l.starts_with(key)),
            "{key} missing:\n{out}"
        );
    }
}

#[test]
fn invalid_values_name_their_key() {
    for (var, value, key) in [
        ("IMPORTD__SCHEDULER__LEASE_SECONDS", "soon", "lease_seconds"),
        ("IMPORTD__SMTP__TLS", "maybe", "smtp.tls"),
        (
            "IMPORTD__SCHEDULER__TICK",
            "every 5 seconds",
            "scheduler.tick",
        ),
        ("IMPORTD__IMPORT__BATCH_SIZE", "0", "import.batch_size"),
        ("IMPORTD__HTTP__BIND", "localhost", "http.bind"),
        // Local runs the status API, which verifies tokens with it.
        ("IMPORTD__APP_SECRET", "", "app_secret"),
        ("IMPORTD__APP_SECRET", "short", "app_secret"),
        // Shorter than the error report links emails carry (7 days).
        ("IMPORTD__RETENTION__DAYS", "3", "retention.days"),
        ("IMPORTD__RETENTION__DAYS", "-1", "retention.days"),
        // Basic credentials would ride next to the Bearer token.
        (
            "IMPORTD__CRM__WEBHOOK_URL",
            "https://hook:pa55@crm.internal/done",
            "crm.webhook_url",
        ),
    ] {
        let (ok, _, err) = check_config(&[(var, value)]);
        assert!(!ok, "{var}={value} accepted");
        assert!(
            err.contains(key),
            "{var}={value}: message does not name {key}: {err}"
        );
    }
}
