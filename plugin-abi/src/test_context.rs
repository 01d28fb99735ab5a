//! A context for unit tests of a plugin's `execute`, without a host.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::ffi::{self, FfiContext, TestHost};
use crate::{Context, Value};

/// A [`Context`] backed by a small in-crate host, so that a plugin's
/// `execute` can be unit-tested with `cargo test`, no dynplug host needed.
/// It goes through the same ABI calls as a real host's context.
///
/// ```
/// use plugin_abi::{Context, PluginError, TestContext};
///
/// fn execute(ctx: &mut Context) -> Result<(), PluginError> {
///     let who = ctx.get_str("name").unwrap_or("world");
///     let greeting = format!("hello, {who}");
///     ctx.set("greeting", greeting);
///     Ok(())
/// }
///
/// let mut ctx = TestContext::new("hello.get").with("name", "Ada");
/// execute(&mut ctx).unwrap();
/// assert_eq!(ctx.get_str("greeting"), Some("hello, Ada"));
/// ```
///
/// It dereferences to [`Context`], so `&mut ctx` is what `execute` takes,
/// and every `Context` method reads the values back.
pub struct TestContext {
    // Boxed: `raw` points at it, and the box does not move when the
    // `TestContext` does.
    host: Box<TestHost>,
    raw: FfiContext,
}

impl TestContext {
    /// A call with `label` and no values.
    pub fn new(label: &str) -> TestContext {
        let mut host = Box::new(TestHost {
            label: label.to_owned(),
            ..TestHost::default()
        });
        let raw = ffi::test_ffi_context(&mut host);
        TestContext { host, raw }
    }

    /// With `key` set to `value`.
    #[must_use]
    pub fn with(mut self, key: &str, value: impl Into<Value>) -> TestContext {
        self.host.values.insert(key.to_owned(), value.into());
        self
    }

    /// With a deadline `timeout` from now (`remaining`, `is_cancelled`).
    #[must_use]
    pub fn with_timeout(mut self, timeout: Duration) -> TestContext {
        self.host.deadline = Some(Instant::now() + timeout);
        self
    }

    /// Cancels the call, as a host does when its caller gives up.
    pub fn cancel(&mut self) {
        self.host.cancelled = true;
    }

    /// Every value, as the host holds them after the call.
    pub fn values(&self) -> &BTreeMap<String, Value> {
        &self.host.values
    }

    /// The values, taken.
    pub fn into_values(self) -> BTreeMap<String, Value> {
        self.host.values
    }
}

impl std::ops::Deref for TestContext {
    type Target = Context;

    fn deref(&self) -> &Context {
        ffi::test_context_ref(&self.raw)
    }
}

impl std::ops::DerefMut for TestContext {
    fn deref_mut(&mut self) -> &mut Context {
        ffi::test_context(&mut self.raw)
    }
}

impl std::fmt::Debug for TestContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestContext")
            .field("label", &self.host.label)
            .field("values", &self.host.values)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_writes_removes_and_lists_through_the_abi() {
        let mut ctx = TestContext::new("t.run")
            .with("name", "Ada")
            .with("n", 2)
            .with("m", Value::Map(BTreeMap::from([("k".into(), "v".into())])));
        assert_eq!(ctx.label(), "t.run");
        assert_eq!(ctx.get_str("name"), Some("Ada"));
        assert_eq!(ctx.get_i64("n"), Some(2));
        assert_eq!(ctx.get_str_in("m", "k"), Some("v"));
        ctx.set("out", vec![1u8, 2]);
        assert_eq!(ctx.remove("n"), Some(Value::Int(2)));
        let moved = ctx; // the host is boxed: moving keeps the pointer valid
        let mut keys: Vec<String> = moved.entries().into_iter().map(|(k, _)| k).collect();
        keys.sort();
        assert_eq!(keys, ["m", "name", "out"]);
        assert_eq!(moved.values()["out"], Value::Bytes(vec![1, 2]));
    }

    #[test]
    fn deadlines_and_cancellation() {
        let mut ctx = TestContext::new("t");
        assert_eq!(ctx.remaining(), None);
        assert!(!ctx.is_cancelled());
        ctx.cancel();
        assert!(ctx.is_cancelled());
        let ctx = TestContext::new("t").with_timeout(Duration::ZERO);
        assert!(ctx.is_cancelled());
        assert_eq!(ctx.remaining(), Some(Duration::ZERO));
    }
}
