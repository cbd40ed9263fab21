//! Reading the PEM files of mutual TLS with errors that name the file and what is wrong,
//! at start-up rather than at the first handshake. Shared by the agent and the collector.

use std::path::Path;

use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};

/// The PEM text of a certificate chain (or CA bundle), checked to hold at least one
/// certificate.
pub fn certificates(path: &Path, what: &str) -> Result<String, String> {
    let text = read(path, what)?;
    let count = CertificateDer::pem_slice_iter(text.as_bytes())
        .map(|c| c.map_err(|e| format!("{what} {}: not a PEM certificate: {e}", path.display())))
        .collect::<Result<Vec<_>, _>>()?
        .len();
    if count == 0 {
        return Err(format!(
            "{what} {}: no PEM certificate in the file",
            path.display()
        ));
    }
    Ok(text)
}

/// The PEM text of a private key, checked to hold one.
pub fn private_key(path: &Path, what: &str) -> Result<String, String> {
    let text = read(path, what)?;
    PrivateKeyDer::from_pem_slice(text.as_bytes())
        .map_err(|e| format!("{what} {}: no usable PEM private key: {e}", path.display()))?;
    Ok(text)
}

fn read(path: &Path, what: &str) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| format!("{what} {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_file_and_the_problem() {
        let dir = std::env::temp_dir().join(format!("sensor-pem-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let junk = dir.join("junk.pem");
        std::fs::write(&junk, "hello\n").unwrap();
        let err = certificates(&junk, "--tls-ca").unwrap_err();
        assert!(
            err.contains("--tls-ca")
                && err.contains("junk.pem")
                && err.contains("no PEM certificate"),
            "{err}"
        );
        let err = private_key(&junk, "--tls-key").unwrap_err();
        assert!(
            err.contains("--tls-key") && err.contains("private key"),
            "{err}"
        );
        let err = certificates(&dir.join("missing.pem"), "--tls-cert").unwrap_err();
        assert!(err.contains("missing.pem"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
