//! RSA signing keys as the Bot Framework publishes them (JWK with `endorsements`), and the tokens
//! the Bot Connector signs with them. Also the hostile variants the router must refuse.

use std::time::{SystemTime, UNIX_EPOCH};

use aws_lc_rs::encoding::{AsDer, Pkcs8V1Der, PublicKeyX509Der};
use aws_lc_rs::rsa::{KeyPair, KeySize};
use aws_lc_rs::signature::KeyPair as _;
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

/// The Bot Connector's token issuer (public cloud).
pub const CONNECTOR_ISSUER: &str = "https://api.botframework.com";

pub struct SigningKey {
    pub kid: String,
    /// Channel ids the key endorses (`msteams`, ...); empty endorses none in particular.
    pub endorsements: Vec<String>,
    encoding: EncodingKey,
    /// base64url modulus and exponent, as in the JWK.
    n: String,
    e: String,
    /// SubjectPublicKeyInfo DER, what an attacker would use as an HMAC secret.
    public_der: Vec<u8>,
}

impl SigningKey {
    /// A fresh 2048-bit RSA key.
    pub fn generate(kid: &str, endorsements: &[&str]) -> Self {
        let pair = KeyPair::generate(KeySize::Rsa2048).expect("RSA key generation");
        let pkcs8 = AsDer::<Pkcs8V1Der>::as_der(&pair).expect("PKCS#8 encoding");
        let pem = to_pem("PRIVATE KEY", pkcs8.as_ref());
        let encoding = EncodingKey::from_rsa_pem(pem.as_bytes()).expect("jsonwebtoken RSA key");
        let public = pair.public_key();
        let n = URL_SAFE_NO_PAD.encode(public.modulus().big_endian_without_leading_zero());
        let e = URL_SAFE_NO_PAD.encode(public.exponent().big_endian_without_leading_zero());
        let public_der = AsDer::<PublicKeyX509Der>::as_der(public)
            .expect("SPKI encoding")
            .as_ref()
            .to_vec();
        Self {
            kid: kid.to_owned(),
            endorsements: endorsements.iter().map(|s| s.to_string()).collect(),
            encoding,
            n,
            e,
            public_der,
        }
    }

    /// The key as the Bot Framework's JWKS lists it.
    pub fn jwk(&self) -> Value {
        json!({
            "kty": "RSA",
            "use": "sig",
            "kid": self.kid,
            "x5t": self.kid,
            "n": self.n,
            "e": self.e,
            "x5c": [STANDARD.encode(&self.public_der)],
            "endorsements": self.endorsements,
        })
    }

    /// An RS256 token with this key's `kid` over `claims`.
    pub fn sign(&self, claims: &Value) -> String {
        let mut header = Header::new(Algorithm::RS256);
        header.kid = Some(self.kid.clone());
        header.typ = Some("JWT".into());
        jsonwebtoken::encode(&header, claims, &self.encoding).expect("RS256 signing")
    }

    /// The classic key-confusion attack: HS256 with the public key as the HMAC secret.
    pub fn sign_hs256_with_public_key(&self, claims: &Value) -> String {
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, claims, &EncodingKey::from_secret(&self.public_der))
            .expect("HS256 signing")
    }

    /// A token that claims `alg: none` and carries no signature.
    pub fn unsigned_alg_none(&self, claims: &Value) -> String {
        let header = json!({"alg": "none", "typ": "JWT", "kid": self.kid});
        format!(
            "{}.{}.",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        )
    }
}

/// Claims of a Bot Connector token for `app_id`, bound to `service_url`, valid for an hour.
pub fn connector_claims(app_id: &str, service_url: &str) -> Value {
    let now = now_secs();
    json!({
        "iss": CONNECTOR_ISSUER,
        "aud": app_id,
        "exp": now + 3600,
        "nbf": now - 10,
        "iat": now - 10,
        "serviceurl": service_url,
    })
}

pub fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or_default()
}

fn to_pem(label: &str, der: &[u8]) -> String {
    let body = STANDARD.encode(der);
    let mut pem = format!("-----BEGIN {label}-----\n");
    for line in body.as_bytes().chunks(64) {
        pem.push_str(std::str::from_utf8(line).unwrap_or_default());
        pem.push('\n');
    }
    pem.push_str(&format!("-----END {label}-----\n"));
    pem
}
