//! The one place in `dynplug` with `unsafe`: opening a plugin library,
//! checking its ABI, calling its entries, and the host callbacks it calls back.
//!
//! [`Library`] is the safe handle: it owns the `dlopen` handle and the entry
//! table read from it, and the table can only be used through `&Library`, so
//! no entry can be called after the library is closed. `interpose` holds
//! dynplug's definitions of the C functions plugin code registers
//! per-thread state with; `mapped` maps a sealed image read-only, so its
//! bytes are checked where `dlopen` will map them.
#![allow(unsafe_code)]

pub(crate) mod interpose;
mod loaded;
#[cfg(target_os = "linux")]
mod mapped;

use std::ffi::CString;
use std::path::Path;
use std::ptr::NonNull;
use std::time::Instant;

use plugin_abi::ffi::{
    self, ErrorSink, FfiContext, HostVtable, Opaque, PluginHeader, PluginVtable, RawStr, ValueView,
    VisitFn, status,
};

use super::header::{HeaderInfo, MAX_VERSION_LEN};
use super::pins::{self, LibId};
use crate::version::Outcome;
use crate::{Context, Value};

#[cfg(target_os = "linux")]
pub(crate) use mapped::Mapped;

/// Why a library was refused after `dlopen`; turned into [`crate::Error`]
/// by the caller, who knows the plugin's name and drop path.
#[derive(Debug)]
pub(crate) enum OpenError {
    /// `dlopen`'s own message (`dlerror`).
    Dlopen(String),
    MissingRoot,
    Abi {
        found: String,
        expected: String,
    },
}

/// `PluginHeader` as raw bits: the same `repr(C)` layout with raw pointers
/// instead of references, so reading a hostile header (null, dangling) is
/// never undefined behaviour.
#[repr(C)]
#[derive(Clone, Copy)]
struct RawHeader {
    magic: [u8; 8],
    abi_major: u32,
    abi_minor: u32,
    version_ptr: *const u8,
    version_len: usize,
    layout: *const abi_stable::type_layout::TypeLayout,
    vtable: *const PluginVtable,
}

const _: () = assert!(
    std::mem::size_of::<RawHeader>() == std::mem::size_of::<PluginHeader>()
        && std::mem::align_of::<RawHeader>() == std::mem::align_of::<PluginHeader>()
        && std::mem::offset_of!(RawHeader, version_ptr)
            == std::mem::offset_of!(PluginHeader, crate_version)
        && std::mem::offset_of!(RawHeader, layout) == std::mem::offset_of!(PluginHeader, layout)
        && std::mem::offset_of!(RawHeader, vtable) == std::mem::offset_of!(PluginHeader, vtable)
);

/// An open plugin library and its checked entry table.
pub(crate) struct Library {
    // Dropped (dlclose) only by `close`, or never when `retain` is set.
    handle: Option<libloading::Library>,
    vtable: NonNull<PluginVtable>,
    /// The name the loader knows it by (what `dlopen` was given).
    name: CString,
    /// An address inside it (its root symbol), to ask the loader about it.
    anchor: Option<usize>,
    /// Its entry in `pins`, when this process tracks plugin threads.
    lib: Option<LibId>,
}

/// A library refused after `dlopen`, and whether it stayed mapped when
/// closed (a library marked `NODELETE` does).
#[derive(Debug)]
pub(crate) struct Refused {
    pub(crate) error: OpenError,
    pub(crate) still_mapped: bool,
}

/// How `dlclose` went.
#[derive(Debug)]
pub(crate) struct Closed {
    /// `dlclose`'s own error.
    pub(crate) error: Option<String>,
    /// Whether the loader still has the library (nothing unmapped).
    pub(crate) still_mapped: bool,
}

// SAFETY: the entry table is immutable static data of the library, which
// stays loaded as long as `Library` lives; plugin entries are plain
// `extern "C" fn`s over `Sync` Rust statics (export_plugin! only accepts safe
// Rust `fn`s), so calling them from several threads is sound.
unsafe impl Send for Library {}
// SAFETY: as above; `&Library` only reads the table.
unsafe impl Sync for Library {}

pub(crate) fn expected_abi() -> String {
    format!(
        "plugin-abi {} (ABI {}.{})",
        ffi::CRATE_VERSION,
        ffi::ABI_MAJOR,
        ffi::ABI_MINOR
    )
}

impl Library {
    /// `dlopen`s `path` with `RTLD_NOW | RTLD_LOCAL` and checks its root
    /// against `checked`, what `header::inspect` read from the same bytes.
    pub(crate) fn open(path: &Path, checked: &HeaderInfo) -> Result<Library, Refused> {
        use libloading::os::unix::{Library as Unix, RTLD_LOCAL, RTLD_NOW};
        use std::os::unix::ffi::OsStrExt;
        let refused = |error| Refused {
            error,
            still_mapped: false,
        };
        let name = CString::new(path.as_os_str().as_bytes())
            .map_err(|_| refused(OpenError::Dlopen("a path with a NUL byte".into())))?;
        // Loading a library runs its initialisers. `header::inspect` has
        // checked, on the exact bytes at `path` (a sealed memfd or a private
        // read-only copy), that this is a shared library for this machine
        // exporting a dynplug header of a compatible ABI, so the code run
        // here is that of a plugin built with plugin-abi, which the operator
        // vouched for by dropping it in the plugins directory (and
        // optionally by its sha256 in the manifest).
        // SAFETY: the initialisers run are those of a checked plugin, above.
        let raw = unsafe { Unix::open(Some(path), RTLD_NOW | RTLD_LOCAL) }
            .map_err(|e| refused(OpenError::Dlopen(dlopen_message(&e, path))))?
            .into_raw();
        // SAFETY: the handle `dlopen` just returned, owned from here on.
        let lib = libloading::Library::from(unsafe { Unix::from_raw(raw) });
        let anchor = root_symbol(&lib).map(|root| root as usize);
        let lookup = loaded::Lookup {
            name: &name,
            anchor,
        };
        let registered = if pins::tracking() {
            lookup.span(raw).map(pins::register)
        } else {
            None
        };
        match Self::check_root(&lib, checked) {
            Ok(vtable) => Ok(Library {
                handle: Some(lib),
                vtable,
                name,
                anchor,
                lib: registered,
            }),
            Err(error) => {
                if let Some(registered) = registered {
                    pins::unregister(registered);
                }
                let _ = lib.close();
                Err(Refused {
                    error,
                    still_mapped: lookup.is_loaded(),
                })
            }
        }
    }

    fn check_root(
        lib: &libloading::Library,
        checked: &HeaderInfo,
    ) -> Result<NonNull<PluginVtable>, OpenError> {
        let abi = |found: String| OpenError::Abi {
            found,
            expected: expected_abi(),
        };
        let root = root_symbol(lib).ok_or(OpenError::MissingRoot)?;
        // `inspect` checked that the symbol is a data object of the header's
        // size inside the library's loaded segments. `RawHeader` has no
        // invalid bit patterns, so a hostile header is read without
        // undefined behaviour, whatever it holds.
        // SAFETY: non-null, in bounds and of a type valid for any bits.
        let header = unsafe { root.read_unaligned() };
        // The loaded bytes are the inspected bytes; anything else means the
        // symbol resolved somewhere unexpected.
        let len = header.version_len;
        if header.magic != ffi::MAGIC
            || header.abi_major != checked.abi_major
            || header.abi_minor != checked.abi_minor
            || len != checked.version_len
            || len > MAX_VERSION_LEN
            || header.version_ptr.is_null()
        {
            return Err(abi("a root that differs from the file's header".into()));
        }
        // SAFETY: a non-null pointer of at most MAX_VERSION_LEN bytes into the
        // loaded library (checked against the file's segments by `inspect`
        // where the format allows).
        let bytes = unsafe { std::slice::from_raw_parts(header.version_ptr, len) };
        let Ok(version) = std::str::from_utf8(bytes) else {
            return Err(abi("a root whose plugin-abi version is not UTF-8".into()));
        };
        if checked
            .crate_version
            .as_deref()
            .is_some_and(|v| v != version)
        {
            return Err(abi("a root that differs from the file's header".into()));
        }
        let found = format!(
            "plugin-abi {version} (ABI {}.{})",
            header.abi_major, header.abi_minor
        );
        if header.layout.is_null() || header.vtable.is_null() {
            return Err(abi(format!("{found} with a null layout or entry table")));
        }
        // SAFETY: non-null pointers to statics of the loaded library, as the
        // header of a compatible ABI says.
        let layout = unsafe { &*header.layout };
        if let Err(detail) = ffi::check_layout(layout) {
            return Err(abi(format!(
                "{found} with another entry table layout ({detail})"
            )));
        }
        NonNull::new(header.vtable.cast_mut()).ok_or_else(|| abi(found))
    }

    fn vtable(&self) -> &PluginVtable {
        // SAFETY: the table is static data of the library, loaded while `self` lives.
        unsafe { self.vtable.as_ref() }
    }

    /// Calls `execute` with `ctx`; values the plugin sets are copied into `ctx`.
    pub(crate) fn execute(&self, ctx: &mut Context) -> Outcome {
        let _running = self.lib.map(pins::entering);
        let mut call = Call { ctx, error: None };
        let mut raw = FfiContext {
            data: (&mut call as *mut Call<'_>).cast(),
            host: &HOST_VTABLE,
        };
        // SAFETY: `execute` is the entry of this loaded, checked library; `raw`
        // is a valid context for the call, exclusively the plugin's until it
        // returns (its `data` points at `call`, alive on this stack frame).
        let code = unsafe { (self.vtable().execute)(&mut raw) };
        outcome(code, call.error)
    }

    /// Whether the plugin exports `init`.
    pub(crate) fn has_init(&self) -> bool {
        self.vtable().init.is_some()
    }

    /// Whether the plugin exports `shutdown`.
    pub(crate) fn has_shutdown(&self) -> bool {
        self.vtable().shutdown.is_some()
    }

    /// Calls `init` (if exported) with `config`.
    pub(crate) fn init(&self, config: &Value) -> Outcome {
        let Some(init) = self.vtable().init else {
            return Outcome::Ok;
        };
        let _running = self.lib.map(pins::entering);
        let mut error = None;
        // SAFETY: the entry of this loaded, checked library; the config view
        // and the sink are valid until it returns.
        let code = unsafe { init(ValueView::of(config), error_sink(&mut error)) };
        outcome(code, error)
    }

    /// Calls `shutdown` (if exported).
    pub(crate) fn shutdown(&self) -> Outcome {
        let Some(shutdown) = self.vtable().shutdown else {
            return Outcome::Ok;
        };
        let _running = self.lib.map(pins::entering);
        let mut error = None;
        // SAFETY: the entry of this loaded, checked library; the sink is
        // valid until it returns.
        let code = unsafe { shutdown(error_sink(&mut error)) };
        outcome(code, error)
    }

    /// Its entry in `pins`, when this process tracks plugin threads.
    pub(crate) fn lib(&self) -> Option<LibId> {
        self.lib
    }

    /// Deletes `keys` (created by its code, held by no thread), `dlclose`s
    /// the library, and asks the loader whether it still has it. Nothing of
    /// it may be referenced afterwards, which `self` by value and the
    /// absence of plugin-made data in the host ensure.
    pub(crate) fn close(mut self, keys: super::pins::Keys) -> Closed {
        for key in keys.own {
            interpose::delete_key(key);
        }
        let error = self
            .handle
            .take()
            .map_or(Ok(()), libloading::Library::close)
            .err()
            .map(|e| e.to_string());
        for (key, dtor) in keys.foreign {
            if !interpose::is_mapped(dtor.addr()) {
                interpose::delete_key(key);
            }
        }
        let lookup = loaded::Lookup {
            name: &self.name,
            anchor: self.anchor,
        };
        Closed {
            error,
            still_mapped: lookup.is_loaded(),
        }
    }

    /// Keeps the library mapped for the life of the process (inline plugins,
    /// whose code may still be on a caller's stack or pinned by its thread-locals).
    pub(crate) fn retain(mut self) {
        std::mem::forget(self.handle.take());
    }
}

impl Drop for Library {
    fn drop(&mut self) {
        // Reached only on error paths before any call; a version in service is
        // always ended through `close` or `retain`.
        if let Some(handle) = self.handle.take() {
            if let Some(lib) = self.lib {
                pins::unregister(lib);
            }
            let _ = handle.close();
        }
    }
}

/// The address of the library's root symbol, if it exports one.
fn root_symbol(lib: &libloading::Library) -> Option<*const RawHeader> {
    let symbol = format!("{}\0", ffi::ROOT_SYMBOL);
    // SAFETY: we only take the symbol's address here (`inspect` checked it
    // is a data object, not an IFUNC whose lookup would run code).
    let root = unsafe { lib.get::<*const PluginHeader>(symbol.as_bytes()) }.ok()?;
    let root = (*root).cast::<RawHeader>();
    (!root.is_null()).then_some(root)
}

/// `dlerror`'s text, with the memfd path (meaningless to the operator) left out.
fn dlopen_message(error: &libloading::Error, path: &Path) -> String {
    // libloading's own Display says only "dlopen failed": the reason is
    // in the source.
    let text = match error {
        libloading::Error::DlOpen { source } => source.to_string(),
        other => other.to_string(),
    };
    let path = path.to_string_lossy();
    let text = text.strip_prefix(&*path).unwrap_or(&text);
    text.trim_start_matches(':').trim().to_owned()
}

fn outcome(code: u32, error: Option<String>) -> Outcome {
    match code {
        status::OK => Outcome::Ok,
        status::PANIC => Outcome::Panic(error.unwrap_or_default()),
        status::ERROR => Outcome::Error(error.unwrap_or_default()),
        other => Outcome::Error(format!("plugin returned unknown status {other}")),
    }
}

fn error_sink(slot: &mut Option<String>) -> ErrorSink {
    ErrorSink {
        data: (slot as *mut Option<String>).cast(),
        write: write_error,
    }
}

unsafe extern "C" fn write_error(data: *mut Opaque, message: RawStr) {
    // SAFETY: `data` is the `&mut Option<String>` of `error_sink`, alive for
    // the entry call; `message` is valid during this callback.
    unsafe { *data.cast::<Option<String>>() = Some(message.as_str().to_owned()) };
}

/// The host's data behind `FfiContext::data` during one `execute`.
struct Call<'a> {
    ctx: &'a mut Context,
    error: Option<String>,
}

/// # Safety
/// `data` must be the `Call` of the running `execute` (the plugin only gets
/// `FfiContext`s from `Library::execute`).
unsafe fn call<'a>(data: *const Opaque) -> &'a Call<'a> {
    // SAFETY: guaranteed by the caller.
    unsafe { &*data.cast::<Call<'a>>() }
}

/// # Safety
/// As [`call`], and no other reference to the `Call` may be live.
unsafe fn call_mut<'a>(data: *mut Opaque) -> &'a mut Call<'a> {
    // SAFETY: guaranteed by the caller.
    unsafe { &mut *data.cast::<Call<'a>>() }
}

static HOST_VTABLE: HostVtable = HostVtable {
    label: host_label,
    get: host_get,
    set: host_set,
    remove: host_remove,
    entries: host_entries,
    is_cancelled: host_is_cancelled,
    remaining_nanos: host_remaining_nanos,
    set_error: host_set_error,
};

// In the callbacks below, `data` comes from `Library::execute` for the call in
// progress, and the plugin (safe Rust behind plugin-abi) never calls them
// outside it: this is the "SAFETY: in call" of each block.

unsafe extern "C" fn host_label(data: *const Opaque) -> RawStr {
    // SAFETY: in call.
    RawStr::new(unsafe { call(data) }.ctx.label())
}

unsafe extern "C" fn host_get(data: *const Opaque, key: RawStr) -> ValueView {
    // SAFETY: in call; `key` is valid during this callback.
    let (call, key) = unsafe { (call(data), key.as_str()) };
    call.ctx
        .values
        .get(key)
        .map_or(ValueView::Absent, ValueView::of)
}

unsafe extern "C" fn host_set(data: *mut Opaque, key: RawStr, value: ValueView) {
    // SAFETY: in call; the plugin holds no borrow of the context while it
    // sets (plugin-abi's `set` takes `&mut Context`); key is valid now.
    let (call, key) = unsafe { (call_mut(data), key.as_str()) };
    if let ValueView::Str(text) = value {
        // SAFETY: the view is valid during this callback.
        call.ctx.set_str_from_plugin(key, unsafe { text.as_str() });
        return;
    }
    // SAFETY: the view is valid during this callback.
    call.ctx.set_from_plugin(key, unsafe { value.to_value() });
}

unsafe extern "C" fn host_remove(data: *mut Opaque, key: RawStr) -> bool {
    // SAFETY: in call, exclusive as in `host_set`; `key` is valid now.
    let (call, key) = unsafe { (call_mut(data), key.as_str()) };
    call.ctx.values.remove(key).is_some()
}

unsafe extern "C" fn host_entries(data: *const Opaque, visitor: *mut Opaque, f: VisitFn) {
    // SAFETY: in call.
    let call = unsafe { call(data) };
    for (k, v) in &call.ctx.values {
        // SAFETY: the plugin passed `f` and `visitor` for this walk; the
        // views are valid during the callback.
        unsafe { (f.func)(visitor, RawStr::new(k), ValueView::of(v)) };
    }
}

unsafe extern "C" fn host_is_cancelled(data: *const Opaque) -> bool {
    // SAFETY: in call.
    unsafe { call(data) }.ctx.is_cancelled()
}

unsafe extern "C" fn host_remaining_nanos(data: *const Opaque) -> i64 {
    // SAFETY: in call.
    match unsafe { call(data) }.ctx.deadline() {
        None => -1,
        Some(d) => d
            .saturating_duration_since(Instant::now())
            .as_nanos()
            .try_into()
            .unwrap_or(i64::MAX),
    }
}

unsafe extern "C" fn host_set_error(data: *mut Opaque, message: RawStr) {
    // SAFETY: in call, exclusive (the plugin reports after its function returned).
    let (call, message) = unsafe { (call_mut(data), message.as_str()) };
    call.error = Some(message.to_owned());
}

/// glibc's `PTHREAD_KEYS_MAX`.
pub(crate) const PTHREAD_KEYS_MAX: usize = 1024;

/// How many pthread keys the process uses, probed by creating one: glibc
/// hands out the lowest free key, so its index counts the keys below it.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub(crate) fn pthread_keys_in_use() -> Option<usize> {
    let mut key: libc::pthread_key_t = 0;
    // SAFETY: creating a key without destructor and deleting it right away
    // has no effect beyond the probe.
    let rc = unsafe { libc::pthread_key_create(&mut key, None) };
    if rc != 0 {
        return Some(PTHREAD_KEYS_MAX);
    }
    // SAFETY: `key` was just created by us and is used by nobody.
    unsafe { libc::pthread_key_delete(key) };
    Some(key as usize)
}

/// Not probed off glibc.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub(crate) fn pthread_keys_in_use() -> Option<usize> {
    None
}

#[cfg(all(test, target_os = "linux", target_env = "gnu"))]
mod tests {
    use super::*;

    #[test]
    fn pthread_key_probe_sees_keys_taken() {
        let before = pthread_keys_in_use().unwrap();
        let mut keys = Vec::new();
        for _ in 0..10 {
            let mut key: libc::pthread_key_t = 0;
            // SAFETY: a key without destructor, deleted below.
            assert_eq!(unsafe { libc::pthread_key_create(&mut key, None) }, 0);
            keys.push(key);
        }
        let after = pthread_keys_in_use().unwrap();
        for key in keys {
            // SAFETY: created above, used by nobody.
            unsafe { libc::pthread_key_delete(key) };
        }
        // The ten new keys take the ten lowest free indexes, `before` among them.
        assert!(after >= before + 10, "{before} -> {after}");
    }
}
