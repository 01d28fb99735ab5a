//! A process plugin's resource limits: set by the runner on itself before
//! it loads the library, and named in the messages of the crashes they cause.

use rustix::process::{Resource, Rlimit};

use crate::manifest::Limits;

/// Sets `limits` on this process (soft and hard: the plugin cannot raise
/// them again).
pub(crate) fn apply(limits: &Limits) -> std::io::Result<()> {
    let set = |resource, value: u64| {
        let limit = Rlimit {
            current: Some(value),
            maximum: Some(value),
        };
        rustix::process::setrlimit(resource, limit)
    };
    if let Some(mb) = limits.memory_mb {
        set(Resource::As, mb.saturating_mul(1024 * 1024))?;
    }
    if let Some(files) = limits.open_files {
        set(Resource::Nofile, files)?;
    }
    if let Some(seconds) = limits.cpu_seconds {
        // SIGXCPU at the soft limit; the hard one a second later kills.
        rustix::process::setrlimit(
            Resource::Cpu,
            Rlimit {
                current: Some(seconds),
                maximum: Some(seconds.saturating_add(1)),
            },
        )?;
    }
    Ok(())
}

/// What a crash says about the limits that may have caused it: the signal
/// and the last line on stderr say which one was hit.
pub(crate) fn explain(limits: &Limits, exit: &str, stderr: Option<&str>) -> Option<String> {
    if let Some(seconds) = limits.cpu_seconds
        && (exit.contains("SIGXCPU") || exit.contains("SIGKILL") && exit.contains("CPU"))
    {
        return Some(format!("its CPU-time limit ({seconds} s) was used up"));
    }
    if let Some(mb) = limits.memory_mb
        && stderr.is_some_and(|l| l.contains("memory allocation of"))
    {
        return Some(format!(
            "its memory limit ({mb} MiB of address space) was reached"
        ));
    }
    None
}
