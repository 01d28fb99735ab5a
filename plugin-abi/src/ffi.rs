//! The raw ABI: `#[repr(C)]` types and the entry trampolines.
//!
//! This module is the only place in `plugin-abi` with `unsafe`. Plugin authors
//! never touch it; the host (`dynplug`) uses it to implement [`HostVtable`] and
//! to call a plugin's [`PluginVtable`].
//!
//! # The contract
//!
//! * A plugin exports one static, [`ROOT_SYMBOL`], of type [`PluginHeader`]. The
//!   header layout is frozen for every ABI major version: the host reads `magic`,
//!   `abi_major` and the `layout` of [`PluginVtable`] (abi_stable's `TypeLayout`)
//!   and refuses the plugin before touching anything else if they differ.
//! * Everything that crosses is borrowed for the duration of one call: strings
//!   as [`RawStr`], values as [`ValueView`]. The receiving side copies what it
//!   keeps, so nothing one side allocated is ever freed or called by the other
//!   after the call returns (a plugin's memory and code may be unmapped later).
//! * Every entry runs under `catch_unwind`: a panic is reported as
//!   [`status::PANIC`] with its message, never unwound into the host.
#![allow(unsafe_code)]

use std::collections::BTreeMap;
use std::panic::{AssertUnwindSafe, catch_unwind};

use abi_stable::StableAbi;
use abi_stable::type_layout::TypeLayout;

use crate::{Context, PluginError, Value};

/// The first bytes of every [`PluginHeader`].
pub const MAGIC: [u8; 8] = *b"DYNPLUG\0";
/// Bumped on any incompatible change of the types in this module.
pub const ABI_MAJOR: u32 = 2;
/// Bumped on compatible additions (the host accepts a plugin with a lower or equal minor).
pub const ABI_MINOR: u32 = 0;
/// The version of the `plugin-abi` crate this copy was compiled from.
pub const CRATE_VERSION: &str = env!("CARGO_PKG_VERSION");
/// The name of the exported [`PluginHeader`] static.
pub const ROOT_SYMBOL: &str = "DYNPLUG_PLUGIN_ROOT";

/// Return codes of the entries.
pub mod status {
    /// The entry succeeded.
    pub const OK: u32 = 0;
    /// The entry returned an error; its message was reported.
    pub const ERROR: u32 = 1;
    /// The entry panicked; the panic message was reported.
    pub const PANIC: u32 = 2;
}

/// Stands for memory owned by the other side; only ever behind a pointer.
#[repr(C)]
#[derive(StableAbi)]
pub struct Opaque {
    _private: [u8; 0],
}

/// A borrowed UTF-8 string: valid only for the call it was passed in.
#[repr(C)]
#[derive(StableAbi, Clone, Copy, Debug)]
pub struct RawStr {
    ptr: *const u8,
    len: usize,
}

impl RawStr {
    /// Borrows `s` (the caller keeps `s` alive while the view is used).
    pub const fn new(s: &str) -> Self {
        Self {
            ptr: s.as_ptr(),
            len: s.len(),
        }
    }

    /// The string.
    ///
    /// # Safety
    /// The view must come from a live `&str` that outlives `'a` (in practice:
    /// use it only during the call that passed it, and copy what you keep).
    pub unsafe fn as_str<'a>(self) -> &'a str {
        // SAFETY: the caller guarantees the bytes come from a live `&str`,
        // which is valid UTF-8 with this exact length.
        unsafe { std::str::from_utf8_unchecked(std::slice::from_raw_parts(self.ptr, self.len)) }
    }
}

/// Borrowed bytes: valid only for the call they were passed in.
#[repr(C)]
#[derive(StableAbi, Clone, Copy, Debug)]
pub struct RawBytes {
    ptr: *const u8,
    len: usize,
}

impl RawBytes {
    /// Borrows `b`.
    pub const fn new(b: &[u8]) -> Self {
        Self {
            ptr: b.as_ptr(),
            len: b.len(),
        }
    }

    /// The bytes.
    ///
    /// # Safety
    /// As [`RawStr::as_str`].
    pub unsafe fn as_slice<'a>(self) -> &'a [u8] {
        // SAFETY: the caller guarantees the view comes from a live slice.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

/// Called once per item of a [`Compound`]: `key` is empty for list items.
#[repr(transparent)]
#[derive(StableAbi, Clone, Copy)]
pub struct VisitFn {
    /// The callback.
    pub func: unsafe extern "C" fn(visitor: *mut Opaque, key: RawStr, value: ValueView),
}

/// A borrowed list or map, walked by the side that owns it.
#[repr(C)]
#[derive(StableAbi, Clone, Copy, Debug)]
pub struct Compound {
    handle: *const Opaque,
    len: usize,
    visit: unsafe extern "C" fn(handle: *const Opaque, visitor: *mut Opaque, f: VisitFn),
}

/// A borrowed [`Value`] (or its absence), valid only during the call that passed it.
#[repr(C, u8)]
#[derive(StableAbi, Clone, Copy, Debug)]
pub enum ValueView {
    /// No value under that key.
    Absent,
    /// [`Value::Null`].
    Null,
    /// [`Value::Bool`].
    Bool(bool),
    /// [`Value::Int`].
    Int(i64),
    /// [`Value::Float`].
    Float(f64),
    /// [`Value::String`].
    Str(RawStr),
    /// [`Value::Bytes`].
    Bytes(RawBytes),
    /// [`Value::List`].
    List(Compound),
    /// [`Value::Map`].
    Map(Compound),
}

unsafe extern "C" fn visit_list(handle: *const Opaque, visitor: *mut Opaque, f: VisitFn) {
    // SAFETY: `handle` was made from a `&Vec<Value>` by `ValueView::of`, which
    // is alive for the call the view was passed in.
    let items = unsafe { &*handle.cast::<Vec<Value>>() };
    for item in items {
        // SAFETY: the receiver passed `f` and `visitor` for this walk; the
        // views are valid during the callback.
        unsafe { (f.func)(visitor, RawStr::new(""), ValueView::of(item)) };
    }
}

unsafe extern "C" fn visit_map(handle: *const Opaque, visitor: *mut Opaque, f: VisitFn) {
    // SAFETY: as in `visit_list`, for a `&BTreeMap<String, Value>`.
    let entries = unsafe { &*handle.cast::<BTreeMap<String, Value>>() };
    for (k, v) in entries {
        // SAFETY: as in `visit_list`.
        unsafe { (f.func)(visitor, RawStr::new(k), ValueView::of(v)) };
    }
}

unsafe extern "C" fn push_item(visitor: *mut Opaque, _key: RawStr, value: ValueView) {
    // SAFETY: `visitor` is the `&mut Vec<Value>` passed by `to_value` for this walk,
    // and `value` is valid during this callback.
    unsafe { (*visitor.cast::<Vec<Value>>()).push(value.to_value()) }
}

unsafe extern "C" fn insert_entry(visitor: *mut Opaque, key: RawStr, value: ValueView) {
    // SAFETY: `visitor` is the `&mut BTreeMap` passed by `to_value` for this walk;
    // `key` and `value` are valid during this callback.
    unsafe {
        (*visitor.cast::<BTreeMap<String, Value>>())
            .insert(key.as_str().to_owned(), value.to_value());
    }
}

impl ValueView {
    /// Borrows `value`. The view carries no lifetime: keep `value` alive and
    /// unmodified while the view is in use.
    pub fn of(value: &Value) -> ValueView {
        match value {
            Value::Null => ValueView::Null,
            Value::Bool(b) => ValueView::Bool(*b),
            Value::Int(i) => ValueView::Int(*i),
            Value::Float(f) => ValueView::Float(*f),
            Value::String(s) => ValueView::Str(RawStr::new(s)),
            Value::Bytes(b) => ValueView::Bytes(RawBytes::new(b)),
            Value::List(items) => ValueView::List(Compound {
                handle: (items as *const Vec<Value>).cast(),
                len: items.len(),
                visit: visit_list,
            }),
            Value::Map(entries) => ValueView::Map(Compound {
                handle: (entries as *const BTreeMap<String, Value>).cast(),
                len: entries.len(),
                visit: visit_map,
            }),
        }
    }

    /// Copies the viewed value into memory owned by the caller
    /// ([`Value::Null`] for [`ValueView::Absent`]).
    ///
    /// # Safety
    /// The view must be valid: made by [`ValueView::of`] from a value that is
    /// still alive, and passed within the current call.
    pub unsafe fn to_value(self) -> Value {
        match self {
            ValueView::Absent | ValueView::Null => Value::Null,
            ValueView::Bool(b) => Value::Bool(b),
            ValueView::Int(i) => Value::Int(i),
            ValueView::Float(f) => Value::Float(f),
            // SAFETY: the caller guarantees the view is valid.
            ValueView::Str(s) => Value::String(unsafe { s.as_str() }.to_owned()),
            // SAFETY: as above.
            ValueView::Bytes(b) => Value::Bytes(unsafe { b.as_slice() }.to_vec()),
            ValueView::List(c) => {
                // A length from the other side is a hint, never trusted for an allocation.
                let mut items: Vec<Value> = Vec::with_capacity(c.len.min(1024));
                // SAFETY: the view is valid (the caller's guarantee), so its
                // owner's `visit` walks a live list; `push_item` gets the
                // `Vec` it expects.
                unsafe {
                    (c.visit)(
                        c.handle,
                        (&mut items as *mut Vec<Value>).cast(),
                        VisitFn { func: push_item },
                    );
                }
                Value::List(items)
            }
            ValueView::Map(c) => {
                let mut entries = BTreeMap::new();
                let visitor = (&mut entries as *mut BTreeMap<String, Value>).cast();
                // SAFETY: as for lists, with the map `insert_entry` expects.
                unsafe { (c.visit)(c.handle, visitor, VisitFn { func: insert_entry }) };
                Value::Map(entries)
            }
        }
    }
}

/// The host's side of a call's context, implemented by `dynplug`.
#[repr(C)]
#[derive(StableAbi)]
pub struct HostVtable {
    /// The label of the call.
    pub label: unsafe extern "C" fn(data: *const Opaque) -> RawStr,
    /// The value under `key`, or [`ValueView::Absent`].
    pub get: unsafe extern "C" fn(data: *const Opaque, key: RawStr) -> ValueView,
    /// Copies `value` into the context under `key`.
    pub set: unsafe extern "C" fn(data: *mut Opaque, key: RawStr, value: ValueView),
    /// Removes `key`; whether it was present.
    pub remove: unsafe extern "C" fn(data: *mut Opaque, key: RawStr) -> bool,
    /// Calls `f(visitor, key, value)` for every entry, in no particular order.
    pub entries: unsafe extern "C" fn(data: *const Opaque, visitor: *mut Opaque, f: VisitFn),
    /// Whether the call was cancelled or is past its deadline.
    pub is_cancelled: unsafe extern "C" fn(data: *const Opaque) -> bool,
    /// Nanoseconds left before the deadline (0 when past it), or -1 without one.
    pub remaining_nanos: unsafe extern "C" fn(data: *const Opaque) -> i64,
    /// Records the call's error message (copied by the host).
    pub set_error: unsafe extern "C" fn(data: *mut Opaque, message: RawStr),
}

/// One call's context as passed to `execute`.
#[repr(C)]
#[derive(StableAbi)]
pub struct FfiContext {
    /// The host's context, opaque to the plugin.
    pub data: *mut Opaque,
    /// The host's functions over `data`.
    pub host: *const HostVtable,
}

/// Where `init` and `shutdown` report an error message (copied by the host).
#[repr(C)]
#[derive(StableAbi, Clone, Copy)]
pub struct ErrorSink {
    /// The host's error slot.
    pub data: *mut Opaque,
    /// Copies `message` into `data`.
    pub write: unsafe extern "C" fn(data: *mut Opaque, message: RawStr),
}

/// The plugin's entries. Its `TypeLayout` is checked by the host before use.
#[repr(C)]
#[derive(StableAbi)]
pub struct PluginVtable {
    /// Runs one call; returns a [`status`] code.
    pub execute: unsafe extern "C" fn(ctx: *mut FfiContext) -> u32,
    /// Runs once after load with the manifest's `config`; returns a [`status`] code.
    pub init: Option<unsafe extern "C" fn(config: ValueView, err: ErrorSink) -> u32>,
    /// Runs once before unload; returns a [`status`] code.
    pub shutdown: Option<unsafe extern "C" fn(err: ErrorSink) -> u32>,
}

/// The exported root. Its layout is frozen: a host of any version reads
/// `magic`, `abi_major`, `abi_minor`, `crate_version` and `layout` to decide
/// whether it may use `vtable`.
#[repr(C)]
pub struct PluginHeader {
    /// Always [`MAGIC`].
    pub magic: [u8; 8],
    /// [`ABI_MAJOR`] of the `plugin-abi` the plugin was built with.
    pub abi_major: u32,
    /// [`ABI_MINOR`] of the `plugin-abi` the plugin was built with.
    pub abi_minor: u32,
    /// [`CRATE_VERSION`] of the `plugin-abi` the plugin was built with.
    pub crate_version: RawStr,
    /// The layout of `PluginVtable` as the plugin was compiled.
    pub layout: &'static TypeLayout,
    /// The entries.
    pub vtable: &'static PluginVtable,
}

// SAFETY: every field is immutable `'static` data (the `RawStr` points at a
// string literal), so sharing the header between threads is sound.
unsafe impl Sync for PluginHeader {}

impl PluginHeader {
    /// The header for `vtable`, stamped with this crate's ABI version and layout.
    pub const fn new(vtable: &'static PluginVtable) -> Self {
        Self {
            magic: MAGIC,
            abi_major: ABI_MAJOR,
            abi_minor: ABI_MINOR,
            crate_version: RawStr::new(CRATE_VERSION),
            layout: <PluginVtable as StableAbi>::LAYOUT,
            vtable,
        }
    }

    /// The version string of the `plugin-abi` the plugin was built with.
    ///
    /// # Safety
    /// The header must come from a loaded library (its string is a literal of it).
    pub unsafe fn crate_version(&self) -> &str {
        // SAFETY: the caller guarantees the library holding the literal is loaded.
        unsafe { self.crate_version.as_str() }
    }
}

/// The layout this copy of `plugin-abi` expects for [`PluginVtable`].
pub fn expected_layout() -> &'static TypeLayout {
    <PluginVtable as StableAbi>::LAYOUT
}

/// Checks a plugin's `PluginVtable` layout against this crate's.
///
/// # Errors
/// A description of every incompatibility abi_stable found.
pub fn check_layout(found: &'static TypeLayout) -> Result<(), String> {
    use abi_stable::abi_stability::abi_checking::{
        CheckingGlobals, check_layout_compatibility_with_globals,
    };
    // abi_stable's default checker records `&'static TypeLayout`s of prefix
    // types in a process-wide table. dynplug unloads libraries, which would
    // leave those pointers dangling: each check gets its own, dropped state.
    let globals = CheckingGlobals::new();
    check_layout_compatibility_with_globals(expected_layout(), found, &globals)
        .map_err(|e| summarize_layout_errors(&e.to_string()))
}

/// abi_stable's report prints both layouts in full for every difference
/// (kilobytes for one changed qualifier). Errors are shown on one line in
/// listings and logs: keep each `Error:` with its `Expected:`/`Found:` lines,
/// the first one in full, and count the rest.
fn summarize_layout_errors(report: &str) -> String {
    let mut lines = report.lines().map(str::trim);
    let mut errors: Vec<String> = Vec::new();
    while let Some(line) = lines.next() {
        let Some(what) = line.strip_prefix("Error:") else {
            continue;
        };
        let mut summary = what.trim().to_owned();
        let take = |label: &str, lines: &mut dyn Iterator<Item = &str>| {
            if lines.next() == Some(label) {
                lines
                    .next()
                    .map(|v| format!("{} `{v}`", label.trim_end_matches(':').to_lowercase()))
            } else {
                None
            }
        };
        if let (Some(expected), Some(found)) =
            (take("Expected:", &mut lines), take("Found:", &mut lines))
        {
            summary = format!("{summary}: {expected}, {found}");
        }
        if !errors.contains(&summary) {
            errors.push(summary);
        }
    }
    match errors.len() {
        0 => "the layouts differ".to_owned(),
        1 => errors.remove(0),
        n => format!("{} (and {} more)", errors[0], n - 1),
    }
}

// ----- the plugin side -----

// Every host callback below is called with the `data` and vtable the host
// passed for the call in progress (an `FfiContext` exists only inside a
// call), and with views of plugin memory that live until it returns: the
// "SAFETY: in call" of each block.

impl FfiContext {
    fn host(&self) -> &HostVtable {
        // SAFETY: the host passes a vtable that lives for the whole call, and
        // `FfiContext` only exists inside a call.
        unsafe { &*self.host }
    }

    pub(crate) fn label(&self) -> &str {
        // SAFETY: in call.
        let label = unsafe { (self.host().label)(self.data) };
        // SAFETY: the label is host memory that stays untouched while the
        // plugin holds `&self` (the host is blocked in the call).
        unsafe { label.as_str() }
    }

    pub(crate) fn get(&self, key: &str) -> Borrowed<'_> {
        // SAFETY: in call.
        let view = unsafe { (self.host().get)(self.data, RawStr::new(key)) };
        // SAFETY: the view points into the host's context, which is not
        // modified while the plugin holds `&self`.
        unsafe { Borrowed::from_view(view) }
    }

    /// The entry `key` of the map under `map`, borrowed without copying the map.
    pub(crate) fn get_in(&self, map: &str, key: &str) -> Borrowed<'_> {
        struct Search<'k> {
            key: &'k str,
            found: ValueView,
        }
        unsafe extern "C" fn visit(visitor: *mut Opaque, key: RawStr, value: ValueView) {
            // SAFETY: `visitor` is the `Search` below, alive for the walk; the
            // key is valid during this callback.
            let (search, key) = unsafe { (&mut *visitor.cast::<Search<'_>>(), key.as_str()) };
            if matches!(search.found, ValueView::Absent) && key == search.key {
                search.found = value;
            }
        }
        // SAFETY: in call.
        let map = unsafe { (self.host().get)(self.data, RawStr::new(map)) };
        let ValueView::Map(compound) = map else {
            return Borrowed::Absent;
        };
        let mut search = Search {
            key,
            found: ValueView::Absent,
        };
        let visitor = (&mut search as *mut Search<'_>).cast();
        // SAFETY: in call; the host walks its own live map and `visit` gets
        // the `Search` it expects.
        unsafe { (compound.visit)(compound.handle, visitor, VisitFn { func: visit }) };
        // SAFETY: the view points into the host's context, which is not
        // modified while the plugin holds `&self`.
        unsafe { Borrowed::from_view(search.found) }
    }

    pub(crate) fn set(&mut self, key: &str, value: &Value) {
        // SAFETY: in call.
        unsafe { (self.host().set)(self.data, RawStr::new(key), ValueView::of(value)) };
    }

    pub(crate) fn set_str(&mut self, key: &str, value: &str) {
        let view = ValueView::Str(RawStr::new(value));
        // SAFETY: in call.
        unsafe { (self.host().set)(self.data, RawStr::new(key), view) };
    }

    pub(crate) fn remove(&mut self, key: &str) -> bool {
        // SAFETY: in call.
        unsafe { (self.host().remove)(self.data, RawStr::new(key)) }
    }

    pub(crate) fn entries(&self) -> Vec<(String, Value)> {
        unsafe extern "C" fn collect(visitor: *mut Opaque, key: RawStr, value: ValueView) {
            // SAFETY: `visitor` is the Vec below; key and value are valid
            // during this callback.
            unsafe {
                (*visitor.cast::<Vec<(String, Value)>>())
                    .push((key.as_str().to_owned(), value.to_value()));
            }
        }
        let mut out: Vec<(String, Value)> = Vec::new();
        let visitor = (&mut out as *mut Vec<(String, Value)>).cast();
        // SAFETY: in call; `collect` gets the `Vec` it expects.
        unsafe { (self.host().entries)(self.data, visitor, VisitFn { func: collect }) };
        out
    }

    pub(crate) fn is_cancelled(&self) -> bool {
        // SAFETY: in call.
        unsafe { (self.host().is_cancelled)(self.data) }
    }

    pub(crate) fn remaining_nanos(&self) -> i64 {
        // SAFETY: in call.
        unsafe { (self.host().remaining_nanos)(self.data) }
    }

    fn set_error(&mut self, message: &str) {
        // SAFETY: in call.
        unsafe { (self.host().set_error)(self.data, RawStr::new(message)) };
    }
}

/// A value borrowed from the host's context for as long as `&Context` lives.
pub(crate) enum Borrowed<'a> {
    Absent,
    Str(&'a str),
    Bytes(&'a [u8]),
    Other(ValueView),
}

impl Borrowed<'_> {
    /// # Safety
    /// `view` must be valid for the borrow's lifetime.
    unsafe fn from_view(view: ValueView) -> Self {
        match view {
            ValueView::Absent => Borrowed::Absent,
            // SAFETY: guaranteed by the caller.
            ValueView::Str(s) => Borrowed::Str(unsafe { s.as_str() }),
            // SAFETY: guaranteed by the caller.
            ValueView::Bytes(b) => Borrowed::Bytes(unsafe { b.as_slice() }),
            other => Borrowed::Other(other),
        }
    }

    pub(crate) fn to_value(&self) -> Option<Value> {
        match *self {
            Borrowed::Absent => None,
            Borrowed::Str(s) => Some(Value::String(s.to_owned())),
            Borrowed::Bytes(b) => Some(Value::Bytes(b.to_vec())),
            // SAFETY: the view was valid when borrowed and the borrow is still live.
            Borrowed::Other(view) => Some(unsafe { view.to_value() }),
        }
    }
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic with a non-string payload".to_owned()
    }
}

fn report(result: std::thread::Result<Result<(), PluginError>>, sink: impl FnOnce(&str)) -> u32 {
    match result {
        Ok(Ok(())) => status::OK,
        Ok(Err(err)) => {
            sink(err.message());
            status::ERROR
        }
        Err(payload) => {
            sink(&panic_message(&*payload));
            status::PANIC
        }
    }
}

/// Runs a plugin's `execute` for the host; used by [`export_plugin!`](crate::export_plugin).
///
/// # Safety
/// `ctx` must be the valid, exclusive context the host passed to this call.
#[doc(hidden)]
pub unsafe fn run_execute(
    ctx: *mut FfiContext,
    f: fn(&mut Context) -> Result<(), PluginError>,
) -> u32 {
    // SAFETY: the host passes a valid context, exclusively ours for the call;
    // `Context` is a `repr(transparent)` wrapper of `FfiContext`.
    let ctx = unsafe { &mut *ctx.cast::<Context>() };
    let result = catch_unwind(AssertUnwindSafe(|| f(ctx)));
    report(result, |message| ctx.raw_mut().set_error(message))
}

/// Runs a plugin's `init` for the host; used by [`export_plugin!`](crate::export_plugin).
///
/// # Safety
/// `config` and `sink` must be the ones the host passed to this call.
#[doc(hidden)]
pub unsafe fn run_init(
    config: ValueView,
    sink: ErrorSink,
    f: fn(&Value) -> Result<(), PluginError>,
) -> u32 {
    let result = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: the host keeps the config alive during the call.
        let config = unsafe { config.to_value() };
        f(&config)
    }));
    report(result, |message| {
        // SAFETY: the host's sink, valid during this entry call.
        unsafe { (sink.write)(sink.data, RawStr::new(message)) }
    })
}

/// Runs a plugin's `shutdown` for the host; used by [`export_plugin!`](crate::export_plugin).
///
/// # Safety
/// `sink` must be the one the host passed to this call.
#[doc(hidden)]
pub unsafe fn run_shutdown(sink: ErrorSink, f: fn()) -> u32 {
    let result = catch_unwind(AssertUnwindSafe(|| {
        f();
        Ok(())
    }));
    report(result, |message| {
        // SAFETY: the host's sink, valid during this entry call.
        unsafe { (sink.write)(sink.data, RawStr::new(message)) }
    })
}

// ----- a host for plugin authors' unit tests -----

/// The host side of a [`TestContext`](crate::TestContext): the call's label
/// and values in a `BTreeMap`, as the real host keeps them in its own map.
#[derive(Debug, Default)]
pub(crate) struct TestHost {
    pub(crate) label: String,
    pub(crate) values: BTreeMap<String, Value>,
    pub(crate) cancelled: bool,
    pub(crate) deadline: Option<std::time::Instant>,
    pub(crate) error: Option<String>,
}

/// The functions the real host passes, over a [`TestHost`] instead.
static TEST_HOST_VTABLE: HostVtable = HostVtable {
    label: test_label,
    get: test_get,
    set: test_set,
    remove: test_remove,
    entries: test_entries,
    is_cancelled: test_is_cancelled,
    remaining_nanos: test_remaining_nanos,
    set_error: test_set_error,
};

// Each callback below gets the `data` pointer `test_context` made from a
// live, boxed `TestHost`, used through the `Context` borrowed from the
// `TestContext` that owns the box: the "SAFETY: test host" of each block.

unsafe extern "C" fn test_label(data: *const Opaque) -> RawStr {
    // SAFETY: test host.
    let host = unsafe { &*data.cast::<TestHost>() };
    RawStr::new(&host.label)
}

unsafe extern "C" fn test_get(data: *const Opaque, key: RawStr) -> ValueView {
    // SAFETY: test host; `key` is valid during the callback.
    let (host, key) = unsafe { (&*data.cast::<TestHost>(), key.as_str()) };
    host.values
        .get(key)
        .map_or(ValueView::Absent, ValueView::of)
}

unsafe extern "C" fn test_set(data: *mut Opaque, key: RawStr, value: ValueView) {
    // SAFETY: test host, borrowed mutably through `&mut Context`; the key
    // and the view are plugin memory valid during the callback.
    unsafe {
        let host = &mut *data.cast::<TestHost>();
        host.values
            .insert(key.as_str().to_owned(), value.to_value());
    }
}

unsafe extern "C" fn test_remove(data: *mut Opaque, key: RawStr) -> bool {
    // SAFETY: as in `test_set`.
    let (host, key) = unsafe { (&mut *data.cast::<TestHost>(), key.as_str()) };
    host.values.remove(key).is_some()
}

unsafe extern "C" fn test_entries(data: *const Opaque, visitor: *mut Opaque, f: VisitFn) {
    // SAFETY: test host.
    let host = unsafe { &*data.cast::<TestHost>() };
    for (key, value) in &host.values {
        // SAFETY: the plugin passed `f` and `visitor` for this walk; the
        // views are valid during the callback.
        unsafe { (f.func)(visitor, RawStr::new(key), ValueView::of(value)) };
    }
}

unsafe extern "C" fn test_is_cancelled(data: *const Opaque) -> bool {
    // SAFETY: test host.
    let host = unsafe { &*data.cast::<TestHost>() };
    host.cancelled
        || host
            .deadline
            .is_some_and(|d| std::time::Instant::now() >= d)
}

unsafe extern "C" fn test_remaining_nanos(data: *const Opaque) -> i64 {
    // SAFETY: test host.
    let host = unsafe { &*data.cast::<TestHost>() };
    host.deadline.map_or(-1, |d| {
        let left = d.saturating_duration_since(std::time::Instant::now());
        i64::try_from(left.as_nanos()).unwrap_or(i64::MAX)
    })
}

unsafe extern "C" fn test_set_error(data: *mut Opaque, message: RawStr) {
    // SAFETY: as in `test_set`.
    let (host, message) = unsafe { (&mut *data.cast::<TestHost>(), message.as_str()) };
    host.error = Some(message.to_owned());
}

/// The `FfiContext` of a test call over `host`. The pointer stays valid as
/// long as the box does: keep both in one owner and hand out the context
/// only borrowed from it ([`test_context`]).
pub(crate) fn test_ffi_context(host: &mut Box<TestHost>) -> FfiContext {
    FfiContext {
        data: (&mut **host as *mut TestHost).cast(),
        host: &TEST_HOST_VTABLE,
    }
}

/// Views `raw` as the plugin's `Context`, for as long as it is borrowed.
pub(crate) fn test_context(raw: &mut FfiContext) -> &mut Context {
    // SAFETY: `Context` is a `repr(transparent)` wrapper of `FfiContext`.
    unsafe { &mut *(raw as *mut FfiContext).cast::<Context>() }
}

/// As [`test_context`], shared.
pub(crate) fn test_context_ref(raw: &FfiContext) -> &Context {
    // SAFETY: as in `test_context`.
    unsafe { &*(raw as *const FfiContext).cast::<Context>() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_reports_are_summarized_on_one_line() {
        let report = "Compared <this>:\n    --- Type Layout ---\n    lots of text\n\
            Error:function pointers have different qualifiers (`unsafe`, etc.)\n\
            Expected:\n    unsafe fn(ctx,: *mut FfiContext )->u32\n\
            Found:\n    fn(ctx,: *mut FfiContext )->u32\n\
            more layout text\n\
            Error:incompatible type size\nExpected:\n    24\nFound:\n    16\n";
        let summary = summarize_layout_errors(report);
        assert_eq!(
            summary,
            "function pointers have different qualifiers (`unsafe`, etc.): expected \
             `unsafe fn(ctx,: *mut FfiContext )->u32`, found `fn(ctx,: *mut FfiContext )->u32` \
             (and 1 more)"
        );
        assert!(!summary.contains('\n'));
        assert_eq!(
            summarize_layout_errors("no errors listed"),
            "the layouts differ"
        );
    }
}
