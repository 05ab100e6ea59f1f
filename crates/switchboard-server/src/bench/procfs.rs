//! CPU time and resident memory of other processes, from `/proc`.

use std::path::Path;

/// CPU time (user + system) of every thread of `pid`, in nanoseconds, from
/// each thread's `schedstat` (nanosecond resolution); falls back to the
/// process's `stat` (clock ticks) where schedstat is unavailable.
pub fn cpu_ns(pid: u32) -> Option<u64> {
    let tasks = Path::new("/proc").join(pid.to_string()).join("task");
    let mut total = 0u64;
    let mut any = false;
    for entry in std::fs::read_dir(&tasks).ok()? {
        let Ok(entry) = entry else { continue };
        if let Ok(s) = std::fs::read_to_string(entry.path().join("schedstat"))
            && let Some(ns) = s
                .split_whitespace()
                .next()
                .and_then(|v| v.parse::<u64>().ok())
        {
            total += ns;
            any = true;
        }
    }
    if any {
        return Some(total);
    }
    // utime and stime are fields 14 and 15, after the parenthesised name.
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    Some(ticks * 10_000_000)
}

/// Resident set size of `pid`, in bytes.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// The sum over several processes; `None` if any is gone.
pub fn total(pids: &[u32], f: fn(u32) -> Option<u64>) -> Option<u64> {
    pids.iter().map(|&p| f(p)).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let me = std::process::id();
        let a = cpu_ns(me).unwrap();
        let mut x = 0u64;
        for i in 0..5_000_000u64 {
            x = x.wrapping_add(i * i);
        }
        assert!(x > 0);
        assert!(cpu_ns(me).unwrap() > a, "CPU time grows with work");
        assert!(rss_bytes(me).unwrap() > 1 << 20);
        assert_eq!(total(&[me, me], rss_bytes).map(|t| t > 0), Some(true));
        assert_eq!(cpu_ns(u32::MAX), None);
    }
}
