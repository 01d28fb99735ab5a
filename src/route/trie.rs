//! The segment trie behind both the [`Router`](super::Router) and the
//! [`RouteIndex`](super::RouteIndex): matching a request and deciding
//! whether two route sets overlap walk the same structure by the same rules.

use std::collections::HashMap;

use foldhash::fast::RandomState;

use super::pattern::{Pattern, Segment};

/// One position in the trie: the routes whose first segments led here.
///
/// Every node lies on the way to at least one leaf (nodes are only created
/// by a complete insert), which keeps [`Node::any_leaf`] a plain descent.
pub(super) struct Node<T> {
    literals: HashMap<Box<str>, Node<T>, RandomState>,
    param: Option<Box<Node<T>>>,
    /// The route whose `*name` is the next segment.
    catch_all: Option<Leaf<T>>,
    /// The route that ends here.
    end: Option<Leaf<T>>,
}

/// A route's end: its parameter names (in path order) and its value.
pub(super) struct Leaf<T> {
    pub(super) names: Box<[Box<str>]>,
    pub(super) value: T,
}

impl<T> Default for Node<T> {
    fn default() -> Self {
        Node {
            literals: HashMap::default(),
            param: None,
            catch_all: None,
            end: None,
        }
    }
}

impl<T> Node<T> {
    pub(super) fn is_empty(&self) -> bool {
        self.literals.is_empty()
            && self.param.is_none()
            && self.catch_all.is_none()
            && self.end.is_none()
    }

    /// Adds `pattern`; a route of the same shape (the same pattern up to
    /// parameter names) keeps its place and its value is returned instead.
    pub(super) fn insert(&mut self, pattern: &Pattern, value: T) -> Result<(), &T> {
        let mut node = self;
        let mut catch_all = false;
        for segment in pattern.segments() {
            node = match segment {
                Segment::Literal(text) => node.literals.entry(text.clone()).or_default(),
                Segment::Param(_) => node.param.get_or_insert_with(Default::default),
                Segment::CatchAll(_) => {
                    catch_all = true;
                    break;
                }
            };
        }
        let slot = if catch_all {
            &mut node.catch_all
        } else {
            &mut node.end
        };
        match slot {
            Some(existing) => Err(&existing.value),
            None => {
                let names = pattern.names().map(Box::from).collect();
                *slot = Some(Leaf { names, value });
                Ok(())
            }
        }
    }

    /// The route matching `rest` (the path after this node's segments,
    /// without its leading `/`; `None` once every segment is consumed), by
    /// precedence: a literal segment first, then a parameter, then a
    /// catch-all, backtracking when a branch leads nowhere. Pushes the raw
    /// parameter values, in path order, onto `values`.
    ///
    /// Each node is visited at most once, so a lookup costs at most the
    /// trie's size, and usually its depth.
    pub(super) fn find<'r, 'p>(
        &'r self,
        rest: Option<&'p str>,
        values: &mut Vec<&'p str>,
    ) -> Option<&'r Leaf<T>> {
        let Some(rest) = rest else {
            return self.end.as_ref();
        };
        let (segment, next) = match rest.split_once('/') {
            Some((segment, next)) => (segment, Some(next)),
            None => (rest, None),
        };
        if let Some(leaf) = self
            .literals
            .get(segment)
            .and_then(|child| child.find(next, values))
        {
            return Some(leaf);
        }
        if let Some(child) = self.param.as_deref().filter(|_| !segment.is_empty()) {
            values.push(segment);
            if let Some(leaf) = child.find(next, values) {
                return Some(leaf);
            }
            values.pop();
        }
        let leaf = self.catch_all.as_ref().filter(|_| !rest.is_empty())?;
        values.push(rest);
        Some(leaf)
    }

    /// Some leaf below this node.
    fn any_leaf(&self) -> Option<&Leaf<T>> {
        self.end
            .as_ref()
            .or(self.catch_all.as_ref())
            .or_else(|| self.param.as_deref()?.any_leaf())
            .or_else(|| self.literals.values().next()?.any_leaf())
    }

    /// Some leaf below this node whose route goes on for a non-empty rest of
    /// path: what a catch-all at this node's depth can meet. Everything but
    /// the route that ends here and the empty last segment (a trailing `/`).
    fn leaf_beyond(&self) -> Option<&Leaf<T>> {
        self.catch_all
            .as_ref()
            .or_else(|| self.param.as_deref()?.any_leaf())
            .or_else(|| {
                self.literals
                    .iter()
                    .find(|(text, _)| !text.is_empty())?
                    .1
                    .any_leaf()
            })
    }
}

/// A pair of routes, one from `a` and one from `b` (tries of the same
/// method), that some request path matches both of, if there is one.
///
/// Walks both tries together: a literal meets the equal literal or a
/// parameter, a parameter meets a parameter or any non-empty literal, a
/// catch-all meets anything that goes on past its position. Each pair of
/// nodes is visited at most once, and literal maps are intersected by
/// looking the smaller one up in the larger, so route sets that share
/// prefixes cost about their sizes. (An adversarial pair of sets, with
/// parameters in one where the other branches on literals, level after
/// level, can approach the product of the two sizes: deciding overlap
/// between sets of wildcard patterns is that hard in general.) `work`
/// counts the node pairs visited.
pub(super) fn overlap<'a, A, B>(
    a: &'a Node<A>,
    b: &'a Node<B>,
    work: &mut usize,
) -> Option<(&'a Leaf<A>, &'a Leaf<B>)> {
    *work += 1;
    if let (Some(x), Some(y)) = (&a.end, &b.end) {
        return Some((x, y));
    }
    if let Some(x) = &a.catch_all
        && let Some(y) = b.leaf_beyond()
    {
        return Some((x, y));
    }
    if let Some(y) = &b.catch_all
        && let Some(x) = a.leaf_beyond()
    {
        return Some((x, y));
    }
    if a.literals.len() <= b.literals.len() {
        for (text, x) in &a.literals {
            if let Some(y) = b.literals.get(text)
                && let Some(pair) = overlap(x, y, work)
            {
                return Some(pair);
            }
        }
    } else {
        for (text, y) in &b.literals {
            if let Some(x) = a.literals.get(text)
                && let Some(pair) = overlap(x, y, work)
            {
                return Some(pair);
            }
        }
    }
    // A parameter takes any non-empty segment; the empty literal is only
    // ever a trailing `/`, which no parameter matches.
    if let Some(y) = b.param.as_deref() {
        for (_, x) in a.literals.iter().filter(|(text, _)| !text.is_empty()) {
            if let Some(pair) = overlap(x, y, work) {
                return Some(pair);
            }
        }
    }
    if let Some(x) = a.param.as_deref() {
        for (_, y) in b.literals.iter().filter(|(text, _)| !text.is_empty()) {
            if let Some(pair) = overlap(x, y, work) {
                return Some(pair);
            }
        }
        if let Some(y) = b.param.as_deref() {
            return overlap(x, y, work);
        }
    }
    None
}
