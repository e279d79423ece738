//! The standard `process_*` metrics (CPU time, memory, file descriptors, start time), read
//! from `/proc/self` at each scrape and written in Prometheus text format.
//!
//! Linux only: elsewhere (and if `/proc` is not mounted) the families are left out rather
//! than reported as 0. They are rendered here rather than through the `metrics` recorder
//! because the recorder's counters are integers and CPU time is counted in fractions of a
//! second; the names, types and meanings are those of the Prometheus client libraries.

use std::fmt::Write as _;
use std::path::Path;

/// The values of one reading; `None` for what could not be read.
#[derive(Debug, Default, PartialEq)]
pub struct ProcessStats {
    pub cpu_seconds: Option<f64>,
    pub resident_memory_bytes: Option<u64>,
    pub virtual_memory_bytes: Option<u64>,
    pub open_fds: Option<u64>,
    pub max_fds: Option<u64>,
    pub start_time_seconds: Option<f64>,
}

impl ProcessStats {
    /// Reads this process's statistics from `/proc`.
    pub fn read() -> Self {
        Self::read_from(Path::new("/proc"))
    }

    /// Reads them from a procfs mounted at `proc` (tests point it at a fixture).
    fn read_from(proc: &Path) -> Self {
        let me = proc.join("self");
        let ticks = rustix::param::clock_ticks_per_second() as f64;
        let page = rustix::param::page_size() as u64;
        let stat = std::fs::read_to_string(me.join("stat"))
            .ok()
            .and_then(|s| Stat::parse(&s));
        let boot_time = std::fs::read_to_string(proc.join("stat"))
            .ok()
            .and_then(|s| boot_time(&s));
        Self {
            cpu_seconds: stat.as_ref().map(|s| (s.utime + s.stime) as f64 / ticks),
            resident_memory_bytes: stat.as_ref().map(|s| s.rss_pages.saturating_mul(page)),
            virtual_memory_bytes: stat.as_ref().map(|s| s.vsize),
            open_fds: std::fs::read_dir(me.join("fd"))
                .ok()
                .map(|d| d.count() as u64),
            max_fds: std::fs::read_to_string(me.join("limits"))
                .ok()
                .and_then(|s| max_open_files(&s)),
            start_time_seconds: stat
                .as_ref()
                .zip(boot_time)
                .map(|(s, boot)| boot as f64 + s.starttime as f64 / ticks),
        }
    }

    /// Appends the families that could be read to `out`, with their HELP and TYPE.
    pub fn render(&self, out: &mut String) {
        let mut family = |name: &str, kind: &str, help: &str, value: Option<String>| {
            if let Some(value) = value {
                let _ = write!(
                    out,
                    "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n\n"
                );
            }
        };
        family(
            "process_cpu_seconds_total",
            "counter",
            "Total user and system CPU time spent in seconds.",
            self.cpu_seconds.map(|v| v.to_string()),
        );
        family(
            "process_resident_memory_bytes",
            "gauge",
            "Resident memory size in bytes.",
            self.resident_memory_bytes.map(|v| v.to_string()),
        );
        family(
            "process_virtual_memory_bytes",
            "gauge",
            "Virtual memory size in bytes.",
            self.virtual_memory_bytes.map(|v| v.to_string()),
        );
        family(
            "process_open_fds",
            "gauge",
            "Number of open file descriptors.",
            self.open_fds.map(|v| v.to_string()),
        );
        family(
            "process_max_fds",
            "gauge",
            "Maximum number of open file descriptors (the soft limit).",
            self.max_fds.map(|v| v.to_string()),
        );
        family(
            "process_start_time_seconds",
            "gauge",
            "Start time of the process since unix epoch in seconds.",
            self.start_time_seconds.map(|v| v.to_string()),
        );
    }
}

/// The fields of `/proc/self/stat` read here (proc(5) numbering in comments).
struct Stat {
    /// (14), in clock ticks.
    utime: u64,
    /// (15), in clock ticks.
    stime: u64,
    /// (22), clock ticks after boot.
    starttime: u64,
    /// (23), bytes.
    vsize: u64,
    /// (24), pages.
    rss_pages: u64,
}

impl Stat {
    /// The command name (2) is in parentheses and may itself contain spaces and `)`, so the
    /// fields are counted from the last `)`: the next one is the state (3).
    fn parse(text: &str) -> Option<Self> {
        let (_, rest) = text.rsplit_once(')')?;
        let fields: Vec<&str> = rest.split_ascii_whitespace().collect();
        let field = |n: usize| -> Option<u64> { fields.get(n.checked_sub(3)?)?.parse().ok() };
        Some(Self {
            utime: field(14)?,
            stime: field(15)?,
            starttime: field(22)?,
            vsize: field(23)?,
            rss_pages: field(24)?,
        })
    }
}

/// `btime` of `/proc/stat`: the boot time in seconds since the epoch.
fn boot_time(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok())
}

/// The soft limit of `Max open files` in `/proc/self/limits`; `None` when unlimited.
fn max_open_files(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..]
        .split_ascii_whitespace()
        .next()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_from_the_last_parenthesis() {
        // A command name with a space and a `)` must not shift the fields.
        let text = "42 (a) b) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 8 0 1000 \
                    123456789 300 18446744073709551615 1 1 0 0 0 0 0 4096 0 0 0 0 17 1 0 0 \
                    0 0 0";
        let s = Stat::parse(text).unwrap();
        assert_eq!((s.utime, s.stime), (250, 50));
        assert_eq!(s.starttime, 1000);
        assert_eq!(s.vsize, 123_456_789);
        assert_eq!(s.rss_pages, 300);
        assert!(Stat::parse("42 (truncated) S 1 2").is_none());
        assert!(Stat::parse("no parenthesis").is_none());
    }

    #[test]
    fn limits_and_boot_time() {
        let limits = "Limit                     Soft Limit           Hard Limit           Units     \n\
                      Max processes             63704                63704                processes \n\
                      Max open files            1024                 524288               files     \n";
        assert_eq!(max_open_files(limits), Some(1024));
        assert_eq!(
            max_open_files(
                "Max open files            unlimited            unlimited            files"
            ),
            None
        );
        assert_eq!(
            boot_time("cpu  1 2 3\nbtime 1700000000\nprocesses 5\n"),
            Some(1_700_000_000)
        );
        assert_eq!(boot_time("cpu  1 2 3\n"), None);
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn this_process_is_read() {
        let stats = ProcessStats::read();
        assert!(stats.cpu_seconds.is_some_and(|c| c >= 0.0));
        assert!(stats.resident_memory_bytes.is_some_and(|r| r > 0));
        assert!(stats.open_fds.is_some_and(|n| n >= 3));
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        let start = stats.start_time_seconds.unwrap();
        assert!(
            start <= now + 1.0 && start > now - 3600.0,
            "{start} vs {now}"
        );
        let mut text = String::new();
        stats.render(&mut text);
        for family in [
            "process_cpu_seconds_total",
            "process_resident_memory_bytes",
            "process_open_fds",
            "process_start_time_seconds",
        ] {
            assert!(text.contains(&format!("# HELP {family} ")), "{text}");
            assert!(text.contains(&format!("# TYPE {family} ")), "{text}");
        }
    }

    #[test]
    fn nothing_is_rendered_without_proc() {
        let dir = std::env::temp_dir().join("sidekey-no-proc-here");
        let stats = ProcessStats::read_from(&dir);
        assert_eq!(stats, ProcessStats::default());
        let mut text = String::new();
        stats.render(&mut text);
        assert!(text.is_empty());
    }
}
