//! Waiting for a deadline beside a call.
//!
//! [`Executor::execute_async`](crate::Executor::execute_async) must honour
//! its deadline on any runtime, including one without tokio's timers (or
//! not tokio at all), so its timers are `futures-timer`'s, driven by a
//! global thread. That costs two wake-ups of that thread per call (one to
//! insert the timer, one to remove it when the call ends first), each a
//! futex wake and a context switch: measured on the 2-core VM, most of what
//! a `pooled` call through the HTTP façade paid over an in-place one.
//!
//! The façades run on a tokio runtime with timers (they need them for
//! their own timeouts), and say so by running calls inside
//! [`on_runtime_timers`]: there, deadlines are tokio's timers, which the
//! runtime's own threads drive with no extra wake-up.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

#[cfg(feature = "server")]
tokio::task_local! {
    /// Set while a call of a façade runs: its runtime drives tokio's timers.
    static RUNTIME_TIMERS: ();
}

/// Runs `future` with its deadlines on tokio's timers; only for futures
/// polled by a tokio runtime whose timers are enabled.
#[cfg(feature = "server")]
pub(crate) fn on_runtime_timers<F: Future>(future: F) -> impl Future<Output = F::Output> {
    RUNTIME_TIMERS.scope((), future)
}

/// A timer on the runtime's clock when the call runs [`on_runtime_timers`],
/// on `futures-timer`'s thread otherwise.
pub(crate) enum Timer {
    #[cfg(feature = "server")]
    Runtime(Pin<Box<tokio::time::Sleep>>),
    Thread(futures_timer::Delay),
}

impl Timer {
    /// Fires at `deadline`.
    pub(crate) fn at(deadline: Instant) -> Timer {
        #[cfg(feature = "server")]
        if RUNTIME_TIMERS.try_with(|()| ()).is_ok() {
            return Timer::Runtime(Box::pin(tokio::time::sleep_until(deadline.into())));
        }
        Timer::Thread(futures_timer::Delay::new(
            deadline.saturating_duration_since(Instant::now()),
        ))
    }

    /// Fires `after` from now.
    #[cfg_attr(not(feature = "exec"), allow(dead_code))]
    pub(crate) fn after(after: Duration) -> Timer {
        Timer::at(Instant::now() + after)
    }

    /// Fires `after` from now instead.
    #[cfg_attr(not(feature = "exec"), allow(dead_code))]
    pub(crate) fn reset(&mut self, after: Duration) {
        match self {
            #[cfg(feature = "server")]
            Timer::Runtime(sleep) => sleep.as_mut().reset((Instant::now() + after).into()),
            Timer::Thread(delay) => delay.reset(after),
        }
    }
}

impl Future for Timer {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        match self.get_mut() {
            #[cfg(feature = "server")]
            Timer::Runtime(sleep) => sleep.as_mut().poll(cx),
            Timer::Thread(delay) => Pin::new(delay).poll(cx),
        }
    }
}

/// Runs `future` until it ends (`Some` of its output) or `deadline` passes
/// (`None`; the future is dropped).
pub(crate) async fn within<F: Future>(deadline: Option<Instant>, future: F) -> Option<F::Output> {
    let Some(deadline) = deadline else {
        return Some(future.await);
    };
    let mut future = std::pin::pin!(future);
    let mut timer = Timer::at(deadline);
    std::future::poll_fn(|cx| {
        if let Poll::Ready(output) = future.as_mut().poll(cx) {
            return Poll::Ready(Some(output));
        }
        Pin::new(&mut timer).poll(cx).map(|()| None)
    })
    .await
}

#[cfg(all(test, feature = "server"))]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_runtime_clock_is_used_only_where_it_is_declared() {
        let never = std::future::pending::<()>();
        let soon = Instant::now() + Duration::from_millis(20);
        assert!(matches!(Timer::at(soon), Timer::Thread(_)));
        let ran = on_runtime_timers(async {
            assert!(matches!(Timer::at(soon), Timer::Runtime(_)));
            within(Some(soon), never).await
        })
        .await;
        assert_eq!(ran, None);
        assert!(Instant::now() >= soon);
        assert_eq!(within(None, async { 7 }).await, Some(7));
    }
}
