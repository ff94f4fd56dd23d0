//! Who is calling: a uid from `SO_PEERCRED` resolved to a user name, or a client certificate
//! mapped to one.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long a uid → name answer is reused (NSS lookups can be slow: LDAP, sssd).
const NAME_CACHE_TTL: Duration = Duration::from_secs(60);

/// The caller of one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The user name jobs are owned by.
    pub user: String,
    /// The uid, for callers on the socket.
    pub uid: Option<u32>,
    /// `unix` or `https`.
    pub via: &'static str,
}

/// Whether `name` can be a user name here: what `useradd` accepts, plus `uid:N` for uids
/// without a passwd entry.
pub fn valid_user_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-:@$".contains(&b))
}

/// How many times a failing user-database lookup is tried before the request fails.
pub const LOOKUP_ATTEMPTS: u32 = 3;
/// The pause after the first failed attempt (doubled after each further one).
const LOOKUP_RETRY_PAUSE: Duration = Duration::from_millis(100);
/// Longest one lookup may take (a hung LDAP server); past it the attempt has failed.
const LOOKUP_TIMEOUT: Duration = Duration::from_secs(5);

/// What the user database answered for a uid: a name, or that it has no entry. An `Err` is a
/// failed lookup (NSS module unreachable, I/O error), which is not the same as no entry.
pub type LookupResult = Result<Option<String>, String>;

/// The lookup behind [`UserNames`]: the system's (`getpwuid_r` through NSS) unless a test
/// injects another.
pub type Lookup = dyn Fn(u32) -> LookupResult + Send + Sync;

/// The user database could not tell who a uid is: the request fails (503) rather than act as
/// anyone else.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot look up uid {uid} in the user database ({reason}); try again")]
pub struct LookupError {
    /// The uid.
    pub uid: u32,
    /// The last failure.
    pub reason: String,
}

fn system_lookup(uid: u32) -> LookupResult {
    nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid))
        .map(|user| user.map(|u| u.name))
        .map_err(|errno| errno.desc().to_owned())
}

/// Resolves uids to names through the system's user database, with a short cache.
///
/// A uid without an entry is `uid:N` (still a distinct identity: no name can start with
/// `uid:`). A lookup that fails is tried [`LOOKUP_ATTEMPTS`] times, then the caller gets
/// [`LookupError`]: an error never becomes "no entry", so a user is never turned into
/// `uid:N` (another owner, whose jobs are not theirs) by an LDAP or sssd outage.
pub struct UserNames {
    cache: Mutex<HashMap<u32, (String, Instant)>>,
    cache_ttl: Duration,
    lookup: Arc<Lookup>,
    warning: common::admission::Warning,
}

impl std::fmt::Debug for UserNames {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserNames").finish_non_exhaustive()
    }
}

impl Default for UserNames {
    fn default() -> Self {
        Self::with_lookup(Arc::new(system_lookup), NAME_CACHE_TTL)
    }
}

impl UserNames {
    /// Names from `lookup` instead of the system's user database (tests), each answer reused
    /// for `cache_ttl`.
    pub fn with_lookup(lookup: Arc<Lookup>, cache_ttl: Duration) -> Self {
        Self {
            cache: Mutex::new(HashMap::new()),
            cache_ttl,
            lookup,
            warning: common::admission::Warning::default(),
        }
    }

    /// The name of `uid`; `uid:N` when the user database has no entry.
    ///
    /// # Errors
    /// Every attempt to look it up failed: [`LookupError`].
    pub async fn name(&self, uid: u32) -> Result<String, LookupError> {
        let now = Instant::now();
        if let Ok(cache) = self.cache.lock() {
            if let Some((name, at)) = cache.get(&uid) {
                if now.duration_since(*at) < self.cache_ttl {
                    return Ok(name.clone());
                }
            }
        }
        let mut pause = LOOKUP_RETRY_PAUSE;
        let mut reason = String::new();
        for attempt in 1..=LOOKUP_ATTEMPTS {
            if attempt > 1 {
                tokio::time::sleep(pause).await;
                pause = pause.saturating_mul(2);
            }
            // NSS may block (LDAP, sssd): off the async workers, and with a deadline.
            let lookup = self.lookup.clone();
            let answer = tokio::time::timeout(
                LOOKUP_TIMEOUT,
                tokio::task::spawn_blocking(move || (*lookup)(uid)),
            )
            .await;
            let answer = match answer {
                Ok(Ok(answer)) => answer,
                Ok(Err(join)) => Err(format!("lookup thread: {join}")),
                Err(_) => Err(format!("no answer within {LOOKUP_TIMEOUT:?}")),
            };
            match answer {
                Ok(entry) => {
                    let name = match entry {
                        Some(name) if valid_user_name(&name) && !name.starts_with("uid:") => name,
                        _ => format!("uid:{uid}"),
                    };
                    self.remember(uid, &name, now);
                    return Ok(name);
                }
                Err(err) => reason = err,
            }
        }
        if let Some(failed) = self.warning.note(tokio::time::Instant::now()) {
            tracing::warn!(
                uid,
                reason = ?reason,
                failed,
                attempts = LOOKUP_ATTEMPTS,
                "user database lookup failed; answering 503 (logged at most once per 10 s)"
            );
        }
        Err(LookupError { uid, reason })
    }

    fn remember(&self, uid: u32, name: &str, now: Instant) {
        if let Ok(mut cache) = self.cache.lock() {
            if cache.len() > 4096 {
                cache.clear();
            }
            cache.insert(uid, (name.to_owned(), now));
        }
    }
}

/// Maps a verified client certificate to a user: `CN=<cn>` or `sha256:<hex>` keys.
pub fn map_certificate(
    users: &std::collections::BTreeMap<String, String>,
    peer: &common::tls::PeerIdentity,
) -> Option<String> {
    users
        .get(&format!("sha256:{}", peer.sha256))
        .or_else(|| {
            peer.cn
                .as_ref()
                .and_then(|cn| users.get(&format!("CN={cn}")))
        })
        .cloned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn names() {
        let names = UserNames::default();
        assert_eq!(names.name(0).await.unwrap(), "root");
        assert_eq!(names.name(3_999_999).await.unwrap(), "uid:3999999");
        assert!(valid_user_name("alice"));
        assert!(valid_user_name("uid:5"));
        assert!(!valid_user_name("a b"));
        assert!(!valid_user_name(""));
    }

    /// Issue 16: a failing NSS or LDAP lookup turned a user into `uid:N`. An error is retried,
    /// then it is an error; only "no entry" is `uid:N`.
    #[tokio::test]
    async fn a_failing_lookup_is_an_error_not_another_identity() {
        use std::sync::atomic::{AtomicU32, Ordering};
        let calls = Arc::new(AtomicU32::new(0));
        let counted = calls.clone();
        let names = UserNames::with_lookup(
            Arc::new(move |_: u32| -> LookupResult {
                counted.fetch_add(1, Ordering::Relaxed);
                Err("Input/output error".into())
            }),
            Duration::ZERO,
        );
        let err = names.name(1000).await.unwrap_err();
        assert_eq!(err.uid, 1000);
        assert!(err.to_string().contains("Input/output error"), "{err}");
        assert_eq!(calls.load(Ordering::Relaxed), LOOKUP_ATTEMPTS, "retried");

        // A lookup that fails once and then answers: the name, not an error.
        let calls = Arc::new(AtomicU32::new(0));
        let counted = calls.clone();
        let names = UserNames::with_lookup(
            Arc::new(move |_: u32| -> LookupResult {
                if counted.fetch_add(1, Ordering::Relaxed) == 0 {
                    Err("Connection refused".into())
                } else {
                    Ok(Some("alice".into()))
                }
            }),
            Duration::ZERO,
        );
        assert_eq!(names.name(1000).await.unwrap(), "alice");
        // No entry at all is still the distinct `uid:N`.
        let names = UserNames::with_lookup(
            Arc::new(|_: u32| -> LookupResult { Ok(None) }),
            Duration::ZERO,
        );
        assert_eq!(names.name(1000).await.unwrap(), "uid:1000");
    }
}
