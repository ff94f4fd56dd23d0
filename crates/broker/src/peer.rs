//! Who is on the other end of a TCP connection from this host. TCP has no `SO_PEERCRED`, so
//! the peer's own socket is looked up in the kernel's tables (`/proc/net/tcp` and
//! `/proc/net/tcp6`): the row whose local address is our peer's and whose remote address is
//! ours carries the uid that owns the peer's socket. A peer on another host has no row.
//!
//! Parsing is separate from reading ([`find_uid`] takes the table text), so it is tested
//! with fixed tables.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// TCP state `TIME_WAIT` in the tables: a socket nobody owns any more (uid 0).
const TIME_WAIT: &str = "06";

/// Whether this system lets [`peer_uid`] look peers up (Linux's `/proc/net/tcp`); without it
/// every loopback peer would be refused.
pub fn available() -> bool {
    std::fs::File::open("/proc/net/tcp").is_ok()
}

/// The uid owning the socket at `peer` connected to `local`, when that socket is on this
/// host (in this network namespace); `None` for a peer elsewhere or an unreadable table.
pub fn peer_uid(peer: SocketAddr, local: SocketAddr) -> Option<u32> {
    ["/proc/net/tcp", "/proc/net/tcp6"].iter().find_map(|path| {
        let table = std::fs::read_to_string(path).ok()?;
        find_uid(&table, peer, local)
    })
}

/// In one table's text (`/proc/net/tcp` or `tcp6` format), the uid of the live socket whose
/// local address is `peer` and whose remote address is `local`. IPv4-mapped IPv6 addresses
/// match their IPv4 form.
pub fn find_uid(table: &str, peer: SocketAddr, local: SocketAddr) -> Option<u32> {
    let peer = canonical(peer);
    let local = canonical(local);
    table.lines().skip(1).find_map(|line| {
        // sl local_address rem_address st tx:rx tr:when retrnsmt uid timeout inode ...
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (ours, theirs, state, uid) = (
            fields.get(1)?,
            fields.get(2)?,
            fields.get(3)?,
            fields.get(7)?,
        );
        if *state == TIME_WAIT {
            return None;
        }
        if parse_address(ours)? != peer || parse_address(theirs)? != local {
            return None;
        }
        uid.parse().ok()
    })
}

fn canonical(address: SocketAddr) -> SocketAddr {
    SocketAddr::new(address.ip().to_canonical(), address.port())
}

/// `0100007F:1F90` (IPv4) or 32 hex digits and a port (IPv6). The kernel prints each 32-bit
/// word of the address as a native-endian number.
fn parse_address(text: &str) -> Option<SocketAddr> {
    let (ip, port) = text.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let word = |hex: &str| u32::from_str_radix(hex, 16).ok().map(u32::to_ne_bytes);
    let ip = match ip.len() {
        8 => IpAddr::V4(Ipv4Addr::from(word(ip)?)),
        32 => {
            let mut octets = [0u8; 16];
            for (i, chunk) in octets.chunks_exact_mut(4).enumerate() {
                chunk.copy_from_slice(&word(ip.get(i * 8..i * 8 + 8)?)?);
            }
            IpAddr::V6(Ipv6Addr::from(octets)).to_canonical()
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn hex4(ip: Ipv4Addr, port: u16) -> String {
        format!("{:08X}:{port:04X}", u32::from_ne_bytes(ip.octets()))
    }

    fn hex6(ip: Ipv6Addr, port: u16) -> String {
        let words: String = ip
            .octets()
            .chunks_exact(4)
            .map(|c| format!("{:08X}", u32::from_ne_bytes([c[0], c[1], c[2], c[3]])))
            .collect();
        format!("{words}:{port:04X}")
    }

    const HEADER: &str = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n";

    fn row(local: &str, remote: &str, state: &str, uid: u32) -> String {
        format!(
            "   0: {local} {remote} {state} 00000000:00000000 00:00000000 00000000 {uid:>5}        0 12345 1 0000000000000000 20 4 30 10 -1\n"
        )
    }

    #[test]
    fn finds_the_peer_row_not_ours() {
        let lo = Ipv4Addr::LOCALHOST;
        let (peer, local) = (SocketAddr::from((lo, 40000)), SocketAddr::from((lo, 8080)));
        let table = format!(
            "{HEADER}{}{}{}{}",
            row(&hex4(lo, 8080), &hex4(Ipv4Addr::UNSPECIFIED, 0), "0A", 0),
            row(&hex4(lo, 8080), &hex4(lo, 40000), "01", 1000),
            row(&hex4(lo, 40000), &hex4(lo, 8080), "06", 0),
            row(&hex4(lo, 40000), &hex4(lo, 8080), "01", 4242),
        );
        assert_eq!(find_uid(&table, peer, local), Some(4242));
        assert_eq!(
            find_uid(&table, SocketAddr::from((lo, 40001)), local),
            None,
            "no row, no uid"
        );
        assert_eq!(find_uid("", peer, local), None);
        assert_eq!(find_uid("garbage\n1 2 3\n", peer, local), None);
    }

    #[test]
    fn ipv6_and_mapped_addresses() {
        let lo6 = Ipv6Addr::LOCALHOST;
        let table = format!(
            "{HEADER}{}",
            row(&hex6(lo6, 50000), &hex6(lo6, 9000), "01", 77)
        );
        assert_eq!(
            find_uid(
                &table,
                SocketAddr::from((lo6, 50000)),
                SocketAddr::from((lo6, 9000))
            ),
            Some(77)
        );
        // A v4 client seen by a dual-stack listener as ::ffff:127.0.0.1.
        let mapped = Ipv4Addr::LOCALHOST.to_ipv6_mapped();
        let table = format!(
            "{HEADER}{}",
            row(
                &hex4(Ipv4Addr::LOCALHOST, 50001),
                &hex4(Ipv4Addr::LOCALHOST, 9000),
                "01",
                78
            )
        );
        assert_eq!(
            find_uid(
                &table,
                SocketAddr::from((mapped, 50001)),
                SocketAddr::from((mapped, 9000))
            ),
            Some(78)
        );
    }

    #[test]
    fn a_real_connection_is_found_with_our_uid() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (_server, peer) = listener.accept().unwrap();
        assert_eq!(peer, client.local_addr().unwrap());
        assert!(available());
        assert_eq!(
            peer_uid(peer, listener.local_addr().unwrap()),
            Some(nix::unistd::geteuid().as_raw())
        );
    }
}
