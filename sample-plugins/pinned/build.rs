//! Links the library with `-z nodelete`: glibc then keeps it mapped after
//! `dlclose`, the way a pinned library (a thread-local with a destructor on a
//! live thread) stays, so tests can check that dynplug reports it leaked.

fn main() {
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux") {
        println!("cargo:rustc-cdylib-link-arg=-Wl,-z,nodelete");
    }
}
