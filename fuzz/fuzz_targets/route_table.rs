//! Arbitrary route sets and request paths through the route module. Run
//! with `cargo +nightly fuzz run route_table -- -dict=route_table.dict`.
//!
//! The input is lines: `M<m><pattern>` is a route of the new plugin, `T<m><pattern>`
//! one of the plugins serving, `P<path>` a request path (`<m>` is one byte
//! choosing the method). Checked: parsing never panics and prints back
//! losslessly; a matched route really matches and yields one value per
//! name; when a path is matched in both route sets for competing methods,
//! the overlap check must have said so; an overlap reported is one between
//! the two patterns it names.
#![no_main]

use dynplug::route::{Method, Pattern, RouteIndex, Router};
use libfuzzer_sys::fuzz_target;

/// One plugin's routes, as the route table and the conflict check hold them.
#[derive(Default)]
struct Side {
    routes: Vec<(Method, Pattern)>,
    router: Router<usize>,
    index: RouteIndex<usize>,
}

impl Side {
    fn add(&mut self, method: Method, pattern: Pattern) {
        let i = self.routes.len();
        if self.router.insert(method, &pattern, i).is_ok() {
            self.index.insert(method, &pattern, i);
            self.routes.push((method, pattern));
        }
    }

    /// The route `method path` goes to, checked against its pattern alone.
    fn lookup(&self, method: Method, path: &str) -> Option<usize> {
        let (&i, params) = self.router.lookup(method, path)?;
        let (_, pattern) = &self.routes[i];
        assert_eq!(params.len(), pattern.names().count());
        for ((name, value), want) in params.iter().zip(pattern.names()) {
            assert_eq!(name, want);
            assert!(!value.is_empty() && path.contains(value));
        }
        let mut alone = Router::new();
        alone.insert(Method::Get, pattern, ()).unwrap();
        assert!(
            alone.lookup(Method::Get, path).is_some(),
            "{pattern} does not match {path}"
        );
        Some(i)
    }
}

fn class(method: Method) -> Method {
    if method == Method::Head {
        Method::Get
    } else {
        method
    }
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let (mut mine, mut theirs, mut paths) = (Side::default(), Side::default(), Vec::new());
    for line in text.lines().take(256) {
        let mut chars = line.chars();
        let (kind, method) = (chars.next(), chars.next().map(|c| c as usize % 7));
        let rest = chars.as_str();
        let side = match kind {
            Some('M') => &mut mine,
            Some('T') => &mut theirs,
            Some('P') => {
                paths.push(line[1..].to_owned());
                continue;
            }
            _ => continue,
        };
        let Some(method) = method.map(|m| Method::ALL[m]) else {
            continue;
        };
        match Pattern::parse(rest) {
            Ok(pattern) => {
                assert_eq!(pattern.to_string(), rest);
                assert_eq!(Pattern::parse(rest).as_ref(), Ok(&pattern));
                // Every route is also a request path worth trying.
                paths.push(rest.to_owned());
                side.add(method, pattern);
            }
            Err(error) => assert!(error.to_string().chars().count() < 400),
        }
    }
    let overlap = mine
        .index
        .first_overlap(&theirs.index)
        .map(|(&x, &y)| (x, y));
    if let Some((x, y)) = overlap {
        let ((mx, px), (my, py)) = (&mine.routes[x], &theirs.routes[y]);
        assert_eq!(class(*mx), class(*my));
        assert!(px.overlaps(py), "{px} and {py} reported overlapping");
    }
    for path in &paths {
        for method in Method::ALL {
            if let (Some(x), Some(y)) = (mine.lookup(method, path), theirs.lookup(method, path)) {
                assert!(
                    overlap.is_some(),
                    "{method:?} {path} matches {} and {}, no overlap reported",
                    mine.routes[x].1,
                    theirs.routes[y].1
                );
            }
        }
    }
});
