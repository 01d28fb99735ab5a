//! Values crossing the ABI: arbitrary JSON becomes a `Value`, is lent as a
//! `ValueView` (what the host and plugins pass each other) and copied back.
//! Run with `cargo +nightly fuzz run value_views`.
//!
//! The copy equals the original, for every shape and depth the JSON parser
//! accepts; bytes are checked too.
#![no_main]

use libfuzzer_sys::fuzz_target;
use plugin_abi::Value;
use plugin_abi::ffi::ValueView;

fn cross(value: &Value) -> Value {
    let view = ValueView::of(value);
    // SAFETY: the view was made from `value`, alive and unmodified here.
    unsafe { view.to_value() }
}

fuzz_target!(|data: &[u8]| {
    let bytes = Value::Bytes(data.to_vec());
    assert_eq!(cross(&bytes), bytes);
    if let Ok(json) = serde_json::from_slice::<serde_json::Value>(data) {
        let value = Value::from(json);
        assert_eq!(cross(&value), value);
        let wrapped = Value::List(vec![value.clone(), Value::Map([("k".into(), value)].into())]);
        assert_eq!(cross(&wrapped), wrapped);
    }
});
