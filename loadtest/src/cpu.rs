//! CPU time of processes, from /proc, for "CPU µs per message" figures.

use std::time::Duration;

/// Clock ticks per second of /proc's times (USER_HZ, 100 on Linux).
const TICKS_PER_SEC: u64 = 100;

/// User + system CPU time of a process (`None`: it is gone or this is not
/// Linux).
pub fn process_cpu(pid: u32) -> Option<Duration> {
    read(&format!("/proc/{pid}/stat"))
}

/// User + system CPU time of this process.
pub fn own_cpu() -> Option<Duration> {
    read("/proc/self/stat")
}

fn read(path: &str) -> Option<Duration> {
    let stat = std::fs::read_to_string(path).ok()?;
    // Fields after the command name, which is in parentheses and may hold
    // spaces; utime and stime are the line's 14th and 15th fields.
    let rest = stat.rsplit_once(')')?.1;
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(Duration::from_millis(
        (utime + stime) * 1000 / TICKS_PER_SEC,
    ))
}

#[cfg(test)]
mod tests {
    #[test]
    fn this_process_has_used_some_cpu_and_it_only_grows() {
        let a = super::own_cpu().expect("linux /proc");
        let mut x = 0u64;
        for i in 0..20_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        assert!(x != 1);
        let b = super::own_cpu().unwrap();
        assert!(b >= a, "{a:?} then {b:?}");
    }
}
