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

/// A value asked for by key that is missing or does not have the expected
/// shape: what `Context::get_as` and `set_as` return, on both sides of the
/// ABI. Converts into [`PluginError`], so `?` works in `execute`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValueError {
    key: String,
    /// `None`: the key is absent.
    problem: Option<String>,
}

impl ValueError {
    /// `key` is absent.
    pub fn missing(key: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            problem: None,
        }
    }

    /// The value under `key` is not what was expected.
    pub fn invalid(key: impl Into<String>, problem: impl fmt::Display) -> Self {
        Self {
            key: key.into(),
            problem: Some(problem.to_string()),
        }
    }

    /// The key.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Whether the key was absent (rather than holding a value of another shape).
    pub fn is_missing(&self) -> bool {
        self.problem.is_none()
    }
}

impl fmt::Display for ValueError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.problem {
            None => write!(f, "missing value `{}`", self.key),
            Some(problem) => write!(f, "value `{}`: {problem}", self.key),
        }
    }
}

impl std::error::Error for ValueError {}

impl From<ValueError> for PluginError {
    fn from(err: ValueError) -> Self {
        Self::new(err.to_string())
    }
}
