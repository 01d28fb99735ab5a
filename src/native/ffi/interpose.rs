//! dynplug's definitions of the C functions through which code registers
//! per-thread state, so that what plugin code registers is seen (`pins`).
//!
//! A definition in the host executable comes before glibc's in the global
//! lookup scope, so a plugin opened with `RTLD_LOCAL` binds to it, despite
//! glibc's symbol versions (measured on glibc 2.36; `RTLD_DEEPBIND` would
//! bypass it, and dynplug does not use it). The executable's own code binds
//! to these definitions when it is linked. For plugins to see them, the
//! executable must also export them, which the linker does only when told:
//!
//! ```text
//! -Wl,--export-dynamic-symbol=__cxa_thread_atexit_impl,--export-dynamic-symbol=pthread_key_create,--export-dynamic-symbol=pthread_key_delete,--export-dynamic-symbol=pthread_setspecific
//! ```
//!
//! (`build.rs` passes it for dynplug's own binaries; `missing_exports`
//! detects a host that does not.) Each definition forwards to the next one
//! in lookup order (glibc's), found with `dlsym(RTLD_NEXT, …)` once. The cost
//! on a call is nothing; registrations (a few per thread and library) take
//! the registry's lock.
//!
//! These run in any thread at any time, before `main`, inside `dlopen` and
//! during thread exit: they allocate, lock `pins`' registry briefly, and
//! never log.

use std::ffi::c_void;

/// A pthread key.
pub(crate) type Key = libc::pthread_key_t;

type DtorFn = unsafe extern "C" fn(*mut c_void);

/// A thread-local destructor registered by plugin code: `func(obj)`, once,
/// on the thread that registered it.
pub(crate) struct ThreadDtor {
    func: DtorFn,
    obj: *mut c_void,
}

impl ThreadDtor {
    /// Runs the destructor. Called on the registering thread while the
    /// library is mapped (it is held until this has run).
    pub(crate) fn run(self) {
        // `func` and `obj` are exactly what plugin code passed to
        // `__cxa_thread_atexit_impl` on this thread, whose contract is that
        // `func(obj)` is called once on this thread, as glibc would at its
        // exit; `pins` calls this once, on that thread, while the library
        // is held (mapped).
        // SAFETY: the registration's own contract, kept as said above.
        unsafe { (self.func)(self.obj) }
    }
}

/// A key's destructor, as plugin code passed it to `pthread_key_create`.
#[derive(Clone, Copy)]
pub(crate) struct KeyDtor(DtorFn);

impl KeyDtor {
    #[cfg(test)]
    pub(crate) fn new(dtor: DtorFn) -> KeyDtor {
        KeyDtor(dtor)
    }

    /// Where its code is, to tell whose it is.
    pub(crate) fn addr(self) -> usize {
        self.0 as *const () as usize
    }
}

/// The definitions themselves (glibc only: defining them over musl's
/// static libc would clash, and elsewhere nothing is unloaded anyway).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
mod glibc {
    use std::ffi::{CStr, c_int, c_void};
    use std::sync::atomic::{AtomicPtr, Ordering};

    use super::{DtorFn, Key, KeyDtor, ThreadDtor};
    use crate::native::pins;

    type AtexitFn = unsafe extern "C" fn(DtorFn, *mut c_void, *mut c_void) -> c_int;
    type KeyCreateFn = unsafe extern "C" fn(*mut Key, Option<DtorFn>) -> c_int;
    type KeyDeleteFn = unsafe extern "C" fn(Key) -> c_int;
    type SetSpecificFn = unsafe extern "C" fn(Key, *const c_void) -> c_int;

    /// The definition of `name` that comes after the executable's (glibc's).
    fn next<F: Copy>(name: &CStr, cache: &AtomicPtr<c_void>) -> Option<F> {
        const { assert!(std::mem::size_of::<F>() == std::mem::size_of::<*mut c_void>()) };
        let mut found = cache.load(Ordering::Acquire);
        if found.is_null() {
            // SAFETY: `name` is a C string; `RTLD_NEXT` asks for the next object
            // after this one in lookup order.
            found = unsafe { libc::dlsym(libc::RTLD_NEXT, name.as_ptr()) };
            cache.store(found, Ordering::Release);
        }
        // SAFETY: `F` is the function pointer type of `name`'s C declaration
        // (the same size as a pointer, checked above), and `found` is that
        // function's address when not null.
        (!found.is_null()).then(|| unsafe { std::mem::transmute_copy::<*mut c_void, F>(&found) })
    }

    static ATEXIT: AtomicPtr<c_void> = AtomicPtr::new(std::ptr::null_mut());
    static KEY_CREATE: AtomicPtr<c_void> = AtomicPtr::new(std::ptr::null_mut());
    static KEY_DELETE: AtomicPtr<c_void> = AtomicPtr::new(std::ptr::null_mut());
    static SET_SPECIFIC: AtomicPtr<c_void> = AtomicPtr::new(std::ptr::null_mut());

    /// Registers `func(obj)` to run at this thread's exit; `dso_symbol` is an
    /// address inside the registering object. glibc's definition (2.18+).
    ///
    /// # Safety
    /// As glibc's: `func(obj)` must be valid to call once on this thread.
    #[unsafe(no_mangle)]
    pub unsafe extern "C" fn __cxa_thread_atexit_impl(
        func: DtorFn,
        obj: *mut c_void,
        dso_symbol: *mut c_void,
    ) -> c_int {
        let dtor = ThreadDtor { func, obj };
        let Err(dtor) = pins::thread_dtor(dso_symbol as usize, dtor) else {
            return 0;
        };
        match next::<AtexitFn>(c"__cxa_thread_atexit_impl", &ATEXIT) {
            // SAFETY: glibc's function, with the caller's own arguments.
            Some(real) => unsafe { real(dtor.func, dtor.obj, dso_symbol) },
            None => -1,
        }
    }

    /// glibc's `pthread_key_create`, recording keys plugin code creates.
    ///
    /// # Safety
    /// As glibc's: `key` must be valid for writes.
    #[unsafe(no_mangle)]
    pub unsafe extern "C" fn pthread_key_create(key: *mut Key, dtor: Option<DtorFn>) -> c_int {
        let Some(real) = next::<KeyCreateFn>(c"pthread_key_create", &KEY_CREATE) else {
            return libc::EAGAIN;
        };
        // SAFETY: glibc's function, with the caller's own arguments.
        let rc = unsafe { real(key, dtor) };
        if rc == 0 {
            // SAFETY: glibc wrote the new key to `key`, valid per the contract.
            pins::key_created(unsafe { *key }, dtor.map(KeyDtor));
        }
        rc
    }

    /// glibc's `pthread_key_delete`, forgetting the key.
    ///
    /// # Safety
    /// As glibc's.
    #[unsafe(no_mangle)]
    pub unsafe extern "C" fn pthread_key_delete(key: Key) -> c_int {
        pins::key_deleted(key);
        match next::<KeyDeleteFn>(c"pthread_key_delete", &KEY_DELETE) {
            // SAFETY: glibc's function, with the caller's own argument.
            Some(real) => unsafe { real(key) },
            None => libc::EINVAL,
        }
    }

    /// glibc's `pthread_setspecific`, noting which threads hold values of
    /// plugin keys.
    ///
    /// # Safety
    /// As glibc's.
    #[unsafe(no_mangle)]
    pub unsafe extern "C" fn pthread_setspecific(key: Key, value: *const c_void) -> c_int {
        let Some(real) = next::<SetSpecificFn>(c"pthread_setspecific", &SET_SPECIFIC) else {
            return libc::EINVAL;
        };
        // SAFETY: glibc's function, with the caller's own arguments.
        let rc = unsafe { real(key, value) };
        if rc == 0 && !value.is_null() {
            pins::value_set(key);
        }
        rc
    }
}

/// Runs this thread's value of `key` through `dtor`, as glibc does at
/// thread exit, after clearing it (so glibc will not run it again).
pub(crate) fn release_value(key: Key, dtor: KeyDtor) {
    // SAFETY: reads this thread's value of a key that exists: `pins`
    // deletes a library's keys only once no thread holds values of them.
    let value = unsafe { libc::pthread_getspecific(key) };
    if value.is_null() {
        return;
    }
    // SAFETY: clearing this thread's value of the key.
    unsafe { libc::pthread_setspecific(key, std::ptr::null()) };
    // SAFETY: `dtor` is the destructor plugin code gave for `key`, called
    // with a non-null value of this thread, once, as glibc would at exit;
    // the library is held (mapped) until this returns.
    unsafe { (dtor.0)(value) };
}

/// Deletes a key created by plugin code that nothing holds values of any
/// more: its destructor will never run, and its slot is free again.
pub(crate) fn delete_key(key: Key) {
    // SAFETY: `pins` hands out only keys created by plugin code of a
    // library being closed, which no thread holds a value of.
    unsafe { libc::pthread_key_delete(key) };
}

/// Whether `addr` is inside a library the loader has mapped.
pub(crate) fn is_mapped(addr: usize) -> bool {
    let mut info = std::mem::MaybeUninit::<libc::Dl_info>::zeroed();
    // SAFETY: `dladdr` only reads the loader's tables for the address
    // (mapped or not) and writes the struct it is given.
    unsafe { libc::dladdr(addr as *const std::ffi::c_void, info.as_mut_ptr()) != 0 }
}

/// The calling thread's kernel id.
#[cfg(target_os = "linux")]
pub(crate) fn thread_id() -> i32 {
    // SAFETY: gettid has no preconditions.
    unsafe { libc::gettid() }
}

/// Not used where nothing is tracked.
#[cfg(not(target_os = "linux"))]
pub(crate) fn thread_id() -> i32 {
    0
}

/// Elsewhere than on glibc nothing is interposed: musl's `dlclose` unmaps
/// nothing, and macOS refuses to unload images that use thread-locals.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub(crate) fn missing_exports() -> Vec<&'static str> {
    vec!["(dynplug interposes only glibc's functions)"]
}

/// The definitions plugins would not see: those the executable does not
/// export (empty when plugins bind to all of them).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub(crate) fn missing_exports() -> Vec<&'static str> {
    let ours: [(&std::ffi::CStr, usize); 4] = [
        (
            c"__cxa_thread_atexit_impl",
            glibc::__cxa_thread_atexit_impl as *const () as usize,
        ),
        (
            c"pthread_key_create",
            glibc::pthread_key_create as *const () as usize,
        ),
        (
            c"pthread_key_delete",
            glibc::pthread_key_delete as *const () as usize,
        ),
        (
            c"pthread_setspecific",
            glibc::pthread_setspecific as *const () as usize,
        ),
    ];
    ours.into_iter()
        .filter(|(name, addr)| {
            // SAFETY: a lookup by name in the global scope, the one plugins
            // search first.
            let found = unsafe { libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr()) };
            found as usize != *addr
        })
        .map(|(name, _)| name.to_str().unwrap_or_default())
        .collect()
}
