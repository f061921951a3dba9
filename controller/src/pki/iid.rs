//! EC2 instance identity documents: the JSON document IMDS serves at
//! `dynamic/instance-identity/document`, signed by AWS (RSA SHA-256, the
//! base64 `dynamic/instance-identity/signature`). The AWS public
//! certificates that verify it are configuration
//! (`pki.instance_identity_certificates`, a PEM bundle: one per region the
//! fleet runs in); in tests, the fake IMDS signs with a test key whose
//! certificate the test's configuration names.
//!
//! A verified document says which instance, account and region the caller
//! runs on; whether that instance may enrol for a site is decided by
//! `agents::enrol`.

use std::path::{Path, PathBuf};

use aws_lc_rs::signature::{RSA_PKCS1_2048_8192_SHA256, UnparsedPublicKey};
use base64::Engine;
use x509_parser::prelude::{FromDer, X509Certificate};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IidError {
    #[error("cannot read the instance identity certificates {path}: {why}")]
    Config { path: PathBuf, why: String },
    #[error("no instance identity document was sent")]
    Missing,
    #[error("the instance identity signature is not base64")]
    SignatureEncoding,
    #[error(
        "the instance identity document's signature does not verify with any configured AWS certificate (forged, or signed for another partition)"
    )]
    BadSignature,
    #[error("the instance identity document is not valid JSON with instanceId, accountId and region: {0}")]
    Document(String),
}

/// What a verified document says (the fields the controller uses).
#[derive(Clone, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InstanceDocument {
    pub instance_id: String,
    pub account_id: String,
    pub region: String,
    #[serde(default)]
    pub private_ip: Option<String>,
    #[serde(default)]
    pub pending_time: Option<String>,
}

/// The configured AWS public keys.
#[derive(Clone, Debug)]
pub struct IidVerifier {
    keys: Vec<Vec<u8>>,
}

impl IidVerifier {
    /// Reads every certificate of a PEM bundle.
    pub fn load(path: &Path) -> Result<IidVerifier, IidError> {
        let bad = |why: String| IidError::Config { path: path.to_owned(), why };
        let certs = dr_proto::tls::load_certs(path).map_err(|e| bad(e.to_string()))?;
        let mut keys = Vec::new();
        for der in certs {
            let (_, cert) = X509Certificate::from_der(der.as_ref()).map_err(|e| bad(e.to_string()))?;
            keys.push(cert.public_key().subject_public_key.data.to_vec());
        }
        Ok(IidVerifier { keys })
    }

    /// Checks the signature, then reads the document. Nothing of an
    /// unverified document is read.
    pub fn verify(&self, document: &[u8], signature_b64: &str) -> Result<InstanceDocument, IidError> {
        if document.is_empty() {
            return Err(IidError::Missing);
        }
        let compact: String = signature_b64.chars().filter(|c| !c.is_whitespace()).collect();
        let signature = base64::engine::general_purpose::STANDARD.decode(compact).map_err(|_| IidError::SignatureEncoding)?;
        let ok = self.keys.iter().any(|k| UnparsedPublicKey::new(&RSA_PKCS1_2048_8192_SHA256, k).verify(document, &signature).is_ok());
        if !ok {
            return Err(IidError::BadSignature);
        }
        serde_json::from_slice(document).map_err(|e| IidError::Document(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_lc_rs::rsa::KeyPair as RsaKeyPair;
    use aws_lc_rs::signature::{KeyPair, RSA_PKCS1_SHA256};

    fn signer() -> (RsaKeyPair, IidVerifier) {
        let key = RsaKeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).expect("rsa key");
        let public = key.public_key().as_ref().to_vec();
        (key, IidVerifier { keys: vec![public] })
    }

    fn sign(key: &RsaKeyPair, doc: &[u8]) -> String {
        let mut sig = vec![0; key.public_modulus_len()];
        key.sign(&RSA_PKCS1_SHA256, &aws_lc_rs::rand::SystemRandom::new(), doc, &mut sig).expect("sign");
        base64::engine::general_purpose::STANDARD.encode(sig)
    }

    #[test]
    fn a_signed_document_verifies_and_a_changed_one_does_not() {
        let (key, verifier) = signer();
        let doc = br#"{"instanceId":"i-0123456789abcdef0","accountId":"123456789012","region":"us-east-1"}"#;
        let sig = sign(&key, doc);
        let d = verifier.verify(doc, &sig).expect("verifies");
        assert_eq!(
            (d.instance_id.as_str(), d.account_id.as_str(), d.region.as_str()),
            ("i-0123456789abcdef0", "123456789012", "us-east-1")
        );
        let forged = br#"{"instanceId":"i-0000000000000000a","accountId":"123456789012","region":"us-east-1"}"#;
        assert_eq!(verifier.verify(forged, &sig), Err(IidError::BadSignature));
        let (other, _) = signer();
        assert_eq!(verifier.verify(doc, &sign(&other, doc)), Err(IidError::BadSignature));
        assert_eq!(verifier.verify(doc, "%%%"), Err(IidError::SignatureEncoding));
        assert_eq!(verifier.verify(b"", &sig), Err(IidError::Missing));
    }
}
