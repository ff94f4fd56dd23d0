//! The broker's own CA, kept in the state directory (`ca.crt`, `ca.key` 0600), made on first
//! start. It issues each ssl job a server certificate and a client certificate for the job's
//! owner (CN = the user name), and signs the CRL of certificates whose job has ended.

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use common::pki::{
    Ca, CaParams, CrlParams, Issued, KeyType, LeafParams, Name, San, Usage, Validity,
};
use time::{Duration, OffsetDateTime};

/// Errors from the CA.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// Issuing or loading failed.
    #[error("broker CA: {0}")]
    Pki(#[from] common::pki::PkiError),
    /// The key or certificate file could not be read or written.
    #[error("broker CA: {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The key file is readable by others.
    #[error("broker CA: {0} must not be readable by group or others (chmod 600)")]
    KeyMode(PathBuf),
}

/// Server and client certificate of one ssl job.
#[derive(Debug, Clone)]
pub struct JobCerts {
    /// The job's server certificate.
    pub server: Issued,
    /// The owner's client certificate.
    pub client: Issued,
}

/// The CA plus a cached CRL.
pub struct BrokerCa {
    ca: Ca,
    crl: Mutex<Option<(Vec<String>, String, OffsetDateTime)>>,
}

impl std::fmt::Debug for BrokerCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BrokerCa").finish_non_exhaustive()
    }
}

/// How long a CRL is valid; clients refresh it well before (the gate on every heartbeat).
const CRL_LIFETIME: Duration = Duration::days(2);
/// A cached CRL is re-signed after this even when nothing changed.
const CRL_REFRESH: Duration = Duration::hours(1);

impl BrokerCa {
    /// Loads `dir/ca.crt` and `dir/ca.key`, or makes them (the key 0600) when both are
    /// missing. `host` goes into the CA's name.
    ///
    /// # Errors
    /// [`CaError`]; a key readable by others is refused.
    pub fn load_or_create(dir: &Path, host: &str) -> Result<Self, CaError> {
        use std::os::unix::fs::MetadataExt as _;
        let cert_path = dir.join("ca.crt");
        let key_path = dir.join("ca.key");
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| CaError::Io { path, source }
        };
        if !cert_path.exists() && !key_path.exists() {
            let mut params =
                CaParams::new(Name::new(format!("broker CA {host}")).with_organization("broker"));
            params.key_type = KeyType::P256;
            params.path_len = Some(0);
            let ca = Ca::new_root(&params)?;
            // The key first, exclusively and private, then the certificate; a crash between the
            // two leaves a key without a certificate, which the next start reports.
            common::daemon::write_new_private(&key_path, ca.key_pem().as_bytes())
                .map_err(io(&key_path))?;
            std::fs::write(&cert_path, ca.cert_pem()).map_err(io(&cert_path))?;
            tracing::info!(path = %cert_path.display(), "made a new broker CA");
        }
        let mode = std::fs::metadata(&key_path).map_err(io(&key_path))?.mode();
        if mode & 0o077 != 0 {
            return Err(CaError::KeyMode(key_path));
        }
        let ca = Ca::load(&cert_path, &key_path)?;
        Ok(Self {
            ca,
            crl: Mutex::new(None),
        })
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        self.ca.cert_pem()
    }

    /// Issues the server certificate (SANs `sans`) and the client certificate of `owner` for
    /// job `job_id`, valid for `days`.
    ///
    /// # Errors
    /// [`CaError`].
    pub fn issue_job(
        &self,
        job_id: &str,
        owner: &str,
        sans: &[San],
        days: u32,
    ) -> Result<JobCerts, CaError> {
        let validity = Validity::starting(OffsetDateTime::now_utc(), Duration::days(days.into()));
        let mut server = LeafParams::new(
            Name::new(job_id)
                .with_organization("broker")
                .with_organizational_unit(owner),
            Usage::Server,
        )
        .with_sans(sans.iter().cloned());
        server.key_type = KeyType::P256;
        server.validity = validity;
        let mut client = LeafParams::new(
            Name::new(owner)
                .with_organization("broker")
                .with_organizational_unit(job_id),
            Usage::Client,
        );
        client.key_type = KeyType::P256;
        client.validity = validity;
        Ok(JobCerts {
            server: self.ca.issue_leaf(&server)?,
            client: self.ca.issue_leaf(&client)?,
        })
    }

    /// A CRL listing `revoked`, PEM; re-signed only when the list changed or the cached one
    /// is an hour old.
    ///
    /// # Errors
    /// [`CaError`].
    pub fn crl_pem(&self, revoked: Vec<String>) -> Result<String, CaError> {
        let now = OffsetDateTime::now_utc();
        let mut cache = self
            .crl
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((serials, pem, at)) = cache.as_ref() {
            if *serials == revoked && now - *at < CRL_REFRESH {
                return Ok(pem.clone());
            }
        }
        let mut params = CrlParams::new(now - Duration::minutes(5), CRL_LIFETIME);
        // Strictly increasing CRL numbers across restarts: milliseconds since the epoch.
        params.crl_number = u64::try_from(now.unix_timestamp_nanos() / 1_000_000).ok();
        for serial in &revoked {
            params = params.revoke(serial.clone());
        }
        let crl = self.ca.issue_crl(&params)?;
        *cache = Some((revoked, crl.pem.clone(), now));
        Ok(crl.pem)
    }
}
