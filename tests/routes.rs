//! HTTP routes: a plugin can never take requests another plugin serves
//! (checked through a real manager and the `hello` sample), and properties
//! of the route module that decides it: matching agrees with a reference
//! matcher, overlap detection agrees with brute force.

mod support;

use std::time::{Duration, Instant};

use dynplug::route::{Method, Pattern, RouteIndex, Router, Segment};
use dynplug::{Error, PluginManager};
use proptest::prelude::*;
use proptest::sample::Index;

/// `hello` loaded (it serves `GET /api/hello/:name`, `GET|POST /api/hello`
/// and `GET /api/respond/:kind`), and `intruder`, hello's library under a
/// manifest declaring `routes`, installed but not loaded.
fn hello_and_intruder(routes: &str) -> (tempfile::TempDir, PluginManager) {
    let (dir, manager) = support::manager_with(&["hello"]);
    manager.load_plugin("hello").unwrap();
    let http = format!(r#""http_services": {{"routes": [{routes}]}}"#);
    let manifest = support::manifest("intruder", "hello", "1.0.0", &http);
    support::install_as(dir.path(), "hello", "intruder", Some(&manifest));
    (dir, manager)
}

fn route(method: &str, route: &str) -> String {
    format!(r#"{{"route": "{route}", "method": "{method}", "label": "hello.get"}}"#)
}

fn hello_still_answers(manager: &PluginManager) {
    let mut ctx = dynplug::Context::new("hello.get").with("name", "Ada");
    support::call(manager, "hello", &mut ctx).unwrap();
    assert_eq!(ctx.get_str("greeting"), Some("hello, Ada"));
}

#[test]
fn a_second_plugin_cannot_take_requests_hello_serves() {
    // Text comparison let all but `:other` through, and each then took
    // requests that hello's `/api/hello/:name` or `/api/respond/:kind` served.
    for (method, path) in [
        ("GET", "/api/hello/Ada"),
        ("HEAD", "/api/hello/Ada"),
        ("GET", "/api/*rest"),
        ("GET", "/api/respond/*rest"),
        ("GET", "/*all"),
        ("GET", "/:a/:b/:c"),
        ("GET", "/api/hello/:other"),
    ] {
        let (_dir, manager) =
            hello_and_intruder(&[route("GET", "/elsewhere"), route(method, path)].join(","));
        match manager.load_plugin("intruder") {
            Err(Error::RouteConflict { route, owner, .. }) => {
                assert_eq!((route, owner), (format!("{method} {path}"), "hello".into()));
            }
            other => panic!("{method} {path}: expected a route conflict, got {other:?}"),
        }
        assert!(manager.get_plugin("intruder").is_err());
        hello_still_answers(&manager);
    }
}

#[test]
fn brace_syntax_is_refused_before_it_can_shadow_a_route() {
    // The old router read `{name}` as a parameter: a second `/api/hello/:name`.
    let (_dir, manager) = hello_and_intruder(&route("GET", "/api/hello/{name}"));
    match manager.load_plugin("intruder") {
        Err(Error::Manifest { field, message, .. }) => {
            assert_eq!(field, "http_services.routes[0].route");
            assert!(
                message.contains("`{` and `}` are not route syntax"),
                "{message}"
            );
        }
        other => panic!("expected a manifest error, got {other:?}"),
    }
    hello_still_answers(&manager);
}

#[test]
fn routes_beside_served_ones_load_and_an_owner_may_change_its_own() {
    let (dir, manager) = hello_and_intruder(
        &[
            route("GET", "/api/hello/:name/more"),
            route("GET", "/api/hello/"),
            route("POST", "/api/hello/:name"),
            route("GET", "/api/hi/*rest"),
        ]
        .join(","),
    );
    manager.load_plugin("intruder").unwrap();

    // hello's own routes are not held against its upgrade...
    let upgrade = |version: &str, routes: &str| {
        let http = format!(r#""http_services": {{"routes": [{routes}]}}"#);
        let manifest = support::manifest("hello", "hello", version, &http);
        support::install_as(dir.path(), "hello", "hello", Some(&manifest));
        manager.load_plugin("hello")
    };
    upgrade("1.1.0", &route("GET", "/api/hello/:who")).unwrap();
    // ...but intruder's now are, by the same rules.
    match upgrade("1.2.0", &route("GET", "/api/hello/*rest")) {
        Err(Error::RouteConflict { route, owner, .. }) => {
            assert_eq!(
                (route.as_str(), owner.as_str()),
                ("GET /api/hello/*rest", "intruder")
            );
        }
        other => panic!("expected a route conflict, got {other:?}"),
    }
    assert_eq!(
        manager.info("hello").unwrap().version.as_deref(),
        Some("1.1.0")
    );
}

/// The manager keeps an index of the routes served, extended as plugins
/// load: routes an upgrade or an unload frees can be taken right after.
#[test]
fn routes_freed_by_an_upgrade_or_an_unload_can_be_taken() {
    let (dir, manager) = hello_and_intruder(&route("GET", "/api/respond/:kind"));
    assert!(matches!(
        manager.load_plugin("intruder"),
        Err(Error::RouteConflict { .. })
    ));
    // hello gives up `/api/respond/:kind` in its next version.
    let http = format!(
        r#""http_services": {{"routes": [{}]}}"#,
        route("GET", "/api/hello/:name")
    );
    let manifest = support::manifest("hello", "hello", "1.1.0", &http);
    support::install_as(dir.path(), "hello", "hello", Some(&manifest));
    manager.load_plugin("hello").unwrap();
    manager.load_plugin("intruder").unwrap();

    // A third plugin wants hello's remaining route: refused while hello
    // serves it, taken once hello is unloaded.
    let third = support::manifest(
        "third",
        "hello",
        "1.0.0",
        &format!(
            r#""http_services": {{"routes": [{}]}}"#,
            route("GET", "/api/hello/:who")
        ),
    );
    support::install_as(dir.path(), "hello", "third", Some(&third));
    assert!(matches!(
        manager.load_plugin("third"),
        Err(Error::RouteConflict { owner, .. }) if owner == "hello"
    ));
    manager.unload("hello").unwrap();
    manager.load_plugin("third").unwrap();
}

#[test]
fn a_manifest_of_100k_routes_is_refused_before_any_route_is_looked_at() {
    let (dir, manager) = support::manager_with(&["hello"]);
    manager.load_plugin("hello").unwrap();
    let started = Instant::now();
    let manifest = |count: usize| {
        let routes = vec![route("GET", "/api/x/:y"); count].join(",");
        let http = format!(r#""http_services": {{"routes": [{routes}]}}"#);
        support::manifest("big", "hello", "1.0.0", &http)
    };
    // 100k routes: the bytes are refused before parsing (plugin.json is
    // capped at 1 MiB), and the parser refuses the count before any route.
    let text = manifest(100_000);
    support::install_as(dir.path(), "hello", "big", Some(&text));
    match manager.load_plugin("big") {
        Err(Error::Io { source, .. }) => {
            assert!(source.to_string().contains("over the limit"), "{source}")
        }
        other => panic!("expected the size cap, got {:?}", other.map(|_| ())),
    }
    let path = std::path::Path::new("big/plugin.json");
    match dynplug::Manifest::parse(text.as_bytes(), path, "big") {
        Err(Error::Manifest { field, message, .. }) => {
            assert_eq!(field, "http_services.routes");
            assert_eq!(message, "at most 1024 routes, found 100000");
        }
        other => panic!("expected a manifest error, got {:?}", other.map(|_| ())),
    }
    // Under the size cap, through a real load.
    support::install_as(dir.path(), "hello", "big", Some(&manifest(15_000)));
    match manager.load_plugin("big") {
        Err(Error::Manifest { field, message, .. }) => {
            assert_eq!(field, "http_services.routes");
            assert_eq!(message, "at most 1024 routes, found 15000");
        }
        other => panic!("expected a manifest error, got {:?}", other.map(|_| ())),
    }
    // Measured: this whole test takes well under a second in a debug build;
    // comparing the routes pairwise against served ones once stalled the
    // watcher for 17 s.
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
}

// Property tests. Patterns come from a small alphabet so that routes share
// prefixes and overlap often; parameter names are numbered by position.

/// A route pattern: up to 4 segments of literals `a`, `b`, `c` and
/// parameters, then maybe a catch-all or a trailing `/` (`/` alone when empty).
fn pattern() -> impl Strategy<Value = Pattern> {
    let segment = prop_oneof![
        3 => prop::sample::select(vec!["a", "b", "c"]).prop_map(str::to_owned),
        2 => Just(":".to_owned()),
    ];
    let last = prop_oneof![
        4 => Just(None),
        1 => Just(Some("")),
        2 => Just(Some("*")),
    ];
    (prop::collection::vec(segment, 0..4), last).prop_map(|(mut segments, last)| {
        segments.extend(last.map(str::to_owned));
        let mut text: String = segments
            .iter()
            .enumerate()
            .map(|(i, s)| match s.as_str() {
                ":" | "*" => format!("/{s}p{i}"),
                literal => format!("/{literal}"),
            })
            .collect();
        if text.is_empty() {
            text.push('/');
        }
        Pattern::parse(&text).unwrap()
    })
}

fn method() -> impl Strategy<Value = Method> {
    prop::sample::select(vec![Method::Get, Method::Head, Method::Post])
}

/// A request path that `pattern` matches, with parameter values picked by `picks`.
fn instance(pattern: &Pattern, picks: &[Index]) -> String {
    const SEGMENTS: &[&str] = &["a", "b", "c", "x", "%2F"];
    const RESTS: &[&str] = &["a", "x/y", "b/", "/c", "a/b/c", "c/"];
    let mut path = String::new();
    for (i, segment) in pattern.segments().iter().enumerate() {
        path.push('/');
        let pick = picks
            .get(i)
            .map_or(0, |p| p.index(SEGMENTS.len() * RESTS.len()));
        path.push_str(match segment {
            Segment::Literal(text) => text,
            Segment::Param(_) => SEGMENTS[pick % SEGMENTS.len()],
            Segment::CatchAll(_) => RESTS[pick % RESTS.len()],
        });
    }
    path
}

fn random_path() -> impl Strategy<Value = String> {
    prop::collection::vec(prop::sample::select(vec!["a", "b", "c", "x", ""]), 1..6)
        .prop_map(|segments| format!("/{}", segments.join("/")))
}

/// The reference matcher: `pattern` against `path`, segment by segment.
fn matches(pattern: &Pattern, path: &str) -> Option<Vec<(String, String)>> {
    let segments: Vec<&str> = path.strip_prefix('/')?.split('/').collect();
    let mut params = Vec::new();
    for (i, segment) in pattern.segments().iter().enumerate() {
        match segment {
            Segment::Literal(text) if **segments.get(i)? == **text => {}
            Segment::Param(name) if !segments.get(i)?.is_empty() => {
                params.push((name.to_string(), segments[i].to_owned()));
            }
            Segment::CatchAll(name) if i < segments.len() => {
                let rest = segments[i..].join("/");
                return (!rest.is_empty()).then(|| {
                    params.push((name.to_string(), rest));
                    params
                });
            }
            _ => return None,
        }
    }
    (segments.len() == pattern.segments().len()).then_some(params)
}

/// Precedence as a sort key: literal (0) before parameter (1) before
/// catch-all (2), segment by segment from the left.
fn precedence(pattern: &Pattern) -> Vec<u8> {
    let rank = |s: &Segment| match s {
        Segment::Literal(_) => 0,
        Segment::Param(_) => 1,
        Segment::CatchAll(_) => 2,
    };
    pattern.segments().iter().map(rank).collect()
}

type Matched = Option<(usize, Vec<(String, String)>)>;

/// Tries every route of `method`, in precedence order; `HEAD` then `GET`.
fn reference_lookup(routes: &[(usize, Method, Pattern)], method: Method, path: &str) -> Matched {
    let best = |method: Method| {
        routes
            .iter()
            .filter(|(_, m, _)| *m == method)
            .filter_map(|(i, _, p)| Some((precedence(p), *i, matches(p, path)?)))
            .min_by(|a, b| a.0.cmp(&b.0))
            .map(|(_, i, params)| (i, params))
    };
    match method {
        Method::Head => best(Method::Head).or_else(|| best(Method::Get)),
        method => best(method),
    }
}

/// A path both patterns match if they overlap: unify them segment by
/// segment (a catch-all takes the other's rest).
fn witness(a: &Pattern, b: &Pattern) -> String {
    let fill = |s: &Segment| match s {
        Segment::Literal(text) => text.to_string(),
        _ => "z".to_owned(),
    };
    let (a, b) = (a.segments(), b.segments());
    let mut path = String::new();
    for i in 0..a.len().max(b.len()) {
        let segment = match (a.get(i), b.get(i)) {
            (Some(Segment::CatchAll(_)), _) => b.get(i..).map(|r| r.iter().map(fill).collect()),
            (_, Some(Segment::CatchAll(_))) => a.get(i..).map(|r| r.iter().map(fill).collect()),
            (Some(Segment::Literal(t)), _) | (_, Some(Segment::Literal(t))) => {
                Some(vec![t.to_string()])
            }
            (Some(s), _) | (_, Some(s)) => Some(vec![fill(s)]),
            (None, None) => None,
        };
        let Some(segment) = segment.filter(|s: &Vec<String>| !s.is_empty()) else {
            path.push_str("/z");
            break;
        };
        path.push('/');
        path.push_str(&segment.join("/"));
        if matches!(a.get(i), Some(Segment::CatchAll(_)))
            || matches!(b.get(i), Some(Segment::CatchAll(_)))
        {
            break;
        }
    }
    path
}

fn same_class(a: Method, b: Method) -> bool {
    let class = |m| if m == Method::Head { Method::Get } else { m };
    class(a) == class(b)
}

proptest! {
    /// One plugin's routes (so overlapping ones, precedence decides): the
    /// router finds what trying every route in precedence order finds.
    #[test]
    fn router_agrees_with_the_reference_matcher(
        declared in prop::collection::vec((method(), pattern()), 1..10),
        picks in prop::collection::vec((any::<Index>(), prop::collection::vec(any::<Index>(), 5)), 1..12),
        random in prop::collection::vec(random_path(), 0..6),
        lookup_method in method(),
    ) {
        let mut router = Router::new();
        let mut routes = Vec::new();
        for (i, (method, pattern)) in declared.iter().enumerate() {
            // A repeated route is refused by the manifest; the first one stays.
            if router.insert(*method, pattern, i).is_ok() {
                routes.push((i, *method, pattern.clone()));
            }
        }
        let paths = picks
            .iter()
            .map(|(which, picks)| instance(&declared[which.index(declared.len())].1, picks))
            .chain(random);
        for path in paths {
            let found = router.lookup(lookup_method, &path).map(|(i, params)| {
                (*i, params.iter().map(|(n, v)| (n.to_owned(), v.to_owned())).collect())
            });
            prop_assert_eq!(found, reference_lookup(&routes, lookup_method, &path), "{}", path);
        }
    }

    /// Two patterns overlap exactly when some path matches both: a declared
    /// overlap has a witness, and no path drawn from either pattern matches
    /// both of a pair declared apart.
    #[test]
    fn overlap_agrees_with_brute_force(
        a in pattern(),
        b in pattern(),
        picks in prop::collection::vec(prop::collection::vec(any::<Index>(), 5), 1..12),
    ) {
        let overlaps = a.overlaps(&b);
        prop_assert_eq!(overlaps, b.overlaps(&a));
        let witness = witness(&a, &b);
        let both = |path: &str| matches(&a, path).is_some() && matches(&b, path).is_some();
        if overlaps {
            prop_assert!(both(&witness), "{} and {} overlap, but not at {}", a, b, witness);
        } else {
            let paths = picks.iter().flat_map(|p| [instance(&a, p), instance(&b, p)]);
            for path in paths.chain([witness]) {
                prop_assert!(!both(&path), "{} and {} declared apart, both match {}", a, b, path);
            }
        }
    }

    /// Whole route sets: the index walk finds an overlap exactly when some
    /// pair of routes (of competing methods) overlaps, and the pair it
    /// reports does.
    #[test]
    fn index_walk_agrees_with_every_pair(
        mine in prop::collection::vec((method(), pattern()), 1..8),
        theirs in prop::collection::vec((method(), pattern()), 1..8),
    ) {
        let index = |routes: &[(Method, Pattern)]| {
            let mut index = RouteIndex::new();
            for (i, (method, pattern)) in routes.iter().enumerate() {
                index.insert(*method, pattern, i);
            }
            index
        };
        let pair_overlaps = |(x, y): (usize, usize)| {
            let ((mx, px), (my, py)) = (&mine[x], &theirs[y]);
            same_class(*mx, *my) && px.overlaps(py)
        };
        let any_pair = (0..mine.len())
            .any(|x| (0..theirs.len()).any(|y| pair_overlaps((x, y))));
        let (mine_index, theirs_index) = (index(&mine), index(&theirs));
        let found = mine_index.first_overlap(&theirs_index).map(|(x, y)| (*x, *y));
        prop_assert_eq!(found.is_some(), any_pair);
        if let Some(pair) = found {
            prop_assert!(pair_overlaps(pair), "{:?} reported, but does not overlap", pair);
        }
    }
}
