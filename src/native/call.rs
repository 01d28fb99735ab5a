//! Where a call runs, and what the caller keeps meanwhile: in place on the
//! caller's thread (`inline`, and `auto` while `placement` allows it), or on
//! the version's workers (`pooled`, and `auto` otherwise), where a caller
//! can stop waiting at its deadline or by dropping the future.

use std::time::Instant;

use super::ffi::Library;
use super::placement::{self, Claim, Placement};
use super::pool::{Pool, Refused, Reply};
use super::{NativeVersion, Runner};
use crate::Context;
use crate::error::{Error, Result};
use crate::version::Outcome;

/// Leave to run one call in place on a runtime worker (from
/// [`NativeVersion::in_place`]).
pub(crate) struct InPlace<'a> {
    /// Counts the worker as in plugin code until the call returns.
    _claim: Claim,
    /// Where to record how long it took (`auto` only).
    placement: Option<&'a Placement>,
}

impl NativeVersion {
    pub(crate) fn execute(&self, ctx: &mut Context) -> Result<Outcome> {
        let library = self.library()?;
        match &self.runner {
            Runner::Inline => Ok(library.execute(ctx)),
            Runner::Pooled(pool) => self.on_pool(pool, ctx),
            Runner::Auto { pool, placement } => {
                if placement.is_slow(ctx.label()) {
                    return self.on_pool(pool, ctx);
                }
                // A blocking caller has no runtime to protect: only a call
                // with a deadline (which the workers could honour) is timed,
                // to learn which labels to send there.
                if ctx.deadline().is_none() {
                    return Ok(library.execute(ctx));
                }
                Ok(timed(library, placement, ctx))
            }
        }
    }

    /// Whether this call may run here, on an async runtime's thread, now:
    /// always for `inline`, never for `pooled`, and for `auto` when its label
    /// has been quick and a runtime worker stays free for other work.
    #[inline]
    pub(crate) fn in_place(&self, ctx: &Context) -> Option<InPlace<'_>> {
        match &self.runner {
            Runner::Inline => Some(InPlace {
                _claim: placement::occupy(),
                placement: None,
            }),
            Runner::Pooled(_) => None,
            Runner::Auto { placement, .. } => {
                if placement.is_slow(ctx.label()) {
                    return None;
                }
                Some(InPlace {
                    _claim: placement::claim(placement::allowed_here())?,
                    placement: Some(placement),
                })
            }
        }
    }

    /// Runs a call `in_place` allowed.
    #[inline]
    pub(crate) fn run_in_place(&self, ctx: &mut Context, leave: InPlace<'_>) -> Result<Outcome> {
        let library = self.library()?;
        let outcome = match leave.placement {
            Some(placement) => timed(library, placement, ctx),
            None => library.execute(ctx),
        };
        Ok(outcome)
    }

    /// Runs a call without blocking the async runtime, once `in_place`
    /// said no: on the version's workers (`inline` calls, which run in place
    /// by definition, run here all the same).
    pub(crate) async fn execute_async(&self, ctx: &mut Context) -> Result<Outcome> {
        let library = self.library()?;
        match &self.runner {
            Runner::Pooled(pool) | Runner::Auto { pool, .. } => self.on_pool_async(pool, ctx).await,
            Runner::Inline => Ok(library.execute(ctx)),
        }
    }

    fn library(&self) -> Result<&Library> {
        self.library.as_deref().ok_or_else(|| self.stopped())
    }

    /// A blocking call on the version's workers.
    fn on_pool(&self, pool: &Pool, ctx: &mut Context) -> Result<Outcome> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        // Only a call that can be abandoned (it has a deadline) pays for
        // keeping what the caller gets back.
        let abandon = ctx
            .deadline()
            .map(|deadline| (deadline, Abandoned::of(ctx)));
        if let Err(refused) = pool.submit(std::mem::take(ctx), Reply::Blocking(tx)) {
            return Err(self.refused(pool, refused, ctx));
        }
        let (done, outcome) = match abandon {
            None => rx.recv().map_err(|_| self.stopped())?,
            Some((deadline, abandoned)) => match rx.recv_deadline(deadline) {
                Ok(reply) => reply,
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                    return Err(abandoned.give_back(ctx, &self.plugin));
                }
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                    return Err(self.stopped());
                }
            },
        };
        *ctx = done;
        Ok(outcome)
    }

    /// An async call on the version's workers.
    async fn on_pool_async(&self, pool: &Pool, ctx: &mut Context) -> Result<Outcome> {
        let (tx, mut rx) = tokio::sync::oneshot::channel();
        let abandoned = Abandoned::of(ctx);
        let deadline = ctx.deadline();
        if let Err(refused) = pool.submit(std::mem::take(ctx), Reply::Async(tx)) {
            // Not queued: the caller gets its context back as it was (it
            // may retry an overloaded plugin with it).
            return Err(self.refused(pool, refused, ctx));
        }
        // From here the values are with the call. If this future is dropped
        // (or the deadline passes), the call is cancelled rather than left
        // running, and the caller's context gets its label, token and
        // deadline back, as from the blocking `execute`.
        let mut pending = Pending {
            ctx,
            abandoned: Some(abandoned),
        };
        match crate::timer::within(deadline, &mut rx).await {
            Some(Ok((done, outcome))) => {
                pending.abandoned = None;
                *pending.ctx = done;
                Ok(outcome)
            }
            Some(Err(_)) => Err(self.stopped()),
            None => {
                let abandoned = pending.abandoned.take().expect("set until the reply");
                Err(abandoned.give_back(pending.ctx, &self.plugin))
            }
        }
    }

    /// Gives the context back to the caller and says why the pool refused it.
    fn refused(&self, pool: &Pool, refused: Refused, ctx: &mut Context) -> Error {
        match refused {
            Refused::Stopped(job) => {
                *ctx = job;
                self.stopped()
            }
            Refused::Full(job) => {
                *ctx = job;
                Error::Overloaded {
                    plugin: self.plugin.clone(),
                    limit: pool.queue_limit().unwrap_or_default(),
                }
            }
        }
    }

    fn stopped(&self) -> Error {
        Error::Unavailable {
            plugin: self.plugin.clone(),
            reason: "this version has been unloaded".into(),
        }
    }
}

/// Runs a call in place and records whether its label was quick.
#[inline]
fn timed(library: &Library, placement: &Placement, ctx: &mut Context) -> Outcome {
    let started = Instant::now();
    let outcome = library.execute(ctx);
    placement.took(ctx.label(), started.elapsed());
    outcome
}

/// What a caller keeps of its context while a pooled call holds the values:
/// what it gets back if it stops waiting (deadline, dropped future).
struct Abandoned {
    label: compact_str::CompactString,
    token: crate::CancelToken,
    deadline: Option<Instant>,
}

impl Abandoned {
    fn of(ctx: &Context) -> Abandoned {
        Abandoned {
            label: ctx.label_compact().clone(),
            token: ctx.cancel_token(),
            deadline: ctx.deadline(),
        }
    }

    /// Cancels the call (the plugin keeps the values until it notices) and
    /// gives the caller its label, token and deadline back.
    fn give_back(self, ctx: &mut Context, plugin: &str) -> Error {
        self.restore(ctx);
        Error::DeadlineExceeded {
            plugin: plugin.to_owned(),
            label: ctx.label().to_owned(),
        }
    }

    fn restore(self, ctx: &mut Context) {
        self.token.cancel();
        let mut back = Context::new(&self.label).with_cancel_token(self.token);
        if let Some(deadline) = self.deadline {
            back = back.with_deadline(deadline);
        }
        *ctx = back;
    }
}

/// An async call in flight: dropped before the reply, it cancels the call
/// and restores the caller's context as `Abandoned` says.
struct Pending<'a> {
    ctx: &'a mut Context,
    abandoned: Option<Abandoned>,
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        if let Some(abandoned) = self.abandoned.take() {
            abandoned.restore(self.ctx);
        }
    }
}
