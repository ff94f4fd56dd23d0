//! Authorization: which certificate identities may join which meet-up ids.
//!
//! Each `[[authorize]]` rule names who it is for (globs on the subject CN, O and OU, on any
//! subjectAltName, or an exact SHA-256 fingerprint; every matcher given must match) and the
//! meet-up ids they may join (globs in which `{cn}` stands for the peer's CN, matched
//! literally). A peer may join an id when some rule matches both. With no rules at all, any
//! verified certificate may join any id, as in the original proxy.
//!
//! Globs are [`glob::Pattern`]s matched with `require_literal_separator`, so `*` stays within
//! one `/`-separated segment of an id and `**` spans segments (`gw/**`).

use common::tls::PeerIdentity;
use glob::{MatchOptions, Pattern};
use serde::Deserialize;

const MATCH: MatchOptions = MatchOptions {
    case_sensitive: true,
    require_literal_separator: true,
    require_literal_leading_dot: false,
};

/// One `[[authorize]]` table as written in the configuration.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    /// Glob on the subject common name.
    pub cn: Option<String>,
    /// Glob on the subject organisation.
    pub o: Option<String>,
    /// Glob on the subject organisational unit.
    pub ou: Option<String>,
    /// Glob matched against every subjectAltName; one match suffices.
    pub san: Option<String>,
    /// SHA-256 fingerprint of the certificate (hex, colons and case ignored).
    pub sha256: Option<String>,
    /// Meet-up id globs this identity may join; `{cn}` is the peer's CN.
    pub ids: Vec<String>,
}

/// A rule that does not compile.
#[derive(Debug, thiserror::Error)]
pub enum RuleError {
    /// No identity matcher: the rule would match everyone, which is what no rules mean.
    #[error("a rule needs at least one of cn, o, ou, san, sha256")]
    NoMatcher,
    /// No id pattern.
    #[error("a rule needs at least one id pattern in `ids`")]
    NoIds,
    /// A glob does not parse.
    #[error("bad pattern {pattern:?}: {source}")]
    Pattern {
        /// The pattern.
        pattern: String,
        /// Why.
        source: glob::PatternError,
    },
    /// A fingerprint that is not 64 hex digits.
    #[error("sha256 must be 64 hex digits (colons allowed)")]
    Fingerprint,
}

/// A compiled rule.
#[derive(Debug, Clone)]
pub struct Rule {
    cn: Option<Pattern>,
    o: Option<Pattern>,
    ou: Option<Pattern>,
    san: Option<Pattern>,
    sha256: Option<String>,
    /// Id templates; those without `{cn}` are compiled once.
    ids: Vec<IdPattern>,
}

#[derive(Debug, Clone)]
enum IdPattern {
    Fixed(Pattern),
    /// Contains `{cn}`: compiled per peer with the CN escaped.
    Template(String),
}

fn compile(pattern: &str) -> Result<Pattern, RuleError> {
    Pattern::new(pattern).map_err(|source| RuleError::Pattern {
        pattern: pattern.to_owned(),
        source,
    })
}

impl Rule {
    /// Compiles a rule.
    ///
    /// # Errors
    /// A [`RuleError`].
    pub fn compile(spec: &RuleSpec) -> Result<Self, RuleError> {
        let opt = |p: &Option<String>| p.as_deref().map(compile).transpose();
        let sha256 = spec
            .sha256
            .as_deref()
            .map(|hex| {
                let clean: String = hex.chars().filter(|c| *c != ':').collect();
                if clean.len() == 64 && clean.chars().all(|c| c.is_ascii_hexdigit()) {
                    Ok(clean.to_ascii_lowercase())
                } else {
                    Err(RuleError::Fingerprint)
                }
            })
            .transpose()?;
        let rule = Self {
            cn: opt(&spec.cn)?,
            o: opt(&spec.o)?,
            ou: opt(&spec.ou)?,
            san: opt(&spec.san)?,
            sha256,
            ids: spec
                .ids
                .iter()
                .map(|id| {
                    if id.contains("{cn}") {
                        // Check the template compiles with a harmless CN.
                        compile(&id.replace("{cn}", "x"))?;
                        Ok(IdPattern::Template(id.clone()))
                    } else {
                        compile(id).map(IdPattern::Fixed)
                    }
                })
                .collect::<Result<_, _>>()?,
        };
        if rule.cn.is_none()
            && rule.o.is_none()
            && rule.ou.is_none()
            && rule.san.is_none()
            && rule.sha256.is_none()
        {
            return Err(RuleError::NoMatcher);
        }
        if rule.ids.is_empty() {
            return Err(RuleError::NoIds);
        }
        Ok(rule)
    }

    fn matches_identity(&self, peer: &PeerIdentity) -> bool {
        let field = |pattern: &Option<Pattern>, value: &Option<String>| match pattern {
            None => true,
            Some(p) => value.as_deref().is_some_and(|v| p.matches_with(v, MATCH)),
        };
        field(&self.cn, &peer.cn)
            && field(&self.o, &peer.o)
            && field(&self.ou, &peer.ou)
            && self
                .san
                .as_ref()
                .is_none_or(|p| peer.sans.iter().any(|s| p.matches_with(s, MATCH)))
            && self
                .sha256
                .as_ref()
                .is_none_or(|fp| fp.eq_ignore_ascii_case(&peer.sha256))
    }

    fn allows_id(&self, peer: &PeerIdentity, id: &str) -> bool {
        self.ids.iter().any(|pattern| match pattern {
            IdPattern::Fixed(p) => p.matches_with(id, MATCH),
            IdPattern::Template(template) => {
                // Without a CN a `{cn}` template cannot apply.
                let Some(cn) = peer.cn.as_deref() else {
                    return false;
                };
                let text = template.replace("{cn}", &Pattern::escape(cn));
                Pattern::new(&text).is_ok_and(|p| p.matches_with(id, MATCH))
            }
        })
    }
}

/// The rule set; empty means everyone may join everything.
#[derive(Debug, Clone, Default)]
pub struct Rules {
    rules: Vec<Rule>,
}

impl Rules {
    /// A rule set.
    pub fn new(rules: Vec<Rule>) -> Self {
        Self { rules }
    }

    /// Whether there are any rules.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Whether some rule could let `peer` (`None`: no certificate) join some id: known right
    /// after the TLS handshake, so a peer no rule matches is refused before its request.
    pub fn admits(&self, peer: Option<&PeerIdentity>) -> bool {
        if self.rules.is_empty() {
            return true;
        }
        peer.is_some_and(|peer| self.rules.iter().any(|rule| rule.matches_identity(peer)))
    }

    /// Whether `peer` (`None`: no certificate) may join `id`.
    pub fn allows(&self, peer: Option<&PeerIdentity>, id: &str) -> bool {
        if self.rules.is_empty() {
            return true;
        }
        let Some(peer) = peer else {
            return false;
        };
        self.rules
            .iter()
            .any(|rule| rule.matches_identity(peer) && rule.allows_id(peer, id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer(cn: &str, o: &str, sans: &[&str]) -> PeerIdentity {
        PeerIdentity {
            cn: Some(cn.to_owned()),
            o: Some(o.to_owned()),
            ou: None,
            sans: sans.iter().map(|s| (*s).to_owned()).collect(),
            sha256: "ab".repeat(32),
        }
    }

    fn rules(specs: &[RuleSpec]) -> Rules {
        Rules::new(specs.iter().map(|s| Rule::compile(s).unwrap()).collect())
    }

    fn spec(f: impl FnOnce(&mut RuleSpec), ids: &[&str]) -> RuleSpec {
        let mut spec = RuleSpec {
            ids: ids.iter().map(|s| (*s).to_owned()).collect(),
            ..RuleSpec::default()
        };
        f(&mut spec);
        spec
    }

    #[test]
    fn no_rules_allow_everyone_even_without_a_certificate() {
        let none = Rules::default();
        assert!(none.allows(None, "anything/at/all"));
        assert!(none.allows(Some(&peer("a", "b", &[])), "x"));
    }

    #[test]
    fn rules_match_identity_and_ids() {
        let set = rules(&[
            spec(|s| s.cn = Some("gw-*".into()), &["gw/{cn}", "gw-test/{cn}"]),
            spec(|s| s.o = Some("Manager".into()), &["gw/**", "gw-test/*"]),
            spec(|s| s.san = Some("*.ops.example".into()), &["ops/*"]),
            spec(|s| s.sha256 = Some("AB:".repeat(31) + "AB"), &["pinned"]),
        ]);
        let gw = peer("gw-17", "Home", &[]);
        let check = |p: &PeerIdentity, id: &str, expected: bool| {
            assert_eq!(set.allows(Some(p), id), expected, "{:?} -> {id}", p.cn);
        };
        check(&gw, "gw/gw-17", true);
        check(&gw, "gw-test/gw-17", true);
        check(&gw, "gw/gw-18", false);
        check(&gw, "gw/gw-17/more", false);
        let manager = peer("mm", "Manager", &[]);
        check(&manager, "gw/a/b", true);
        check(&manager, "gw-test/a", true);
        check(&manager, "gw-test/a/b", false);
        check(&manager, "other", false);
        let ops = peer("x", "y", &["node1.ops.example"]);
        check(&ops, "ops/1", true);
        // Everyone in the test has the fingerprint ab..ab.
        check(&ops, "pinned", true);
        let mut other = ops.clone();
        other.sha256 = "cd".repeat(32);
        check(&other, "pinned", false);
        assert!(!set.allows(None, "gw/gw-17"));
        // Who could join some id is known from the certificate alone.
        assert!(set.admits(Some(&gw)) && set.admits(Some(&other)));
        let mut nobody = peer("nobody", "Home", &[]);
        nobody.sha256 = "cd".repeat(32);
        assert!(!set.admits(Some(&nobody)));
        assert!(!set.admits(None));
        assert!(Rules::default().admits(None));
    }

    #[test]
    fn a_cn_with_glob_characters_is_matched_literally() {
        let set = rules(&[spec(|s| s.cn = Some("*".into()), &["gw/{cn}"])]);
        assert!(set.allows(Some(&peer("a*", "o", &[])), "gw/a*"));
        assert!(!set.allows(Some(&peer("a*", "o", &[])), "gw/abc"));
        assert!(!set.allows(Some(&peer("[ab]", "o", &[])), "gw/a"));
    }

    #[test]
    fn bad_rules_are_refused() {
        assert!(matches!(
            Rule::compile(&spec(|_| {}, &["x"])),
            Err(RuleError::NoMatcher)
        ));
        assert!(matches!(
            Rule::compile(&spec(|s| s.cn = Some("a".into()), &[])),
            Err(RuleError::NoIds)
        ));
        assert!(matches!(
            Rule::compile(&spec(|s| s.cn = Some("[".into()), &["x"])),
            Err(RuleError::Pattern { .. })
        ));
        assert!(matches!(
            Rule::compile(&spec(|s| s.sha256 = Some("zz".into()), &["x"])),
            Err(RuleError::Fingerprint)
        ));
    }
}
