use std::io::Write;

use super::unpack::{Limits, unpack};

const LIMITS: Limits = Limits {
    max_entries: 8,
    max_bytes: 1 << 20,
};

/// A raw tar header: name, type and size as given, no checks.
fn header(name: &[u8], kind: tar::EntryType, size: u64, link: &[u8]) -> tar::Header {
    let mut header = tar::Header::new_old();
    header.as_old_mut().name[..name.len()].copy_from_slice(name);
    header.as_old_mut().linkname[..link.len()].copy_from_slice(link);
    header.set_entry_type(kind);
    header.set_size(size);
    header.set_mode(0o644);
    header.set_cksum();
    header
}

fn archive(entries: &[(&[u8], tar::EntryType, &[u8])]) -> Vec<u8> {
    let mut tar = tar::Builder::new(Vec::new());
    for (name, kind, data) in entries {
        let size = if *kind == tar::EntryType::Regular {
            data.len() as u64
        } else {
            0
        };
        let link: &[u8] = if *kind == tar::EntryType::Regular {
            b""
        } else {
            data
        };
        let contents: &[u8] = if *kind == tar::EntryType::Regular {
            data
        } else {
            b""
        };
        tar.append(&header(name, *kind, size, link), contents)
            .unwrap();
    }
    gzip(&tar.into_inner().unwrap())
}

fn many_files(n: usize) -> Vec<u8> {
    let names: Vec<Vec<u8>> = (0..n).map(|i| format!("f{i}").into_bytes()).collect();
    let entries: Vec<(&[u8], tar::EntryType, &[u8])> = names
        .iter()
        .map(|name| (&name[..], tar::EntryType::Regular, &b""[..]))
        .collect();
    archive(&entries)
}

fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    gz.write_all(bytes).unwrap();
    gz.finish().unwrap()
}

fn refused(bytes: &[u8]) -> String {
    let dest = tempfile::tempdir().unwrap();
    unpack(bytes, dest.path(), LIMITS).unwrap_err()
}

use tar::EntryType::{Block, Char, Directory, Fifo, Link, Regular, Symlink};

#[test]
fn a_plain_package_unpacks() {
    let dest = tempfile::tempdir().unwrap();
    let bytes = archive(&[
        (b"./", Directory, b""),
        (b"./plugin.json", Regular, b"{}"),
        (b"lib/libx.so", Regular, b"elf"),
    ]);
    unpack(&bytes[..], dest.path(), LIMITS).unwrap();
    assert_eq!(
        std::fs::read(dest.path().join("lib/libx.so")).unwrap(),
        b"elf"
    );
}

#[test]
fn every_hostile_archive_is_refused_with_its_reason() {
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (
            archive(&[(b"/etc/x", Regular, b"x")]),
            "entry 1 `/etc/x`: an absolute path",
        ),
        (
            archive(&[(b"a/../../x", Regular, b"x")]),
            "entry 1 `a/../../x`: a path with `..`",
        ),
        (
            archive(&[(b"ok", Regular, b""), (b"l", Symlink, b"/etc/passwd")]),
            "entry 2 `l`: a symbolic link: only regular files and directories",
        ),
        (archive(&[(b"h", Link, b"/etc/passwd")]), "a hard link"),
        (archive(&[(b"d", Char, b"")]), "a device"),
        (archive(&[(b"d", Block, b"")]), "a device"),
        (archive(&[(b"f", Fifo, b"")]), "a FIFO"),
        (
            archive(&[
                (b"plugin.json", Regular, b"{}"),
                (b"./plugin.json", Regular, b"{}"),
            ]),
            "entry 2 `./plugin.json`: appears twice",
        ),
        (many_files(9), "more than 8 entries"),
        (b"not gzip at all".to_vec(), "not a gzipped tar"),
    ];
    for (bytes, want) in cases {
        let err = refused(&bytes);
        assert!(err.contains(want), "{want}: {err}");
    }
}

#[test]
fn a_gzip_bomb_stops_at_the_cap() {
    // 64 MiB of zeros in one entry: ~64 KiB compressed, 64 times the cap.
    let size = 64u64 << 20;
    let mut raw = Vec::new();
    {
        let mut tar = tar::Builder::new(&mut raw);
        tar.append(
            &header(b"zeros", Regular, size, b""),
            std::io::repeat(0).take_limited(size),
        )
        .unwrap();
    }
    let bytes = gzip(&raw);
    assert!(bytes.len() < 1 << 20, "{}", bytes.len());
    let err = refused(&bytes);
    assert!(err.contains("unpacks to more than 1048576 bytes"), "{err}");
}

trait TakeLimited: std::io::Read + Sized {
    fn take_limited(self, n: u64) -> std::io::Take<Self> {
        std::io::Read::take(self, n)
    }
}
impl<R: std::io::Read> TakeLimited for R {}

#[test]
fn package_names_are_recognised() {
    assert!(super::is_package_name("hello-1.0.0.plg"));
    assert!(!super::is_package_name(".hello-1.0.0.plg"));
    assert!(!super::is_package_name(".plg"));
    assert!(!super::is_package_name("hello"));
    assert!(!super::is_package_name("helloplg"));
}
