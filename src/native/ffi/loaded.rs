//! What the loader has of a library: where it is mapped (for `pins`, at
//! load) and whether it is still mapped (after `dlclose`).
//!
//! Both used to walk every loaded object (`dl_iterate_phdr`, which also
//! looks up each object's TLS block), so loading or unloading N plugins was
//! quadratic: at 10,000 plugins the walks were more than half of a 19.6 s
//! shutdown. Where glibc has `_dl_find_object` (2.35 and later), an address
//! inside the library (its root symbol) is looked up in the loader's sorted
//! table instead, in O(log N). The walk by name remains the fallback, and
//! it confirms the rare positive answer after a close: another library may
//! have been mapped where the closed one was.

use std::ffi::{CStr, c_int, c_void};

/// A library the loader knows as `name`, with an address inside it once
/// its root symbol was found.
#[derive(Clone, Copy)]
pub(super) struct Lookup<'a> {
    pub(super) name: &'a CStr,
    pub(super) anchor: Option<usize>,
}

impl Lookup<'_> {
    /// From the lowest to the highest address the library occupies, right
    /// after `dlopen` returned `handle` (so it cannot be unloaded meanwhile).
    #[cfg(target_os = "linux")]
    pub(super) fn span(self, handle: *mut c_void) -> Option<(usize, usize)> {
        if let Some(found) = self.find()
            && found.link_map == handle
        {
            return Some((found.map_start as usize, found.map_end as usize));
        }
        walk(self.name)
    }

    #[cfg(not(target_os = "linux"))]
    pub(super) fn span(self, _handle: *mut c_void) -> Option<(usize, usize)> {
        None
    }

    /// Whether the loader still has the library (after `dlclose`).
    #[cfg(target_os = "linux")]
    pub(super) fn is_loaded(self) -> bool {
        if find_object().is_some() && self.anchor.is_some() && self.find().is_none() {
            // No object covers an address the library had: it is gone.
            return false;
        }
        walk(self.name).is_some()
    }

    /// Elsewhere, `dlopen(RTLD_NOLOAD)` answers without loading.
    #[cfg(not(target_os = "linux"))]
    pub(super) fn is_loaded(self) -> bool {
        // SAFETY: `RTLD_NOLOAD` never loads (so runs no initialiser); a
        // handle returned is closed right away.
        let handle =
            unsafe { libc::dlopen(self.name.as_ptr(), libc::RTLD_NOLOAD | libc::RTLD_LAZY) };
        if handle.is_null() {
            return false;
        }
        // SAFETY: the handle just returned.
        unsafe { libc::dlclose(handle) };
        true
    }

    /// The loader's object covering the anchor, if any. Only the fields
    /// returned by value are read: the object's `link_map` may belong to
    /// another library, which another thread may be closing.
    #[cfg(target_os = "linux")]
    fn find(self) -> Option<DlFindObject> {
        let find = find_object()?;
        let mut found = DlFindObject::default();
        // SAFETY: `_dl_find_object` only reads the loader's tables for the
        // address (mapped or not) and writes the struct it is given, which
        // is larger than any glibc's.
        let status = unsafe { find(self.anchor? as *mut c_void, &mut found) };
        (status == 0).then_some(found)
    }
}

/// glibc's `struct dl_find_object` (dlfcn.h): the fields read here are at
/// the same offsets on every architecture; the tail is larger than glibc's
/// (whose own ends with seven reserved words) so no version writes past it.
#[cfg(target_os = "linux")]
#[repr(C)]
#[derive(Clone, Copy)]
struct DlFindObject {
    flags: u64,
    map_start: *mut c_void,
    map_end: *mut c_void,
    link_map: *mut c_void,
    eh_frame: *mut c_void,
    rest: [u64; 16],
}

#[cfg(target_os = "linux")]
impl Default for DlFindObject {
    fn default() -> DlFindObject {
        DlFindObject {
            flags: 0,
            map_start: std::ptr::null_mut(),
            map_end: std::ptr::null_mut(),
            link_map: std::ptr::null_mut(),
            eh_frame: std::ptr::null_mut(),
            rest: [0; 16],
        }
    }
}

#[cfg(target_os = "linux")]
type FindObject = unsafe extern "C" fn(*mut c_void, *mut DlFindObject) -> c_int;

/// `_dl_find_object`, where this C library has it.
#[cfg(target_os = "linux")]
fn find_object() -> Option<FindObject> {
    static FIND: std::sync::OnceLock<Option<FindObject>> = std::sync::OnceLock::new();
    *FIND.get_or_init(|| {
        // SAFETY: a lookup of a NUL-terminated name among loaded objects.
        let symbol = unsafe { libc::dlsym(libc::RTLD_DEFAULT, c"_dl_find_object".as_ptr()) };
        // SAFETY: glibc's `_dl_find_object` has this signature (dlfcn.h,
        // glibc 2.35); no other C library defines the name.
        (!symbol.is_null())
            .then(|| unsafe { std::mem::transmute::<*mut c_void, FindObject>(symbol) })
    })
}

/// Where the loader mapped the library it knows as `name`, by walking every
/// loaded object: from the lowest to the highest address of its loadable
/// segments.
#[cfg(target_os = "linux")]
fn walk(name: &CStr) -> Option<(usize, usize)> {
    struct Search<'a> {
        name: &'a CStr,
        span: Option<(usize, usize)>,
    }
    unsafe extern "C" fn visit(
        info: *mut libc::dl_phdr_info,
        _size: usize,
        data: *mut c_void,
    ) -> c_int {
        // SAFETY: `data` is the `Search` passed below, alive during the
        // walk; `info` is the loader's description of one object, valid
        // during this callback.
        let (search, info) = unsafe { (&mut *data.cast::<Search<'_>>(), &*info) };
        // SAFETY: the loader's object name, a C string (possibly empty).
        if info.dlpi_name.is_null() || unsafe { CStr::from_ptr(info.dlpi_name) } != search.name {
            return 0;
        }
        // SAFETY: the loader's program headers of this object.
        let headers =
            unsafe { std::slice::from_raw_parts(info.dlpi_phdr, usize::from(info.dlpi_phnum)) };
        let base = info.dlpi_addr as usize;
        let (mut low, mut high) = (usize::MAX, 0);
        for header in headers.iter().filter(|h| h.p_type == libc::PT_LOAD) {
            low = low.min(base + header.p_vaddr as usize);
            high = high.max(base + (header.p_vaddr + header.p_memsz) as usize);
        }
        search.span = (low < high).then_some((low, high));
        1
    }
    let mut search = Search { name, span: None };
    // SAFETY: `visit` matches the callback's signature and only reads what
    // the loader passes; `search` outlives the walk.
    unsafe { libc::dl_iterate_phdr(Some(visit), (&raw mut search).cast()) };
    search.span
}

#[cfg(all(test, target_os = "linux"))]
mod tests {
    use super::*;

    #[test]
    fn the_loader_table_and_the_walk_agree_on_libc() {
        // Any address inside libc: the function just used.
        let anchor = libc::dlsym as *const () as usize;
        let mut found = DlFindObject::default();
        let find = find_object().expect("glibc 2.35 or later");
        // SAFETY: as in `Lookup::find`.
        assert_eq!(unsafe { find(anchor as *mut c_void, &mut found) }, 0);
        // SAFETY: a loaded object's link_map starts with l_addr and l_name
        // (link.h); libc is never unloaded.
        let name = unsafe { CStr::from_ptr(*found.link_map.cast::<*const i8>().add(1)) };
        let (low, high) = walk(name).expect("libc is loaded");
        assert!((low..high).contains(&anchor));
        assert!(found.map_start as usize <= low && high <= found.map_end as usize);
        // An address no object covers.
        let lookup = Lookup {
            name: c"/nowhere/libnothing.so",
            anchor: Some(8),
        };
        assert!(lookup.find().is_none());
        assert!(!lookup.is_loaded());
    }
}
