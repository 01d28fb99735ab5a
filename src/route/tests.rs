use super::*;

fn pattern(text: &str) -> Pattern {
    Pattern::parse(text).unwrap_or_else(|e| panic!("{text}: {e}"))
}

fn router(routes: &[(Method, &str)]) -> Router<usize> {
    let mut router = Router::new();
    for (i, (method, text)) in routes.iter().enumerate() {
        router.insert(*method, &pattern(text), i).unwrap();
    }
    router
}

/// The index of the route matched, and its parameters.
fn matched(router: &Router<usize>, method: Method, path: &str) -> Option<(usize, Vec<String>)> {
    let (value, params) = router.lookup(method, path)?;
    let params = params.iter().map(|(n, v)| format!("{n}={v}")).collect();
    Some((*value, params))
}

#[test]
fn literal_beats_parameter_beats_catch_all_with_backtracking() {
    use Method::Get;
    let router = router(&[
        (Get, "/a/b"),     // 0
        (Get, "/a/:x/c"),  // 1
        (Get, "/a/*rest"), // 2
        (Get, "/a/b/"),    // 3
        (Get, "/"),        // 4
        (Get, "/a/:x"),    // 5
    ]);
    // Path, then the route matched and its parameters.
    type Case<'a> = (&'a str, Option<(usize, &'a [&'a str])>);
    let cases: &[Case] = &[
        ("/a/b", Some((0, &[]))),
        ("/a/b/c", Some((1, &["x=b"]))),
        ("/a/b/d", Some((2, &["rest=b/d"]))),
        ("/a/b/", Some((3, &[]))),
        ("/", Some((4, &[]))),
        ("/a/zz", Some((5, &["x=zz"]))),
        ("/a/%41", Some((5, &["x=%41"]))),
        ("/a//x", Some((2, &["rest=/x"]))),
        ("/a/", None),
        ("/a", None),
        ("/b", None),
        ("", None),
        ("a/b", None),
    ];
    for (path, want) in cases {
        let want = want.map(|(i, p)| (i, p.iter().map(|s| s.to_string()).collect()));
        assert_eq!(matched(&router, Get, path), want, "{path}");
    }
    assert_eq!(matched(&router, Method::Post, "/a/b"), None);
}

#[test]
fn head_falls_back_to_get_unless_it_has_its_own_route() {
    let router = router(&[
        (Method::Get, "/x/:id"),
        (Method::Head, "/y"),
        (Method::Get, "/y"),
    ]);
    assert_eq!(matched(&router, Method::Head, "/x/1").unwrap().0, 0);
    assert_eq!(matched(&router, Method::Head, "/y").unwrap().0, 1);
    assert_eq!(matched(&router, Method::Get, "/y").unwrap().0, 2);
    assert_eq!(matched(&router, Method::Options, "/y"), None);
}

#[test]
fn parameter_names_belong_to_each_route() {
    let router = router(&[(Method::Get, "/u/:id/a"), (Method::Get, "/u/:name/b")]);
    assert_eq!(matched(&router, Method::Get, "/u/7/a").unwrap().1, ["id=7"]);
    assert_eq!(
        matched(&router, Method::Get, "/u/7/b").unwrap().1,
        ["name=7"]
    );
    let (_, params) = router.lookup(Method::Get, "/u/7/b").unwrap();
    assert_eq!(
        (params.len(), params.get("name"), params.get("id")),
        (1, Some("7"), None)
    );
}

#[test]
fn the_same_route_up_to_parameter_names_is_inserted_once() {
    let mut router = Router::new();
    router.insert(Method::Get, &pattern("/a/:x"), 1).unwrap();
    assert_eq!(router.insert(Method::Get, &pattern("/a/:y"), 2), Err(&1));
    router.insert(Method::Head, &pattern("/a/:y"), 3).unwrap();
    router.insert(Method::Get, &pattern("/a/*x"), 4).unwrap();
    assert_eq!(router.insert(Method::Get, &pattern("/a/*y"), 5), Err(&4));
    assert!(!router.is_empty() && Router::<()>::new().is_empty());
}

#[test]
fn overlap_follows_the_matching_rules() {
    let cases = [
        ("/api/hello/:name", "/api/hello/Ada", true),
        ("/api/hello/:name", "/api/*rest", true),
        ("/api/hello/:name", "/api/hello/:other", true),
        ("/api/hello/:name", "/*all", true),
        ("/api/hello/:name", "/:a/:b/:c", true),
        ("/api/hello/:name", "/api/hello", false),
        ("/api/hello/:name", "/api/hello/:name/x", false),
        ("/api/hello/:name", "/api/hello/", false),
        ("/api/hello/:name", "/api/respond/:kind", false),
        ("/a/", "/a/*r", false),
        ("/a/", "/a/", true),
        ("/a/", "/a/:x", false),
        ("/a/*r", "/a/b/c/d", true),
        ("/a/*r", "/a/*s", true),
        ("/a/*r", "/a", false),
        ("/a/*r", "/a/b/", true),
        ("/*r", "/", false),
        ("/*r", "/x/", true),
        ("/a/b", "/a/c", false),
        ("/:a/x", "/y/:b", true),
        ("/:a/x", "/y/:b/z", false),
        ("/:a/x/*r", "/y/:b/:c", true),
    ];
    for (a, b, want) in cases {
        assert_eq!(pattern(a).overlaps(&pattern(b)), want, "{a} vs {b}");
        assert_eq!(pattern(b).overlaps(&pattern(a)), want, "{b} vs {a}");
    }
}

#[test]
fn get_and_head_compete_other_methods_do_not() {
    let index = |method, text| {
        let mut index = RouteIndex::new();
        index.insert(method, &pattern(text), text.to_owned());
        index
    };
    let served = index(Method::Get, "/api/hello/:name");
    let head = index(Method::Head, "/api/hello/Ada");
    assert_eq!(
        head.first_overlap(&served),
        Some((&"/api/hello/Ada".to_owned(), &"/api/hello/:name".to_owned()))
    );
    assert!(
        index(Method::Post, "/api/hello/Ada")
            .first_overlap(&served)
            .is_none()
    );
    assert!(
        index(Method::Get, "/api/other")
            .first_overlap(&served)
            .is_none()
    );
}

#[test]
fn checking_a_full_manifest_against_many_plugins_stays_near_linear() {
    // 100 plugins of 1,000 routes each, then a new manifest of 1,024 routes
    // that shares their prefix and puts a parameter where they branch.
    let mut served = RouteIndex::new();
    for plugin in 0..100 {
        for route in 0..1_000 {
            let text = format!("/api/p{plugin}/r{route}/:id");
            served.insert(Method::Get, &pattern(&text), plugin);
        }
    }
    let mut new = RouteIndex::new();
    for route in 0..1_024 {
        new.insert(Method::Get, &pattern(&format!("/api/:p/q{route}")), route);
    }
    let mut work = 0;
    assert_eq!(new.overlap_counted(&served, &mut work), None);
    // Two shared levels, then the parameter against each plugin's name; the
    // literal maps below meet by lookups, not by pairs.
    assert!(work <= 200, "{work} node pairs");

    // And a conflict among them is found.
    new.insert(Method::Get, &pattern("/api/p42/r7/x"), 9_999);
    assert_eq!(new.first_overlap(&served), Some((&9_999, &42)));
}
