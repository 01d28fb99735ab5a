//! Capabilities and fan-outs: one call sent to every plugin that offers a
//! capability (its manifest's `capabilities`, or those it registered
//! with), in a deterministic order (by name), each with its own deadline.
//!
//! Network Service Mesh's connection plugins are the model: a *chain*
//! (`UpdateConnection`: each plugin's output is the next one's input; the
//! first error stops it) and a *validation* (`ValidateConnection`: every
//! plugin sees the same input; the first that does not succeed stops it).
//! The reference called plugins in a random order with a 100 s deadline.

use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::{Context, PluginManager, Value};

/// What a fan-out did, plugin by plugin.
#[derive(Debug)]
#[non_exhaustive]
pub struct FanOut {
    /// The plugins called, in order, each with how its call ended. Only
    /// the last can be an error: an error stops the fan-out.
    pub calls: Vec<(String, Result<()>)>,
    /// The plugins offering the capability that were not called because
    /// an earlier one stopped the fan-out, in order.
    pub skipped: Vec<String>,
}

impl FanOut {
    /// Whether every plugin was called and succeeded (also true when no
    /// plugin offers the capability).
    pub fn succeeded(&self) -> bool {
        self.calls.iter().all(|(_, result)| result.is_ok())
    }

    /// The plugin that stopped the fan-out, and why.
    pub fn stopped_by(&self) -> Option<(&str, &Error)> {
        self.calls
            .iter()
            .find_map(|(plugin, result)| Some((plugin.as_str(), result.as_ref().err()?)))
    }

    /// The plugins called, in order.
    pub fn called(&self) -> Vec<&str> {
        self.calls
            .iter()
            .map(|(plugin, _)| plugin.as_str())
            .collect()
    }
}

impl PluginManager {
    /// The serving plugins that offer `capability`, sorted by name: the
    /// order every fan-out calls them in.
    pub fn with_capability(&self, capability: &str) -> Vec<String> {
        self.list()
            .into_iter()
            .filter(|info| info.state.in_service() && info.has_capability(capability))
            .map(|info| info.name)
            .collect()
    }

    /// Calls every plugin offering `capability` in turn with `ctx`'s label,
    /// each with the values the previous one left (the first gets `ctx`'s)
    /// and a deadline of `per_plugin` (or `ctx`'s, if sooner). The first
    /// error stops the chain. Afterwards `ctx` holds the values of the last
    /// successful call.
    pub async fn chain(&self, capability: &str, ctx: &mut Context, per_plugin: Duration) -> FanOut {
        let mut fan_out = FanOut {
            calls: Vec::new(),
            skipped: Vec::new(),
        };
        let mut plugins = self.with_capability(capability).into_iter();
        for plugin in plugins.by_ref() {
            let mut call = ctx.clone();
            let result = self.call_one(&plugin, &mut call, per_plugin).await;
            let failed = result.is_err();
            if !failed {
                ctx.values = call.values;
            }
            fan_out.calls.push((plugin, result));
            if failed {
                break;
            }
        }
        fan_out.skipped = plugins.collect();
        fan_out
    }

    /// Calls every plugin offering `capability` in turn with the same input
    /// (`ctx`'s label and values), each with a deadline of `per_plugin` (or
    /// `ctx`'s, if sooner). The first that does not succeed stops the
    /// validation: an error, or a `status` value it sets to anything but
    /// `success` (any case), reported as [`Error::Plugin`] with its
    /// `error_message` (or `message`) value.
    pub async fn validate(&self, capability: &str, ctx: &Context, per_plugin: Duration) -> FanOut {
        let mut fan_out = FanOut {
            calls: Vec::new(),
            skipped: Vec::new(),
        };
        let mut plugins = self.with_capability(capability).into_iter();
        for plugin in plugins.by_ref() {
            let mut call = ctx.clone();
            let result = self
                .call_one(&plugin, &mut call, per_plugin)
                .await
                .and_then(|()| verdict(&plugin, &call));
            let failed = result.is_err();
            fan_out.calls.push((plugin, result));
            if failed {
                break;
            }
        }
        fan_out.skipped = plugins.collect();
        fan_out
    }

    async fn call_one(&self, plugin: &str, ctx: &mut Context, per_plugin: Duration) -> Result<()> {
        if let Some(deadline) = Instant::now().checked_add(per_plugin) {
            ctx.set_deadline(ctx.deadline().map_or(deadline, |d| d.min(deadline)));
        }
        let (_, executor) = self.get_plugin(plugin)?;
        executor.execute_async(ctx).await
    }
}

/// A validation call that returned: success unless it set a `status` other
/// than `success`.
fn verdict(plugin: &str, ctx: &Context) -> Result<()> {
    let status = ctx
        .written()
        .find(|(key, _)| *key == "status")
        .map(|(_, v)| v);
    match status {
        None => Ok(()),
        Some(Value::String(status)) if status.eq_ignore_ascii_case("success") => Ok(()),
        Some(status) => {
            let message = ["error_message", "message"]
                .iter()
                .find_map(|key| ctx.get_str(key))
                .map(str::to_owned)
                .unwrap_or_else(|| {
                    format!(
                        "status {}",
                        serde_json::to_string(status).unwrap_or_default()
                    )
                });
            Err(Error::Plugin {
                plugin: plugin.to_owned(),
                label: ctx.label().to_owned(),
                message,
                code: None,
                data: None,
            })
        }
    }
}
