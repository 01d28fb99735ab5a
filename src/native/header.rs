//! The checks made on a library's bytes before `dlopen`.
//!
//! `dlopen` runs a library's constructors before any symbol can be looked up,
//! so everything that can be decided from the file is decided here, on the
//! exact bytes that will be loaded: the object format and architecture, that
//! every loadable segment lies inside the file, that the root symbol exists
//! and is a data object of the header's size, and the header's magic bytes,
//! ABI version and `plugin-abi` version string. A non-plugin or a plugin
//! built against another ABI is refused without running any of its code.
//!
//! Nothing read here is trusted as a pointer: offsets are checked against the
//! file, and the version string's length is bounded before it is read.

use std::mem::{offset_of, size_of};

use object::{
    Object, ObjectSegment, ObjectSymbol, ObjectSymbolTable, RelocationTarget, SymbolKind,
};
use plugin_abi::ffi::{self, PluginHeader};

/// The longest `plugin-abi` version string accepted in a header.
pub(crate) const MAX_VERSION_LEN: usize = 64;

/// What the file's header says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct HeaderInfo {
    pub(crate) abi_major: u32,
    pub(crate) abi_minor: u32,
    /// `None` where the object format stores the pointer in a form we do not
    /// decode (Mach-O chained fixups); it is then read, bounded, after `dlopen`.
    pub(crate) crate_version: Option<String>,
    pub(crate) version_len: usize,
}

impl HeaderInfo {
    /// `plugin-abi 0.1.0 (ABI 1.0)`, as errors print it.
    pub(crate) fn describe(&self) -> String {
        format!(
            "plugin-abi {} (ABI {}.{})",
            self.crate_version.as_deref().unwrap_or("?"),
            self.abi_major,
            self.abi_minor
        )
    }

    /// Whether a host of this `plugin-abi` may use the plugin (its layout is
    /// checked after `dlopen`).
    // Written as the rule, whatever ABI_MINOR is today (0 makes `<=` look odd).
    #[allow(clippy::absurd_extreme_comparisons)]
    pub(crate) fn is_compatible(&self) -> bool {
        self.abi_major == ffi::ABI_MAJOR && self.abi_minor <= ffi::ABI_MINOR
    }
}

/// Why the bytes were refused.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// Not a complete shared library for this platform.
    NotALibrary(String),
    /// No root symbol: not a dynplug plugin.
    MissingRoot,
    /// A root that is not a well-formed header (also: wrong magic bytes).
    BadRoot(String),
    /// A well-formed header of an incompatible ABI.
    Abi(HeaderInfo),
}

/// Checks `bytes` as a plugin library for this host.
pub(crate) fn inspect(bytes: &[u8]) -> Result<HeaderInfo, Refusal> {
    let file = object::File::parse(bytes)
        .map_err(|e| Refusal::NotALibrary(format!("{e} (truncated or not a library?)")))?;
    if file.kind() != object::ObjectKind::Dynamic {
        return Err(Refusal::NotALibrary(format!(
            "expected a shared library, found a {:?} object",
            file.kind()
        )));
    }
    check_target(&file)?;
    check_segments(&file, bytes.len())?;
    let (address, size) = root_symbol(&file)?;
    if size != 0 && size != size_of::<PluginHeader>() as u64 {
        return Err(bad_root(&format!(
            "the root symbol is {size} bytes, a dynplug header is {}",
            size_of::<PluginHeader>()
        )));
    }
    let image = Image { file: &file, bytes };
    let header = image
        .read(address, size_of::<PluginHeader>())
        .ok_or_else(|| bad_root("the root symbol's bytes are not in the file"))?;
    if header[..ffi::MAGIC.len()] != ffi::MAGIC {
        return Err(bad_root("unknown root format (bad magic bytes)"));
    }
    let u32_at = |offset: usize| {
        let mut raw = [0u8; 4];
        raw.copy_from_slice(&header[offset..offset + 4]);
        u32::from_ne_bytes(raw)
    };
    let version_at = offset_of!(PluginHeader, crate_version);
    let word = size_of::<usize>();
    let version_len = read_word(&header[version_at + word..version_at + 2 * word]);
    let mut info = HeaderInfo {
        abi_major: u32_at(offset_of!(PluginHeader, abi_major)),
        abi_minor: u32_at(offset_of!(PluginHeader, abi_minor)),
        crate_version: None,
        version_len: usize::try_from(version_len).unwrap_or(usize::MAX),
    };
    if info.version_len > MAX_VERSION_LEN {
        return Err(bad_root(&format!(
            "the plugin-abi version string claims {version_len} bytes (at most {MAX_VERSION_LEN})"
        )));
    }
    if let Some(target) = image.pointer_at(address + version_at as u64) {
        let text = image
            .read(target, info.version_len)
            .ok_or_else(|| bad_root("the plugin-abi version string is not in the file"))?;
        let text = std::str::from_utf8(text)
            .map_err(|_| bad_root("the plugin-abi version string is not UTF-8"))?;
        if !text.chars().all(|c| c.is_ascii_graphic()) {
            return Err(bad_root("the plugin-abi version string is not printable"));
        }
        info.crate_version = Some(text.to_owned());
    }
    for (field, offset) in [
        ("layout", offset_of!(PluginHeader, layout)),
        ("vtable", offset_of!(PluginHeader, vtable)),
    ] {
        if image.pointer_at(address + offset as u64) == Some(0) {
            return Err(bad_root(&format!("the header's {field} pointer is null")));
        }
    }
    if !info.is_compatible() {
        return Err(Refusal::Abi(info));
    }
    Ok(info)
}

fn bad_root(message: &str) -> Refusal {
    Refusal::BadRoot(message.to_owned())
}

fn read_word(raw: &[u8]) -> u64 {
    match raw.len() {
        4 => u64::from(u32::from_ne_bytes(raw.try_into().unwrap_or_default())),
        _ => u64::from_ne_bytes(raw.try_into().unwrap_or_default()),
    }
}

/// The object format's name for this host's architecture.
pub(crate) fn host_architecture() -> Option<object::Architecture> {
    use object::Architecture as A;
    let arch = match std::env::consts::ARCH {
        "x86_64" => A::X86_64,
        "aarch64" => A::Aarch64,
        "x86" => A::I386,
        "arm" => A::Arm,
        "riscv64" => A::Riscv64,
        "powerpc64" => A::PowerPc64,
        "s390x" => A::S390x,
        "loongarch64" => A::LoongArch64,
        _ => return None,
    };
    Some(arch)
}

/// The library must be for this machine: `dlopen` of another architecture
/// fails with a misleading message ("No such file or directory" was seen).
fn check_target(file: &object::File<'_>) -> Result<(), Refusal> {
    let found = file.architecture();
    if let Some(host) = host_architecture()
        && found != host
    {
        return Err(Refusal::NotALibrary(format!(
            "built for {found:?}, but this host is {host:?}"
        )));
    }
    let host_64 = size_of::<usize>() == 8;
    if file.is_64() != host_64 || file.is_little_endian() != cfg!(target_endian = "little") {
        return Err(Refusal::NotALibrary(format!(
            "a {}-bit {}-endian library, but this host is {}-bit {}-endian",
            if file.is_64() { 64 } else { 32 },
            if file.is_little_endian() {
                "little"
            } else {
                "big"
            },
            if host_64 { 64 } else { 32 },
            if cfg!(target_endian = "little") {
                "little"
            } else {
                "big"
            },
        )));
    }
    Ok(())
}

/// Measured: glibc maps a truncated library whose headers are intact, then
/// the process dies of SIGBUS while relocating pages past the end of the
/// file. Every loadable segment must lie inside the file.
fn check_segments(file: &object::File<'_>, len: usize) -> Result<(), Refusal> {
    for segment in file.segments() {
        let (offset, size) = segment.file_range();
        let end = offset.saturating_add(size);
        if end > len as u64 {
            return Err(Refusal::NotALibrary(format!(
                "a segment spans bytes {offset}..{end} but the file has {len} bytes (truncated?)"
            )));
        }
    }
    Ok(())
}

/// The root symbol's address and size (0 where the format records none).
/// It must be a defined data object: a function, and above all an ELF
/// `IFUNC`, would make the symbol lookup itself run plugin code.
fn root_symbol(file: &object::File<'_>) -> Result<(u64, u64), Refusal> {
    let name = ffi::ROOT_SYMBOL;
    let matches = |symbol: &object::Symbol<'_, '_>| {
        symbol
            .name_bytes()
            .is_ok_and(|n| n == name.as_bytes() || n.strip_prefix(b"_") == Some(name.as_bytes()))
    };
    let symbol = file
        .dynamic_symbols()
        .find(|s| matches(s) && !s.is_undefined())
        .or_else(|| file.symbols().find(|s| matches(s) && !s.is_undefined()))
        .ok_or(Refusal::MissingRoot)?;
    if symbol.kind() != SymbolKind::Data {
        return Err(bad_root(&format!(
            "the root symbol is not a data object (a {:?} symbol)",
            symbol.kind()
        )));
    }
    if symbol.section_index().is_none() {
        return Err(bad_root(
            "the root symbol is in no section (an absolute or common symbol)",
        ));
    }
    Ok((symbol.address(), symbol.size()))
}

/// The library's bytes, addressed by virtual address.
struct Image<'a, 'data> {
    file: &'a object::File<'data>,
    bytes: &'data [u8],
}

impl<'data> Image<'_, 'data> {
    /// `len` bytes at virtual address `address`, if the file holds them all.
    fn read(&self, address: u64, len: usize) -> Option<&'data [u8]> {
        let end = address.checked_add(len as u64)?;
        self.file.segments().find_map(|segment| {
            let (offset, file_size) = segment.file_range();
            let start = segment.address();
            (address >= start && end <= start.checked_add(file_size)?).then(|| {
                let from = usize::try_from(offset + (address - start)).ok()?;
                self.bytes.get(from..from.checked_add(len)?)
            })?
        })
    }

    /// The address a pointer-sized field at `address` holds once relocated,
    /// relative to the library's load address. `None` when the format's
    /// encoding is not decoded here (the header is then checked after `dlopen`).
    fn pointer_at(&self, address: u64) -> Option<u64> {
        let word = size_of::<usize>();
        let in_place = read_word(self.read(address, word)?);
        if self.file.format() != object::BinaryFormat::Elf {
            return None;
        }
        if let Some(relocations) = self.file.dynamic_relocations() {
            for (offset, relocation) in relocations {
                if offset != address {
                    continue;
                }
                let addend = if relocation.has_implicit_addend() {
                    in_place
                } else {
                    relocation.addend() as u64
                };
                return match relocation.target() {
                    // `R_*_RELATIVE`: load address + addend.
                    RelocationTarget::Absolute => Some(addend),
                    RelocationTarget::Symbol(index) => {
                        let table = self.file.dynamic_symbol_table()?;
                        let symbol = table.symbol_by_index(index).ok()?;
                        Some(symbol.address().wrapping_add(addend))
                    }
                    _ => None,
                };
            }
        }
        // No REL/RELA entry: RELR-packed relative relocations keep the
        // target in place, and so does a field with no relocation at all.
        Some(in_place)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_and_empty_files_are_not_libraries() {
        assert!(matches!(inspect(b""), Err(Refusal::NotALibrary(_))));
        assert!(matches!(
            inspect(b"\x7fELF garbage"),
            Err(Refusal::NotALibrary(_))
        ));
    }

    #[test]
    fn the_test_binary_itself_is_not_a_plugin() {
        // An executable (or PIE) with no root symbol: refused before dlopen.
        let me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        assert!(
            matches!(
                inspect(&me),
                Err(Refusal::MissingRoot | Refusal::NotALibrary(_))
            ),
            "{:?}",
            inspect(&me)
        );
    }
}

#[cfg(test)]
mod properties {
    use proptest::prelude::*;

    use super::*;

    fn seed() -> &'static [u8] {
        // An ELF with dynamic symbols, relocations and segments (a PIE is a
        // dynamic object): mutations of it reach deep into the parser.
        static SEED: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
        SEED.get_or_init(|| std::fs::read(std::env::current_exe().unwrap()).unwrap())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Whatever the bytes, `inspect` answers without panicking.
        #[test]
        fn inspect_never_panics_on_mutated_libraries(
            edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..64),
            cut in any::<prop::sample::Index>(),
        ) {
            let mut bytes = seed().to_vec();
            for (at, byte) in edits {
                let at = at.index(bytes.len());
                bytes[at] = byte;
            }
            // Also mutated headers of a shorter file.
            let _ = inspect(&bytes);
            let len = cut.index(bytes.len());
            let _ = inspect(&bytes[..len]);
        }

        #[test]
        fn inspect_never_panics_on_noise(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
            let _ = inspect(&bytes);
        }
    }
}
