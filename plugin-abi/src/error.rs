use std::fmt;

/// The error a plugin returns from `execute` or `init`.
///
/// Only its message crosses the ABI: the host copies it into its own memory
/// before the call returns, so a plugin error never outlives the plugin.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginError {
    message: String,
}

impl PluginError {
    /// An error with this message.
    pub fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
        }
    }

    /// The message, as the host will report it.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl fmt::Display for PluginError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for PluginError {}

impl From<String> for PluginError {
    fn from(message: String) -> Self {
        Self { message }
    }
}

impl From<&str> for PluginError {
    fn from(message: &str) -> Self {
        Self::new(message)
    }
}

#[cfg(feature = "serde")]
impl From<serde_json::Error> for PluginError {
    fn from(err: serde_json::Error) -> Self {
        Self::new(err.to_string())
    }
}
