//! Failure fixture: a plugin built against an incompatible `plugin-abi`.
//!
//! It exports a root with the frozen header shape (magic, versions, layout)
//! but claims ABI 0 / plugin-abi 0.0.9 and an entry table of another layout,
//! as a plugin compiled against an old `plugin-abi` would.
//!
//! It also has a constructor, which `dlopen` would run before any symbol can
//! be looked up: with `DYNPLUG_FIXTURE_MARKER` set it writes that file, with
//! `DYNPLUG_FIXTURE_ABORT` set it aborts the process. The host must refuse
//! the library from its bytes, so neither ever happens.
#![allow(unsafe_code)]

use abi_stable::StableAbi;
use abi_stable::type_layout::TypeLayout;

/// The entry table of the imaginary old ABI.
#[repr(C)]
#[derive(StableAbi)]
pub struct OldVtable {
    /// An entry with another signature than today's.
    pub execute: extern "C" fn(input: *const u8, len: usize) -> i32,
}

/// The frozen header shape.
#[repr(C)]
pub struct Header {
    magic: [u8; 8],
    abi_major: u32,
    abi_minor: u32,
    version_ptr: *const u8,
    version_len: usize,
    layout: &'static TypeLayout,
    vtable: &'static OldVtable,
}

// SAFETY: immutable 'static data only.
unsafe impl Sync for Header {}

extern "C" fn execute(_input: *const u8, _len: usize) -> i32 {
    0
}

static VTABLE: OldVtable = OldVtable { execute };
const VERSION: &str = "0.0.9";

/// The root the host reads.
#[unsafe(no_mangle)]
pub static DYNPLUG_PLUGIN_ROOT: Header = Header {
    magic: *b"DYNPLUG\0",
    abi_major: 0,
    abi_minor: 9,
    version_ptr: VERSION.as_ptr(),
    version_len: VERSION.len(),
    layout: <OldVtable as StableAbi>::LAYOUT,
    vtable: &VTABLE,
};

extern "C" fn constructor() {
    if let Some(path) = std::env::var_os("DYNPLUG_FIXTURE_MARKER") {
        let _ = std::fs::write(path, b"the constructor ran");
    }
    if std::env::var_os("DYNPLUG_FIXTURE_ABORT").is_some() {
        std::process::abort();
    }
}

/// Run by the dynamic loader when the library is loaded.
#[used]
#[cfg_attr(target_os = "linux", unsafe(link_section = ".init_array"))]
#[cfg_attr(target_os = "macos", unsafe(link_section = "__DATA,__mod_init_func"))]
static CONSTRUCTOR: extern "C" fn() = constructor;
