//! The WSS listen address: `HOST:PORT`, where HOST is an IP address (IPv6 in brackets) or a
//! host name resolved once at start, every address it resolves to bound.
//!
//! `localhost:5050` thus listens on 127.0.0.1 and ::1 where the host has both. An address
//! that cannot be bound while another one could is a warning (a host without IPv6); none
//! bound is an error. With port 0 the first address gets a port from the kernel and the
//! others are bound on the same port, so one port serves every address.
//!
//! Only the syntax is checked when the configuration is validated; nothing here resolves a
//! name until [`ListenAddr::resolve`] is called.

use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr};

use tokio::net::TcpListener;

/// A validated `HOST:PORT`, as written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenAddr {
    text: String,
    host: Host,
    port: u16,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Host {
    Ip(IpAddr),
    Name(String),
}

impl ListenAddr {
    /// Checks `HOST:PORT`: an IP address (`[v6]` in brackets) or a host name, and a port.
    ///
    /// # Errors
    /// What is wrong with it, for the caller to prefix with the key or flag.
    pub fn parse(text: &str) -> Result<Self, String> {
        if let Ok(addr) = text.parse::<SocketAddr>() {
            return Ok(Self {
                text: text.to_owned(),
                host: Host::Ip(addr.ip()),
                port: addr.port(),
            });
        }
        let Some((host, port)) = text.rsplit_once(':') else {
            return Err("not HOST:PORT (an IP address or a host name, and a port)".into());
        };
        let port = port
            .parse::<u16>()
            .map_err(|_| format!("port {port:?} is not a number from 0 to 65535"))?;
        if host.contains(':') || host.starts_with('[') {
            return Err("an IPv6 address goes in brackets ([::1]:5050)".into());
        }
        let name_ok = !host.is_empty()
            && host.len() <= 253
            && host.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && !label.starts_with('-')
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            });
        if !name_ok {
            return Err(format!(
                "host {host:?} is neither an IP address nor a host name"
            ));
        }
        Ok(Self {
            text: text.to_owned(),
            host: Host::Name(host.to_ascii_lowercase()),
            port,
        })
    }

    /// The port.
    #[must_use]
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Every address to bind: the IP address itself, or what the name resolves to now (in
    /// the resolver's order, duplicates dropped).
    ///
    /// # Errors
    /// The name does not resolve, or resolves to nothing.
    pub async fn resolve(&self) -> io::Result<Vec<SocketAddr>> {
        let name = match &self.host {
            Host::Ip(ip) => return Ok(vec![SocketAddr::new(*ip, self.port)]),
            Host::Name(name) => name,
        };
        let mut addrs: Vec<SocketAddr> = Vec::new();
        for addr in tokio::net::lookup_host((name.as_str(), self.port)).await? {
            if !addrs.contains(&addr) {
                addrs.push(addr);
            }
        }
        if addrs.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("{name} resolves to no address"),
            ));
        }
        Ok(addrs)
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// The outcome of [`bind_each`]: the listeners bound and the addresses that failed.
#[derive(Debug)]
pub struct Bound {
    /// One listener per address bound, in the order given.
    pub listeners: Vec<TcpListener>,
    /// Addresses that could not be bound, with the reason (each worth a warning).
    pub failed: Vec<(SocketAddr, io::Error)>,
}

/// Binds every address of `addrs`; with port 0, the later ones on the port the first one got.
///
/// # Errors
/// No address could be bound: the first failure, naming its address.
pub async fn bind_each(addrs: &[SocketAddr]) -> io::Result<Bound> {
    let mut listeners = Vec::new();
    let mut failed = Vec::new();
    let mut port = None;
    for addr in addrs {
        let mut addr = *addr;
        if addr.port() == 0 {
            if let Some(port) = port {
                addr.set_port(port);
            }
        }
        match TcpListener::bind(addr).await {
            Ok(listener) => {
                if port.is_none() {
                    port = Some(listener.local_addr()?.port());
                }
                listeners.push(listener);
            }
            Err(err) => failed.push((addr, err)),
        }
    }
    if listeners.is_empty() {
        let detail = failed
            .iter()
            .map(|(addr, err)| format!("{addr}: {err}"))
            .collect::<Vec<_>>()
            .join("; ");
        let kind = failed
            .first()
            .map_or(io::ErrorKind::AddrNotAvailable, |(_, err)| err.kind());
        return Err(io::Error::new(kind, format!("binding {detail}")));
    }
    Ok(Bound { listeners, failed })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_and_names_are_checked_without_resolving() {
        for good in [
            "127.0.0.1:5050",
            "0.0.0.0:0",
            "[::1]:5050",
            "[::]:5050",
            "localhost:5050",
            "proxy.example.org:443",
            "gw-1.lan:1",
        ] {
            let addr = ListenAddr::parse(good).unwrap();
            assert_eq!(addr.to_string(), good);
        }
        for (bad, expected) in [
            ("nowhere", "HOST:PORT"),
            ("localhost", "HOST:PORT"),
            ("localhost:http", "port"),
            ("localhost:70000", "port"),
            ("::1:5050", "brackets"),
            ("[::1:5050", "brackets"),
            (":5050", "neither"),
            ("a b:5050", "neither"),
            ("-x.org:5050", "neither"),
            ("x..org:5050", "neither"),
        ] {
            let err = ListenAddr::parse(bad).unwrap_err();
            assert!(err.contains(expected), "{bad:?}: {err}");
        }
    }

    #[tokio::test]
    async fn a_name_binds_every_address_it_resolves_to() {
        let addr = ListenAddr::parse("localhost:0").unwrap();
        let addrs = addr.resolve().await.unwrap();
        assert!(addrs.iter().all(|a| a.ip().is_loopback()), "{addrs:?}");
        let bound = bind_each(&addrs).await.unwrap();
        assert_eq!(bound.listeners.len() + bound.failed.len(), addrs.len());
        let ports: Vec<u16> = bound
            .listeners
            .iter()
            .map(|l| l.local_addr().unwrap().port())
            .collect();
        assert!(
            ports[0] != 0 && ports.iter().all(|p| *p == ports[0]),
            "{ports:?}"
        );
    }

    #[tokio::test]
    async fn one_address_failing_is_reported_and_all_failing_is_an_error() {
        // 192.0.2.1 (TEST-NET-1) is on no interface here: it cannot be bound.
        let local: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let foreign: SocketAddr = "192.0.2.1:0".parse().unwrap();
        let bound = bind_each(&[foreign, local]).await.unwrap();
        assert_eq!(bound.listeners.len(), 1);
        assert_eq!(bound.failed.len(), 1);
        assert_eq!(bound.failed[0].0.ip(), foreign.ip());

        let err = bind_each(&[foreign]).await.unwrap_err();
        assert!(err.to_string().contains("192.0.2.1"), "{err}");
    }
}
