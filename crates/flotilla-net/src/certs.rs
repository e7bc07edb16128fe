//! `flotilla certs`: a local certificate authority, a server certificate, a client
//! certificate (for mutual TLS) and bearer tokens, for a deployment without an existing PKI.

use crate::NetError;
use rand::Rng;
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use std::path::{Path, PathBuf};

/// Files written by [`generate`].
#[derive(Debug, Clone)]
pub struct CertFiles {
    /// CA certificate (give it to every client: `--ca`).
    pub ca: PathBuf,
    /// Server certificate and key (`flotilla serve --cert --key`).
    pub server_cert: PathBuf,
    /// Server key.
    pub server_key: PathBuf,
    /// Client certificate and key (mutual TLS: `flotilla join --cert --key`).
    pub client_cert: PathBuf,
    /// Client key.
    pub client_key: PathBuf,
    /// Bearer tokens, one per client (`flotilla serve --tokens`, `flotilla join --token`).
    pub tokens: PathBuf,
}

fn err(e: impl std::fmt::Display) -> NetError {
    NetError::Setup(format!("cannot make certificates: {e}"))
}

/// Writes a CA, a server certificate for `hosts` (DNS names or IP addresses), a client
/// certificate and `num_tokens` random tokens into `dir`. Keys are written with mode 0600.
pub fn generate(dir: &Path, hosts: &[String], num_tokens: usize) -> Result<CertFiles, NetError> {
    std::fs::create_dir_all(dir)
        .map_err(|e| NetError::Setup(format!("cannot create {}: {e}", dir.display())))?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).map_err(err)?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "flotilla local CA");
    let ca =
        CertifiedIssuer::self_signed(ca_params, KeyPair::generate().map_err(err)?).map_err(err)?;
    let leaf = |names: Vec<String>, cn: &str| -> Result<(String, String), NetError> {
        let mut p = CertificateParams::new(names).map_err(err)?;
        p.distinguished_name.push(DnType::CommonName, cn);
        let key = KeyPair::generate().map_err(err)?;
        let cert = p.signed_by(&key, &ca).map_err(err)?;
        Ok((cert.pem(), key.serialize_pem()))
    };
    let (server_pem, server_key) = leaf(hosts.to_vec(), "flotilla server")?;
    let (client_pem, client_key) = leaf(vec!["flotilla-client".into()], "flotilla client")?;
    let mut rng = rand::rng();
    let tokens: String = (0..num_tokens.max(1))
        .map(|i| {
            let t: String = (0..32)
                .map(|_| format!("{:x}", rng.random_range(0..16u8)))
                .collect();
            format!("client-{i} {t} {i}\n")
        })
        .collect();
    let files = CertFiles {
        ca: dir.join("ca.pem"),
        server_cert: dir.join("server.pem"),
        server_key: dir.join("server.key"),
        client_cert: dir.join("client.pem"),
        client_key: dir.join("client.key"),
        tokens: dir.join("tokens.txt"),
    };
    let write = |path: &Path, text: &str, secret: bool| -> Result<(), NetError> {
        std::fs::write(path, text)
            .map_err(|e| NetError::Setup(format!("cannot write {}: {e}", path.display())))?;
        #[cfg(unix)]
        if secret {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
                .map_err(|e| NetError::Setup(format!("{}: {e}", path.display())))?;
        }
        let _ = secret;
        Ok(())
    };
    write(&files.ca, &ca.pem(), false)?;
    write(&files.server_cert, &server_pem, false)?;
    write(&files.server_key, &server_key, true)?;
    write(&files.client_cert, &client_pem, false)?;
    write(&files.client_key, &client_key, true)?;
    write(&files.tokens, &tokens, true)?;
    Ok(files)
}
