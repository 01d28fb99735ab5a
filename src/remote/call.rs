//! One call over a plugin's current link, bounded by the context's deadline
//! and cancel token: the same for every kind whose plugin runs in another
//! process (exec, socket).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;

use super::link::{CallError, Link};
use crate::error::{Error, Result};
use crate::timer::Timer;
use crate::version::Outcome;
use crate::{CancelToken, Context};

/// How often a call with a cancel token looks at it: the token is a flag,
/// with nothing to wake a waiting call.
const CANCEL_POLL: Duration = Duration::from_millis(5);

/// A plugin served over a link (exec, socket): what a call needs to know
/// about it.
pub(crate) trait Remote: Send + Sync + 'static {
    fn plugin(&self) -> &str;
    /// The way to the plugin now; `None` while it is down.
    fn link(&self) -> &ArcSwapOption<Link>;
    /// How errors name the other end: "its process", "its socket".
    fn noun(&self) -> &'static str;
    /// Why calls fail now, when there is no link.
    fn why_down(&self) -> String;
    /// Told when a connection could not be made (the plugin may be gone).
    fn connect_failed(&self) {}
}

/// A blocking call, from any thread: the remote runtime carries it.
pub(crate) fn execute<R: Remote>(remote: &Arc<R>, ctx: &mut Context) -> Result<Outcome> {
    let remote = Arc::clone(remote);
    let mut owned = std::mem::take(ctx);
    let (result, back) = super::runtime::block(async move {
        let result = call(&*remote, &mut owned).await;
        (result, owned)
    });
    *ctx = back;
    result
}

/// An async call: driven here on a tokio runtime (its connections are this
/// runtime's, no thread hop); on another executor the remote runtime
/// carries it.
pub(crate) async fn execute_async<R: Remote>(
    remote: &Arc<R>,
    ctx: &mut Context,
) -> Result<Outcome> {
    if tokio::runtime::Handle::try_current().is_ok() {
        return call(&**remote, ctx).await;
    }
    let carried = Arc::clone(remote);
    on_runtime(ctx, remote.plugin(), |mut owned| async move {
        let result = call(&*carried, &mut owned).await;
        (result, owned)
    })
    .await
}

/// One call over the target's current link. Only a failure to connect,
/// when nothing was sent, is tried again, and only once, on a link that
/// replaced the one that failed.
async fn call(target: &impl Remote, ctx: &mut Context) -> Result<Outcome> {
    let deadline = ctx.deadline();
    let token = ctx.existing_cancel_token().cloned();
    let command = ctx.label_compact().clone();
    let plugin = target.plugin();
    let names = || (plugin.to_owned(), command.to_string());
    let unavailable = |reason: String| Error::Unavailable {
        plugin: plugin.to_owned(),
        reason,
    };
    let mut retried = false;
    let reply = loop {
        let Some(link) = target.link().load_full() else {
            return Err(unavailable(target.why_down()));
        };
        let payload = link.encode(ctx);
        let timeout = deadline.map(|d| d.saturating_duration_since(Instant::now()));
        let exec = link.exec(&command, &payload, timeout);
        match bounded(exec, deadline, token.as_ref()).await {
            Err(Stop::Deadline) => {
                let (plugin, label) = names();
                return Err(Error::DeadlineExceeded { plugin, label });
            }
            Err(Stop::Cancelled) => {
                let (plugin, label) = names();
                return Err(Error::Cancelled { plugin, label });
            }
            Ok(Err(CallError::Connect(why))) => {
                target.connect_failed();
                // Nothing was sent. If another link serves by now, it gets
                // the call; otherwise fail fast.
                let replaced = target
                    .link()
                    .load()
                    .as_ref()
                    .is_some_and(|now| !Arc::ptr_eq(now, &link));
                if replaced && !retried {
                    retried = true;
                    continue;
                }
                return Err(unavailable(format!(
                    "cannot connect to {}: {why}",
                    target.noun()
                )));
            }
            Ok(reply) => break reply,
        }
    };
    match reply {
        Ok(reply) => {
            reply.apply(ctx);
            Ok(Outcome::Ok)
        }
        Err(CallError::Plugin(message)) => Ok(Outcome::Error(message)),
        // As `Version::settle` reports a plugin's error, with the code and
        // data the protocol carries.
        Err(CallError::Fault { .. }) if ctx.is_expired() => {
            let (plugin, label) = names();
            Err(Error::DeadlineExceeded { plugin, label })
        }
        Err(CallError::Fault { .. }) if token.as_ref().is_some_and(|t| t.is_cancelled()) => {
            let (plugin, label) = names();
            Err(Error::Cancelled { plugin, label })
        }
        Err(CallError::Fault {
            code,
            message,
            data,
        }) => {
            let (plugin, label) = names();
            Err(Error::Plugin {
                plugin,
                label,
                message,
                code: Some(code),
                data: data.map(crate::Value::from),
            })
        }
        Err(CallError::Lost(why)) => Err(unavailable(format!(
            "{} went away during the call (the call may have run): {why}",
            target.noun()
        ))),
        Err(CallError::Unavailable(why)) => Err(unavailable(why)),
        // A server that gives up at the deadline it was sent may say
        // "cancelled" (tonic does) a moment before our own timer fires.
        Err(CallError::Deadline) | Err(CallError::Cancelled) if ctx.is_expired() => {
            let (plugin, label) = names();
            Err(Error::DeadlineExceeded { plugin, label })
        }
        Err(CallError::Deadline) => {
            let (plugin, label) = names();
            Err(Error::DeadlineExceeded { plugin, label })
        }
        Err(CallError::Cancelled) => {
            let (plugin, label) = names();
            Err(Error::Cancelled { plugin, label })
        }
        Err(CallError::BadReply(message) | CallError::Connect(message)) => {
            let (plugin, label) = names();
            Err(Error::BadReply {
                plugin,
                label,
                message,
            })
        }
    }
}

enum Stop {
    Deadline,
    Cancelled,
}

/// Runs `future` until it ends, the deadline passes or the token is
/// cancelled; the latter two drop it, which aborts the request on the wire
/// (a reset HTTP/2 stream, a closed HTTP/1.1 connection). The timers are
/// not the runtime's, so any runtime (or none) will do.
async fn bounded<F: Future>(
    future: F,
    deadline: Option<Instant>,
    token: Option<&CancelToken>,
) -> std::result::Result<F::Output, Stop> {
    let mut future = std::pin::pin!(future);
    let mut timer = deadline.map(Timer::at);
    let mut poll = token.map(|_| Timer::after(CANCEL_POLL));
    std::future::poll_fn(|cx| {
        if let Poll::Ready(output) = future.as_mut().poll(cx) {
            return Poll::Ready(Ok(output));
        }
        if let Some(timer) = timer.as_mut()
            && Pin::new(timer).poll(cx).is_ready()
        {
            return Poll::Ready(Err(Stop::Deadline));
        }
        if let (Some(token), Some(delay)) = (token, poll.as_mut()) {
            if token.is_cancelled() {
                return Poll::Ready(Err(Stop::Cancelled));
            }
            while Pin::new(&mut *delay).poll(cx).is_ready() {
                if token.is_cancelled() {
                    return Poll::Ready(Err(Stop::Cancelled));
                }
                delay.reset(CANCEL_POLL);
            }
        }
        Poll::Pending
    })
    .await
}

/// Runs a call on `runtime` when the caller is under another executor
/// (or none), putting the context back afterwards; dropping the returned
/// future aborts the call. Inside a tokio runtime, call [`call`] directly:
/// the connections of that runtime are then driven there, with no hop.
async fn on_runtime<F>(
    ctx: &mut Context,
    plugin: &str,
    run: impl FnOnce(Context) -> F,
) -> Result<Outcome>
where
    F: Future<Output = (Result<Outcome>, Context)> + Send + 'static,
{
    let saved = (
        ctx.label_compact().clone(),
        ctx.cancel_token(),
        ctx.deadline(),
    );
    let owned = std::mem::take(ctx);
    let task = super::runtime::handle().spawn(run(owned));
    let abort = AbortOnDrop(task.abort_handle());
    let joined = task.await;
    std::mem::forget(abort);
    match joined {
        Ok((result, back)) => {
            *ctx = back;
            result
        }
        Err(_) => {
            let (label, token, deadline) = saved;
            let mut back = Context::new(&label).with_cancel_token(token);
            if let Some(deadline) = deadline {
                back = back.with_deadline(deadline);
            }
            *ctx = back;
            Err(Error::Unavailable {
                plugin: plugin.to_owned(),
                reason: "the call's task ended".into(),
            })
        }
    }
}

struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
