//! What exec plugins write on stdout and stderr: every line goes to
//! `tracing` under the plugin's name, and the last lines are kept for the
//! management API and for start errors.

use std::collections::VecDeque;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};

use tokio::io::AsyncReadExt;

/// Lines kept per version (across its restarts).
const KEPT: usize = 50;
/// Longest line kept or logged, in bytes: a child writing without newlines
/// must not grow a buffer without bound.
const MAX_LINE: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    fn as_str(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
}

struct Line {
    pid: u32,
    stream: Stream,
    text: String,
}

/// The last lines of one version's processes.
#[derive(Default)]
pub(crate) struct Logs {
    lines: Mutex<VecDeque<Line>>,
}

impl Logs {
    fn push(&self, line: Line) {
        let mut lines = self.lines.lock().unwrap_or_else(|e| e.into_inner());
        if lines.len() == KEPT {
            lines.pop_front();
        }
        lines.push_back(line);
    }

    /// The last lines, oldest first, as `[pid stream] text`.
    pub(crate) fn last(&self) -> Vec<String> {
        let lines = self.lines.lock().unwrap_or_else(|e| e.into_inner());
        lines
            .iter()
            .map(|l| format!("[{} {}] {}", l.pid, l.stream.as_str(), l.text))
            .collect()
    }

    /// The last `n` lines process `pid` wrote to stderr, oldest first.
    pub(crate) fn stderr_of(&self, pid: u32, n: usize) -> Vec<String> {
        let lines = self.lines.lock().unwrap_or_else(|e| e.into_inner());
        let mut tail: Vec<String> = lines
            .iter()
            .rev()
            .filter(|l| l.pid == pid && l.stream == Stream::Stderr)
            .take(n)
            .map(|l| l.text.clone())
            .collect();
        tail.reverse();
        tail
    }
}

/// Reads a child's pipe until it closes, on the exec runtime.
pub(crate) fn follow(
    pipe: OwnedFd,
    stream: Stream,
    plugin: Arc<str>,
    pid: u32,
    logs: Arc<Logs>,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let runtime = crate::remote::runtime::handle();
    let mut pipe = {
        let _inside = runtime.enter();
        tokio::net::unix::pipe::Receiver::from_owned_fd(pipe)?
    };
    Ok(runtime.spawn(async move {
        let emit = |bytes: &[u8], cut: bool| {
            let mut text = crate::text::printable(
                String::from_utf8_lossy(bytes).trim_end_matches('\r'),
                MAX_LINE,
            )
            .into_owned();
            if cut {
                text.push('…');
            }
            tracing::info!(target: "dynplug::plugin", plugin = %plugin, pid, stream = stream.as_str(), "{text}");
            logs.push(Line { pid, stream, text });
        };
        let mut buffer = Vec::with_capacity(1024);
        // Past MAX_LINE, the rest of the line is dropped.
        let mut skipping = false;
        let mut chunk = [0u8; 8192];
        loop {
            let n = match pipe.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let mut rest = &chunk[..n];
            while let Some(at) = rest.iter().position(|&b| b == b'\n') {
                if !skipping {
                    buffer.extend_from_slice(&rest[..at]);
                    emit(&buffer, false);
                }
                buffer.clear();
                skipping = false;
                rest = &rest[at + 1..];
            }
            if !skipping {
                buffer.extend_from_slice(rest);
                if buffer.len() > MAX_LINE {
                    emit(&buffer[..MAX_LINE], true);
                    buffer.clear();
                    skipping = true;
                }
            }
        }
        if !buffer.is_empty() && !skipping {
            emit(&buffer, false);
        }
    }))
}
