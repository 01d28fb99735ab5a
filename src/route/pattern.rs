//! Route patterns as the manifest writes them, parsed once and strictly.

use std::fmt;

use crate::text::printable;

/// Longest route pattern accepted, in bytes.
pub const MAX_PATTERN_LEN: usize = 1024;

/// Longest part of a route quoted in an error message, in characters.
const QUOTED: usize = 120;

/// A parsed route pattern: `/` followed by segments separated by `/`.
///
/// A segment is a literal (matched byte for byte against the raw request
/// path), `:name` (one non-empty path segment) or `*name` (the rest of the
/// path, slashes included, at least one character; last segment only).
/// Names are `[A-Za-z_][A-Za-z0-9_]*`, unique within a route. A literal may
/// not contain `{`, `}`, `?`, `#`, whitespace or control characters, nor
/// start with `:` or `*`. Only the last segment may be empty: `/a/` (a
/// trailing slash) is a route of its own, distinct from `/a`; `/` is the
/// root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pattern {
    segments: Box<[Segment]>,
}

/// One segment of a [`Pattern`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    /// Matches exactly this text (possibly empty, as the last segment).
    Literal(Box<str>),
    /// `:name`: any one non-empty segment.
    Param(Box<str>),
    /// `*name`: the non-empty rest of the path.
    CatchAll(Box<str>),
}

/// Why a route pattern was refused; the message says what was expected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum PatternError {
    /// The pattern does not start with `/`.
    #[error("expected a path starting with `/`, found `{found}`")]
    NoLeadingSlash {
        /// The pattern (cut).
        found: String,
    },
    /// The pattern is longer than [`MAX_PATTERN_LEN`].
    #[error("a route may be at most {MAX_PATTERN_LEN} bytes long, found {len}")]
    TooLong {
        /// Its length in bytes.
        len: usize,
    },
    /// `//`: an empty segment before the last one.
    #[error(
        "segment {position} is empty (`//`); only the last segment may be empty (a trailing `/`)"
    )]
    EmptySegment {
        /// The segment's position, from 1.
        position: usize,
    },
    /// `{` or `}`: another router's syntax, which this one would take literally.
    #[error(
        "`{segment}`: `{{` and `}}` are not route syntax; write `:name` for one path segment or `*name` for the rest of the path"
    )]
    Braces {
        /// The segment (cut).
        segment: String,
    },
    /// `:` or `*` without a valid name after it.
    #[error(
        "`{segment}`: expected a parameter name after `{sigil}`, of the form [A-Za-z_][A-Za-z0-9_]*"
    )]
    BadName {
        /// The segment (cut).
        segment: String,
        /// `:` or `*`.
        sigil: char,
    },
    /// `*name` before the last segment.
    #[error(
        "`{segment}`: a `*name` catch-all takes the rest of the path, so it must be the last segment"
    )]
    CatchAllNotLast {
        /// The segment (cut).
        segment: String,
    },
    /// A parameter name used twice.
    #[error("parameter name `{name}` appears twice; names must be unique within a route")]
    DuplicateName {
        /// The name.
        name: String,
    },
    /// A character that never reaches the route table in a request path.
    #[error(
        "`{segment}`: `{found}` cannot appear in a route (no control characters, whitespace, `?` or `#`)"
    )]
    BadCharacter {
        /// The segment (cut, escaped).
        segment: String,
        /// The character, escaped.
        found: String,
    },
}

impl Pattern {
    /// Parses a manifest route pattern.
    ///
    /// # Errors
    /// A [`PatternError`] saying what is wrong and what is expected.
    pub fn parse(text: &str) -> Result<Pattern, PatternError> {
        // First, so that no more work than this is ever spent on a route.
        if text.len() > MAX_PATTERN_LEN {
            return Err(PatternError::TooLong { len: text.len() });
        }
        let Some(rest) = text.strip_prefix('/') else {
            return Err(PatternError::NoLeadingSlash { found: quote(text) });
        };
        let count = rest.split('/').count();
        let mut segments = Vec::with_capacity(count);
        let mut names: Vec<&str> = Vec::new();
        for (i, segment) in rest.split('/').enumerate() {
            let last = i + 1 == count;
            let parsed = match (segment.strip_prefix(':'), segment.strip_prefix('*')) {
                _ if segment.is_empty() && !last => {
                    return Err(PatternError::EmptySegment { position: i + 1 });
                }
                (Some(name), _) => {
                    check_name(segment, name, ':')?;
                    names.push(name);
                    Segment::Param(name.into())
                }
                (_, Some(name)) => {
                    check_name(segment, name, '*')?;
                    if !last {
                        return Err(PatternError::CatchAllNotLast {
                            segment: quote(segment),
                        });
                    }
                    names.push(name);
                    Segment::CatchAll(name.into())
                }
                _ => {
                    check_literal(segment)?;
                    Segment::Literal(segment.into())
                }
            };
            segments.push(parsed);
        }
        // Sorted rather than compared pairwise: a 1 KiB route holds up to ~340 names.
        names.sort_unstable();
        if let Some(pair) = names.windows(2).find(|pair| pair[0] == pair[1]) {
            return Err(PatternError::DuplicateName {
                name: pair[0].to_owned(),
            });
        }
        Ok(Pattern {
            segments: segments.into(),
        })
    }

    /// The segments, in order (at least one).
    pub fn segments(&self) -> &[Segment] {
        &self.segments
    }

    /// The parameter names, in order (the catch-all's last).
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.segments.iter().filter_map(|s| match s {
            Segment::Literal(_) => None,
            Segment::Param(name) | Segment::CatchAll(name) => Some(&**name),
        })
    }
}

impl fmt::Display for Pattern {
    /// The pattern as written in the manifest (parsing is lossless).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for segment in &self.segments {
            match segment {
                Segment::Literal(text) => write!(f, "/{text}")?,
                Segment::Param(name) => write!(f, "/:{name}")?,
                Segment::CatchAll(name) => write!(f, "/*{name}")?,
            }
        }
        Ok(())
    }
}

fn check_name(segment: &str, name: &str, sigil: char) -> Result<(), PatternError> {
    let mut chars = name.chars();
    let valid = matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
    if valid {
        return Ok(());
    }
    if segment.contains(['{', '}']) {
        return Err(PatternError::Braces {
            segment: quote(segment),
        });
    }
    Err(PatternError::BadName {
        segment: quote(segment),
        sigil,
    })
}

fn check_literal(segment: &str) -> Result<(), PatternError> {
    if segment.contains(['{', '}']) {
        return Err(PatternError::Braces {
            segment: quote(segment),
        });
    }
    match segment
        .chars()
        .find(|&c| c.is_control() || c.is_whitespace() || c == '?' || c == '#')
    {
        Some(c) => Err(PatternError::BadCharacter {
            segment: quote(segment),
            found: if c.is_whitespace() || c.is_control() {
                c.escape_unicode().to_string()
            } else {
                c.to_string()
            },
        }),
        None => Ok(()),
    }
}

fn quote(text: &str) -> String {
    printable(text, QUOTED).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_patterns_parse_and_print_back() {
        for text in [
            "/",
            "/api",
            "/api/",
            "/api/hello/:name",
            "/api/hello/:name/",
            "/files/*path",
            "/a/:x/b/:y/*rest",
            "/v1:beta/a*b/caf%C3%A9/é",
            "/_x/:_/:a1",
        ] {
            let pattern = Pattern::parse(text).unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(pattern.to_string(), text);
        }
        let pattern = Pattern::parse("/a/:x/*rest").unwrap();
        assert_eq!(pattern.names().collect::<Vec<_>>(), ["x", "rest"]);
        assert_eq!(
            Pattern::parse("/").unwrap().segments(),
            [Segment::Literal("".into())]
        );
    }

    #[test]
    fn invalid_patterns_say_what_is_wrong() {
        let cases = [
            ("api", "starting with `/`"),
            ("", "starting with `/`"),
            ("/a/{x}", "`{` and `}` are not route syntax"),
            ("/a/{", "`{` and `}` are not route syntax"),
            ("/a/x}", "`{` and `}` are not route syntax"),
            ("/a/:{x}", "`{` and `}` are not route syntax"),
            ("/a/:", "expected a parameter name after `:`"),
            ("/a/*", "expected a parameter name after `*`"),
            ("/a/:1x", "expected a parameter name after `:`"),
            ("/a/:x-y", "expected a parameter name after `:`"),
            ("/a/*rest/b", "must be the last segment"),
            ("/a/*rest/", "must be the last segment"),
            ("/a/:x/:x", "`x` appears twice"),
            ("/:x/*x", "`x` appears twice"),
            ("//a", "segment 1 is empty"),
            ("/a//b", "segment 2 is empty"),
            ("//", "segment 1 is empty"),
            ("/a b", "`\\u{20}` cannot appear"),
            ("/a?b", "`?` cannot appear"),
            ("/a#", "`#` cannot appear"),
            ("/a\u{1b}[2J", "`\\u{1b}` cannot appear"),
        ];
        for (text, want) in cases {
            let error = Pattern::parse(text).expect_err(text).to_string();
            assert!(error.contains(want), "{text:?}: {error}");
            assert!(!error.contains('\u{1b}'), "{error}");
        }
        let long = format!("/{}", "a".repeat(MAX_PATTERN_LEN));
        assert_eq!(
            Pattern::parse(&long),
            Err(PatternError::TooLong {
                len: MAX_PATTERN_LEN + 1
            })
        );
        // The longest accepted route, and a long segment quoted in an error, cut.
        assert!(Pattern::parse(&long[..MAX_PATTERN_LEN]).is_ok());
        let error = Pattern::parse(&format!("/{}{{", "a".repeat(1000)))
            .unwrap_err()
            .to_string();
        assert!(error.len() < 300 && error.contains('…'), "{error}");
    }
}
