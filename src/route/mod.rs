//! HTTP routes: one set of rules for validating a manifest's routes, for
//! matching requests, and for deciding whether two plugins' routes overlap.
//!
//! Conflicts used to be compared as text while requests were matched by
//! another router with its own syntax and precedence, so a plugin declaring
//! `/api/hello/{name}` or `/api/hello/Ada` silently took requests that
//! `/api/hello/:name` of another plugin served. Here the conflict check walks
//! the very trie that matching walks.
//!
//! Public (hidden) for the fuzz targets and property tests only; not part of
//! the API.
//!
//! ```
//! use dynplug::route::{Method, Pattern, RouteIndex, Router};
//!
//! let mut router = Router::new();
//! router.insert(Method::Get, &Pattern::parse("/api/hello/:name")?, "hello").unwrap();
//! router.insert(Method::Get, &Pattern::parse("/api/hello/Ada")?, "ada").unwrap();
//! let (target, params) = router.lookup(Method::Get, "/api/hello/Bob").unwrap();
//! assert_eq!((*target, params.get("name")), ("hello", Some("Bob")));
//! assert_eq!(*router.lookup(Method::Head, "/api/hello/Ada").unwrap().0, "ada");
//!
//! // Another plugin's `/api/*rest` would take requests `hello` serves.
//! let mut hello = RouteIndex::new();
//! hello.insert(Method::Get, &Pattern::parse("/api/hello/:name")?, "hello");
//! let mut other = RouteIndex::new();
//! other.insert(Method::Head, &Pattern::parse("/api/*rest")?, "other");
//! assert_eq!(other.first_overlap(&hello), Some((&"other", &"hello")));
//! # Ok::<(), dynplug::route::PatternError>(())
//! ```

mod pattern;
mod trie;

pub use pattern::{MAX_PATTERN_LEN, Pattern, PatternError, Segment};

use trie::Node;

/// An HTTP method a route can be declared for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Method {
    /// `GET`
    Get,
    /// `POST`
    Post,
    /// `PUT`
    Put,
    /// `PATCH`
    Patch,
    /// `DELETE`
    Delete,
    /// `HEAD` (falls back to `GET` routes)
    Head,
    /// `OPTIONS`
    Options,
}

impl Method {
    /// Every method, in the order the manifest documentation lists them.
    pub const ALL: [Method; 7] = [
        Method::Get,
        Method::Post,
        Method::Put,
        Method::Patch,
        Method::Delete,
        Method::Head,
        Method::Options,
    ];

    /// The method named exactly `name` (upper case), if routes can use it.
    pub fn parse(name: &str) -> Option<Method> {
        Method::ALL.into_iter().find(|m| m.as_str() == name)
    }

    /// The name, upper case.
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Get => "GET",
            Method::Post => "POST",
            Method::Put => "PUT",
            Method::Patch => "PATCH",
            Method::Delete => "DELETE",
            Method::Head => "HEAD",
            Method::Options => "OPTIONS",
        }
    }

    /// Which request methods this one competes with for a path: `HEAD`
    /// falls back to `GET`, so the two share a class.
    fn class(self) -> usize {
        match self {
            Method::Head => Method::Get as usize,
            other => other as usize,
        }
    }
}

/// Request matching: `(method, pattern) → T`.
///
/// Within one method, a literal segment wins over a parameter, which wins
/// over a catch-all, segment by segment from the left, backtracking when a
/// branch leads nowhere: with `/a/b` and `/a/:x/c`, `/a/b/c` goes to the
/// second. A `HEAD` request with no `HEAD` route goes to the `GET` route.
pub struct Router<T> {
    tries: [Node<T>; Method::ALL.len()],
}

impl<T> Default for Router<T> {
    fn default() -> Self {
        Router {
            tries: Default::default(),
        }
    }
}

impl<T> std::fmt::Debug for Router<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Router").finish_non_exhaustive()
    }
}

impl<T> Router<T> {
    /// An empty router.
    pub fn new() -> Router<T> {
        Router::default()
    }

    /// Routes `method pattern` to `value`.
    ///
    /// # Errors
    /// The value already routed for the same method and the same pattern up
    /// to parameter names (`/a/:x` and `/a/:y` are one route); it stays.
    pub fn insert(&mut self, method: Method, pattern: &Pattern, value: T) -> Result<(), &T> {
        self.tries[method as usize].insert(pattern, value)
    }

    /// The value routed for `method path` and the path parameters, raw (not
    /// percent-decoded). `path` is the request's path, starting with `/`,
    /// without the query.
    pub fn lookup<'r, 'p>(
        &'r self,
        method: Method,
        path: &'p str,
    ) -> Option<(&'r T, Params<'r, 'p>)> {
        let rest = path.strip_prefix('/')?;
        let find = |method: Method| {
            let mut values = Vec::new();
            let leaf = self.tries[method as usize].find(Some(rest), &mut values)?;
            let params = Params {
                names: &leaf.names,
                values,
            };
            Some((&leaf.value, params))
        };
        match method {
            Method::Head => find(Method::Head).or_else(|| find(Method::Get)),
            method => find(method),
        }
    }

    /// Whether no route was inserted.
    pub fn is_empty(&self) -> bool {
        self.tries.iter().all(Node::is_empty)
    }
}

/// The parameters of a matched route: names (from the route) and raw values
/// (from the path), in path order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Params<'r, 'p> {
    names: &'r [Box<str>],
    values: Vec<&'p str>,
}

impl<'r, 'p> Params<'r, 'p> {
    /// `(name, raw value)` pairs, in path order.
    pub fn iter(&self) -> impl Iterator<Item = (&'r str, &'p str)> + '_ {
        self.names
            .iter()
            .map(|n| &**n)
            .zip(self.values.iter().copied())
    }

    /// The raw value of parameter `name`.
    pub fn get(&self, name: &str) -> Option<&'p str> {
        self.iter().find(|(n, _)| *n == name).map(|(_, v)| v)
    }

    /// How many parameters.
    pub fn len(&self) -> usize {
        self.values.len()
    }

    /// Whether the route has no parameters.
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }
}

/// Routes indexed for overlap detection: two routes overlap when at least
/// one request path matches both and their methods compete for it (the same
/// method, or `GET` and `HEAD`, since `HEAD` falls back to `GET`).
///
/// Checking one index against another walks both tries together (see
/// [`first_overlap`](Self::first_overlap)), so a manifest of M routes is
/// checked against N served ones in about M + N steps for real route sets,
/// not M × N.
pub struct RouteIndex<T> {
    tries: [Node<T>; Method::ALL.len()],
}

impl<T> Default for RouteIndex<T> {
    fn default() -> Self {
        RouteIndex {
            tries: Default::default(),
        }
    }
}

impl<T> std::fmt::Debug for RouteIndex<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouteIndex").finish_non_exhaustive()
    }
}

impl<T> RouteIndex<T> {
    /// An empty index.
    pub fn new() -> RouteIndex<T> {
        RouteIndex::default()
    }

    /// Adds a route. A route of the same method class and shape is already
    /// a witness for every overlap this one could have, so it is kept and
    /// `value` dropped.
    pub fn insert(&mut self, method: Method, pattern: &Pattern, value: T) {
        let _ = self.tries[method.class()].insert(pattern, value);
    }

    /// Whether no route was inserted.
    pub fn is_empty(&self) -> bool {
        self.tries.iter().all(Node::is_empty)
    }

    /// A route of `self` and a route of `other` that overlap, if any.
    pub fn first_overlap<'a, U>(&'a self, other: &'a RouteIndex<U>) -> Option<(&'a T, &'a U)> {
        self.overlap_counted(other, &mut 0)
    }

    /// [`first_overlap`](Self::first_overlap), counting the node pairs visited.
    fn overlap_counted<'a, U>(
        &'a self,
        other: &'a RouteIndex<U>,
        work: &mut usize,
    ) -> Option<(&'a T, &'a U)> {
        self.tries
            .iter()
            .zip(&other.tries)
            .find_map(|(a, b)| trie::overlap(a, b, work))
            .map(|(x, y)| (&x.value, &y.value))
    }
}

impl Pattern {
    /// Whether some request path matches both patterns (for the same method).
    pub fn overlaps(&self, other: &Pattern) -> bool {
        let (mut a, mut b) = (RouteIndex::new(), RouteIndex::new());
        a.insert(Method::Get, self, ());
        b.insert(Method::Get, other, ());
        a.first_overlap(&b).is_some()
    }
}

#[cfg(test)]
mod tests;
