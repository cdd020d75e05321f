//! The completion webhook: `POST crm.webhook_url` with the summary as JSON
//! and `Authorization: Bearer <JWT>`, the token minted at the moment of each
//! call (HS256, `app_secret`, expiring 5 minutes later), so no import,
//! however long, fails because a token expired.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{EncodingKey, Header};
use secrecy::{ExposeSecret, SecretString};
use serde::Serialize;

/// Lifetime of a webhook token.
pub const TOKEN_TTL: Duration = Duration::from_secs(300);

/// Scope the CRM's tokens carry (seed 003).
pub const SCOPE: &str = "contacts communications contacts.external contacts.read contacts.create";

/// Claims of the CRM's access tokens.
#[derive(Clone, Debug, Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct Claims {
    /// Always `access_token`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The importing user.
    pub uid: String,
    /// Account.
    pub account_id: String,
    /// White-label parent account.
    pub parent_account: String,
    /// Client.
    pub client_id: String,
    /// Space-separated scopes.
    pub scope: String,
    /// Issued at (seconds since the epoch).
    pub iat: u64,
    /// Expiry (seconds since the epoch).
    pub exp: u64,
}

/// Who the token speaks for.
#[derive(Clone, Debug)]
pub struct Principal {
    /// User id (hex).
    pub uid: String,
    /// Account id (hex).
    pub account_id: String,
    /// Parent account id (hex).
    pub parent_account: String,
    /// Client id (hex).
    pub client_id: String,
}

/// Errors of the webhook.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Signing failed.
    #[error("signing the token: {0}")]
    Jwt(#[from] jsonwebtoken::errors::Error),
    /// The request failed before a response (its URL, which may carry a
    /// token, left out: this error is logged and stored).
    #[error("request: {0}")]
    Http(reqwest::Error),
    /// The endpoint answered with an error status.
    #[error("the endpoint answered {0}")]
    Status(u16),
    /// The endpoint answered with a redirect, which is not followed (it
    /// would drop the POST body): not retried.
    #[error("the endpoint answered {0} (a redirect): set crm.webhook_url to the final URL")]
    Redirected(u16),
    /// The import's totals could not be read.
    #[error("reading the totals: {0}")]
    Totals(String),
    /// A round claimed past `notify.max_rounds`: nothing is posted.
    #[error("the last round's sender stopped before recording its result; no rounds are left")]
    NoRoundsLeft,
}

impl From<reqwest::Error> for Error {
    fn from(e: reqwest::Error) -> Self {
        Self::Http(e.without_url())
    }
}

impl Error {
    /// 4xx other than 408/429 is the endpoint refusing: not retried.
    pub fn is_transient(&self) -> bool {
        match self {
            Self::Jwt(_) | Self::NoRoundsLeft | Self::Redirected(_) => false,
            Self::Http(_) | Self::Totals(_) => true,
            Self::Status(s) => *s >= 500 || *s == 408 || *s == 429,
        }
    }
}

/// Mints a fresh token for `who`, valid [`TOKEN_TTL`] from now.
pub fn mint(secret: &SecretString, who: &Principal) -> Result<String, Error> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    let claims = Claims {
        kind: "access_token".into(),
        uid: who.uid.clone(),
        account_id: who.account_id.clone(),
        parent_account: who.parent_account.clone(),
        client_id: who.client_id.clone(),
        scope: SCOPE.into(),
        iat: now,
        exp: now + TOKEN_TTL.as_secs(),
    };
    Ok(jsonwebtoken::encode(
        &Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.expose_secret().as_bytes()),
    )?)
}

/// The HTTP client for [`post`]. Redirects are not followed: a 301/302/303
/// would turn the POST into a GET without the summary, and that GET's 200
/// would read as delivered.
pub fn client() -> reqwest::Result<reqwest::Client> {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .redirect(reqwest::redirect::Policy::none())
        .build()
}

/// POSTs `body` once, with a token minted now. Returns the status.
pub async fn post(
    client: &reqwest::Client,
    url: &str,
    secret: &SecretString,
    who: &Principal,
    body: &serde_json::Value,
) -> Result<u16, Error> {
    let token = mint(secret, who)?;
    let r = client
        .post(url)
        .bearer_auth(token)
        .json(body)
        .send()
        .await?;
    let status = r.status().as_u16();
    if r.status().is_success() {
        Ok(status)
    } else if r.status().is_redirection() {
        Err(Error::Redirected(status))
    } else {
        Err(Error::Status(status))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{DecodingKey, Validation};

    fn principal() -> Principal {
        Principal {
            uid: "u".into(),
            account_id: "a".into(),
            parent_account: "p".into(),
            client_id: "c".into(),
        }
    }

    #[test]
    fn tokens_verify_with_the_secret_and_expire_in_five_minutes() {
        let secret = SecretString::from("s3cret");
        let who = principal();
        let t = mint(&secret, &who).unwrap();
        let got = jsonwebtoken::decode::<Claims>(
            &t,
            &DecodingKey::from_secret(b"s3cret"),
            &Validation::default(),
        )
        .unwrap()
        .claims;
        assert_eq!(got.kind, "access_token");
        assert_eq!(got.exp - got.iat, 300);
        assert!(
            jsonwebtoken::decode::<Claims>(
                &t,
                &DecodingKey::from_secret(b"other"),
                &Validation::default()
            )
            .is_err()
        );
    }

    #[test]
    fn client_errors_are_not_retried() {
        assert!(!Error::Status(400).is_transient());
        assert!(!Error::Status(404).is_transient());
        assert!(Error::Status(408).is_transient());
        assert!(Error::Status(429).is_transient());
        assert!(Error::Status(503).is_transient());
    }

    #[tokio::test]
    async fn a_redirect_is_not_followed_and_not_retried() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let served = tokio::spawn(async move {
            let mut requests = 0;
            // The redirect target is this listener too: a followed redirect
            // would come back as a second request.
            while let Ok(Ok((mut conn, _))) =
                tokio::time::timeout(Duration::from_millis(500), listener.accept()).await
            {
                requests += 1;
                let mut buf = [0u8; 4096];
                let _ = conn.read(&mut buf).await;
                let reply = format!(
                    "HTTP/1.1 302 Found\r\nLocation: http://{addr}/elsewhere\r\n\
                     Content-Length: 0\r\nConnection: close\r\n\r\n"
                );
                let _ = conn.write_all(reply.as_bytes()).await;
            }
            requests
        });
        let who = principal();
        let e = post(
            &client().unwrap(),
            &format!("http://{addr}/done"),
            &SecretString::from("s"),
            &who,
            &serde_json::json!({}),
        )
        .await
        .unwrap_err();
        assert!(matches!(e, Error::Redirected(302)), "{e}");
        assert!(!e.is_transient());
        assert_eq!(served.await.unwrap(), 1);
    }

    #[tokio::test]
    async fn a_failed_request_names_neither_the_url_nor_its_token() {
        // Nothing listens on the port just freed.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let url = format!("http://hook:pa55word@127.0.0.1:{port}/done?token=t0ken");
        let who = principal();
        let e = post(
            &reqwest::Client::new(),
            &url,
            &SecretString::from("s"),
            &who,
            &serde_json::json!({}),
        )
        .await
        .unwrap_err();
        assert!(e.is_transient(), "{e}");
        let text = crate::telemetry::error_chain(&e);
        assert!(
            !text.contains("t0ken") && !text.contains("pa55word") && !text.contains("/done"),
            "{text}"
        );
    }
}
