//! Process metrics, read from `/proc/self` once per scrape, named as the Prometheus client
//! libraries name them (`process_resident_memory_bytes`, `process_open_fds`,
//! `process_max_fds`, `process_cpu_seconds_total`, `process_start_time_seconds`), so the
//! dashboards and alerts written for other services work unchanged.
//!
//! A value that cannot be read (no `/proc`, a field that does not parse) is left out of the
//! scrape rather than reported as zero.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric as _};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

/// What `/proc/self/stat` says that we export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Stat {
    /// User CPU time, in clock ticks.
    pub(crate) utime: u64,
    /// System CPU time, in clock ticks.
    pub(crate) stime: u64,
    /// Start time after boot, in clock ticks.
    pub(crate) starttime: u64,
    /// Resident set size, in pages.
    pub(crate) rss_pages: u64,
}

/// Parses `/proc/self/stat`. The command name (field 2) is in parentheses and may hold
/// spaces and parentheses itself, so the fields are counted from the last `)`.
pub(crate) fn parse_stat(text: &str) -> Option<Stat> {
    let (_, rest) = text.rsplit_once(')')?;
    // rest[0] is field 3 (state); field N is rest[N - 3].
    let fields: Vec<&str> = rest.split_ascii_whitespace().collect();
    let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
    Some(Stat {
        utime: field(14)?,
        stime: field(15)?,
        starttime: field(22)?,
        rss_pages: field(24)?,
    })
}

/// The boot time (`btime`, seconds since the epoch) from `/proc/stat`.
pub(crate) fn parse_btime(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|line| line.strip_prefix("btime "))
        .and_then(|value| value.trim().parse().ok())
}

/// The process metrics, read at every scrape.
#[derive(Debug, Default)]
pub struct ProcessCollector;

#[expect(
    clippy::cast_precision_loss,
    reason = "tick and byte counts far below 2^52"
)]
fn seconds(ticks: u64, per_second: u64) -> f64 {
    ticks as f64 / per_second.max(1) as f64
}

/// Descriptors open now; the directory listing's own descriptor is not counted.
fn open_fds() -> Option<i64> {
    let count = std::fs::read_dir("/proc/self/fd").ok()?.count();
    i64::try_from(count.saturating_sub(1)).ok()
}

fn max_fds() -> Option<i64> {
    let limit = rustix::process::getrlimit(rustix::process::Resource::Nofile);
    limit.current.and_then(|max| i64::try_from(max).ok())
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let ticks = rustix::param::clock_ticks_per_second();
        let stat = std::fs::read_to_string("/proc/self/stat")
            .ok()
            .and_then(|text| parse_stat(&text));
        if let Some(stat) = stat {
            let cpu = seconds(stat.utime.saturating_add(stat.stime), ticks);
            let counter = ConstCounter::new(cpu);
            counter.encode(encoder.encode_descriptor(
                "process_cpu_seconds",
                "Total user and system CPU time spent in seconds.",
                None,
                counter.metric_type(),
            )?)?;
            let pages = u64::try_from(rustix::param::page_size()).unwrap_or(4096);
            let rss = i64::try_from(stat.rss_pages.saturating_mul(pages)).unwrap_or(i64::MAX);
            let gauge = ConstGauge::new(rss);
            gauge.encode(encoder.encode_descriptor(
                "process_resident_memory_bytes",
                "Resident memory size in bytes.",
                None,
                gauge.metric_type(),
            )?)?;
            let btime = std::fs::read_to_string("/proc/stat")
                .ok()
                .and_then(|text| parse_btime(&text));
            if let Some(btime) = btime {
                #[expect(clippy::cast_precision_loss, reason = "seconds since 1970")]
                let start = btime as f64 + seconds(stat.starttime, ticks);
                let gauge = ConstGauge::new(start);
                gauge.encode(encoder.encode_descriptor(
                    "process_start_time_seconds",
                    "Start time of the process since unix epoch in seconds.",
                    None,
                    gauge.metric_type(),
                )?)?;
            }
        }
        if let Some(open) = open_fds() {
            let gauge = ConstGauge::new(open);
            gauge.encode(encoder.encode_descriptor(
                "process_open_fds",
                "Number of open file descriptors.",
                None,
                gauge.metric_type(),
            )?)?;
        }
        if let Some(max) = max_fds() {
            let gauge = ConstGauge::new(max);
            gauge.encode(encoder.encode_descriptor(
                "process_max_fds",
                "Maximum number of open file descriptors.",
                None,
                gauge.metric_type(),
            )?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_from_the_last_parenthesis() {
        // A command name with spaces and a ')' of its own.
        let text = "4242 (a b) c) S 1 4242 4242 0 -1 4194560 500 0 0 0 17 5 0 0 20 0 3 0 123456 10000000 777 18446744073709551615 1 1 0 0 0 0 0 4096 0 0 0 0 17 1 0 0 0 0 0";
        assert_eq!(
            parse_stat(text),
            Some(Stat {
                utime: 17,
                stime: 5,
                starttime: 123_456,
                rss_pages: 777,
            })
        );
        assert_eq!(parse_stat("4242 (x) S 1 2"), None);
        assert_eq!(parse_stat("no parenthesis"), None);
    }

    #[test]
    fn boot_time_comes_from_the_btime_line() {
        let text = "cpu  1 2 3 4\nintr 5\nbtime 1700000000\nprocesses 9\n";
        assert_eq!(parse_btime(text), Some(1_700_000_000));
        assert_eq!(parse_btime("cpu 1\n"), None);
    }

    #[test]
    fn this_process_is_read() {
        let text = std::fs::read_to_string("/proc/self/stat").unwrap();
        let stat = parse_stat(&text).unwrap();
        assert!(stat.rss_pages > 0 && stat.starttime > 0, "{stat:?}");
        assert!(open_fds().unwrap() >= 3);
        assert!(max_fds().unwrap() >= open_fds().unwrap());
    }
}
