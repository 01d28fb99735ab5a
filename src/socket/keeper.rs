//! Keeping a socket plugin in service: health checks on an interval, the
//! plugin taken out of service after missed checks (or a failed connect),
//! reconnection with backoff, and its handshake checked again each time it
//! answers (a restarted plugin may implement something else).
//!
//! The exec kind's supervisor without a process: nothing to start or stop,
//! only a server to find again.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use tokio::sync::{Notify, watch};

use super::settings::Settings;
use crate::event::{Event, EventSink};
use crate::remote::link::{CallError, Identity, Link};

#[derive(Debug)]
pub(crate) struct Status {
    /// What the last handshake said; `None` before the first answer.
    pub(crate) identity: Option<Identity>,
    pub(crate) reconnects: u64,
    pub(crate) failures_in_row: u32,
    pub(crate) last_error: Option<String>,
    pub(crate) next_attempt: Option<Instant>,
    /// Whether this outage was announced (`Event::Unreachable`).
    pub(crate) reported: bool,
}

/// What the version, its calls and its keeper share.
pub(crate) struct Shared {
    pub(crate) plugin: Arc<str>,
    pub(crate) version: String,
    pub(crate) settings: Settings,
    pub(crate) host: Arc<str>,
    /// The way to the server; `None` while it does not answer.
    pub(crate) link: ArcSwapOption<Link>,
    pub(crate) status: Mutex<Status>,
    /// Woken when a call could not connect: the keeper checks at once.
    pub(crate) nudge: Notify,
    pub(crate) events: EventSink,
}

impl Shared {
    pub(crate) fn status(&self) -> std::sync::MutexGuard<'_, Status> {
        self.status.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Why calls fail now, for `Error::Unavailable`.
    pub(crate) fn why_down(&self) -> String {
        let status = self.status();
        let why = status.last_error.as_deref().unwrap_or("not connected yet");
        let next = status
            .next_attempt
            .map(|at| {
                format!(
                    "; next attempt in {:?}",
                    at.saturating_duration_since(Instant::now())
                )
            })
            .unwrap_or_default();
        format!("unreachable: {why}{next}")
    }

    /// A new link, in the wire the plugin last answered in.
    fn new_link(&self) -> Link {
        let wire = self
            .status()
            .identity
            .as_ref()
            .map_or(self.settings.wire, |id| id.wire);
        Link::new(wire, self.settings.address.clone(), &self.host)
    }

    /// Connects and shakes hands, bounded by the health timeout.
    pub(crate) async fn connect(&self) -> Result<(Arc<Link>, Identity), CallError> {
        let link = self.new_link();
        let identity = link.identify(self.settings.health_timeout).await?;
        let link = if identity.wire == link.wire() {
            link
        } else {
            Link::new(identity.wire, self.settings.address.clone(), &self.host)
        };
        Ok((Arc::new(link), identity))
    }

    /// Puts an answering server in service; says so if it was out of it
    /// (or now implements something else).
    pub(crate) fn up(&self, link: Arc<Link>, identity: Identity, announce: bool) {
        let changed = {
            let mut status = self.status();
            let was_down = self.link.load().is_none();
            let changed = status.identity.as_ref() != Some(&identity);
            if was_down && status.identity.is_some() {
                status.reconnects += 1;
            }
            status.failures_in_row = 0;
            status.next_attempt = None;
            status.reported = false;
            status.identity = Some(identity.clone());
            was_down || changed
        };
        self.link.store(Some(link));
        if changed && announce {
            tracing::info!(plugin = %self.plugin, protocol = identity.wire.as_str(), interfaces = ?identity.interfaces, "answers");
            self.events.emit(Event::Reachable {
                plugin: self.plugin.to_string(),
                version: self.version.clone(),
                protocol: identity.wire.as_str().to_owned(),
                interfaces: identity.interfaces,
            });
        }
    }

    /// Takes the server out of service (or keeps it out) after `reason`;
    /// returns how long to wait before the next attempt. The outage is
    /// announced once, unless `quiet` (a load: its event would come before
    /// the manager's `Loaded`; the keeper's next failure announces it).
    pub(crate) fn down(&self, reason: String, quiet: bool) -> Duration {
        self.link.swap(None);
        let (delay, first) = {
            let mut status = self.status();
            status.failures_in_row = status.failures_in_row.saturating_add(1);
            let delay = self.settings.backoff(status.failures_in_row);
            let first = !status.reported && !quiet;
            status.reported |= first;
            status.last_error = Some(reason.clone());
            status.next_attempt = Some(Instant::now() + delay);
            (delay, first)
        };
        if first {
            // Reported once per outage; the attempts that follow go to debug.
            tracing::warn!(plugin = %self.plugin, ?delay, "unreachable: {reason}");
            self.events.emit(Event::Unreachable {
                plugin: self.plugin.to_string(),
                version: self.version.clone(),
                reason,
                retry_in_ms: delay.as_millis().try_into().unwrap_or(u64::MAX),
            });
        } else {
            tracing::debug!(plugin = %self.plugin, ?delay, "still unreachable: {reason}");
        }
        delay
    }
}

/// Keeps the plugin in service until `stop` says true.
pub(crate) async fn keep(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let settings = &shared.settings;
    let mut misses = 0;
    loop {
        let Some(link) = shared.link.load_full() else {
            let delay = shared.status().next_attempt.map_or(Duration::ZERO, |at| {
                at.saturating_duration_since(Instant::now())
            });
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = stopped(&mut stop) => return,
            }
            match shared.connect().await {
                Ok((link, identity)) => {
                    misses = 0;
                    shared.up(link, identity, true);
                }
                Err(e) => {
                    shared.down(e.to_string(), false);
                }
            }
            continue;
        };
        let nudged = tokio::select! {
            () = tick(settings.health_interval) => false,
            () = shared.nudge.notified() => true,
            () = stopped(&mut stop) => return,
        };
        match link.identify(settings.health_timeout).await {
            Ok(identity) => {
                misses = 0;
                let link = if identity.wire == link.wire() {
                    link
                } else {
                    Arc::new(Link::new(
                        identity.wire,
                        settings.address.clone(),
                        &shared.host,
                    ))
                };
                shared.up(link, identity, true);
            }
            Err(e) => {
                misses += 1;
                tracing::debug!(plugin = %shared.plugin, misses, "health check failed: {e}");
                // A call that could not connect, confirmed: out at once.
                if nudged || misses >= settings.health_misses {
                    let reason = if nudged {
                        e.to_string()
                    } else {
                        format!("missed {misses} health checks in a row (last: {e})")
                    };
                    misses = 0;
                    shared.down(reason, false);
                }
            }
        }
    }
}

/// Resolves after `interval`, never without one.
async fn tick(interval: Option<Duration>) {
    match interval {
        Some(interval) => tokio::time::sleep(interval).await,
        None => std::future::pending().await,
    }
}

/// Resolves once a stop is asked for (or the version is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|stop| *stop).await;
}
