//! The state every connection shares ([`Shared`]) and who is on the other end of one
//! ([`Peer`]).
//!
//! This module sits below every handler: `server` (listeners, HTTP), `channel`, `inbound`,
//! `admin`, `pipes` and `ipc` depend on it, and it depends on none of them (only on `config`,
//! `hub`, `token`, `budget` and `metrics`), so the module graph stays a tree, as mini-redis keeps its
//! `Db` apart from its `server`. What several handlers do to the shared state alone (stop a
//! pipe, number a connection) lives here too.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::admission::{Admission, Pool};
use common::daemon::Shutdown;
use common::tls::{LivePeer, PeerIdentity, ServerTls};

use crate::budget::{Budget, Shares};
use crate::config::Config;
use crate::hub::{ClientId, Hub, PipeError, PipeId};
use crate::metrics::Metrics;
use crate::token::Tokens;

/// State every connection shares.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) config: Config,
    pub(crate) tokens: Tokens,
    pub(crate) hub: Hub,
    pub(crate) shutdown: Shutdown,
    pub(crate) tls: Option<Arc<ServerTls>>,
    pub(crate) next_conn: AtomicU64,
    /// Upload paths being written (a second writer gets an `error`).
    pub(crate) uploads: Mutex<HashSet<PathBuf>>,
    /// Serialises read-modify-write of `model_info.json`.
    pub(crate) model_info_lock: Mutex<()>,
    /// The latest `checkSum` broadcast (a text message), one copy shared by every admin
    /// connection; each connection writes the latest it has not written yet.
    pub(crate) model_info: tokio::sync::watch::Sender<Option<bytes::Bytes>>,
    /// Bytes of incoming messages held in memory, all connections together and each party's
    /// share.
    pub(crate) budget: Arc<Shares>,
    /// The TCP front door: strangers in the handshake, then `max_connections`.
    pub(crate) admission: Admission,
    /// The Unix socket's own pool (`max_local_connections`).
    pub(crate) local: Arc<Pool>,
    /// What `/metrics` exports.
    pub(crate) metrics: Metrics,
}

impl Shared {
    /// The state of a new server; `tls` is required when the configuration has a TCP listener.
    pub(crate) fn new(
        config: Config,
        tokens: Tokens,
        tls: Option<Arc<ServerTls>>,
        shutdown: Shutdown,
    ) -> Self {
        let limits = config.tls.as_ref().map_or_else(
            || {
                common::admission::Limits::new(
                    config.limits.max_connections,
                    common::tls::DEFAULT_HANDSHAKE_TIMEOUT,
                )
            },
            |tls| tls.admission(config.limits.max_connections),
        );
        let admission = Admission::new("https", limits);
        let local = Pool::new(
            "unix",
            "max_local_connections",
            config.limits.max_local_connections,
        );
        let budget = Shares::new(
            Budget::new(config.limits.max_bytes_in_flight),
            config.limits.max_bytes_in_flight_per_identity,
        );
        Self {
            config,
            tokens,
            hub: Hub::default(),
            shutdown,
            tls,
            next_conn: AtomicU64::new(1),
            uploads: Mutex::new(HashSet::new()),
            model_info_lock: Mutex::new(()),
            model_info: tokio::sync::watch::Sender::new(None),
            budget,
            admission,
            local,
            metrics: Metrics::new(),
        }
    }

    /// A connection number.
    pub(crate) fn next_conn(&self) -> u64 {
        self.next_conn.fetch_add(1, Ordering::Relaxed)
    }

    /// `[tls] max_connection_age_secs`, for every connection (the Unix socket's too).
    pub(crate) fn max_connection_age(&self) -> Duration {
        self.config
            .tls
            .as_ref()
            .map_or(common::tls::DEFAULT_MAX_CONNECTION_AGE, |t| {
                t.max_connection_age()
            })
    }

    /// Stops a pipe owned by `client` (`None`: any pipe): asks it over IPC when it has checked
    /// in, and lets its supervisor escalate to SIGTERM and SIGKILL.
    ///
    /// # Errors
    /// No such pipe, or not `client`'s.
    ///
    /// `request` is the owner's `destroy` payload (the dlafs dialect passes it on).
    pub(crate) fn destroy_pipe(
        &self,
        client: Option<ClientId>,
        pipe: PipeId,
        request: Option<&serde_json::Value>,
    ) -> Result<(), PipeError> {
        let (stop, checked_in) = self.hub.begin_destroy(client, pipe)?;
        if checked_in {
            let owner = self.hub.owner(pipe).unwrap_or_default();
            let ask = self.config.ipc_dialect.destroy(pipe, owner, request);
            let _ = self.hub.send_to_pipe(None, pipe, ask);
        }
        stop.cancel();
        Ok(())
    }
}

/// Who is on the other end of a connection.
#[derive(Debug, Clone)]
pub(crate) struct Peer {
    /// Address, or `unix` for the Unix socket.
    pub(crate) addr: String,
    /// Verified certificate identity (TCP with a client certificate).
    pub(crate) identity: Option<PeerIdentity>,
    /// Re-checks the certificate against the CRLs loaded now (TCP only).
    pub(crate) live: Option<LivePeer>,
}

impl Peer {
    /// Who pays for this connection's pipes and memory: its certificate (`sha256:` of the
    /// DER), else its local uid (`unix:uid=N`), else its address without the port. Tokens
    /// are free (each `GET /` mints a new client id), so limits meant for one party are
    /// kept by this key, not by client id.
    pub(crate) fn key(&self) -> String {
        if let Some(identity) = &self.identity {
            return format!("sha256:{}", identity.sha256);
        }
        match self.addr.rsplit_once(':') {
            Some((host, port)) if !self.addr.starts_with("unix") && port.parse::<u16>().is_ok() => {
                host.to_owned()
            }
            _ => self.addr.clone(),
        }
    }
}
