/// Exports a plugin's entries under the stable ABI.
///
/// ```ignore
/// export_plugin!(execute);
/// export_plugin!(execute, init = init, shutdown = shutdown);
/// export_plugin!(plugin = MyPlugin); // a type implementing `Plugin`
/// ```
///
/// * `execute: fn(&mut Context) -> Result<(), PluginError>`
/// * `init: fn(&Value) -> Result<(), PluginError>`, called once after load with
///   the manifest's `config` (or [`Value::Null`](crate::Value::Null)).
/// * `shutdown: fn()`, called once before the plugin is unloaded.
///
/// Each entry runs under `catch_unwind`, so a panic becomes an error carrying
/// its message. The crate must be built with `panic = "unwind"` (the default):
/// under `panic = "abort"` a panic ends the host process.
#[macro_export]
macro_rules! export_plugin {
    (plugin = $plugin:ty $(,)?) => {
        const _: () = {
            static __DYNPLUG_STATE: $crate::__private::State<$plugin> =
                $crate::__private::State::new();
            fn __dynplug_plugin_execute(
                ctx: &mut $crate::Context,
            ) -> ::std::result::Result<(), $crate::PluginError> {
                __DYNPLUG_STATE.execute(ctx)
            }
            fn __dynplug_plugin_init(
                config: &$crate::Value,
            ) -> ::std::result::Result<(), $crate::PluginError> {
                __DYNPLUG_STATE.init(config)
            }
            fn __dynplug_plugin_shutdown() {
                __DYNPLUG_STATE.shutdown()
            }
            $crate::export_plugin!(
                __dynplug_plugin_execute,
                init = __dynplug_plugin_init,
                shutdown = __dynplug_plugin_shutdown
            );
        };
    };
    ($execute:path $(, init = $init:path)? $(, shutdown = $shutdown:path)? $(,)?) => {
        const _: () = {
            unsafe extern "C" fn __dynplug_execute(ctx: *mut $crate::ffi::FfiContext) -> u32 {
                // SAFETY: called by the host with a valid, exclusive context.
                #[allow(unsafe_code)]
                unsafe { $crate::ffi::run_execute(ctx, $execute) }
            }
            static __DYNPLUG_VTABLE: $crate::ffi::PluginVtable = $crate::ffi::PluginVtable {
                execute: __dynplug_execute,
                init: $crate::__dynplug_init!($($init)?),
                shutdown: $crate::__dynplug_shutdown!($($shutdown)?),
            };
            /// The plugin's root, read by the dynplug host.
            #[allow(unsafe_code)]
            #[unsafe(no_mangle)]
            pub static DYNPLUG_PLUGIN_ROOT: $crate::ffi::PluginHeader =
                $crate::ffi::PluginHeader::new(&__DYNPLUG_VTABLE);
        };
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __dynplug_init {
    () => {
        None
    };
    ($init:path) => {{
        unsafe extern "C" fn __dynplug_init(
            config: $crate::ffi::ValueView,
            sink: $crate::ffi::ErrorSink,
        ) -> u32 {
            // SAFETY: called by the host with a valid config view and sink.
            #[allow(unsafe_code)]
            unsafe {
                $crate::ffi::run_init(config, sink, $init)
            }
        }
        Some(__dynplug_init)
    }};
}

#[doc(hidden)]
#[macro_export]
macro_rules! __dynplug_shutdown {
    () => {
        None
    };
    ($shutdown:path) => {{
        unsafe extern "C" fn __dynplug_shutdown(sink: $crate::ffi::ErrorSink) -> u32 {
            // SAFETY: called by the host with a valid sink.
            #[allow(unsafe_code)]
            unsafe {
                $crate::ffi::run_shutdown(sink, $shutdown)
            }
        }
        Some(__dynplug_shutdown)
    }};
}
