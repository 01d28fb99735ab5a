//! The one `unsafe` of the exec kind: code that runs in the child between
//! `fork` and `exec`, asking the kernel to kill it when its parent dies.
#![allow(unsafe_code)]

use std::process::Command;

/// Makes the child receive SIGKILL when the thread that spawns it exits
/// (Linux's parent-death signal is tied to the forking thread, not the
/// process: the spawning thread must live as long as the child, which
/// `child.rs` ensures). If this process died before the signal was set,
/// the child has already been re-parented and refuses to start.
#[cfg(target_os = "linux")]
pub(crate) fn kill_with_parent(command: &mut Command) {
    use std::os::unix::process::CommandExt;
    let parent = rustix::process::getpid();
    // The closure runs in the forked child before `exec`, where only
    // async-signal-safe operations are allowed. It makes two raw system
    // calls (prctl, getppid) through rustix, which neither allocate nor
    // take locks, and returns an `io::Error` built from an errno (no
    // allocation): std reports it to the parent and `_exit`s the child.
    // SAFETY: async-signal-safe only, as above.
    unsafe {
        command.pre_exec(move || {
            rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL))?;
            if rustix::process::getppid() != Some(parent) {
                // Re-parented: the host is gone. (No allocation here.)
                return Err(rustix::io::Errno::SRCH.into());
            }
            Ok(())
        });
    }
}

/// Elsewhere there is no parent-death signal: the process group and the
/// stop sequence are all there is.
#[cfg(not(target_os = "linux"))]
pub(crate) fn kill_with_parent(_command: &mut Command) {}
