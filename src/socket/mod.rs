//! Socket plugins (`source.mode = "socket"`): a server dynplug did not
//! start, on a Unix socket or TCP, spoken to in goplugin's REST or gRPC
//! protocol, JSON-RPC 2.0 (InfraKit) or Docker's plugin protocol.
//!
//! An exec plugin without a process: the wire is `crate::remote`'s, and
//! `keeper.rs` keeps the plugin in service as `exec/supervisor.rs` does,
//! with reconnection in place of restarts. The plugin loads even when
//! nothing answers yet (its state is then `unreachable`, and calls fail
//! with `Unavailable` until it answers): the server is not ours to start.
//!
//! Socket plugins come from manifests, from a sockets directory
//! (`discovery.rs`, InfraKit and Docker style) and from the registry
//! (`serve::registry`); the last two make their manifest themselves.

mod discovery;
mod keeper;
mod settings;

use std::path::Path;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwapOption;
use tokio::sync::{Notify, watch};

pub use discovery::Discovery;

use crate::Context;
use crate::error::{Error, Result};
use crate::event::EventSink;
use crate::manifest::Manifest;
use crate::remote::call;
use crate::remote::link::Address;
use crate::remote::runtime;
use crate::slot::{PluginState, SocketInfo};
use crate::version::{Ending, Outcome};
use keeper::{Shared, Status};
use settings::Settings;

/// Settings the manager passes to every socket load.
#[derive(Debug, Clone)]
pub(crate) struct SocketOptions {
    /// What the goplugin `X-Host` header says.
    pub(crate) host_name: Arc<str>,
    pub(crate) events: EventSink,
}

pub(crate) struct SocketVersion {
    shared: Arc<Shared>,
    stop: watch::Sender<bool>,
    keeper: Option<tokio::task::JoinHandle<()>>,
    ending: Option<Ending>,
}

impl SocketVersion {
    /// Connects (bounded by the health timeout) and starts keeping the
    /// plugin in service. A server that does not answer is not an error:
    /// it is tried again with backoff, and reported (`Event::Unreachable`,
    /// after the manager's `Loaded`) when that attempt fails too.
    pub(crate) fn load(
        manifest: &Manifest,
        dir: &Path,
        options: &SocketOptions,
    ) -> Result<SocketVersion> {
        let settings = Settings::of(manifest, dir).map_err(|reason| Error::Unavailable {
            plugin: manifest.name.clone(),
            reason,
        })?;
        let shared = Arc::new(Shared {
            plugin: Arc::from(manifest.name.as_str()),
            version: manifest.version.to_string(),
            settings,
            host: Arc::clone(&options.host_name),
            link: ArcSwapOption::empty(),
            status: Mutex::new(Status {
                identity: None,
                reconnects: 0,
                failures_in_row: 0,
                last_error: None,
                next_attempt: None,
                reported: false,
            }),
            nudge: Notify::new(),
            events: options.events.clone(),
        });
        let connecting = Arc::clone(&shared);
        match runtime::block(async move { connecting.connect().await }) {
            Ok((link, identity)) => {
                tracing::debug!(plugin = %shared.plugin, address = %shared.settings.address, ?identity, "answers");
                shared.up(link, identity, false);
            }
            Err(e) => {
                shared.down(e.to_string(), true);
            }
        }
        let (stop, stopped) = watch::channel(false);
        let keeper = runtime::handle().spawn(keeper::keep(Arc::clone(&shared), stopped));
        Ok(SocketVersion {
            shared,
            stop,
            keeper: Some(keeper),
            ending: None,
        })
    }

    pub(crate) fn execute(&self, ctx: &mut Context) -> Result<Outcome> {
        call::execute(&self.shared, ctx)
    }

    pub(crate) async fn execute_async(&self, ctx: &mut Context) -> Result<Outcome> {
        call::execute_async(&self.shared, ctx).await
    }

    /// Calls whose caller stopped waiting are aborted on the wire: nothing
    /// to wait for beyond the callers.
    pub(crate) fn busy(&self) -> usize {
        0
    }

    pub(crate) fn artifact(&self) -> String {
        self.shared.settings.address.to_string()
    }

    pub(crate) fn info(&self) -> SocketInfo {
        let status = self.shared.status();
        let (protocol, interfaces) = match &status.identity {
            Some(identity) => (identity.wire, identity.interfaces.clone()),
            None => (self.shared.settings.wire, Vec::new()),
        };
        SocketInfo {
            address: self.shared.settings.address.to_string(),
            protocol: protocol.as_str().to_owned(),
            connected: self.shared.link.load().is_some(),
            interfaces,
            found_by: "manifest".to_owned(),
            reconnects: status.reconnects,
            failures_in_row: status.failures_in_row,
            last_error: status.last_error.clone(),
        }
    }

    /// `Unreachable` while the server does not answer.
    pub(crate) fn down_state(&self) -> Option<PluginState> {
        self.shared
            .link
            .load()
            .is_none()
            .then_some(PluginState::Unreachable)
    }

    /// Stops keeping the plugin; the server itself is not ours to stop.
    pub(crate) fn unload(&mut self) -> Ending {
        if let Some(ending) = &self.ending {
            return ending.clone();
        }
        let _ = self.stop.send(true);
        self.shared.link.store(None);
        if let Some(keeper) = self.keeper.take() {
            if tokio::runtime::Handle::try_current().is_ok() {
                // On a runtime's thread: the keeper ends at its next await.
                keeper.abort();
            } else {
                let _ = runtime::block(keeper);
            }
        }
        self.ending = Some(Ending::Unloaded);
        Ending::Unloaded
    }
}

impl Drop for SocketVersion {
    fn drop(&mut self) {
        self.unload();
    }
}

impl call::Remote for Shared {
    fn plugin(&self) -> &str {
        &self.plugin
    }

    fn link(&self) -> &arc_swap::ArcSwapOption<crate::remote::link::Link> {
        &self.link
    }

    fn noun(&self) -> &'static str {
        "its socket"
    }

    fn why_down(&self) -> String {
        Shared::why_down(self)
    }

    /// The keeper checks at once, instead of at its next interval.
    fn connect_failed(&self) {
        self.nudge.notify_one();
    }
}

/// Checks a socket manifest without connecting: its address.
pub(crate) fn verify(manifest: &Manifest, dir: &Path) -> Result<String> {
    let settings = Settings::of(manifest, dir).map_err(|reason| Error::Unavailable {
        plugin: manifest.name.clone(),
        reason,
    })?;
    let what = match &settings.address {
        Address::Unix(path, _) => match std::fs::symlink_metadata(path) {
            Ok(meta) if std::os::unix::fs::FileTypeExt::is_socket(&meta.file_type()) => {
                "a Unix socket"
            }
            Ok(_) => "not a socket (yet)",
            Err(_) => "missing (yet)",
        },
        Address::Tcp(_) => "a TCP address",
    };
    Ok(format!(
        "{} ({what}), {}; not connected (reachability is checked at load)",
        settings.address,
        settings.wire.as_str()
    ))
}
