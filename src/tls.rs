//! TLS helpers shared by the analytics client and the broker connection: reading an
//! extra CA file (`ANALYTICS_CA_FILE`, `AMQP_CA_FILE`) and telling a refused server
//! certificate apart from other connection failures.
//!
//! Certificate checks are always on; these files only add trust anchors beside the
//! system's roots.

use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

/// Reads a PEM file of CA certificates and checks that it holds at least one, each
/// usable as a trust anchor. Returns the file's text. The error says what is wrong in
/// words (the caller names the setting).
pub fn read_ca_pem(path: &str) -> Result<String, String> {
    let pem = std::fs::read_to_string(path).map_err(|e| format!("cannot read {path}: {e}"))?;
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{path} is not a valid PEM file: {e}"))?;
    if certs.is_empty() {
        return Err(format!(
            "{path} holds no PEM certificate (a \"-----BEGIN CERTIFICATE-----\" block)"
        ));
    }
    let mut roots = rustls::RootCertStore::empty();
    for (i, cert) in certs.into_iter().enumerate() {
        roots
            .add(cert)
            .map_err(|e| format!("certificate {} of {path} is not usable as a CA: {e}", i + 1))?;
    }
    Ok(pem)
}

/// When `err` (or anything in its chain of sources) is rustls refusing the server's
/// certificate, the reason rustls gave (`invalid peer certificate: UnknownIssuer`, ...).
///
/// Such a failure is a configuration problem, not a transient one: the same certificate
/// will be refused again until the CA is trusted or the certificate fixed.
pub fn certificate_refused(err: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut next = Some(err);
    while let Some(e) = next {
        if let Some(r @ rustls::Error::InvalidCertificate(_)) = e.downcast_ref::<rustls::Error>() {
            return Some(r.to_string());
        }
        // rustls errors travel inside `io::Error`s (reqwest's: one inside another), whose
        // `source()` skips the error they wrap: step into them explicitly.
        next = match e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            Some(inner) => Some(inner as &(dyn std::error::Error + 'static)),
            None => e.source(),
        };
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_or_certificate_free_file_is_refused_with_its_path() {
        let dir = std::env::temp_dir();
        let missing = dir.join(format!("loansync-ca-missing-{}", uuid::Uuid::new_v4()));
        let err = read_ca_pem(missing.to_str().unwrap()).unwrap_err();
        assert!(err.starts_with("cannot read"), "{err}");

        let garbage = dir.join(format!("loansync-ca-garbage-{}", uuid::Uuid::new_v4()));
        std::fs::write(&garbage, "not a certificate\n").unwrap();
        let err = read_ca_pem(garbage.to_str().unwrap()).unwrap_err();
        assert!(err.contains("holds no PEM certificate"), "{err}");

        std::fs::write(
            &garbage,
            "-----BEGIN CERTIFICATE-----\nbm90IGRlcg==\n-----END CERTIFICATE-----\n",
        )
        .unwrap();
        let err = read_ca_pem(garbage.to_str().unwrap()).unwrap_err();
        assert!(err.contains("not usable as a CA"), "{err}");
        std::fs::remove_file(garbage).unwrap();
    }

    #[test]
    fn a_refused_certificate_is_found_inside_an_io_error() {
        let refused = rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer);
        // As reqwest reports it: an io::Error inside an io::Error.
        let io = std::io::Error::new(std::io::ErrorKind::InvalidData, refused);
        let io = std::io::Error::other(io);
        let wrapped = anyhow::Error::new(io).context("cannot connect");
        let reason = certificate_refused(wrapped.as_ref()).unwrap();
        assert!(reason.contains("UnknownIssuer"), "{reason}");
        let other = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        assert_eq!(certificate_refused(&other), None);
    }
}
