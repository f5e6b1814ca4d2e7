//! TLS settings read at start: the HTTP API's certificate and key (HTTPS, rustls with the `ring`
//! provider) and the CA certificates trusted for `amqps://`. A file that cannot be read or used
//! fails the start with its setting and path named. PostgreSQL TLS needs nothing here: the
//! database URL says it (`sslmode=verify-full&sslrootcert=ca.pem`).

use crate::config::Config;
use crate::error::{Error, Result};
use lapin::tcp::OwnedTLSConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use std::path::Path;
use std::sync::Arc;
use tokio_rustls::TlsAcceptor;

/// The HTTP API's TLS acceptor when `http_tls_cert` and `http_tls_key` are set (HTTP/1.1 over
/// TLS 1.2 or 1.3); `None` for plain HTTP.
pub fn http_acceptor(config: &Config) -> Result<Option<TlsAcceptor>> {
    let Some((cert_path, key_path)) = config.http_tls()? else {
        return Ok(None);
    };
    let certs = read_certificates(cert_path)
        .map_err(|e| Error::Tls(format!("TASKER_HTTP_TLS_CERT {}: {e}", cert_path.display())))?;
    let key = PrivateKeyDer::from_pem_file(key_path).map_err(|e| {
        Error::Tls(format!(
            "TASKER_HTTP_TLS_KEY {}: {}",
            key_path.display(),
            pem_error(
                &e,
                "private key (BEGIN PRIVATE KEY, RSA PRIVATE KEY or EC PRIVATE KEY)"
            )
        ))
    })?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Tls(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| {
            Error::Tls(format!(
                "the certificate of TASKER_HTTP_TLS_CERT {} and the key of TASKER_HTTP_TLS_KEY {} cannot be used together: {e}",
                cert_path.display(),
                key_path.display()
            ))
        })?;
    server.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Some(TlsAcceptor::from(Arc::new(server))))
}

/// TLS settings of every broker connection: the CA certificates of `amqp_ca_cert` on top of the
/// platform's roots (used by `amqps://` URLs only).
pub fn amqp_tls(config: &Config) -> Result<OwnedTLSConfig> {
    let ca = match config.amqp_ca_cert() {
        Some(path) => Some(
            tasker_client::tls::read_ca_pem(path)
                .map_err(|e| Error::Tls(format!("TASKER_AMQP_CA_CERT: {e}")))?,
        ),
        None => None,
    };
    Ok(tasker_client::tls::amqp_tls_config(ca))
}

/// The certificates of a PEM file, at least one.
fn read_certificates(path: &Path) -> std::result::Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| pem_error(&e, "certificate"))?
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| pem_error(&e, "certificate"))?;
    if certs.is_empty() {
        return Err("no PEM certificate (BEGIN CERTIFICATE) in it".into());
    }
    Ok(certs)
}

fn pem_error(e: &rustls::pki_types::pem::Error, what: &str) -> String {
    use rustls::pki_types::pem::Error as E;
    match e {
        E::Io(io) => format!("cannot read it: {io}"),
        E::NoItemsFound => format!("no PEM {what} in it"),
        other => format!("invalid PEM: {other}"),
    }
}
