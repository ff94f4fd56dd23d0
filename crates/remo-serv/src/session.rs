//! Sessions: the cookie, the session key, the request-number rules and the attached
//! interactive command.
//!
//! Only logged-in sessions are stored. A request without a valid cookie is handed a fresh id
//! (as the original did) but nothing is remembered until it logs in, so anonymous traffic
//! cannot fill the table.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

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
    interactive: Option<Interactive>,
}

/// What a request learns about its session.
#[derive(Debug, Clone)]
pub struct Login {
    /// The session cipher.
    pub cipher: Arc<Cipher>,
    /// The logged-in user.
    pub user: String,
}

/// The session table.
#[derive(Debug)]
pub struct Sessions {
    map: Mutex<HashMap<String, Session>>,
    timeout: Duration,
    max: usize,
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
    /// An empty table.
    pub fn new(timeout: Duration, max: usize) -> Self {
        Self {
            map: Mutex::new(HashMap::new()),
            timeout,
            max,
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

    /// Installs a session key under `id` (a new login, or a re-login of a live session).
    ///
    /// # Errors
    /// [`Full`] when the table is at its cap even after removing expired sessions.
    pub fn login(&self, id: &str, cipher: Cipher, user: &str, now: Instant) -> Result<(), Full> {
        let mut map = self.lock();
        if let Some(session) = map.get_mut(id) {
            session.cipher = Arc::new(cipher);
            session.user = user.to_owned();
            session.req_no = 0;
            session.last_req = None;
            session.last_access = now;
            return Ok(());
        }
        if map.len() >= self.max {
            let timeout = self.timeout;
            map.retain(|_, s| now.duration_since(s.last_access) <= timeout);
            if map.len() >= self.max {
                return Err(Full);
            }
        }
        map.insert(
            id.to_owned(),
            Session {
                cipher: Arc::new(cipher),
                user: user.to_owned(),
                req_no: 0,
                last_req: None,
                last_access: now,
                interactive: None,
            },
        );
        Ok(())
    }

    /// Logs out (and invalidates): the key and the interactive command go.
    pub fn logout(&self, id: &str) -> Option<String> {
        let removed = self.lock().remove(id);
        removed.map(|session| session.user)
    }

    /// Checks a request number against the session's window: within `window` of the last
    /// request it must be the last one plus one; after that any number re-synchronises.
    pub fn check_req_no(&self, id: &str, req_no: i16, window: Duration, now: Instant) -> bool {
        let map = self.lock();
        let Some(session) = map.get(id) else {
            return false;
        };
        match session.last_req {
            Some(last) if now.duration_since(last) < window => {
                i32::from(req_no) == i32::from(session.req_no) + 1
            }
            _ => true,
        }
    }

    /// Records an accepted request number.
    pub fn set_req_no(&self, id: &str, req_no: i16) {
        if let Some(session) = self.lock().get_mut(id) {
            session.req_no = req_no;
        }
    }

    /// Records a completed request: its number and the time.
    pub fn commit(&self, id: &str, req_no: i16, now: Instant) {
        if let Some(session) = self.lock().get_mut(id) {
            session.req_no = req_no;
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
            tracing::info!(user = ?session.user, "session expired");
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
        all.into_iter().filter_map(|s| s.interactive).collect()
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
        let sessions = Sessions::new(Duration::from_secs(3), 2);
        let t0 = Instant::now();
        let cipher = || Cipher::new(&[1u8; 32]);
        let (id, login) = sessions.resolve(None, t0);
        assert!(login.is_none());
        sessions.login(&id, cipher(), "alice", t0).unwrap();
        // Right after login any number is accepted.
        assert!(sessions.check_req_no(&id, 5, WINDOW_SINGLE, t0));
        sessions.commit(&id, 1, t0);
        assert!(sessions.check_req_no(&id, 2, WINDOW_SINGLE, t0));
        assert!(!sessions.check_req_no(&id, 3, WINDOW_SINGLE, t0));
        assert!(!sessions.check_req_no(&id, 1, WINDOW_SINGLE, t0));
        let later = t0 + Duration::from_secs(11);
        assert!(!sessions.check_req_no(&id, 9, WINDOW_SINGLE, later));
        assert!(sessions.check_req_no(&id, 9, WINDOW_CHUNKED, later));
        sessions.commit(&id, i16::MAX, t0);
        assert!(!sessions.check_req_no(&id, i16::MIN, WINDOW_SINGLE, t0));

        // Idle timeout refreshed by every request.
        let (same, login) = sessions.resolve(Some(id.clone()), t0 + Duration::from_secs(2));
        assert_eq!(same, id);
        assert_eq!(login.unwrap().user, "alice");
        let (fresh, login) = sessions.resolve(Some(id.clone()), t0 + Duration::from_secs(6));
        assert_ne!(fresh, id);
        assert!(login.is_none());
        assert!(sessions.is_empty());

        sessions.login("a", cipher(), "u", t0).unwrap();
        sessions.login("b", cipher(), "u", t0).unwrap();
        assert!(sessions.login("c", cipher(), "u", t0).is_err());
        assert!(
            sessions
                .login("c", cipher(), "u", t0 + Duration::from_secs(4))
                .is_ok()
        );
        assert_eq!(sessions.sweep(t0 + Duration::from_secs(10)), 1);
        assert_eq!(sessions.logout("c"), None);
    }
}
