//! Who is calling: a uid from `SO_PEERCRED` resolved to a user name, or a client certificate
//! mapped to one.

use std::collections::HashMap;
use std::sync::Mutex;
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

/// Resolves uids to names through the system's user database, with a short cache.
#[derive(Debug, Default)]
pub struct UserNames {
    cache: Mutex<HashMap<u32, (String, Instant)>>,
}

impl UserNames {
    /// The name of `uid`; `uid:N` when the user database has no entry (a uid is still a
    /// distinct identity, and a name cannot start with `uid:`).
    pub fn name(&self, uid: u32) -> String {
        let now = Instant::now();
        if let Ok(cache) = self.cache.lock() {
            if let Some((name, at)) = cache.get(&uid) {
                if now.duration_since(*at) < NAME_CACHE_TTL {
                    return name.clone();
                }
            }
        }
        let name = match nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)) {
            Ok(Some(user)) if valid_user_name(&user.name) && !user.name.starts_with("uid:") => {
                user.name
            }
            _ => format!("uid:{uid}"),
        };
        if let Ok(mut cache) = self.cache.lock() {
            if cache.len() > 4096 {
                cache.clear();
            }
            cache.insert(uid, (name.clone(), now));
        }
        name
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

    #[test]
    fn names() {
        let names = UserNames::default();
        assert_eq!(names.name(0), "root");
        assert_eq!(names.name(3_999_999), "uid:3999999");
        assert!(valid_user_name("alice"));
        assert!(valid_user_name("uid:5"));
        assert!(!valid_user_name("a b"));
        assert!(!valid_user_name(""));
    }
}
