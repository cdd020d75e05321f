//! Dashboard tokens: `Authorization: Bearer <JWT>`, HS256 signed with
//! `app_secret`, naming the caller's `account_id`. Pure: no I/O.

use bson::oid::ObjectId;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

/// Why a request is not authenticated (answered 401).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No `Authorization: Bearer` header.
    #[error("a bearer token is required")]
    Missing,
    /// Bad signature, expired, malformed, wrong algorithm.
    #[error("the token is not valid")]
    Invalid,
    /// A valid token that is not a dashboard access token.
    #[error("the token is not an access token")]
    WrongType,
}

#[derive(Deserialize)]
struct DashboardClaims {
    #[serde(rename = "type")]
    kind: Option<String>,
    account_id: String,
}

/// The account a request's token speaks for.
pub fn account_of(header: Option<&str>, secret: &SecretString) -> Result<ObjectId, AuthError> {
    // The scheme is case-insensitive (RFC 9110).
    let token = header
        .and_then(|h| h.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim())
        .filter(|t| !t.is_empty())
        .ok_or(AuthError::Missing)?;
    // Expiry is required and checked; HS256 only (no `alg: none`, no RS/HS
    // confusion).
    let mut validation = Validation::new(Algorithm::HS256);
    validation.leeway = 30;
    // A token not valid yet (`nbf`, when it has one) is refused too.
    validation.validate_nbf = true;
    let data = jsonwebtoken::decode::<DashboardClaims>(
        token,
        &DecodingKey::from_secret(secret.expose_secret().as_bytes()),
        &validation,
    )
    .map_err(|_| AuthError::Invalid)?;
    // Other tokens signed with the same secret (without `type`, or of
    // another type) do not speak for an account's dashboard.
    if data.claims.kind.as_deref() != Some("access_token") {
        return Err(AuthError::WrongType);
    }
    ObjectId::parse_str(&data.claims.account_id).map_err(|_| AuthError::Invalid)
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header};
    use serde_json::json;

    fn secret() -> SecretString {
        SecretString::from("test-secret-of-the-dashboard")
    }

    fn now() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    fn token(claims: serde_json::Value, key: &str, alg: Algorithm) -> String {
        jsonwebtoken::encode(
            &Header::new(alg),
            &claims,
            &EncodingKey::from_secret(key.as_bytes()),
        )
        .unwrap()
    }

    #[test]
    fn a_valid_access_token_names_its_account() {
        let account = ObjectId::new();
        let t = token(
            json!({ "type": "access_token", "uid": "u", "account_id": account.to_hex(), "exp": now() + 60 }),
            "test-secret-of-the-dashboard",
            Algorithm::HS256,
        );
        let header = format!("Bearer {t}");
        assert_eq!(account_of(Some(&header), &secret()), Ok(account));
        let header = format!("BEARER {t}");
        assert_eq!(account_of(Some(&header), &secret()), Ok(account));
    }

    #[test]
    fn a_token_not_valid_yet_is_refused() {
        let t = token(
            json!({ "type": "access_token", "account_id": ObjectId::new().to_hex(), "exp": now() + 7200, "nbf": now() + 3600 }),
            "test-secret-of-the-dashboard",
            Algorithm::HS256,
        );
        assert_eq!(
            account_of(Some(&format!("Bearer {t}")), &secret()),
            Err(AuthError::Invalid)
        );
    }

    #[test]
    fn missing_expired_forged_and_refresh_tokens_are_refused() {
        let account = ObjectId::new().to_hex();
        let s = secret();
        assert_eq!(account_of(None, &s), Err(AuthError::Missing));
        assert_eq!(account_of(Some("Basic abc"), &s), Err(AuthError::Missing));
        assert_eq!(account_of(Some("Bearer "), &s), Err(AuthError::Missing));
        let expired = token(
            json!({ "account_id": account, "exp": now() - 3600 }),
            "test-secret-of-the-dashboard",
            Algorithm::HS256,
        );
        assert_eq!(
            account_of(Some(&format!("Bearer {expired}")), &s),
            Err(AuthError::Invalid)
        );
        let no_exp = token(
            json!({ "account_id": account }),
            "test-secret-of-the-dashboard",
            Algorithm::HS256,
        );
        assert_eq!(
            account_of(Some(&format!("Bearer {no_exp}")), &s),
            Err(AuthError::Invalid)
        );
        let forged = token(
            json!({ "account_id": account, "exp": now() + 60 }),
            "another-secret",
            Algorithm::HS256,
        );
        assert_eq!(
            account_of(Some(&format!("Bearer {forged}")), &s),
            Err(AuthError::Invalid)
        );
        let hs512 = token(
            json!({ "account_id": account, "exp": now() + 60 }),
            "test-secret-of-the-dashboard",
            Algorithm::HS512,
        );
        assert_eq!(
            account_of(Some(&format!("Bearer {hs512}")), &s),
            Err(AuthError::Invalid)
        );
        let refresh = token(
            json!({ "type": "refresh_token", "account_id": account, "exp": now() + 60 }),
            "test-secret-of-the-dashboard",
            Algorithm::HS256,
        );
        assert_eq!(
            account_of(Some(&format!("Bearer {refresh}")), &s),
            Err(AuthError::WrongType)
        );
        let untyped = token(
            json!({ "account_id": account, "exp": now() + 60 }),
            "test-secret-of-the-dashboard",
            Algorithm::HS256,
        );
        assert_eq!(
            account_of(Some(&format!("Bearer {untyped}")), &s),
            Err(AuthError::WrongType)
        );
        let bad_account = token(
            json!({ "type": "access_token", "account_id": "not-an-id", "exp": now() + 60 }),
            "test-secret-of-the-dashboard",
            Algorithm::HS256,
        );
        assert_eq!(
            account_of(Some(&format!("Bearer {bad_account}")), &s),
            Err(AuthError::Invalid)
        );
    }
}
