//! `.plg` packages in the plugins directory, signatures and the trust
//! policy, with the sample plugins (no crate is generated here: see
//! tests/authoring.rs for the end-to-end path).

mod support;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use dynplug::{Event, PluginManager};

/// A plugin directory for the `hello` sample at `version` (no sha256).
fn hello_dir(parent: &Path, version: &str) -> PathBuf {
    let dir = parent.join("hello");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let lib = support::library("hello");
    std::fs::copy(&lib, dir.join(lib.file_name().unwrap())).unwrap();
    std::fs::write(
        dir.join("plugin.json"),
        support::manifest("hello", "hello", version, ""),
    )
    .unwrap();
    dir
}

/// `hello-VERSION.plg`, packed in `out`.
fn hello_package(out: &Path, version: &str) -> PathBuf {
    let work = tempfile::tempdir().unwrap();
    let packed = dynplug::package::pack(hello_dir(work.path(), version), out).unwrap();
    assert!(!packed.signed);
    packed.path
}

/// Moves `package` into `plugins` the way an operator should: a dot name
/// first, then a rename.
fn drop_in(package: &Path, plugins: &Path) {
    let name = package.file_name().unwrap().to_string_lossy().into_owned();
    let staging = plugins.join(format!(".{name}.tmp"));
    std::fs::copy(package, &staging).unwrap();
    std::fs::rename(&staging, plugins.join(name)).unwrap();
}

fn greet(manager: &PluginManager) -> Result<String, dynplug::Error> {
    let mut ctx = dynplug::Context::new("hello.get").with("name", "Ada");
    support::call(manager, "hello", &mut ctx)?;
    Ok(ctx.get_str("greeting").unwrap_or_default().to_owned())
}

#[test]
fn a_package_loads_upgrades_under_load_and_unloads_with_no_failed_call() {
    let plugins = tempfile::tempdir().unwrap();
    let packages = tempfile::tempdir().unwrap();
    let manager = PluginManager::new(plugins.path()).unwrap();
    let mut events = manager.subscribe();
    let watcher = manager.watch().unwrap();

    drop_in(&hello_package(packages.path(), "1.0.0"), plugins.path());
    assert!(watcher.wait_settled(support::PATIENCE));
    assert_eq!(greet(&manager).unwrap(), "hello, Ada");
    let info = manager.info("hello").unwrap();
    assert_eq!(info.version.as_deref(), Some("1.0.0"));
    assert!(info.dir.ends_with("hello-1.0.0.plg"), "{:?}", info.dir);

    // Callers never stop while two newer packages arrive.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let callers: Vec<_> = (0..4)
        .map(|_| {
            let (manager, stop) = (manager.clone(), Arc::clone(&stop));
            let (ok, failed) = (Arc::clone(&ok), Arc::clone(&failed));
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    match greet(&manager) {
                        Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                        Err(e) => {
                            eprintln!("failed call: {e}");
                            failed.fetch_add(1, Ordering::Relaxed)
                        }
                    };
                }
            })
        })
        .collect();
    for version in ["1.1.0", "1.2.0"] {
        drop_in(&hello_package(packages.path(), version), plugins.path());
        support::wait_for_event(
            &mut events,
            "the upgrade",
            |e| matches!(e, Event::Upgraded { to, .. } if to == version),
        );
    }
    let before = ok.load(Ordering::Relaxed);
    while ok.load(Ordering::Relaxed) < before + 100 {
        std::thread::yield_now();
    }
    stop.store(true, Ordering::Relaxed);
    for caller in callers {
        caller.join().unwrap();
    }
    assert_eq!(failed.load(Ordering::Relaxed), 0, "no call failed");
    assert!(ok.load(Ordering::Relaxed) > 100);
    support::wait_for_event(
        &mut events,
        "1.1.0 unloaded",
        |e| matches!(e, Event::Unloaded { version, .. } if version == "1.1.0"),
    );
    assert!(
        std::fs::read_dir(plugins.path().join(".dynplug/unpacked"))
            .unwrap()
            .next()
            .is_none(),
        "unpacked copies are removed once loaded"
    );

    // An older package dropped beside the newest changes nothing.
    drop_in(&hello_package(packages.path(), "1.0.5"), plugins.path());
    assert!(watcher.wait_settled(support::PATIENCE));
    assert_eq!(
        manager.info("hello").unwrap().version.as_deref(),
        Some("1.2.0")
    );

    // Removing every package unloads the plugin.
    for entry in std::fs::read_dir(plugins.path()).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "plg") {
            std::fs::remove_file(path).unwrap();
        }
    }
    support::wait_for_event(
        &mut events,
        "the unload",
        |e| matches!(e, Event::Unloaded { version, .. } if version == "1.2.0"),
    );
    assert!(greet(&manager).is_err());
}

#[test]
fn a_misnamed_or_hostile_package_is_listed_with_its_reason() {
    let plugins = tempfile::tempdir().unwrap();
    // A valid package under another name.
    let package = hello_package(plugins.path(), "1.0.0");
    std::fs::rename(&package, plugins.path().join("hello-9.9.9.plg")).unwrap();
    // A gzipped tar whose second entry climbs out of the directory.
    let mut tar = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_old();
    header.as_old_mut().name[..12].copy_from_slice(b"../../escape");
    header.set_size(1);
    header.set_cksum();
    tar.append(&header, &b"x"[..]).unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut gz, &tar.into_inner().unwrap()).unwrap();
    std::fs::write(plugins.path().join("evil-1.0.0.plg"), gz.finish().unwrap()).unwrap();

    let manager = PluginManager::new(plugins.path()).unwrap();
    let report = manager.load_plugins().unwrap();
    let errors: Vec<(String, String)> = report
        .failed
        .iter()
        .map(|(name, e)| (name.clone(), e.to_string()))
        .collect();
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert!(
        errors[0].0 == "evil-1.0.0.plg"
            && errors[0]
                .1
                .contains("entry 1 `../../escape`: a path with `..`"),
        "{errors:?}"
    );
    assert!(
        errors[1].0 == "hello-9.9.9.plg"
            && errors[1].1.contains(
                "its manifest says hello 1.0.0, so the file must be named `hello-1.0.0.plg`"
            ),
        "{errors:?}"
    );
    assert!(!plugins.path().join("escape").exists());
}

/// A directory signed by `key` (written by `dynplug::signing`).
fn signed_hello(parent: &Path, key: &dynplug::signing::SecretKey) -> PathBuf {
    let dir = hello_dir(parent, "1.0.0");
    dynplug::signing::sign_dir(&dir, key).unwrap();
    dir
}

fn trusting(plugins: &Path, keys: &[&dynplug::signing::SecretKey], require: bool) -> PluginManager {
    PluginManager::builder(plugins)
        .trusted_keys(keys.iter().map(|k| k.public()))
        .require_signatures(require)
        .build()
        .unwrap()
}

#[test]
fn signed_unsigned_tampered_and_unknown_key_plugins() {
    let alice = dynplug::signing::SecretKey::generate("alice").unwrap();
    let mallory = dynplug::signing::SecretKey::generate("mallory").unwrap();
    let load = |plugins: &Path, require| {
        trusting(plugins, &[&alice], require)
            .load_plugin("hello")
            .map(|_| ())
            .map_err(|e| e.to_string())
    };

    let plugins = tempfile::tempdir().unwrap();
    signed_hello(plugins.path(), &alice);
    load(plugins.path(), true).expect("signed by a trusted key");
    let signer = dynplug::signing::signer_of(plugins.path().join("hello"), &[alice.public()])
        .unwrap()
        .unwrap();
    assert_eq!((signer.name.as_str(), signer.trusted), ("alice", true));

    let plugins = tempfile::tempdir().unwrap();
    hello_dir(plugins.path(), "1.0.0");
    let err = load(plugins.path(), true).unwrap_err();
    assert!(
        err.contains("plugin.sig: not signed, and this host requires signatures"),
        "{err}"
    );
    load(plugins.path(), false).expect("unsigned is fine unless required");

    // The manifest changed after signing.
    let plugins = tempfile::tempdir().unwrap();
    let dir = signed_hello(plugins.path(), &alice);
    let manifest = std::fs::read_to_string(dir.join("plugin.json")).unwrap();
    std::fs::write(dir.join("plugin.json"), manifest.replace("1.0.0", "1.0.1")).unwrap();
    let err = load(plugins.path(), false).unwrap_err();
    assert!(
        err.contains("signature does not match: the manifest or the artifact changed after key"),
        "{err}"
    );

    // The library changed after signing (another sample under its name).
    let plugins = tempfile::tempdir().unwrap();
    let dir = signed_hello(plugins.path(), &alice);
    std::fs::copy(support::library("counter"), dir.join("libhello.so")).unwrap();
    let err = load(plugins.path(), false).unwrap_err();
    assert!(err.contains("signature does not match"), "{err}");

    // Signed, but by a key the host does not trust.
    let plugins = tempfile::tempdir().unwrap();
    signed_hello(plugins.path(), &mallory);
    let err = load(plugins.path(), false).unwrap_err();
    assert!(
        err.contains(&format!(
            "signed by key {} (`mallory`), which is not among the trusted keys",
            mallory.public().fingerprint()
        )),
        "{err}"
    );

    // A signed package: the signature travels inside it.
    let plugins = tempfile::tempdir().unwrap();
    let work = tempfile::tempdir().unwrap();
    let package = hello_package(work.path(), "1.0.0");
    dynplug::signing::sign_package(&package, &alice).unwrap();
    drop_in(&package, plugins.path());
    load(plugins.path(), true).expect("a signed package loads");
    let manager = trusting(plugins.path(), &[&alice], true);
    manager.load_plugins().unwrap();
    assert_eq!(greet(&manager).unwrap(), "hello, Ada");
    let _ = Duration::ZERO;
}

#[test]
fn a_package_seen_half_written_is_listed_by_file_then_loads_by_name() {
    let plugins = tempfile::tempdir().unwrap();
    let packages = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(hello_package(packages.path(), "1.0.0")).unwrap();
    let path = plugins.path().join("hello-1.0.0.plg");
    // Copied in place rather than renamed in: the first look sees 20 bytes.
    std::fs::write(&path, &bytes[..20]).unwrap();
    let manager = PluginManager::new(plugins.path()).unwrap();
    let report = manager.load_plugins().unwrap();
    assert_eq!(report.failed.len(), 1);
    assert_eq!(report.failed[0].0, "hello-1.0.0.plg");
    let watcher = manager.watch().unwrap();
    std::fs::write(&path, &bytes).unwrap();
    assert!(watcher.wait_settled(support::PATIENCE));
    let names: Vec<String> = manager.list().into_iter().map(|i| i.name).collect();
    assert_eq!(names, ["hello"]);
    assert_eq!(greet(&manager).unwrap(), "hello, Ada");
}
