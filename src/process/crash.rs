//! What a process that died during a call says about it: its exit, and
//! the line of its stderr that gives the cause.

use std::io;
use std::time::{Duration, Instant};

use super::conns::Failed;
use crate::exec::child::Handle;
use crate::exec::logs::Logs;

/// How long a call that lost its connection waits for the process's exit,
/// to say how it ended.
const EXIT_WAIT: Duration = Duration::from_secs(1);
/// How long it then waits for the process's last line on stderr.
const STDERR_WAIT: Duration = Duration::from_millis(100);
/// Lines of a dying process's stderr searched for its cause.
const CAUSE_LINES: usize = 40;

/// Why a connection was lost: how the process ended (waiting a moment for
/// its exit), and its last line on stderr.
pub(crate) async fn lost(child: &Handle, logs: &Logs, error: io::Error) -> Failed {
    let Some(status) = child.exit_within(EXIT_WAIT).await else {
        return Failed::Lost {
            how: format!("lost the connection to its process ({error})"),
            stderr: None,
        };
    };
    let how = child.explain(status);
    let waited = Instant::now();
    let stderr = loop {
        let lines = logs.stderr_of(child.pid, CAUSE_LINES);
        if !lines.is_empty() || waited.elapsed() >= STDERR_WAIT {
            break cause(&lines);
        }
        crate::timer::Timer::after(Duration::from_millis(5)).await;
    };
    Failed::Lost {
        how: format!("its process {how}"),
        stderr,
    }
}

/// The line of a dying process's stderr that says why: Rust's own last
/// words (a panic and its message, a failed allocation, a stack overflow)
/// come before a backtrace when `RUST_BACKTRACE` is set, so they are looked
/// for first; else the last line.
fn cause(lines: &[String]) -> Option<String> {
    const CAUSES: [&str; 4] = [
        "memory allocation of",
        "stack overflow",
        "fatal runtime error",
        "panicked at",
    ];
    let found = lines
        .iter()
        .rposition(|l| CAUSES.iter().any(|c| l.contains(c)));
    match found {
        // A panic's message is on the next line.
        Some(at) if lines[at].contains("panicked at") => Some(match lines.get(at + 1) {
            Some(message) => format!("{} {message}", lines[at]),
            None => lines[at].clone(),
        }),
        Some(at) => Some(lines[at].clone()),
        None => lines.last().cloned(),
    }
}

#[cfg(test)]
mod tests {
    use super::cause;

    #[test]
    fn the_cause_is_found_above_a_backtrace() {
        let lines: Vec<String> = [
            "memory allocation of 1073741824 bytes failed",
            "stack backtrace:",
            "   0: somewhere",
            "note: Some details are omitted",
        ]
        .map(String::from)
        .to_vec();
        assert_eq!(cause(&lines).unwrap(), lines[0]);
        let panic = ["thread 'x' panicked at src/lib.rs:1:1:", "boom"].map(String::from);
        assert_eq!(
            cause(&panic).unwrap(),
            "thread 'x' panicked at src/lib.rs:1:1: boom"
        );
        assert_eq!(cause(&["last words".into()]).unwrap(), "last words");
        assert_eq!(cause(&[]), None);
    }
}
