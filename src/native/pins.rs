//! What plugin code leaves on the threads it runs on, and when a loaded
//! library may therefore be closed.
//!
//! Measured on Linux/glibc 2.36 with Rust 1.95 (a plugin is a `cdylib` with
//! its own copy of std): plugin code that touches a `thread_local!` holding
//! a type with `Drop` registers a destructor with `__cxa_thread_atexit_impl`,
//! which glibc runs at that thread's exit and which pins the library (its
//! `dlclose` unmaps nothing until the thread exits). Plugin code that calls
//! `std::thread::current()` creates one pthread key per loaded copy (std's
//! thread-cleanup guard, with a destructor in the plugin) and sets it on
//! each thread: the key never pins, so after `dlclose` the thread crashes at
//! exit in unmapped code, and the keys of ~1,020 copies exhaust glibc's 1,024.
//!
//! When the host executable exports dynplug's definitions of those C
//! functions (`ffi::interpose`), every such registration made by plugin code
//! comes here instead, attributed to its library by address:
//! * thread-local destructors are kept per thread (`Held`), not given to
//!   glibc, and run by dynplug: when the thread exits (in registration
//!   order reversed, as glibc would), or earlier, at the thread's next call
//!   into any plugin, once their library is out of service;
//! * keys are remembered per library, and each thread's values of them are
//!   released (the key's destructor run) at the same moments;
//! * a retired library is closed once no thread holds anything of it (at
//!   once, usually), after its keys are deleted, so neither crash nor key
//!   exhaustion can happen; until then it is *pinned*, and the threads that
//!   pin it are known by name.
//!
//! Without those exports (`tracking()` is `false`), nothing is seen, and
//! code that ran on a caller's thread is never closed.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, OnceLock};

use super::ffi::interpose::{self, Key, KeyDtor, ThreadDtor};

/// One opened library, as this registry knows it; never reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct LibId(u64);

/// Runs once nothing of a retired library is held any more, with the keys
/// it created (still to delete).
type Finish = Box<dyn FnOnce(Keys) + Send>;

/// The pthread keys a library's code created, as it is closed.
#[derive(Default)]
pub(crate) struct Keys {
    /// With their destructor in the library (or none): deleted before
    /// `dlclose`, so no thread exit calls into the unmapped code.
    pub(crate) own: Vec<Key>,
    /// With their destructor in another library, created while this one's
    /// code ran (a shared library it calls): deleted after `dlclose` only
    /// if that destructor's code went with it; a library still loaded
    /// keeps its key (deleting it would pull it from under its owner).
    pub(crate) foreign: Vec<(Key, KeyDtor)>,
}

struct Lib {
    /// Where it is mapped (start, end).
    span: (usize, usize),
    keys: Vec<(Key, Option<KeyDtor>)>,
    /// Thread id → thread-local destructors and key values it holds.
    holders: BTreeMap<i32, usize>,
    /// `Some` once retired and pinned: what to do when released.
    finish: Option<Finish>,
    retired: bool,
}

struct Registry {
    libs: BTreeMap<LibId, Lib>,
    /// Span start → (end, library).
    spans: BTreeMap<usize, (usize, LibId)>,
    /// Key → the library that created it.
    keys: BTreeMap<Key, LibId>,
    next: u64,
}

impl Registry {
    const fn new() -> Registry {
        Registry {
            libs: BTreeMap::new(),
            spans: BTreeMap::new(),
            keys: BTreeMap::new(),
            next: 1,
        }
    }

    fn owner_of(&self, addr: usize) -> Option<LibId> {
        let (_, &(end, id)) = self.spans.range(..=addr).next_back()?;
        (addr < end).then_some(id)
    }

    /// Takes `count` holdings of `lib` away from thread `tid`; `true` if
    /// that released a retired library (the reaper then finishes it).
    fn release(&mut self, lib: LibId, tid: i32, count: usize) -> bool {
        let Some(entry) = self.libs.get_mut(&lib) else {
            return false;
        };
        if let Some(held) = entry.holders.get_mut(&tid) {
            *held = held.saturating_sub(count);
            if *held == 0 {
                entry.holders.remove(&tid);
            }
        }
        entry.holders.is_empty() && entry.finish.is_some()
    }

    /// Retired libraries nothing holds any more, taken out with their keys.
    fn released(&mut self) -> Vec<(Finish, Keys)> {
        let free: Vec<LibId> = self
            .libs
            .iter()
            .filter(|(_, l)| l.holders.is_empty() && l.finish.is_some())
            .map(|(id, _)| *id)
            .collect();
        free.into_iter()
            .filter_map(|lib| {
                let finish = self.libs.get_mut(&lib)?.finish.take()?;
                Some((finish, self.forget(lib)))
            })
            .collect()
    }

    /// Removes a library that nothing holds; returns its keys.
    fn forget(&mut self, lib: LibId) -> Keys {
        let Some(entry) = self.libs.remove(&lib) else {
            return Keys::default();
        };
        self.spans.remove(&entry.span.0);
        let (start, end) = entry.span;
        let mut keys = Keys::default();
        for (key, dtor) in entry.keys {
            self.keys.remove(&key);
            key_bit(key, false);
            match dtor {
                Some(dtor) if !(start..end).contains(&dtor.addr()) => {
                    keys.foreign.push((key, dtor));
                }
                _ => keys.own.push(key),
            }
        }
        keys
    }
}

static REGISTRY: Mutex<Registry> = Mutex::new(Registry::new());
/// Libraries registered: while 0, no registration can be a plugin's.
static LIBRARIES: AtomicUsize = AtomicUsize::new(0);
/// Bumped when a pinned library is retired: threads then look at what they hold.
static RETIREMENTS: AtomicU64 = AtomicU64::new(0);
/// Keys created by plugin code (glibc has 1,024), for a check without the lock.
static PLUGIN_KEYS: [AtomicU64; 16] = [const { AtomicU64::new(0) }; 16];

fn key_bit(key: Key, on: bool) {
    let Some(word) = PLUGIN_KEYS.get(key as usize / 64) else {
        return;
    };
    let bit = 1u64 << (key % 64);
    if on {
        word.fetch_or(bit, Ordering::AcqRel);
    } else {
        word.fetch_and(!bit, Ordering::AcqRel);
    }
}

fn is_plugin_key(key: Key) -> bool {
    PLUGIN_KEYS
        .get(key as usize / 64)
        // Keys past glibc's 1,024 do not exist; look them up anyway.
        .is_none_or(|word| word.load(Ordering::Acquire) & (1u64 << (key % 64)) != 0)
}

fn registry() -> std::sync::MutexGuard<'static, Registry> {
    REGISTRY.lock().unwrap_or_else(|e| e.into_inner())
}

/// What one thread holds of plugin code.
struct Held {
    tid: i32,
    dtors: Vec<(LibId, ThreadDtor)>,
    values: Vec<(LibId, Key, KeyDtor)>,
}

impl Held {
    const fn new() -> Held {
        Held {
            tid: 0,
            dtors: Vec::new(),
            values: Vec::new(),
        }
    }

    fn tid(&mut self) -> i32 {
        if self.tid == 0 {
            self.tid = interpose::thread_id();
        }
        self.tid
    }
}

impl Drop for Held {
    /// The thread is exiting: everything it holds runs now, while every
    /// library it holds is still mapped (that is what holding means).
    fn drop(&mut self) {
        let tid = self.tid;
        let mut released: BTreeMap<LibId, usize> = BTreeMap::new();
        while let Some((lib, dtor)) = self.dtors.pop() {
            dtor.run();
            *released.entry(lib).or_default() += 1;
        }
        for (lib, key, dtor) in self.values.drain(..) {
            if still_owns(lib, key) {
                interpose::release_value(key, dtor);
            }
            *released.entry(lib).or_default() += 1;
        }
        settle(tid, released);
    }
}

thread_local! {
    /// The last value of `RETIREMENTS` this thread acted on.
    static SEEN: Cell<u64> = const { Cell::new(0) };
    /// The library whose code runs on this thread now (0: none).
    static RUNNING: Cell<u64> = const { Cell::new(0) };
    static HELD: RefCell<Held> = const { RefCell::new(Held::new()) };
}

/// Takes away what a thread released; has the reaper finish libraries that
/// became free.
fn settle(tid: i32, released: BTreeMap<LibId, usize>) {
    if released.is_empty() {
        return;
    }
    let mut free = false;
    {
        let mut registry = registry();
        for (lib, count) in released {
            free |= registry.release(lib, tid, count);
        }
    }
    if free {
        reaper().wake();
    }
}

/// Whether this process lets dynplug see the per-thread registrations of
/// plugin code (the executable exports dynplug's definitions, and
/// `DYNPLUG_THREAD_TRACKING` is not `off`). Decided once.
pub(crate) fn tracking() -> bool {
    static TRACKING: OnceLock<bool> = OnceLock::new();
    *TRACKING.get_or_init(|| !switched_off() && interpose::missing_exports().is_empty())
}

/// `DYNPLUG_THREAD_TRACKING=off`: behave as if the executable did not
/// export the interposers (registrations then go straight to glibc).
pub(crate) fn switched_off() -> bool {
    std::env::var_os("DYNPLUG_THREAD_TRACKING").is_some_and(|v| v == "off")
}

/// Registers a library just opened, mapped over `span`.
pub(crate) fn register(span: (usize, usize)) -> LibId {
    let mut registry = registry();
    let id = LibId(registry.next);
    registry.next += 1;
    registry.spans.insert(span.0, (span.1, id));
    registry.libs.insert(
        id,
        Lib {
            span,
            keys: Vec::new(),
            holders: BTreeMap::new(),
            finish: None,
            retired: false,
        },
    );
    LIBRARIES.fetch_add(1, Ordering::AcqRel);
    id
}

/// Forgets a library closed without having served (a refused load).
pub(crate) fn unregister(lib: LibId) {
    registry().forget(lib);
}

/// Plugin code of `lib` is about to run on this thread: first let go of
/// what the thread holds of libraries retired since it last looked (cheap
/// when there is none), then mark `lib` as running until the guard drops.
#[inline]
pub(crate) fn entering(lib: LibId) -> Running {
    let retirements = RETIREMENTS.load(Ordering::Acquire);
    if SEEN.get() != retirements {
        SEEN.set(retirements);
        release_retired();
    }
    Running(RUNNING.replace(lib.0))
}

/// While alive, plugin code of a library runs on this thread.
pub(crate) struct Running(u64);

impl Drop for Running {
    #[inline]
    fn drop(&mut self) {
        RUNNING.set(self.0);
    }
}

/// A thread that runs no plugin code now can let go of retired libraries
/// (pool workers between jobs, for instance).
pub(crate) fn between_calls() {
    let retirements = RETIREMENTS.load(Ordering::Acquire);
    if SEEN.get() != retirements {
        SEEN.set(retirements);
        release_retired();
    }
}

fn release_retired() {
    // Which libraries this thread holds, then which of them are retired.
    let Ok(mine) = HELD.try_with(|held| {
        let held = held.borrow();
        let mut libs: Vec<LibId> = held.dtors.iter().map(|(lib, _)| *lib).collect();
        libs.extend(held.values.iter().map(|(lib, _, _)| *lib));
        libs.sort_unstable();
        libs.dedup();
        libs
    }) else {
        return;
    };
    if mine.is_empty() {
        return;
    }
    let retired: Vec<LibId> = {
        let registry = registry();
        mine.into_iter()
            .filter(|lib| registry.libs.get(lib).is_some_and(|l| l.retired))
            .collect()
    };
    if retired.is_empty() {
        return;
    }
    // Run them with no borrow held: a destructor may register another, or
    // set its value again. As glibc stops after four rounds, so does this:
    // what is still there after that stays held (until the thread exits).
    let mut budget = HELD
        .try_with(|held| {
            let held = held.borrow();
            4 * (held.dtors.len() + held.values.len())
        })
        .unwrap_or(0);
    let mut released: BTreeMap<LibId, usize> = BTreeMap::new();
    let mut tid = 0;
    while budget > 0 {
        budget -= 1;
        let next = HELD.try_with(|held| {
            let mut held = held.borrow_mut();
            tid = held.tid();
            if let Some(i) = held
                .dtors
                .iter()
                .rposition(|(lib, _)| retired.contains(lib))
            {
                let (lib, dtor) = held.dtors.remove(i);
                return Some(Ok((lib, dtor)));
            }
            let i = held
                .values
                .iter()
                .position(|(lib, _, _)| retired.contains(lib))?;
            Some(Err(held.values.remove(i)))
        });
        match next {
            Ok(Some(Ok((lib, dtor)))) => {
                dtor.run();
                *released.entry(lib).or_default() += 1;
            }
            Ok(Some(Err((lib, key, dtor)))) => {
                if still_owns(lib, key) {
                    interpose::release_value(key, dtor);
                }
                *released.entry(lib).or_default() += 1;
            }
            _ => break,
        }
    }
    let any = !released.is_empty();
    settle(tid, released);
    if any {
        // A reaper that could not start when the library was retired gets
        // another chance here (never from an exiting thread).
        reaper().start();
    }
}

/// Whether `key` is still the one `lib`'s code created: a key it deleted
/// (and glibc may have handed to someone else since) is not released with
/// its old destructor.
fn still_owns(lib: LibId, key: Key) -> bool {
    registry().keys.get(&key) == Some(&lib)
}

/// Records `count` more holdings of `lib` by this thread.
fn hold(lib: LibId, tid: i32) {
    let mut registry = registry();
    if let Some(entry) = registry.libs.get_mut(&lib) {
        *entry.holders.entry(tid).or_default() += 1;
    }
}

/// A thread-local destructor is being registered for the object `dso`
/// belongs to: kept here if that is a plugin library, else handed back.
pub(crate) fn thread_dtor(dso: usize, dtor: ThreadDtor) -> Result<(), ThreadDtor> {
    if LIBRARIES.load(Ordering::Acquire) == 0 {
        return Err(dtor);
    }
    let Some(lib) = registry().owner_of(dso) else {
        return Err(dtor);
    };
    // The borrow ends before `hold` locks. (The first use of `HELD` on a
    // thread registers its own destructor, through the interposer, as the
    // host's.)
    let mut dtor = Some(dtor);
    let kept = HELD.try_with(|held| {
        let mut held = held.borrow_mut();
        let tid = held.tid();
        held.dtors.extend(dtor.take().map(|d| (lib, d)));
        tid
    });
    match (kept, dtor) {
        (Ok(tid), None) => {
            hold(lib, tid);
            Ok(())
        }
        // The thread is past its own exit work: glibc keeps this one, and
        // pins the library itself (reported if it stays mapped).
        (_, Some(dtor)) => Err(dtor),
        (Err(_), None) => Ok(()),
    }
}

/// Plugin code (or not) created `key` with `dtor`.
pub(crate) fn key_created(key: Key, dtor: Option<KeyDtor>) {
    if LIBRARIES.load(Ordering::Acquire) == 0 {
        return;
    }
    let running = RUNNING.get();
    let mut registry = registry();
    let owner = match dtor.map(|d| registry.owner_of(d.addr())) {
        // Its destructor is a plugin's code: that plugin's key.
        Some(Some(lib)) => Some(lib),
        // Another library's destructor, set up while plugin code ran (a
        // shared library it calls): the values pin that plugin, and its
        // close deletes the key only if the destructor went with it.
        Some(None) => (running != 0).then_some(LibId(running)),
        // No destructor: no thread exit ever calls into anything, and the
        // key may be any library's: not ours to delete.
        None => None,
    }
    .filter(|lib| registry.libs.contains_key(lib));
    let Some(lib) = owner else { return };
    if let Some(entry) = registry.libs.get_mut(&lib) {
        entry.keys.push((key, dtor));
    }
    registry.keys.insert(key, lib);
    key_bit(key, true);
}

/// `key` was deleted (by whoever created it).
pub(crate) fn key_deleted(key: Key) {
    if !is_plugin_key(key) {
        return;
    }
    let mut registry = registry();
    if let Some(lib) = registry.keys.remove(&key)
        && let Some(entry) = registry.libs.get_mut(&lib)
    {
        entry.keys.retain(|&(k, _)| k != key);
    }
    key_bit(key, false);
}

/// This thread set a non-null value for `key`.
pub(crate) fn value_set(key: Key) {
    if !is_plugin_key(key) {
        return;
    }
    let owner = {
        let registry = registry();
        registry.keys.get(&key).and_then(|lib| {
            let (_, dtor) = registry
                .libs
                .get(lib)?
                .keys
                .iter()
                .find(|(k, _)| *k == key)?;
            Some((*lib, (*dtor)?))
        })
    };
    // A key without a destructor holds nothing.
    let Some((lib, dtor)) = owner else { return };
    let new = HELD.try_with(|held| {
        let mut held = held.borrow_mut();
        let tid = held.tid();
        if held.values.iter().any(|&(l, k, _)| l == lib && k == key) {
            return None;
        }
        held.values.push((lib, key, dtor));
        Some(tid)
    });
    match new {
        Ok(Some(tid)) => hold(lib, tid),
        Ok(None) => {}
        // The thread is past its own exit work (its `HELD` is gone, say a
        // plugin destructor run from `Held::drop` set the key): glibc will
        // call the key's destructor after everything dynplug sees. Held
        // for good, so the library is never closed under it (reported
        // pinned by an exited thread, as glibc's own holds are).
        Err(_) => hold(lib, interpose::thread_id()),
    }
}

/// A thread that still holds something of a retired library.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Holder {
    pub(crate) tid: i32,
    /// Its name (`/proc/self/task/<tid>/comm`), if it still runs.
    pub(crate) name: Option<String>,
    /// Thread-local destructors and key values it holds.
    pub(crate) count: usize,
}

/// What `retire` found.
pub(crate) enum Retired<T> {
    /// Nothing holds the library: close it now, after deleting these keys.
    Free(T, Keys),
    /// These threads hold it: `finish` runs (on a thread of dynplug's) once
    /// they let go.
    Pinned(Vec<Holder>),
}

/// The library is out of service and no call of it runs: free it now, or,
/// if threads still hold some of its state, once they let go (`finish`
/// gets `held` and the keys to delete, on a thread of dynplug's).
pub(crate) fn retire<T: Send + 'static>(
    lib: LibId,
    held: T,
    finish: impl FnOnce(T, Keys) + Send + 'static,
) -> Retired<T> {
    let holders: Vec<(i32, usize)> = {
        let mut registry = registry();
        let Some(entry) = registry.libs.get_mut(&lib) else {
            return Retired::Free(held, Keys::default());
        };
        entry.retired = true;
        if entry.holders.is_empty() {
            let keys = registry.forget(lib);
            return Retired::Free(held, keys);
        }
        entry.finish = Some(Box::new(move |keys| finish(held, keys)));
        entry.holders.iter().map(|(&tid, &n)| (tid, n)).collect()
    };
    reaper().start();
    RETIREMENTS.fetch_add(1, Ordering::AcqRel);
    Retired::Pinned(
        holders
            .into_iter()
            .map(|(tid, count)| Holder {
                tid,
                name: std::fs::read_to_string(format!("/proc/self/task/{tid}/comm"))
                    .ok()
                    .map(|n| n.trim_end().to_owned()),
                count,
            })
            .collect(),
    )
}

/// Finishes released libraries on a thread of its own (never on the thread
/// that released them: that may be a runtime worker, or a thread exiting).
/// Started by the first retirement that pins; leaves when nothing is pinned.
/// A library stays in the registry, pinned, until this thread takes it out,
/// so it cannot leave with one still to finish.
struct Reaper {
    state: Mutex<ReaperState>,
    wake: Condvar,
}

#[derive(Default)]
struct ReaperState {
    running: bool,
    /// Something was released since the reaper last looked.
    dirty: bool,
}

fn reaper() -> &'static Reaper {
    static REAPER: OnceLock<Reaper> = OnceLock::new();
    REAPER.get_or_init(|| Reaper {
        state: Mutex::new(ReaperState::default()),
        wake: Condvar::new(),
    })
}

impl Reaper {
    fn lock(&self) -> std::sync::MutexGuard<'_, ReaperState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Makes sure a reaper runs (called where starting a thread is safe).
    fn start(&'static self) {
        let mut state = self.lock();
        if state.running {
            return;
        }
        state.running = true;
        drop(state);
        let spawned = std::thread::Builder::new()
            .name("dynplug-reaper".into())
            .spawn(move || self.run());
        if let Err(e) = spawned {
            tracing::error!("cannot start dynplug-reaper ({e}): pinned libraries stay mapped");
            self.lock().running = false;
        }
    }

    /// Something was released (any thread, even one exiting: no thread is
    /// started here).
    fn wake(&self) {
        self.lock().dirty = true;
        self.wake.notify_one();
    }

    fn run(&self) {
        loop {
            let released = registry().released();
            for (finish, keys) in released {
                // A bug in one ending must not stop the reaper for the others.
                let finished =
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| finish(keys)));
                if finished.is_err() {
                    tracing::error!("dynplug-reaper: finishing a released library panicked");
                }
            }
            let mut state = self.lock();
            if std::mem::take(&mut state.dirty) {
                continue;
            }
            let pinned = registry().libs.values().any(|l| l.finish.is_some());
            if !pinned {
                state.running = false;
                return;
            }
            drop(
                self.wake
                    .wait_timeout(state, std::time::Duration::from_secs(1))
                    .unwrap_or_else(|e| e.into_inner()),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lib(span: (usize, usize)) -> Lib {
        Lib {
            span,
            keys: Vec::new(),
            holders: BTreeMap::new(),
            finish: None,
            retired: false,
        }
    }

    #[test]
    fn addresses_belong_to_the_library_mapped_over_them() {
        let mut registry = Registry::new();
        for (id, span) in [(1, (0x1000, 0x2000)), (2, (0x3000, 0x3800))] {
            registry.spans.insert(span.0, (span.1, LibId(id)));
            registry.libs.insert(LibId(id), lib(span));
        }
        assert_eq!(registry.owner_of(0x1000), Some(LibId(1)));
        assert_eq!(registry.owner_of(0x1fff), Some(LibId(1)));
        assert_eq!(registry.owner_of(0x2000), None);
        assert_eq!(registry.owner_of(0x37ff), Some(LibId(2)));
        assert_eq!(registry.owner_of(0xfff), None);
        registry.forget(LibId(1));
        assert_eq!(registry.owner_of(0x1800), None);
    }

    // Different bodies: identical ones could be folded into one address.
    extern "C" fn inside(_: *mut std::ffi::c_void) {
        std::hint::black_box(1);
    }
    extern "C" fn elsewhere(_: *mut std::ffi::c_void) {
        std::hint::black_box(2);
    }

    #[test]
    fn keys_with_a_destructor_elsewhere_are_told_apart_at_close() {
        let mut registry = Registry::new();
        let inside = KeyDtor::new(inside);
        let elsewhere = KeyDtor::new(elsewhere);
        let span = (inside.addr(), inside.addr() + 1);
        let mut entry = lib(span);
        entry.keys = vec![(7, Some(inside)), (8, Some(elsewhere)), (9, None)];
        registry.spans.insert(span.0, (span.1, LibId(1)));
        registry.libs.insert(LibId(1), entry);
        for key in [7, 8, 9] {
            registry.keys.insert(key, LibId(1));
        }
        let keys = registry.forget(LibId(1));
        assert_eq!(keys.own, [7, 9]);
        assert_eq!(
            keys.foreign.iter().map(|(k, _)| *k).collect::<Vec<_>>(),
            [8]
        );
        assert!(registry.keys.is_empty());
    }

    #[test]
    fn a_retired_library_is_released_by_its_last_holder() {
        let mut registry = Registry::new();
        let id = LibId(7);
        registry.libs.insert(id, lib((0x1000, 0x2000)));
        let entry = registry.libs.get_mut(&id).unwrap();
        entry.holders.insert(10, 2);
        entry.holders.insert(11, 1);
        entry.retired = true;
        entry.finish = Some(Box::new(|_| {}));
        assert!(!registry.release(id, 10, 2), "thread 11 still holds it");
        assert!(registry.released().is_empty());
        assert!(registry.release(id, 11, 1));
        assert_eq!(registry.released().len(), 1);
        assert!(registry.libs.is_empty(), "forgotten once taken out");
    }
}
