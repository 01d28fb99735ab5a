//! Failure fixture: each label ends the process that runs it in its own
//! way. Only safe to load with `isolation: "process"`, where the host
//! outlives it.
//!
//! * `ok`: sets `ok` and the runner's `pid`;
//! * `segfault`: writes through a null pointer (SIGSEGV);
//! * `abort`: `std::process::abort()` (SIGABRT);
//! * `overflow`: unbounded recursion (Rust reports the stack overflow and
//!   aborts);
//! * `hog`: allocates and fills `mb` MiB (default 4096);
//! * `spin`: runs `ms` milliseconds (default 60 000), ignoring its deadline;
//! * `burn`: keeps a core busy for `ms` milliseconds (default 60 000).
#![allow(unsafe_code)]

use std::time::{Duration, Instant};

use plugin_abi::{Context, PluginError, export_plugin};

fn execute(ctx: &mut Context) -> Result<(), PluginError> {
    let ms =
        |ctx: &Context| Duration::from_millis(ctx.get_i64("ms").unwrap_or(60_000).max(0) as u64);
    match ctx.label() {
        "ok" => {
            ctx.set("ok", true);
            ctx.set("pid", i64::from(std::process::id()));
        }
        "segfault" => {
            let null = std::hint::black_box(std::ptr::null_mut::<u64>());
            // SAFETY: none: this fixture crashes on purpose, in a process
            // of its own.
            unsafe { null.write_volatile(1) };
        }
        "abort" => std::process::abort(),
        "overflow" => {
            ctx.set("depth", recurse(std::hint::black_box(0)) as i64);
        }
        "hog" => {
            let mb = ctx.get_i64("mb").unwrap_or(4096).max(0) as usize;
            let block = vec![1u8; mb * 1024 * 1024];
            ctx.set("filled", std::hint::black_box(&block).len() as i64);
        }
        "spin" => {
            let until = Instant::now() + ms(ctx);
            while Instant::now() < until {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        "burn" => {
            let until = Instant::now() + ms(ctx);
            let mut x = 0u64;
            while Instant::now() < until {
                x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
            }
            ctx.set("x", x as i64);
        }
        other => return Err(PluginError::new(format!("unknown label {other}"))),
    }
    Ok(())
}

#[allow(unconditional_recursion)]
fn recurse(n: u64) -> u64 {
    let frame = std::hint::black_box([n; 64]);
    recurse(frame[0] + 1) + frame[1]
}

export_plugin!(execute);
