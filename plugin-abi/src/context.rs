use std::time::{Duration, Instant};

use crate::Value;
#[cfg(feature = "serde")]
use crate::ValueError;
use crate::ffi::{Borrowed, FfiContext};

/// The context of one call, as a plugin sees it.
///
/// The values live in the host; reads borrow them (no copy for strings and
/// bytes), writes are copied into the host before `set` returns.
#[repr(transparent)]
pub struct Context {
    raw: FfiContext,
}

impl Context {
    pub(crate) fn raw_mut(&mut self) -> &mut FfiContext {
        &mut self.raw
    }

    /// The label the host called with (which operation to run).
    pub fn label(&self) -> &str {
        self.raw.label()
    }

    /// A copy of the value under `key`.
    pub fn get(&self, key: &str) -> Option<Value> {
        self.raw.get(key).to_value()
    }

    /// The string under `key`, borrowed from the host without a copy.
    pub fn get_str(&self, key: &str) -> Option<&str> {
        match self.raw.get(key) {
            Borrowed::Str(s) => Some(s),
            _ => None,
        }
    }

    /// The string under `key` in the map under `map` (e.g. an HTTP route
    /// parameter: `get_str_in("params", "id")`), borrowed without copying the map.
    pub fn get_str_in(&self, map: &str, key: &str) -> Option<&str> {
        match self.raw.get_in(map, key) {
            Borrowed::Str(s) => Some(s),
            _ => None,
        }
    }

    /// A copy of the value under `key` in the map under `map`.
    pub fn get_in(&self, map: &str, key: &str) -> Option<Value> {
        self.raw.get_in(map, key).to_value()
    }

    /// The bytes under `key` (a string's UTF-8 too), borrowed without a copy.
    pub fn get_bytes(&self, key: &str) -> Option<&[u8]> {
        match self.raw.get(key) {
            Borrowed::Bytes(b) => Some(b),
            Borrowed::Str(s) => Some(s.as_bytes()),
            _ => None,
        }
    }

    /// The integer under `key` (see [`Value::as_i64`]).
    pub fn get_i64(&self, key: &str) -> Option<i64> {
        self.get(key)?.as_i64()
    }

    /// The number under `key` as a float (see [`Value::as_f64`]).
    pub fn get_f64(&self, key: &str) -> Option<f64> {
        self.get(key)?.as_f64()
    }

    /// The boolean under `key`.
    pub fn get_bool(&self, key: &str) -> Option<bool> {
        self.get(key)?.as_bool()
    }

    /// Deserializes the value under `key` into `T`.
    ///
    /// # Errors
    /// When `key` is absent or its value does not have the shape `T` expects;
    /// the message names the key.
    #[cfg(feature = "serde")]
    pub fn get_as<T: serde::de::DeserializeOwned>(&self, key: &str) -> Result<T, ValueError> {
        let value = self.get(key).ok_or_else(|| ValueError::missing(key))?;
        value
            .deserialize_into()
            .map_err(|e| ValueError::invalid(key, e))
    }

    /// Stores `value` under `key` (copied into the host).
    pub fn set(&mut self, key: &str, value: impl Into<Value>) {
        match value.into() {
            // Strings are the common case: pass them without building a Value twice.
            Value::String(s) => self.raw.set_str(key, &s),
            other => self.raw.set(key, &other),
        }
    }

    /// Serializes `value` and stores it under `key`.
    ///
    /// # Errors
    /// When `T`'s `Serialize` implementation fails.
    #[cfg(feature = "serde")]
    pub fn set_as<T: serde::Serialize + ?Sized>(
        &mut self,
        key: &str,
        value: &T,
    ) -> Result<(), ValueError> {
        let value = Value::from_serialize(value).map_err(|e| ValueError::invalid(key, e))?;
        self.raw.set(key, &value);
        Ok(())
    }

    /// Removes `key` and returns its value, if it was present.
    pub fn remove(&mut self, key: &str) -> Option<Value> {
        let value = self.get(key)?;
        self.raw.remove(key);
        Some(value)
    }

    /// A copy of every entry, in no particular order.
    pub fn entries(&self) -> Vec<(String, Value)> {
        self.raw.entries()
    }

    /// Whether the host cancelled the call or its deadline has passed.
    /// Long-running plugins should check it and return early.
    pub fn is_cancelled(&self) -> bool {
        self.raw.is_cancelled()
    }

    /// Time left before the deadline (zero once past it), if the call has one.
    pub fn remaining(&self) -> Option<Duration> {
        u64::try_from(self.raw.remaining_nanos())
            .ok()
            .map(Duration::from_nanos)
    }

    /// The call's deadline, if it has one.
    pub fn deadline(&self) -> Option<Instant> {
        self.remaining().map(|left| Instant::now() + left)
    }
}
