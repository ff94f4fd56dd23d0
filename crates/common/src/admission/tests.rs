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

#[tokio::test]
async fn between_equals_a_full_pool_evicts_its_oldest_stranger_once_it_is_old_enough() {
    let mut now = Instant::now();
    let door = Admission::new("test", limits(4, 3, 2));
    let oldest = door.stranger_at(v4(1, 1), now).unwrap();
    now += Duration::from_millis(10);
    let middle = door.stranger_at(v4(2, 1), now).unwrap();
    let youngest = door.stranger_at(v4(3, 1), now).unwrap();
    // Full, one each, as the newcomer would hold, and nobody has been there EVICT_MIN_AGE:
    // the newcomer is refused.
    assert_eq!(
        door.stranger_at(v4(4, 1), now).unwrap_err(),
        Refused::Handshakes
    );
    assert!(!oldest.is_evicted());
    now += EVICT_MIN_AGE - Duration::from_millis(10);
    // Now the oldest (only) is old enough: it goes, the newcomer takes its room at once.
    let first_in = door.stranger_at(v4(4, 1), now).unwrap();
    assert!(oldest.is_evicted());
    assert!(!middle.is_evicted() && !youngest.is_evicted());
    // The evicted one's evicted() has completed; the others' have not.
    tokio::time::timeout(Duration::ZERO, oldest.evicted())
        .await
        .unwrap();
    assert!(
        tokio::time::timeout(Duration::ZERO, middle.evicted())
            .await
            .is_err()
    );
    let stats = door.stats();
    assert_eq!((stats.strangers, stats.evicted), (3, 1), "{stats:?}");
    assert_eq!(stats.refused_handshakes, 1);
    // The next eviction is the next oldest, admission order deciding between equals.
    now += Duration::from_millis(10);
    let _second_in = door.stranger_at(v4(5, 1), now).unwrap();
    assert!(middle.is_evicted());
    assert!(!youngest.is_evicted() && !first_in.is_evicted());
    // first_in is younger than EVICT_MIN_AGE, but youngest is not: it goes next.
    let _third_in = door.stranger_at(v4(6, 1), now).unwrap();
    assert!(youngest.is_evicted());
    assert!(!first_in.is_evicted());
    // Now all three are the newcomers, all young: refused.
    assert_eq!(
        door.stranger_at(v4(7, 1), now).unwrap_err(),
        Refused::Handshakes
    );
    // A newcomer never evicts from a key holding no more than its own would: address 4 holds
    // one, as everyone does, so its second connection is refused even once all are old.
    now += EVICT_MIN_AGE;
    assert_eq!(
        door.stranger_at(v4(4, 2), now).unwrap_err(),
        Refused::Handshakes
    );
    assert!(!first_in.is_evicted());
    assert_eq!(door.stats().evicted, 3);
}

/// Issue 16: the busiest key gives way at once, however young its strangers, to a newcomer
/// whose key would hold fewer; never to one whose key would hold as many.
#[tokio::test]
async fn a_full_pool_evicts_from_the_busiest_address_at_once() {
    let now = Instant::now();
    let door = Admission::new("test", limits(4, 4, 3));
    let a1 = door.stranger_at(v4(1, 1), now).unwrap();
    let b1 = door.stranger_at(v4(2, 1), now).unwrap();
    let a2 = door.stranger_at(v4(1, 2), now).unwrap();
    let a3 = door.stranger_at(v4(1, 3), now).unwrap();
    // All young. Address 1 holds 3, more than the newcomer's 1: its oldest goes.
    let c1 = door.stranger_at(v4(3, 1), now).unwrap();
    assert!(a1.is_evicted());
    assert!(!a2.is_evicted() && !a3.is_evicted() && !b1.is_evicted());
    assert_eq!((held(&door, 1), held(&door, 2), held(&door, 3)), (2, 1, 1));
    // Address 3 would hold 2, as address 1 does: between equals the young stay.
    assert_eq!(
        door.stranger_at(v4(3, 2), now).unwrap_err(),
        Refused::Handshakes
    );
    // A fresh address would hold 1: address 1 (2) gives way again.
    let d1 = door.stranger_at(v4(4, 1), now).unwrap();
    assert!(a2.is_evicted() && !a3.is_evicted());
    // Now one each, all young: the next fresh address is refused.
    assert_eq!(
        door.stranger_at(v4(5, 1), now).unwrap_err(),
        Refused::Handshakes
    );
    for survivor in [&a3, &b1, &c1, &d1] {
        assert!(!survivor.is_evicted());
    }
    let stats = door.stats();
    assert_eq!(
        (stats.strangers, stats.evicted, stats.refused_handshakes),
        (4, 2, 2),
        "{stats:?}"
    );
}

/// Issue 16 (`t_churn.py 16 20 8 0.5`), sans-IO: 16 addresses x 8 sockets, each reopened
/// 0.5 s after the daemon closes it, kept the default pool full of strangers younger than
/// `EVICT_MIN_AGE`, and a newcomer logging in every 0.5 s from an address of its own was
/// refused every time. Now it gets in at once, and its 20 ms login is never cut short.
#[tokio::test]
async fn strangers_reconnecting_from_sixteen_addresses_do_not_lock_out_a_newcomer() {
    const TICK: Duration = Duration::from_millis(10);
    const PAUSE: Duration = Duration::from_millis(500);
    const LOGIN: Duration = Duration::from_millis(20);
    let door = Admission::new("test", Limits::new(256, Duration::from_secs(10)));
    let start = Instant::now();
    let mut now = start;
    // (address, the permit held, when to reopen).
    let mut crowd: Vec<(u8, Option<Stranger>, Instant)> = (1..=16)
        .flat_map(|address| (0..8).map(move |_| (address, None, start)))
        .collect();
    let mut newcomer: Option<(Stranger, Instant)> = None;
    let (mut tried, mut served, mut port) = (0, 0, 0u16);
    while now < start + Duration::from_secs(8) {
        for (address, held, reopen) in &mut crowd {
            if held.as_ref().is_some_and(Stranger::is_evicted) {
                *held = None;
                *reopen = now + PAUSE;
            }
            if held.is_none() && now >= *reopen {
                port = port.wrapping_add(1);
                match door.stranger_at(v4(*address, port), now) {
                    Ok(stranger) => *held = Some(stranger),
                    Err(_) => *reopen = now + PAUSE,
                }
            }
        }
        if let Some((stranger, since)) = newcomer.take() {
            if now >= since + LOGIN {
                if stranger.authenticated().is_ok() {
                    served += 1;
                }
            } else {
                newcomer = Some((stranger, since));
            }
        }
        let elapsed = now.saturating_duration_since(start);
        if elapsed >= Duration::from_secs(2) && elapsed.as_millis() % 500 == 0 {
            tried += 1;
            port = port.wrapping_add(1);
            if let Ok(stranger) = door.stranger_at(v4(200, port), now) {
                newcomer = Some((stranger, now));
            }
        }
        now += TICK;
    }
    let stats = door.stats();
    // The crowd keeps the pool full (but for the newcomer's room just given back).
    assert!(stats.strangers >= 63, "{stats:?}");
    assert!(stats.refused_handshakes > 500, "{stats:?}");
    assert_eq!(served, tried, "served {served} of {tried}; {stats:?}");
}

/// The case fairness by key cannot help: 64 addresses (the pool) holding one stranger each.
/// They are evicted between equals once EVICT_MIN_AGE old, as before; a newcomer whose key
/// already holds one is refused.
#[tokio::test]
async fn one_stranger_from_each_of_many_addresses_is_evicted_only_once_old() {
    let mut now = Instant::now();
    let door = Admission::new("test", Limits::new(256, Duration::from_secs(10)));
    let crowd: Vec<Stranger> = (1..=64)
        .map(|address| door.stranger_at(v4(address, 1), now).unwrap())
        .collect();
    assert_eq!(
        door.stranger_at(v4(100, 1), now).unwrap_err(),
        Refused::Handshakes
    );
    now += EVICT_MIN_AGE;
    let newcomer = door.stranger_at(v4(100, 1), now).unwrap();
    assert!(crowd.first().unwrap().is_evicted());
    assert!(crowd.iter().skip(1).all(|s| !s.is_evicted()));
    assert_eq!(
        door.stranger_at(v4(100, 2), now).unwrap_err(),
        Refused::Handshakes
    );
    assert!(!newcomer.is_evicted());
}

/// How many stranger permits the address of `v4(last, _)` holds.
fn held(door: &Admission, last: u8) -> usize {
    let key = AddressKey::of(v4(last, 0).ip());
    let table = door.inner.table.lock().unwrap();
    table.per_address.get(&key).copied().unwrap_or(0)
}

#[tokio::test]
async fn eviction_gives_back_the_address_share_once_and_the_evicted_cannot_authenticate() {
    let mut now = Instant::now();
    let door = Admission::new("test", limits(4, 2, 2));
    let a1 = door.stranger_at(v4(1, 1), now).unwrap();
    let a2 = door.stranger_at(v4(1, 2), now).unwrap();
    // The per-address cap is kept and checked first: a full address evicts nobody young.
    assert_eq!(
        door.stranger_at(v4(1, 3), now).unwrap_err(),
        Refused::Address
    );
    assert_eq!(door.stats().evicted, 0);
    now += EVICT_MIN_AGE;
    let b1 = door.stranger_at(v4(2, 1), now).unwrap();
    assert!(a1.is_evicted() && !a2.is_evicted());
    // The evicted one's share went with it, at once.
    assert_eq!((held(&door, 1), held(&door, 2)), (1, 1));
    // Dropping the evicted gives nothing back twice.
    drop(a1);
    assert_eq!((held(&door, 1), door.stats().strangers), (1, 2));
    // Address 1 would hold 2, more than address 2 (b1, young): refused, a2 stays.
    assert_eq!(
        door.stranger_at(v4(1, 3), now).unwrap_err(),
        Refused::Handshakes
    );
    assert!(!a2.is_evicted());
    // Address 3 would hold 1, as address 1 does: a2 is old enough, it goes.
    let a3 = door.stranger_at(v4(3, 1), now).unwrap();
    assert!(a2.is_evicted() && !b1.is_evicted());
    assert_eq!((held(&door, 1), held(&door, 3)), (0, 1));
    drop(a2);
    assert_eq!((held(&door, 1), door.stats().strangers), (0, 2));
    // Both young: the next newcomer is refused, whatever its address.
    assert_eq!(
        door.stranger_at(v4(4, 1), now).unwrap_err(),
        Refused::Handshakes
    );
    // An evicted stranger is not promoted, and its refusal takes no slot.
    now += EVICT_MIN_AGE;
    let c1 = door.stranger_at(v4(4, 1), now).unwrap();
    assert!(b1.is_evicted() && !a3.is_evicted());
    assert_eq!(held(&door, 2), 0);
    assert_eq!(b1.authenticated().unwrap_err(), Refused::Handshakes);
    assert_eq!(door.stats().connections, 0);
    let _slot = a3.authenticated().unwrap();
    drop(c1);
    let stats = door.stats();
    assert_eq!(
        (stats.strangers, stats.connections, stats.evicted),
        (0, 1, 3)
    );
    assert_eq!((held(&door, 3), held(&door, 2), held(&door, 4)), (0, 0, 0));
    assert!(door.inner.table.lock().unwrap().per_address.is_empty());
}

#[tokio::test]
async fn an_evicted_pending_connection_expires_at_once() {
    let mut now = Instant::now();
    let door = Admission::new("test", limits(4, 1, 1));
    let pending = door.stranger_at(v4(1, 1), now).unwrap().pending();
    now += EVICT_MIN_AGE;
    let _newcomer = door.stranger_at(v4(2, 1), now).unwrap();
    // The deadline is 10 s away; the eviction ends it now.
    tokio::time::timeout(Duration::from_secs(1), pending.expired())
        .await
        .unwrap();
    // A request that authenticates afterwards does not promote it.
    assert_eq!(pending.authenticated().unwrap_err(), Refused::Handshakes);
    assert!(!pending.is_authenticated());
    assert_eq!(door.stats().connections, 0);
}

/// Attack pass 2 (MEDIUM): 8 idle sockets from 127.0.0.1, reopened when closed, kept every
/// other client on 127.0.0.1 out (0 of 34 logins): a newcomer over its address's cap was
/// refused at once. Now it evicts its own address's oldest stranger once that is
/// EVICT_MIN_AGE old, so a client sharing the address gets in; a young one is not evicted.
#[tokio::test]
async fn a_full_address_makes_room_from_its_own_oldest_once_old() {
    let mut now = Instant::now();
    let door = Admission::new("test", Limits::new(256, Duration::from_secs(10)));
    let per_address = door.limits().max_handshakes_per_address;
    let crowd: Vec<Stranger> = (0..per_address)
        .map(|port| door.stranger_at(v4(1, port as u16), now).unwrap())
        .collect();
    assert_eq!(
        door.stranger_at(v4(1, 999), now).unwrap_err(),
        Refused::Address
    );
    now += EVICT_MIN_AGE;
    let client = door.stranger_at(v4(1, 999), now).unwrap();
    assert!(crowd.first().unwrap().is_evicted());
    assert!(crowd.iter().skip(1).all(|s| !s.is_evicted()));
    assert_eq!(held(&door, 1), per_address);
    // The attacker reopens at once: it evicts its own next oldest, never the young client.
    let again = door.stranger_at(v4(1, 1000), now).unwrap();
    assert!(crowd.get(1).unwrap().is_evicted());
    assert!(!client.is_evicted() && !again.is_evicted());
    assert_eq!(door.stats().evicted, 2);
}
