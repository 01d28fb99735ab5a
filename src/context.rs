//! The host's side of a call: label, values, cancellation, deadline.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use compact_str::CompactString;

use crate::{Value, ValueError};

/// Cancels the calls of every [`Context`] it was taken from; cheap to clone,
/// usable from any thread.
#[derive(Debug, Clone, Default)]
pub struct CancelToken(Arc<AtomicBool>);

impl CancelToken {
    /// A token that is not cancelled.
    pub fn new() -> Self {
        Self::default()
    }

    /// Cancels: the plugin sees `is_cancelled() == true` from now on.
    pub fn cancel(&self) {
        self.0.store(true, Ordering::Release);
    }

    fn into_lock(self) -> std::sync::OnceLock<CancelToken> {
        let lock = std::sync::OnceLock::new();
        let _ = lock.set(self);
        lock
    }

    /// Whether [`cancel`](Self::cancel) was called.
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// The input and output of one call: a label, values, a cancellation token
/// and an optional deadline.
///
/// ```
/// let mut ctx = dynplug::Context::new("hello.get").with("name", "Ada");
/// ctx.set("lang", "en");
/// assert_eq!(ctx.get_str("name"), Some("Ada"));
/// ```
#[derive(Debug, Clone, Default)]
pub struct Context {
    // Inline up to 24 bytes: labels are short, and a façade call copies its label.
    label: CompactString,
    // foldhash: a context is a handful of short keys read a few times per
    // call, where SipHash costs more than the lookup itself (see benches/call.rs).
    // Keys are short: CompactString keeps up to 24 bytes inline, which saves
    // an allocation per value (a façade request sets eight).
    pub(crate) values: HashMap<CompactString, Value, foldhash::fast::RandomState>,
    // Created on first use: most calls are never cancelled from outside, and
    // an allocation per call shows in the façade's profile.
    cancel: std::sync::OnceLock<CancelToken>,
    deadline: Option<Instant>,
    // The keys the plugin set during the last call, in order: what a façade
    // replies with when the plugin shaped no response itself.
    written: Vec<CompactString>,
}

impl Context {
    /// A context for a call with `label`, without values or deadline.
    pub fn new(label: impl AsRef<str>) -> Self {
        Self {
            label: CompactString::new(label.as_ref()),
            ..Self::default()
        }
    }

    /// A context for `label` with room for `values` values without rehashing.
    pub fn with_capacity(label: impl AsRef<str>, values: usize) -> Self {
        let mut ctx = Self::new(label);
        ctx.values.reserve(values);
        ctx
    }

    /// Adds a value (builder style).
    #[must_use]
    pub fn with(mut self, key: impl AsRef<str>, value: impl Into<Value>) -> Self {
        self.set(key, value);
        self
    }

    /// Sets the deadline to `timeout` from now (builder style).
    #[must_use]
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        // A timeout too large for the clock means no deadline, not a panic.
        self.deadline = Instant::now().checked_add(timeout);
        self
    }

    /// Sets the deadline (builder style).
    #[must_use]
    pub fn with_deadline(mut self, deadline: Instant) -> Self {
        self.deadline = Some(deadline);
        self
    }

    /// Shares `token`, so cancelling it cancels this call (builder style).
    #[must_use]
    pub fn with_cancel_token(mut self, token: CancelToken) -> Self {
        self.cancel = token.into_lock();
        self
    }

    /// The label.
    pub fn label(&self) -> &str {
        &self.label
    }

    /// The label as stored (copied without allocating when short).
    pub(crate) fn label_compact(&self) -> &CompactString {
        &self.label
    }

    /// Replaces the label.
    pub fn set_label(&mut self, label: impl AsRef<str>) {
        self.label = CompactString::new(label.as_ref());
    }

    /// The value under `key`.
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.values.get(key)
    }

    /// The string under `key`.
    pub fn get_str(&self, key: &str) -> Option<&str> {
        self.get(key)?.as_str()
    }

    /// The integer under `key` (see [`Value::as_i64`]).
    pub fn get_i64(&self, key: &str) -> Option<i64> {
        self.get(key)?.as_i64()
    }

    /// The number under `key` as a float.
    pub fn get_f64(&self, key: &str) -> Option<f64> {
        self.get(key)?.as_f64()
    }

    /// The boolean under `key`.
    pub fn get_bool(&self, key: &str) -> Option<bool> {
        self.get(key)?.as_bool()
    }

    /// The bytes under `key` (a string's UTF-8 too).
    pub fn get_bytes(&self, key: &str) -> Option<&[u8]> {
        self.get(key)?.as_bytes()
    }

    /// Deserializes the value under `key` into `T` (the same as a plugin's
    /// `Context::get_as`).
    ///
    /// # Errors
    /// When `key` is absent ([`ValueError::is_missing`]) or its value does
    /// not have the shape `T` expects; the message names the key.
    pub fn get_as<T: serde::de::DeserializeOwned>(&self, key: &str) -> Result<T, ValueError> {
        let value = self.get(key).ok_or_else(|| ValueError::missing(key))?;
        value
            .deserialize_into()
            .map_err(|e| ValueError::invalid(key, e))
    }

    /// Stores `value` under `key`.
    pub fn set(&mut self, key: impl AsRef<str>, value: impl Into<Value>) {
        self.values.insert(CompactString::new(key), value.into());
    }

    /// Serializes `value` and stores it under `key`.
    ///
    /// # Errors
    /// When `T`'s `Serialize` implementation fails.
    pub fn set_as<T: serde::Serialize + ?Sized>(
        &mut self,
        key: impl AsRef<str>,
        value: &T,
    ) -> Result<(), ValueError> {
        let key = key.as_ref();
        let value = Value::from_serialize(value).map_err(|e| ValueError::invalid(key, e))?;
        self.values.insert(CompactString::new(key), value);
        Ok(())
    }

    /// Removes and returns the value under `key`.
    pub fn remove(&mut self, key: &str) -> Option<Value> {
        self.values.remove(key)
    }

    /// The values the plugin set during the last call (each key once, in
    /// the order first set); inputs it left alone are not among them. What
    /// the HTTP and gRPC façades reply with when a plugin sets no
    /// `response.*` value.
    pub fn written(&self) -> impl Iterator<Item = (&str, &Value)> {
        self.written
            .iter()
            .filter_map(|k| Some((k.as_str(), self.values.get(k)?)))
    }

    /// Stores a string the plugin sets: an existing string value keeps its
    /// buffer (a context reused across calls copies into it, with no
    /// allocation).
    pub(crate) fn set_str_from_plugin(&mut self, key: &str, text: &str) {
        match self.values.get_mut(key) {
            Some(Value::String(old)) => {
                old.clear();
                old.push_str(text);
            }
            Some(slot) => *slot = Value::String(text.to_owned()),
            None => {
                self.values
                    .insert(CompactString::new(key), Value::String(text.to_owned()));
            }
        }
        if !self.written.iter().any(|k| k == key) {
            self.written.push(CompactString::new(key));
        }
    }

    /// Takes out the values the last call set (see [`written`](Self::written)).
    #[cfg(feature = "server")]
    pub(crate) fn into_written(mut self) -> impl Iterator<Item = (CompactString, Value)> {
        let written = std::mem::take(&mut self.written);
        written
            .into_iter()
            .filter_map(move |k| self.values.remove_entry(&k))
    }

    /// Stores a value the plugin sets (through the ABI, or decoded from a
    /// subprocess's reply), remembering that the plugin set it.
    pub(crate) fn set_from_plugin(&mut self, key: &str, value: Value) {
        match self.values.get_mut(key) {
            Some(slot) => *slot = value,
            None => {
                self.values.insert(CompactString::new(key), value);
            }
        }
        if !self.written.iter().any(|k| k == key) {
            self.written.push(CompactString::new(key));
        }
    }

    /// Forgets which values the previous call set (a new call begins).
    pub(crate) fn begin_call(&mut self) {
        self.written.clear();
    }

    /// All values, in no particular order.
    pub fn values(&self) -> impl ExactSizeIterator<Item = (&str, &Value)> {
        self.values.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// Takes all values out.
    pub fn into_values(self) -> HashMap<String, Value> {
        self.values
            .into_iter()
            .map(|(k, v)| (k.into_string(), v))
            .collect()
    }

    /// A token that cancels this call from another thread.
    pub fn cancel_token(&self) -> CancelToken {
        self.cancel.get_or_init(CancelToken::new).clone()
    }

    /// The token, if one was ever taken or given (no allocation otherwise).
    pub(crate) fn existing_cancel_token(&self) -> Option<&CancelToken> {
        self.cancel.get()
    }

    /// Cancels this call.
    pub fn cancel(&self) {
        self.cancel.get_or_init(CancelToken::new).cancel();
    }

    /// The deadline, if any.
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// Sets the deadline.
    pub fn set_deadline(&mut self, deadline: Instant) {
        self.deadline = Some(deadline);
    }

    /// Whether the deadline has passed.
    pub fn is_expired(&self) -> bool {
        self.deadline.is_some_and(|d| Instant::now() >= d)
    }

    /// Whether the call was cancelled or its deadline has passed (what the plugin sees).
    pub fn is_cancelled(&self) -> bool {
        self.cancel.get().is_some_and(CancelToken::is_cancelled) || self.is_expired()
    }

    /// Time left before the deadline (zero once past it).
    pub fn remaining(&self) -> Option<Duration> {
        self.deadline
            .map(|d| d.saturating_duration_since(Instant::now()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cancel_token_is_shared_between_clones() {
        let ctx = Context::new("x");
        let token = ctx.cancel_token();
        assert!(!ctx.is_cancelled());
        std::thread::spawn(move || token.cancel()).join().unwrap();
        assert!(ctx.is_cancelled());
    }

    #[test]
    fn expired_deadline_reads_as_cancelled() {
        let ctx = Context::new("x").with_timeout(Duration::ZERO);
        assert!(ctx.is_expired() && ctx.is_cancelled());
        assert_eq!(ctx.remaining(), Some(Duration::ZERO));
    }

    #[test]
    fn typed_helpers_round_trip() {
        let mut ctx = Context::new("x").with("n", 5).with("s", "t");
        ctx.set_as("list", &vec![1, 2]).unwrap();
        assert_eq!(ctx.get_i64("n"), Some(5));
        assert_eq!(ctx.get_str("s"), Some("t"));
        let list: Vec<i32> = ctx.get_as("list").unwrap();
        assert_eq!(list, [1, 2]);
    }
}
