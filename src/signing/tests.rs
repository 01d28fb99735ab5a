use super::*;

fn plugin_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("plugin.json"),
        r#"{"name":"p","version":"1.0.0","source":{"mode":"local_so","path":"libp.so"}}"#,
    )
    .unwrap();
    std::fs::write(dir.path().join("libp.so"), b"library bytes").unwrap();
    dir
}

fn seal_and_digest(dir: &Path) -> (Seal, String) {
    let manifest = std::fs::read(dir.join("plugin.json")).unwrap();
    let library = std::fs::read(dir.join("libp.so")).unwrap();
    (
        Seal::read(dir, &manifest),
        crate::digest::sha256_hex(&library),
    )
}

#[test]
fn signed_tampered_unsigned_and_unknown_keys() {
    let alice = SecretKey::generate("alice").unwrap();
    let mallory = SecretKey::generate("mallory").unwrap();
    let trust = Trust::new(vec![alice.public()], true, "keys/".into());
    let dir = plugin_dir();

    let (seal, digest) = seal_and_digest(dir.path());
    let err = trust
        .check("p", &seal, Some(&digest))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("not signed, and this host requires signatures"),
        "{err}"
    );

    sign_dir(dir.path(), &alice).unwrap();
    let (seal, digest) = seal_and_digest(dir.path());
    let signer = trust.check("p", &seal, Some(&digest)).unwrap().unwrap();
    assert_eq!((signer.name.as_str(), signer.trusted), ("alice", true));
    assert_eq!(signer.fingerprint, alice.public().fingerprint());

    // The library changed after signing: its digest is not the signed one.
    let err = trust
        .check("p", &seal, Some(&crate::digest::sha256_hex(b"other")))
        .unwrap_err();
    assert!(err.to_string().contains("does not match"), "{err}");
    // The manifest changed after signing.
    std::fs::write(
        dir.path().join("plugin.json"),
        r#"{"name":"p","version":"1.0.1","source":{"mode":"local_so","path":"libp.so"}}"#,
    )
    .unwrap();
    let (seal, digest) = seal_and_digest(dir.path());
    let err = trust.check("p", &seal, Some(&digest)).unwrap_err();
    assert!(err.to_string().contains("does not match"), "{err}");

    sign_dir(dir.path(), &mallory).unwrap();
    let (seal, digest) = seal_and_digest(dir.path());
    let err = trust
        .check("p", &seal, Some(&digest))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(&format!(
            "signed by key {} (`mallory`), which is not among the trusted keys (keys/)",
            mallory.public().fingerprint()
        )),
        "{err}"
    );
    let signer = signer_of(dir.path(), &[]).unwrap().unwrap();
    assert_eq!((signer.name.as_str(), signer.trusted), ("mallory", false));
}

#[test]
fn keys_round_trip_through_their_files() {
    let dir = tempfile::tempdir().unwrap();
    let key = SecretKey::generate("ci release").unwrap();
    let path = dir.path().join("release.key");
    key.save(&path).unwrap();
    assert!(key.save(&path).is_err(), "never overwrites a key");
    let loaded = SecretKey::load(&path).unwrap();
    assert_eq!(loaded.public(), key.public());
    assert_eq!(loaded.public().name(), "ci-release");
    let public = PublicKey::load_all(dir.path()).unwrap();
    assert_eq!(public, vec![key.public()]);
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
    std::fs::write(dir.path().join("bad.pub"), "dynplug-ed25519-public zz x\n").unwrap();
    let err = PublicKey::load_all(dir.path()).unwrap_err().to_string();
    assert!(err.contains("bad.pub:1"), "{err}");
}
