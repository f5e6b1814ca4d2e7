//! TLS for the HTTP client and for AMQP connections: rustls with the `ring` provider, trusting the
//! platform's roots plus, optionally, the certificates of a private CA (a PEM file).
//!
//! - HTTPS: [`Client::builder`](crate::Client::builder) with
//!   [`ca_cert`](crate::http::ClientBuilder::ca_cert), or any `https://` URL signed by a CA the
//!   platform trusts.
//! - `amqps://`: [`amqp_connect`] with [`amqp_tls_config`], which the worker SDK and the
//!   orchestrator use too.
//!
//! ```no_run
//! use tasker_client::tls::{amqp_connect, amqp_tls_config, read_ca_pem};
//!
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! let ca = read_ca_pem("ca.pem".as_ref())?;
//! let tls = amqp_tls_config(Some(ca));
//! let connection = amqp_connect(
//!     "amqps://guest:guest@localhost:5671/%2f",
//!     lapin::ConnectionProperties::default(),
//!     &tls,
//! )
//! .await?;
//! # Ok(()) }
//! ```

use lapin::tcp::OwnedTLSConfig;
use lapin::{Connection, ConnectionProperties, DefaultConnectionBuilder};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use std::path::{Path, PathBuf};

/// A CA certificate file that cannot be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsError {
    #[error("cannot read CA certificate file {path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("invalid CA certificate file {path}: {error}")]
    Invalid { path: PathBuf, error: String },
}

/// Makes rustls's `ring` provider the process default, unless a provider is installed already.
///
/// reqwest is built without a provider of its own (no aws-lc): a `reqwest::Client` built in this
/// process needs a default one. [`Client`](crate::Client) calls this; call it yourself before
/// building other reqwest clients first.
pub fn install_crypto_provider() {
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        // Another thread may install one at the same time: either is fine.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
}

/// Reads a PEM file of one or more CA certificates; fails unless it holds at least one and all
/// of them read.
pub fn read_ca_pem(path: &Path) -> Result<String, TlsError> {
    let pem = std::fs::read_to_string(path).map_err(|error| TlsError::Read {
        path: path.to_owned(),
        error,
    })?;
    parse_certificates(&pem).map_err(|error| TlsError::Invalid {
        path: path.to_owned(),
        error,
    })?;
    Ok(pem)
}

/// Checks that a PEM text holds at least one certificate and nothing unreadable.
pub fn check_ca_pem(pem: &str) -> Result<(), String> {
    parse_certificates(pem).map(|_| ())
}

/// The certificates of a PEM text (at least one).
pub(crate) fn parse_certificates(pem: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    if certs.is_empty() {
        return Err("no PEM certificate (-----BEGIN CERTIFICATE-----) in it".into());
    }
    Ok(certs)
}

/// TLS settings for an `amqps://` connection: the platform's roots plus the CA certificates in
/// `ca_pem` (see [`read_ca_pem`]). Without `ca_pem`, the platform's roots only. Ignored by
/// `amqp://` connections.
pub fn amqp_tls_config(ca_pem: Option<String>) -> OwnedTLSConfig {
    OwnedTLSConfig {
        identity: None,
        cert_chain: ca_pem,
    }
}

/// Opens an AMQP connection (`amqp://` or `amqps://`) with the TLS settings `tls`.
pub async fn amqp_connect(
    url: &str,
    properties: ConnectionProperties,
    tls: &OwnedTLSConfig,
) -> lapin::Result<Connection> {
    DefaultConnectionBuilder::new()?
        .with_uri_str(url.to_owned())
        .with_properties(properties)
        .with_tls_config(tls.clone())
        .connect()
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_ca_files_are_refused_with_their_path() {
        let dir = std::env::temp_dir().join(format!("tasker-client-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let missing = dir.join("missing.pem");
        let err = read_ca_pem(&missing).unwrap_err();
        assert!(matches!(err, TlsError::Read { .. }), "{err}");
        assert!(err.to_string().contains("missing.pem"), "{err}");

        let empty = dir.join("empty.pem");
        std::fs::write(&empty, "no certificate here\n").unwrap();
        let err = read_ca_pem(&empty).unwrap_err();
        assert!(err.to_string().contains("no PEM certificate"), "{err}");

        let broken = dir.join("broken.pem");
        std::fs::write(
            &broken,
            "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        assert!(read_ca_pem(&broken).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_provider_can_be_installed_twice() {
        install_crypto_provider();
        install_crypto_provider();
        assert!(rustls::crypto::CryptoProvider::get_default().is_some());
    }
}
