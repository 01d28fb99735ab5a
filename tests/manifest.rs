//! `plugin.json` from hostile hands: parsing never panics and every error it
//! gives is bounded and printable, down to the `dynplug list` table.

use std::path::Path;
use std::process::Command;

use dynplug::Manifest;
use proptest::prelude::*;
use proptest::sample::Index;

/// Valid manifests to mutate: every mode, routes, config, optional fields.
const VALID: &[&str] = &[
    r#"{"name":"p","version":"1.0.0","source":{"mode":"local_so","path":"libp"}}"#,
    r#"{"name":"hello","version":"1.2.0-beta.1+b7","description":"Says hello","maintainers":["dev@example.com"],"home":"https://example.com","source":{"mode":"local_so","path":"libhello.so","sha256":"0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"},"isolation":"inline","config":{"greeting":"hi","n":[1,2.5,null,true]},"http_services":{"driver":"axum","routes":[{"route":"/api/hello/:id","method":"GET","label":"hello.get","timeout_ms":250},{"route":"/api/hello","method":"POST","label":"hello.post"},{"route":"/files/*path","method":"HEAD","label":"f"},{"route":"/","method":"OPTIONS","label":"o"}]}}"#,
    r#"{"name":"g","version":"0.1.0","source":{"mode":"remote_git","path":"https://example.com/x.git","rev":"v1","package":"x"}}"#,
    r#"{"name":"e","version":"3.0.0","source":{"mode":"exec","path":"bin/x","args":["-v","--x=1"],"protocol":"grpc","md5":"0123456789abcdef0123456789abcdef"}}"#,
    r#"{"name":"s","version":"1.0.0","source":{"mode":"socket","path":"/run/x.sock","protocol":"jsonrpc"}}"#,
];

/// Parses `bytes`; an error must read as one bounded, printable line
/// (field at most 256 characters, message at most 1,024, plus the prefix).
fn parse_checked(bytes: &[u8]) -> Result<(), TestCaseError> {
    if let Err(error) = Manifest::parse(bytes, Path::new("p/plugin.json"), "p") {
        let text = error.to_string();
        prop_assert!(
            text.chars().count() <= 1024 + 256 + 32,
            "{} chars",
            text.len()
        );
        prop_assert!(!text.contains(char::is_control), "{:?}", text);
    }
    Ok(())
}

/// One edit of a byte string: overwrite, insert, delete, cut, or repeat a slice.
#[derive(Debug, Clone)]
enum Edit {
    Set(Index, u8),
    Insert(Index, Vec<u8>),
    Delete(Index, usize),
    Truncate(Index),
    Repeat(Index, usize),
}

fn edit() -> impl Strategy<Value = Edit> {
    // Bytes that matter to JSON and to the manifest's own syntax.
    let byte = prop_oneof![
        any::<u8>(),
        prop::sample::select(b"{}[]\":,\\/*0123456789-.+eE \x1b\x00\xff".to_vec()),
    ];
    let snippet = prop_oneof![
        prop::collection::vec(byte.clone(), 1..8),
        prop::sample::select(vec![
            &br#","x":1"#[..],
            br#"{"route":"/a/{x}","method":"GET","label":"l"}"#,
            br#""\u001b[31m""#,
            br#"{}"#,
            br#"1e999"#,
            br#""\ud800""#,
        ])
        .prop_map(<[u8]>::to_vec),
    ];
    prop_oneof![
        (any::<Index>(), byte).prop_map(|(i, b)| Edit::Set(i, b)),
        (any::<Index>(), snippet).prop_map(|(i, s)| Edit::Insert(i, s)),
        (any::<Index>(), 1..16usize).prop_map(|(i, n)| Edit::Delete(i, n)),
        any::<Index>().prop_map(Edit::Truncate),
        (any::<Index>(), 1..64usize).prop_map(|(i, n)| Edit::Repeat(i, n)),
    ]
}

fn apply(bytes: &mut Vec<u8>, edit: &Edit) {
    let at = |i: &Index, len: usize| i.index(len + 1);
    match edit {
        Edit::Set(i, b) if !bytes.is_empty() => {
            let i = i.index(bytes.len());
            bytes[i] = *b;
        }
        Edit::Set(..) => {}
        Edit::Insert(i, snippet) => {
            let i = at(i, bytes.len());
            bytes.splice(i..i, snippet.iter().copied());
        }
        Edit::Delete(i, n) => {
            let i = at(i, bytes.len());
            bytes.drain(i..(i + n).min(bytes.len()));
        }
        Edit::Truncate(i) => bytes.truncate(at(i, bytes.len())),
        Edit::Repeat(i, n) => {
            let i = at(i, bytes.len());
            let slice = bytes[i..(i + n).min(bytes.len())].to_vec();
            bytes.splice(i..i, slice);
        }
    }
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic_and_errors_stay_bounded(
        bytes in prop::collection::vec(any::<u8>(), 0..512),
    ) {
        parse_checked(&bytes)?;
    }

    #[test]
    fn mutated_manifests_never_panic_and_errors_stay_bounded(
        which in any::<Index>(),
        edits in prop::collection::vec(edit(), 1..6),
    ) {
        let mut bytes = VALID[which.index(VALID.len())].as_bytes().to_vec();
        for edit in &edits {
            apply(&mut bytes, edit);
        }
        parse_checked(&bytes)?;
    }

    /// Whatever routes a manifest declares, an accepted manifest's routes
    /// all parse and none repeats another.
    #[test]
    fn accepted_routes_are_valid_patterns(
        routes in prop::collection::vec(
            ("[/:*{}a-c?]{0,12}", prop::sample::select(vec!["GET", "HEAD", "get", "TRACE"])),
            0..6,
        ),
    ) {
        let routes: Vec<String> = routes
            .iter()
            .map(|(route, method)| {
                serde_json::json!({"route": route, "method": method, "label": "l"}).to_string()
            })
            .collect();
        let json = format!(
            r#"{{"name":"p","version":"1.0.0","source":{{"mode":"local_so","path":"a"}},"http_services":{{"routes":[{}]}}}}"#,
            routes.join(",")
        );
        parse_checked(json.as_bytes())?;
        if let Ok(manifest) = Manifest::parse(json.as_bytes(), Path::new("p/plugin.json"), "p") {
            let mut router = dynplug::route::Router::new();
            for route in manifest.routes() {
                let pattern = dynplug::route::Pattern::parse(&route.route);
                prop_assert!(pattern.is_ok(), "{}", route.route);
                let method = dynplug::route::Method::parse(&route.method).unwrap();
                prop_assert!(router.insert(method, &pattern.unwrap(), ()).is_ok(), "{}", route.route);
            }
        }
    }
}

#[test]
fn list_prints_a_bounded_escaped_line_for_a_70k_error() {
    // serde quotes an unknown key in full, and it becomes the field too: a
    // 140,000-character error cell made `dynplug list` panic (exit 101).
    let dir = tempfile::tempdir().unwrap();
    let plugin = dir.path().join("noisy");
    std::fs::create_dir(&plugin).unwrap();
    let key = format!("\\u001b[2J\\u001b]0;owned\\u0007{}", "k".repeat(70_000));
    let manifest = VALID[0].replacen('{', &format!(r#"{{"{key}":1,"#), 1);
    std::fs::write(plugin.join("plugin.json"), manifest).unwrap();

    let out = Command::new(env!("CARGO_BIN_EXE_dynplug"))
        .args(["list", "--plugins"])
        .arg(dir.path())
        .env_remove("DYNPLUG_CONFIG")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let row = stdout
        .lines()
        .find(|l| l.starts_with("noisy"))
        .unwrap_or_else(|| panic!("{stdout:.2000}"));
    assert!(
        row.contains("failed") && row.contains("\\u{1b}[2J\\u{1b}]0;owned\\u{7}"),
        "{row:.300}"
    );
    assert!(!stdout.contains(['\u{1b}', '\u{7}']));
    assert!(
        row.chars().count() < 1200 && row.ends_with('…'),
        "{} chars",
        row.len()
    );
}
