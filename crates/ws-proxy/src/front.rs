//! Front mode: what a trusted front (HAProxy terminating mutual TLS) tells an instance about
//! the client, in two request headers it sets, and which source addresses are the front.
//!
//! Sans-IO: bytes of a request head in, a [`Forwarded`] identity and address out. The front
//! verified the client certificate's chain and CRLs; this module only reads who it names
//! (with the same [`PeerIdentity::from_der`] the TLS path uses), so every rule, limit and
//! `/status` entry works as with direct TLS. It does not know sockets: `crate::server` checks
//! [`Peers`] (a TCP listener) or [`PeerUsers`] (a Unix socket) before reading a byte and
//! answers what this module refuses. The forwarded certificate is also kept ([`Forwarded::cert`])
//! for an instance that checks it against CRLs of its own (`[front] crls`).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use base64::Engine as _;
use common::tls::PeerIdentity;

/// The client certificate, standard base64 of its DER (HAProxy: `%[ssl_c_der,base64]`).
/// Fixed, not configurable: the front deletes and sets exactly this name.
pub const CERT_HEADER: &str = "X-Client-Cert";
/// The client's address as the front saw it, an IP address (HAProxy: `%[src]`).
pub const ADDR_HEADER: &str = "X-Client-Addr";
/// Longest certificate header value (base64): 12 KiB, a certificate of 9 KiB.
pub const MAX_CERT_HEADER_BYTES: usize = 12 * 1024;
/// The path of the front's health check (`GET` or `HEAD`), answered 200 while the instance
/// takes connections and 503 once it drains.
pub const HEALTH_PATH: &str = "/healthz";

/// What the front says about one client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forwarded {
    /// The identity of its verified certificate; `None`: it sent none (as a TLS peer
    /// without a client certificate).
    pub identity: Option<PeerIdentity>,
    /// The certificate itself (DER), to check against the instance's own CRLs
    /// (`[front] crls`); `Some` exactly when `identity` is.
    pub cert: Option<Vec<u8>>,
    /// Its address, for logs, `/status` and per-address limits.
    pub addr: IpAddr,
}

/// Why the forwarded headers are refused (HTTP 400, the text is the body).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ForwardError {
    /// Not an HTTP request head.
    #[error("not an HTTP request head")]
    NotHttp,
    /// A header appears more than once: which one would the front have meant?
    #[error("more than one {0} header")]
    Repeated(&'static str),
    /// No client address header.
    #[error("no {ADDR_HEADER} header: the front must set it")]
    NoAddress,
    /// The client address is not an IP address.
    #[error("{ADDR_HEADER} is not an IP address")]
    BadAddress,
    /// The certificate header is over [`MAX_CERT_HEADER_BYTES`].
    #[error("{CERT_HEADER} is over {MAX_CERT_HEADER_BYTES} bytes")]
    CertTooLarge,
    /// The certificate header is not base64.
    #[error(
        "{CERT_HEADER} is not base64 (expected the DER certificate in base64, HAProxy's ssl_c_der,base64)"
    )]
    CertNotBase64,
    /// The certificate header does not hold one DER certificate with an unambiguous subject.
    #[error("{CERT_HEADER} is not a DER certificate with at most one CN, O and OU")]
    CertNotDer,
}

/// Reads the client identity and address from a complete request head.
///
/// An empty certificate header is no certificate (what HAProxy sets for a client without one
/// under `verify optional`); an absent one too.
///
/// # Errors
/// [`ForwardError`]: the head does not parse, a header is repeated, the address is missing or
/// not an IP address, the certificate is oversized, not base64 or not a certificate.
pub fn forwarded(head: &[u8]) -> Result<Forwarded, ForwardError> {
    let mut headers = [httparse::EMPTY_HEADER; crate::upgrade::MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    match request.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        _ => return Err(ForwardError::NotHttp),
    }
    let one = |name: &'static str| -> Result<Option<&[u8]>, ForwardError> {
        let mut values = request
            .headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value);
        let first = values.next();
        if values.next().is_some() {
            return Err(ForwardError::Repeated(name));
        }
        Ok(first)
    };
    let addr = one(ADDR_HEADER)?.ok_or(ForwardError::NoAddress)?;
    let addr = parse_addr(addr).ok_or(ForwardError::BadAddress)?;
    let (identity, cert) = match one(CERT_HEADER)? {
        None => (None, None),
        Some(value) => match certificate(value)? {
            None => (None, None),
            Some((identity, der)) => (Some(identity), Some(der)),
        },
    };
    Ok(Forwarded {
        identity,
        cert,
        addr,
    })
}

/// The identity in a certificate header value; `None` for an empty value.
///
/// # Errors
/// Oversized, not base64 (a PEM text included), not a DER certificate, an ambiguous subject.
pub fn identity(value: &[u8]) -> Result<Option<PeerIdentity>, ForwardError> {
    certificate(value).map(|cert| cert.map(|(identity, _)| identity))
}

/// The identity in a certificate header value and the certificate's DER; `None` for an
/// empty value.
fn certificate(value: &[u8]) -> Result<Option<(PeerIdentity, Vec<u8>)>, ForwardError> {
    let value = value.trim_ascii();
    if value.is_empty() {
        return Ok(None);
    }
    if value.len() > MAX_CERT_HEADER_BYTES {
        return Err(ForwardError::CertTooLarge);
    }
    let der = base64::engine::general_purpose::STANDARD
        .decode(value)
        .map_err(|_| ForwardError::CertNotBase64)?;
    // Exactly one certificate: bytes after it (a second certificate, junk) would change
    // the fingerprint but not the name, a new identity for per-identity limits.
    if der_len(&der) != Some(der.len()) {
        return Err(ForwardError::CertNotDer);
    }
    let identity = PeerIdentity::from_der(&der).ok_or(ForwardError::CertNotDer)?;
    Ok(Some((identity, der)))
}

/// The length of the DER SEQUENCE `der` starts with, its header included; `None` when it
/// does not start with one (definite length, at most 4 length bytes).
fn der_len(der: &[u8]) -> Option<usize> {
    let (&tag, rest) = der.split_first()?;
    let (&first, rest) = rest.split_first()?;
    if tag != 0x30 {
        return None;
    }
    if first < 0x80 {
        return Some(2 + usize::from(first));
    }
    let count = usize::from(first & 0x7f);
    if count == 0 || count > 4 || rest.len() < count {
        return None;
    }
    let len = rest[..count]
        .iter()
        .fold(0usize, |len, &b| (len << 8) | usize::from(b));
    len.checked_add(2 + count)
}

/// An IP address as HAProxy's `%[src]` writes it (IPv4-mapped IPv6 as IPv4).
fn parse_addr(value: &[u8]) -> Option<IpAddr> {
    let text = std::str::from_utf8(value).ok()?.trim();
    text.parse::<IpAddr>().ok().map(|ip| ip.to_canonical())
}

/// Whether a complete request head is the front's health check: `GET` or `HEAD` of
/// [`HEALTH_PATH`] (query ignored), not an upgrade.
pub fn is_health_check(head: &[u8]) -> bool {
    let mut headers = [httparse::EMPTY_HEADER; crate::upgrade::MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    if !matches!(request.parse(head), Ok(httparse::Status::Complete(_))) {
        return false;
    }
    let path = request.path.unwrap_or_default();
    matches!(request.method, Some("GET" | "HEAD"))
        && path.split(['?', '#']).next() == Some(HEALTH_PATH)
}

/// One entry of `[front] peers`: an IP address or a CIDR block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Net {
    addr: IpAddr,
    prefix: u8,
}

impl Net {
    /// `10.0.0.5`, `10.0.0.0/24`, `::1`, `fd00::/8`. Host bits set under the prefix are an
    /// error (`10.0.0.5/24` is probably a mistake for one address or a block).
    ///
    /// # Errors
    /// What is wrong, to be shown with the value.
    pub fn parse(text: &str) -> Result<Self, String> {
        let (addr, prefix) = match text.split_once('/') {
            None => (text, None),
            Some((addr, prefix)) => (addr, Some(prefix)),
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| "not an IP address or CIDR block".to_owned())?;
        let bits = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => bits,
            Some(p) => p
                .parse::<u8>()
                .ok()
                .filter(|p| *p <= bits)
                .ok_or_else(|| format!("the prefix length must be 0 to {bits}"))?,
        };
        let net = Self { addr, prefix };
        if net.masked(addr) != addr {
            return Err(format!(
                "host bits set under /{prefix}: write the block's first address"
            ));
        }
        Ok(net)
    }

    /// `ip` with the bits past the prefix cleared (of this block's family).
    fn masked(&self, ip: IpAddr) -> IpAddr {
        match ip {
            IpAddr::V4(v4) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                IpAddr::V4(Ipv4Addr::from(u32::from(v4) & mask))
            }
            IpAddr::V6(v6) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                IpAddr::V6(Ipv6Addr::from(u128::from(v6) & mask))
            }
        }
    }

    /// Whether `ip` (IPv4-mapped IPv6 taken as IPv4) is in the block.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        ip.is_ipv4() == self.addr.is_ipv4() && self.masked(ip) == self.addr
    }
}

impl fmt::Display for Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let bits = if self.addr.is_ipv4() { 32 } else { 128 };
        if self.prefix == bits {
            write!(f, "{}", self.addr)
        } else {
            write!(f, "{}/{}", self.addr, self.prefix)
        }
    }
}

/// `[front] peers`: the addresses the front connects from; never empty.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peers(Vec<Net>);

impl Peers {
    /// The peers, or `None` when there are none (a front listener without peers would refuse
    /// everyone; the configuration check says so instead).
    pub fn new(nets: Vec<Net>) -> Option<Self> {
        (!nets.is_empty()).then_some(Self(nets))
    }

    /// Whether `ip` is one of the front's addresses.
    pub fn contains(&self, ip: IpAddr) -> bool {
        self.0.iter().any(|net| net.contains(ip))
    }
}

impl fmt::Display for Peers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, net) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            write!(f, "{net}")?;
        }
        Ok(())
    }
}

/// `[front] peer_users` of a Unix-socket front listener: the uids (resolved from names at
/// start) whose connections are the front; never empty.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerUsers(Vec<(String, u32)>);

impl PeerUsers {
    /// The users as written with their uids, or `None` when there are none.
    pub fn new(users: Vec<(String, u32)>) -> Option<Self> {
        (!users.is_empty()).then_some(Self(users))
    }

    /// Whether a connection whose peer credentials carry `uid` is the front.
    pub fn contains(&self, uid: u32) -> bool {
        self.0.iter().any(|(_, u)| *u == uid)
    }
}

impl fmt::Display for PeerUsers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, (name, uid)) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            if name == &uid.to_string() {
                write!(f, "{uid}")?;
            } else {
                write!(f, "{name}({uid})")?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn der_b64(leaf: &testkit::Leaf) -> String {
        let der = common::tls::Pem::new("leaf", &leaf.cert_pem)
            .certs()
            .unwrap()
            .remove(0);
        base64::engine::general_purpose::STANDARD.encode(der.as_ref())
    }

    fn head(extra: &str) -> Vec<u8> {
        format!("GET /micronets/v1/ws-proxy/x HTTP/1.1\r\nHost: a\r\n{extra}\r\n").into_bytes()
    }

    #[test]
    fn the_forwarded_certificate_gives_the_same_identity_as_tls() {
        let pki = testkit::test_pki();
        let der = common::tls::Pem::new("alice", &pki.alice.cert_pem)
            .certs()
            .unwrap()
            .remove(0);
        let got = forwarded(&head(&format!(
            "X-Client-Cert: {}\r\nx-client-addr: 192.0.2.7\r\n",
            der_b64(&pki.alice)
        )))
        .unwrap();
        assert_eq!(got.identity, PeerIdentity::from_der(der.as_ref()));
        assert_eq!(got.identity.unwrap().cn.as_deref(), Some("alice"));
        assert_eq!(got.addr, "192.0.2.7".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn no_or_empty_certificate_header_is_no_certificate() {
        let got = forwarded(&head("X-Client-Addr: 2001:db8::1\r\n")).unwrap();
        assert_eq!(got.identity, None);
        assert_eq!(got.addr, "2001:db8::1".parse::<IpAddr>().unwrap());
        let got = forwarded(&head(
            "X-Client-Cert: \r\nX-Client-Addr: ::ffff:10.1.2.3\r\n",
        ))
        .unwrap();
        assert_eq!(got.identity, None);
        // IPv4-mapped, as HAProxy would print it for an IPv4 client on a v6 socket.
        assert_eq!(got.addr, "10.1.2.3".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn bad_headers_are_refused_with_a_reason() {
        let pki = testkit::test_pki();
        let alice = der_b64(&pki.alice);
        let pem_b64 = base64::engine::general_purpose::STANDARD.encode(&pki.alice.cert_pem);
        let pem_line = pki.alice.cert_pem.lines().collect::<Vec<_>>().join(" ");
        let big = "A".repeat(MAX_CERT_HEADER_BYTES + 4);
        let not_cert = base64::engine::general_purpose::STANDARD.encode(b"hello, world");
        let der = |leaf: &testkit::Leaf| {
            common::tls::Pem::new("leaf", &leaf.cert_pem)
                .certs()
                .unwrap()
                .remove(0)
                .as_ref()
                .to_vec()
        };
        let b64 = |bytes: &[u8]| base64::engine::general_purpose::STANDARD.encode(bytes);
        let alice_junk = b64(&[der(&pki.alice), b"junk".to_vec()].concat());
        let alice_bob = b64(&[der(&pki.alice), der(&pki.bob)].concat());
        let cases: Vec<(String, ForwardError)> = vec![
            (String::new(), ForwardError::NoAddress),
            (
                "X-Client-Addr: nowhere\r\n".into(),
                ForwardError::BadAddress,
            ),
            (
                "X-Client-Addr: 1.2.3.4:80\r\n".into(),
                ForwardError::BadAddress,
            ),
            ("X-Client-Addr: \r\n".into(), ForwardError::BadAddress),
            (
                "X-Client-Addr: 1.2.3.4\r\nX-Client-Addr: 5.6.7.8\r\n".into(),
                ForwardError::Repeated(ADDR_HEADER),
            ),
            (
                format!(
                    "X-Client-Addr: 1.2.3.4\r\nX-Client-Cert: {alice}\r\nX-Client-Cert: {alice}\r\n"
                ),
                ForwardError::Repeated(CERT_HEADER),
            ),
            (
                format!("X-Client-Addr: 1.2.3.4\r\nX-Client-Cert: {big}\r\n"),
                ForwardError::CertTooLarge,
            ),
            (
                format!("X-Client-Addr: 1.2.3.4\r\nX-Client-Cert: {pem_line}\r\n"),
                ForwardError::CertNotBase64,
            ),
            // PEM text in base64 is base64, but not of a DER certificate.
            (
                format!("X-Client-Addr: 1.2.3.4\r\nX-Client-Cert: {pem_b64}\r\n"),
                ForwardError::CertNotDer,
            ),
            (
                format!("X-Client-Addr: 1.2.3.4\r\nX-Client-Cert: {not_cert}\r\n"),
                ForwardError::CertNotDer,
            ),
            (
                format!(
                    "X-Client-Addr: 1.2.3.4\r\nX-Client-Cert: {}\r\n",
                    &alice[..alice.len() - 8]
                ),
                ForwardError::CertNotDer,
            ),
            // One certificate and anything after it: each tail would be a new fingerprint
            // under the same name.
            (
                format!("X-Client-Addr: 1.2.3.4\r\nX-Client-Cert: {alice_junk}\r\n"),
                ForwardError::CertNotDer,
            ),
            (
                format!("X-Client-Addr: 1.2.3.4\r\nX-Client-Cert: {alice_bob}\r\n"),
                ForwardError::CertNotDer,
            ),
        ];
        for (extra, want) in cases {
            assert_eq!(forwarded(&head(&extra)), Err(want.clone()), "{extra:?}");
            // The reason is one line, fit for a refusal body.
            assert!(!want.to_string().contains('\n'));
        }
        assert_eq!(
            forwarded(b"\x00\x01garbage\r\n\r\n"),
            Err(ForwardError::NotHttp)
        );
    }

    #[test]
    fn an_ambiguous_subject_is_refused_as_in_the_handshake() {
        use testkit::Attr;
        let pki = testkit::test_pki();
        let two_cns =
            pki.client_with_subject("front-two-cn", &[&[(Attr::Cn, "a")], &[(Attr::Cn, "b")]]);
        let value = der_b64(&two_cns);
        assert_eq!(identity(value.as_bytes()), Err(ForwardError::CertNotDer));
    }

    #[test]
    fn arbitrary_header_values_never_panic() {
        for len in [0, 1, 3, 4, 100, 5000] {
            for seed in 0..20u8 {
                let value: Vec<u8> = (0..len)
                    .map(|i| (i as u8).wrapping_mul(31) ^ seed)
                    .collect();
                let _ = identity(&value);
                let _ = parse_addr(&value);
            }
        }
    }

    #[test]
    fn peers_are_addresses_and_blocks() {
        let net = |s: &str| Net::parse(s).unwrap();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(net("10.0.0.5").contains(ip("10.0.0.5")));
        assert!(!net("10.0.0.5").contains(ip("10.0.0.6")));
        assert!(net("10.0.0.0/24").contains(ip("10.0.0.255")));
        assert!(!net("10.0.0.0/24").contains(ip("10.0.1.0")));
        assert!(net("0.0.0.0/0").contains(ip("203.0.113.1")));
        assert!(!net("0.0.0.0/0").contains(ip("::2")));
        assert!(net("127.0.0.1").contains(ip("::ffff:127.0.0.1")));
        assert!(net("fd00::/8").contains(ip("fd12::1")));
        assert!(!net("fd00::/8").contains(ip("fe80::1")));
        assert!(net("::/0").contains(ip("::1")));
        assert_eq!(net("10.0.0.0/24").to_string(), "10.0.0.0/24");
        assert_eq!(net("::1").to_string(), "::1");
        for bad in [
            "",
            "10.0.0",
            "10.0.0.0/33",
            "10.0.0.5/24",
            "::1/129",
            "host",
            "10.0.0.0/x",
        ] {
            assert!(Net::parse(bad).is_err(), "{bad:?}");
        }
        assert_eq!(Peers::new(Vec::new()), None);
    }

    #[test]
    fn the_health_check_is_get_or_head_of_its_path() {
        assert!(is_health_check(b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n"));
        assert!(is_health_check(b"HEAD /healthz?x HTTP/1.0\r\n\r\n"));
        assert!(!is_health_check(b"POST /healthz HTTP/1.1\r\n\r\n"));
        assert!(!is_health_check(b"GET /healthzz HTTP/1.1\r\n\r\n"));
        assert!(!is_health_check(b"GET /healthz HTTP/1.1\r\n"));
    }
}
