//! Sessions: the cookie, the session key, the request-number rules and the attached
//! interactive command.
//!
//! Only logged-in sessions are stored. A request without a valid cookie is handed a fresh id
//! (as the original did) but nothing is remembered until it logs in, so anonymous traffic
//! cannot fill the table. Every login opens a new session under a new id (the original
//! re-keyed the session the cookie named, so anyone holding a cookie could take it over), and
//! one user holds at most `max_per_user` sessions: a replayed login evicts that user's oldest
//! session instead of filling the table for everyone.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use crate::exec::Interactive;
use crate::proto::Cipher;

/// Request-number window for Content-Length bodies (2 × TTL).
pub const WINDOW_SINGLE: Duration = Duration::from_secs(20);
/// Request-number window for chunked bodies (TTL).
pub const WINDOW_CHUNKED: Duration = Duration::from_secs(10);

/// One logged-in session.
#[derive(Debug)]
struct Session {
    cipher: Arc<Cipher>,
    user: String,
    req_no: i16,
    last_req: Option<Instant>,
    last_access: Instant,
    /// Login order: the lowest of a user's sessions is their oldest.
    serial: u64,
    interactive: Option<Interactive>,
    /// Cancelled when the session ends (dropped), which closes the connections it
    /// authenticated (`conns`).
    ended: CancellationToken,
}

impl Drop for Session {
    fn drop(&mut self) {
        self.ended.cancel();
    }
}

/// What a request learns about its session.
#[derive(Debug, Clone)]
pub struct Login {
    /// The session cipher.
    pub cipher: Arc<Cipher>,
    /// The logged-in user.
    pub user: String,
    /// Cancelled when the session ends.
    pub ended: CancellationToken,
}

/// The session table.
#[derive(Debug)]
pub struct Sessions {
    map: Mutex<HashMap<String, Session>>,
    timeout: Duration,
    max: usize,
    max_per_user: usize,
    serial: std::sync::atomic::AtomicU64,
}

/// Extracts the session id the way the original did: the first occurrence of the substring
/// `SESSION_ID=` in any `Cookie` header, up to the next `;`.
pub fn cookie_session_id<'a>(cookies: impl Iterator<Item = &'a [u8]>) -> Option<String> {
    for header in cookies {
        let text = std::str::from_utf8(header).ok()?;
        if let Some(at) = text.find("SESSION_ID=") {
            let rest = &text[at + "SESSION_ID=".len()..];
            let id = rest.split(';').next().unwrap_or("").trim();
            if !id.is_empty() && id.len() <= 64 {
                return Some(id.to_owned());
            }
        }
    }
    None
}

/// A new session id: 8 random bytes, URL-safe base64 without padding (11 characters, as
/// Python's `secrets.token_urlsafe(8)`).
pub fn new_session_id() -> String {
    use base64::Engine as _;
    use rand::RngCore as _;
    let mut bytes = [0u8; 8];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// The session table is full (every slot logged in and fresh).
#[derive(Debug, thiserror::Error)]
#[error("too many sessions")]
pub struct Full;

impl Sessions {
    /// An empty table: at most `max` sessions, `max_per_user` of them for one user.
    pub fn new(timeout: Duration, max: usize, max_per_user: usize) -> Self {
        Self {
            map: Mutex::new(HashMap::new()),
            timeout,
            max,
            max_per_user: max_per_user.max(1),
            serial: std::sync::atomic::AtomicU64::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Session>> {
        self.map
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Looks the cookie's session up and refreshes its idle timer. An unknown or expired id
    /// yields a fresh id and no login.
    pub fn resolve(&self, cookie: Option<String>, now: Instant) -> (String, Option<Login>) {
        let mut map = self.lock();
        if let Some(id) = cookie {
            let expired = match map.get_mut(&id) {
                Some(session) if now.duration_since(session.last_access) > self.timeout => true,
                Some(session) => {
                    session.last_access = now;
                    let login = Login {
                        cipher: Arc::clone(&session.cipher),
                        user: session.user.clone(),
                        ended: session.ended.clone(),
                    };
                    return (id, Some(login));
                }
                None => false,
            };
            if expired {
                // Dropping the session terminates its interactive command.
                map.remove(&id);
            }
        }
        (new_session_id(), None)
    }

    /// Opens a new session for `user` under a new id, which it returns with the token
    /// cancelled when the session ends. The session a cookie
    /// named is left as it is: a login never re-keys a live session. When `user` already holds
    /// `max_per_user` sessions, their oldest is ended (its interactive command terminated).
    ///
    /// # Errors
    /// [`Full`] when the table is at its cap even after removing expired sessions.
    pub fn login(
        &self,
        cipher: Cipher,
        user: &str,
        now: Instant,
    ) -> Result<(String, CancellationToken), Full> {
        let id = new_session_id();
        let end = CancellationToken::new();
        let serial = self
            .serial
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // Ended sessions are dropped after the lock is released (dropping one terminates its
        // interactive command).
        let mut ended: Vec<Session> = Vec::new();
        let result = {
            let mut map = self.lock();
            let mut mine: Vec<(u64, String)> = map
                .iter()
                .filter(|(_, s)| s.user == user)
                .map(|(id, s)| (s.serial, id.clone()))
                .collect();
            if mine.len() >= self.max_per_user {
                mine.sort_unstable();
                let excess = mine.len() + 1 - self.max_per_user;
                for (_, old) in mine.iter().take(excess) {
                    if let Some(session) = map.remove(old) {
                        ended.push(session);
                    }
                }
            }
            if map.len() >= self.max {
                let timeout = self.timeout;
                let expired: Vec<String> = map
                    .iter()
                    .filter(|(_, s)| now.duration_since(s.last_access) > timeout)
                    .map(|(id, _)| id.clone())
                    .collect();
                ended.extend(expired.iter().filter_map(|id| map.remove(id)));
            }
            if map.len() >= self.max {
                Err(Full)
            } else {
                map.insert(
                    id.clone(),
                    Session {
                        cipher: Arc::new(cipher),
                        user: user.to_owned(),
                        req_no: 0,
                        last_req: None,
                        last_access: now,
                        serial,
                        interactive: None,
                        ended: end.clone(),
                    },
                );
                Ok((id, end))
            }
        };
        for session in &ended {
            if now.duration_since(session.last_access) <= self.timeout {
                tracing::info!(user = %common::log::Clipped(&session.user), "oldest session of the user ended by a new login");
            }
        }
        drop(ended);
        result
    }

    /// Logs out (and invalidates): the key and the interactive command go.
    pub fn logout(&self, id: &str) -> Option<String> {
        let removed = self.lock().remove(id);
        removed.map(|session| session.user.clone())
    }

    /// Accepts a request number, or refuses it, in one step: within `window` of the last
    /// accepted request it must be the last one plus one; after that any number
    /// re-synchronises. An accepted number is recorded at once, with the time, so a copy of
    /// the same token sent while the first still runs is refused.
    pub fn accept_req_no(&self, id: &str, req_no: i16, window: Duration, now: Instant) -> bool {
        let mut map = self.lock();
        let Some(session) = map.get_mut(id) else {
            return false;
        };
        let ok = match session.last_req {
            Some(last) if now.duration_since(last) < window => {
                i32::from(req_no) == i32::from(session.req_no) + 1
            }
            _ => true,
        };
        if ok {
            session.req_no = req_no;
            session.last_req = Some(now);
        }
        ok
    }

    /// Records a completed request: the window counts from its end (as the original's
    /// `LAST_REQ`). Its number was recorded when it was accepted.
    pub fn commit(&self, id: &str, now: Instant) {
        if let Some(session) = self.lock().get_mut(id) {
            session.last_req = Some(now);
        }
    }

    /// Takes the attached interactive command out (it is put back with [`Sessions::attach`]).
    pub fn take_interactive(&self, id: &str) -> Option<Interactive> {
        self.lock().get_mut(id)?.interactive.take()
    }

    /// Attaches an interactive command; a previous one is terminated. If the session is gone
    /// meanwhile, the command is terminated.
    pub fn attach(&self, id: &str, process: Interactive) {
        let previous = {
            let mut map = self.lock();
            match map.get_mut(id) {
                Some(session) => session.interactive.replace(process),
                None => Some(process),
            }
        };
        drop(previous);
    }

    /// Removes sessions idle for longer than the timeout; returns how many went.
    pub fn sweep(&self, now: Instant) -> usize {
        let timeout = self.timeout;
        let expired: Vec<Session> = {
            let mut map = self.lock();
            let ids: Vec<String> = map
                .iter()
                .filter(|(_, s)| now.duration_since(s.last_access) > timeout)
                .map(|(id, _)| id.clone())
                .collect();
            ids.iter().filter_map(|id| map.remove(id)).collect()
        };
        for session in &expired {
            tracing::info!(user = %common::log::Clipped(&session.user), "session expired");
        }
        expired.len()
    }

    /// Logged-in sessions.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether no session is logged in.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Drops every session (shutdown) and hands back their interactive commands, for the
    /// caller to terminate.
    pub fn clear(&self) -> Vec<Interactive> {
        let all: Vec<Session> = self.lock().drain().map(|(_, s)| s).collect();
        all.into_iter()
            .filter_map(|mut s| s.interactive.take())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookie_extraction_is_a_substring_match() {
        let id = |h: &str| cookie_session_id(std::iter::once(h.as_bytes()));
        assert_eq!(id("SESSION_ID=abc"), Some("abc".into()));
        assert_eq!(id("a=b; SESSION_ID=abc; c=d"), Some("abc".into()));
        assert_eq!(id("XSESSION_ID=abc"), Some("abc".into()));
        assert_eq!(id("other=1"), None);
        assert_eq!(id("SESSION_ID="), None);
        assert_eq!(new_session_id().len(), 11);
    }

    #[test]
    fn windows_expiry_and_cap() {
        let sessions = Sessions::new(Duration::from_secs(3), 2, 2);
        let t0 = Instant::now();
        let cipher = || Cipher::new(&[1u8; 32]);
        let (anonymous, login) = sessions.resolve(None, t0);
        assert!(login.is_none());
        let id = sessions.login(cipher(), "alice", t0).unwrap().0;
        assert_ne!(id, anonymous, "a login gets an id of its own");
        // Right after login any number is accepted, and recorded at once: a copy is refused.
        assert!(sessions.accept_req_no(&id, 5, WINDOW_SINGLE, t0));
        assert!(!sessions.accept_req_no(&id, 5, WINDOW_SINGLE, t0));
        assert!(sessions.accept_req_no(&id, 6, WINDOW_SINGLE, t0));
        sessions.commit(&id, t0);
        assert!(!sessions.accept_req_no(&id, 8, WINDOW_SINGLE, t0));
        assert!(!sessions.accept_req_no(&id, 6, WINDOW_SINGLE, t0));
        let later = t0 + Duration::from_secs(11);
        assert!(!sessions.accept_req_no(&id, 9, WINDOW_SINGLE, later));
        assert!(sessions.accept_req_no(&id, 9, WINDOW_CHUNKED, later));
        let id2 = sessions.login(cipher(), "alice", t0).unwrap().0;
        assert!(sessions.accept_req_no(&id2, i16::MAX, WINDOW_SINGLE, t0));
        assert!(!sessions.accept_req_no(&id2, i16::MIN, WINDOW_SINGLE, t0));

        // Idle timeout refreshed by every request.
        let (same, login) = sessions.resolve(Some(id.clone()), t0 + Duration::from_secs(2));
        assert_eq!(same, id);
        assert_eq!(login.unwrap().user, "alice");
        let (fresh, login) = sessions.resolve(Some(id.clone()), t0 + Duration::from_secs(6));
        assert_ne!(fresh, id);
        assert!(login.is_none());
        let (_, login) = sessions.resolve(Some(id2.clone()), t0 + Duration::from_secs(6));
        assert!(login.is_none());
        assert!(sessions.is_empty());

        let a = sessions.login(cipher(), "u", t0).unwrap().0;
        let _b = sessions.login(cipher(), "v", t0).unwrap().0;
        assert!(sessions.login(cipher(), "w", t0).is_err());
        let c = sessions
            .login(cipher(), "w", t0 + Duration::from_secs(4))
            .unwrap()
            .0;
        assert_eq!(sessions.sweep(t0 + Duration::from_secs(10)), 1);
        assert_eq!(sessions.logout(&c), None);
        assert_eq!(sessions.logout(&a), None);
    }

    #[test]
    fn a_user_over_their_cap_loses_their_oldest_session_only() {
        let sessions = Sessions::new(Duration::from_secs(600), 4, 2);
        let t0 = Instant::now();
        let cipher = || Cipher::new(&[1u8; 32]);
        let bob = sessions.login(cipher(), "bob", t0).unwrap().0;
        let first = sessions.login(cipher(), "alice", t0).unwrap().0;
        let second = sessions.login(cipher(), "alice", t0).unwrap().0;
        for _ in 0..10 {
            sessions.login(cipher(), "alice", t0).unwrap();
        }
        assert_eq!(sessions.len(), 3);
        assert!(sessions.resolve(Some(first), t0).1.is_none());
        assert!(sessions.resolve(Some(second), t0).1.is_none());
        assert_eq!(sessions.resolve(Some(bob), t0).1.unwrap().user, "bob");
        sessions.login(cipher(), "carol", t0).unwrap();
    }
}
