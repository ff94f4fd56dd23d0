use std::net::{Ipv4Addr, Ipv6Addr};

use super::*;

fn limits(max_connections: usize, max_handshakes: usize, per_address: usize) -> Limits {
    Limits {
        max_connections,
        max_handshakes,
        max_handshakes_per_address: per_address,
        deadline: Duration::from_secs(10),
    }
}

fn v4(last: u8, port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::new(192, 0, 2, last), port))
}

#[tokio::test]
async fn one_address_gets_its_share_of_the_stranger_pool_and_no_more() {
    let door = Admission::new("test", limits(4, 10, 2));
    let first = door.stranger(v4(1, 1000)).unwrap();
    let _second = door.stranger(v4(1, 1001)).unwrap();
    assert_eq!(door.stranger(v4(1, 1002)).unwrap_err(), Refused::Address);
    // Another address is not held back by the first one's crowd.
    let _other = door.stranger(v4(2, 1000)).unwrap();
    // A permit given back (connection closed) makes room for the same address.
    drop(first);
    let _again = door.stranger(v4(1, 1003)).unwrap();
    let stats = door.stats();
    assert_eq!(stats.refused_address, 1);
    assert_eq!(stats.strangers, 3);
    assert_eq!(stats.connections, 0);
}

#[tokio::test]
async fn ipv6_counts_by_64_and_mapped_ipv4_as_ipv4() {
    let door = Admission::new("test", limits(4, 10, 1));
    let a: Ipv6Addr = "2001:db8:1:2::1".parse().unwrap();
    let b: Ipv6Addr = "2001:db8:1:2:ffff::9".parse().unwrap();
    let c: Ipv6Addr = "2001:db8:1:3::1".parse().unwrap();
    let _a = door.stranger(SocketAddr::from((a, 1))).unwrap();
    assert_eq!(
        door.stranger(SocketAddr::from((b, 1))).unwrap_err(),
        Refused::Address
    );
    let _c = door.stranger(SocketAddr::from((c, 1))).unwrap();
    let _v4 = door.stranger(v4(7, 1)).unwrap();
    let mapped = Ipv4Addr::new(192, 0, 2, 7).to_ipv6_mapped();
    assert_eq!(
        door.stranger(SocketAddr::from((mapped, 1))).unwrap_err(),
        Refused::Address
    );
}

#[tokio::test]
async fn the_stranger_pool_is_bounded_apart_from_the_main_pool() {
    let door = Admission::new("test", limits(1, 3, 8));
    let held: Vec<_> = (0..3).map(|i| door.stranger(v4(i, 1)).unwrap()).collect();
    assert_eq!(door.stranger(v4(9, 1)).unwrap_err(), Refused::Handshakes);
    assert_eq!(door.stats().refused_handshakes, 1);
    // Strangers hold none of the main pool: the one slot is still free for whoever
    // authenticates first.
    assert_eq!(door.stats().connections, 0);
    drop(held);
    assert_eq!(door.stats().strangers, 0);
}

#[tokio::test]
async fn promotion_moves_a_connection_from_the_stranger_pool_to_the_main_pool() {
    let door = Admission::new("test", limits(1, 2, 2));
    let first = door.stranger(v4(1, 1)).unwrap();
    let second = door.stranger(v4(1, 2)).unwrap();
    assert_eq!(door.stranger(v4(1, 3)).unwrap_err(), Refused::Address);
    let slot = first.authenticated().unwrap();
    assert_eq!(door.stats().strangers, 1);
    assert_eq!(door.stats().connections, 1);
    // The address's share is given back at promotion.
    let third = door.stranger(v4(1, 3)).unwrap();
    // The main pool is full: the second is refused after authenticating, counted, and its
    // stranger permit is given back all the same.
    assert_eq!(second.authenticated().unwrap_err(), Refused::Connections);
    let stats = door.stats();
    assert_eq!(stats.refused_connections, 1);
    assert_eq!(stats.strangers, 1);
    drop(slot);
    let _slot = third.authenticated().unwrap();
    assert_eq!(door.stats().connections, 1);
    assert_eq!(door.stats().strangers, 0);
}

#[tokio::test]
async fn local_pool_is_separate_from_the_network_pools() {
    let door = Admission::new("test", limits(1, 1, 1));
    let local = Pool::new("unix", "max_local_connections", 2);
    let _stranger = door.stranger(v4(1, 1)).unwrap();
    let _main = door.stranger(v4(2, 1)).err();
    let a = local.try_admit().unwrap();
    let _b = local.admit().await.unwrap();
    assert_eq!(local.try_admit().unwrap_err(), Refused::Connections);
    assert_eq!(local.refused(), 1);
    assert_eq!(local.in_use(), 2);
    // The network side is untouched by the local crowd, and the reverse.
    assert_eq!(door.stats().refused_connections, 0);
    drop(a);
    let _c = local.try_admit().unwrap();
}

#[test]
fn limit_warnings_are_one_per_interval_and_count_what_they_stand_for() {
    let warning = Warning::default();
    let start = Instant::now();
    assert_eq!(warning.note(start), Some(1));
    for i in 1..=500u64 {
        assert_eq!(warning.note(start + Duration::from_millis(i)), None);
    }
    assert_eq!(
        warning.note(start + WARN_INTERVAL - Duration::from_millis(1)),
        None
    );
    // The next line reports every refusal since the last one, itself included.
    assert_eq!(warning.note(start + WARN_INTERVAL), Some(502));
    assert_eq!(warning.note(start + WARN_INTERVAL), None);
    assert_eq!(warning.note(start + WARN_INTERVAL * 5), Some(2));
}

#[test]
fn the_tls_section_defaults_are_the_named_constants() {
    let section: crate::tls::TlsSection = crate::daemon::parse_toml("cert = \"c.pem\"").unwrap();
    let limits = section.admission(7);
    assert_eq!(
        limits,
        Limits {
            max_connections: 7,
            max_handshakes: DEFAULT_MAX_HANDSHAKES,
            max_handshakes_per_address: DEFAULT_MAX_HANDSHAKES_PER_ADDRESS,
            deadline: crate::tls::DEFAULT_HANDSHAKE_TIMEOUT,
        }
    );
    assert_eq!(limits.deadline, Duration::from_secs(10));
    assert_eq!(Limits::new(7, limits.deadline), limits);
    assert_eq!(crate::tls::TlsSection::new("c.pem".into()), section);
    for zero in ["max_handshakes = 0", "max_handshakes_per_address = 0"] {
        let text = format!("cert = \"c.pem\"\n{zero}");
        let err = crate::daemon::parse_toml::<crate::tls::TlsSection>(&text).unwrap_err();
        assert!(err.to_string().contains("nonzero"), "{zero}: {err}");
    }
    let text = "cert = \"c.pem\"\nmax_handshakes = 3\nmax_handshakes_per_address = 1";
    let section: crate::tls::TlsSection = crate::daemon::parse_toml(text).unwrap();
    assert_eq!(section.admission(7).max_handshakes, 3);
    assert_eq!(section.admission(7).max_handshakes_per_address, 1);
}

#[tokio::test]
async fn a_pending_connection_is_promoted_once_or_expires_at_its_deadline() {
    let deadline = Duration::from_millis(200);
    let door = Admission::new(
        "test",
        Limits {
            deadline,
            ..limits(1, 4, 4)
        },
    );
    let first = door.stranger(v4(1, 1)).unwrap().pending();
    let second = door.stranger(v4(1, 2)).unwrap().pending();
    assert!(!first.is_authenticated());
    first.authenticated().unwrap();
    first.authenticated().unwrap();
    assert!(first.is_authenticated());
    assert_eq!(door.stats().connections, 1);
    assert_eq!(door.stats().strangers, 1);
    // The main pool is full: refused now and on every later request.
    assert_eq!(second.authenticated().unwrap_err(), Refused::Connections);
    assert_eq!(second.authenticated().unwrap_err(), Refused::Connections);
    assert_eq!(door.stats().strangers, 0);

    let third = door.stranger(v4(1, 3)).unwrap().pending();
    let started = Instant::now();
    third.expired().await;
    assert!(started.elapsed() >= deadline, "{:?}", started.elapsed());
    assert!(started.elapsed() < deadline * 5, "{:?}", started.elapsed());
    // An authenticated one never expires.
    assert!(
        tokio::time::timeout(deadline * 2, first.expired())
            .await
            .is_err()
    );
}
