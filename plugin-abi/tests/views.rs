//! Values crossing the ABI as borrowed views: whatever their shape and
//! depth, the copy the receiving side makes equals the original (the same
//! entry point as the `value_views` fuzz target, run on stable by
//! `cargo test`).
#![allow(unsafe_code)]

use plugin_abi::Value;
use plugin_abi::ffi::ValueView;
use proptest::prelude::*;

fn value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::Int),
        any::<f64>()
            .prop_filter("NaN never equals itself", |f| !f.is_nan())
            .prop_map(Value::Float),
        ".{0,12}".prop_map(Value::String),
        proptest::collection::vec(any::<u8>(), 0..16).prop_map(Value::Bytes),
    ];
    leaf.prop_recursive(4, 64, 6, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::List),
            proptest::collection::btree_map(".{0,6}", inner, 0..6).prop_map(Value::Map),
        ]
    })
}

proptest! {
    #[test]
    fn a_view_copies_back_to_the_same_value(value in value()) {
        let view = ValueView::of(&value);
        // SAFETY: the view was made from `value`, alive and unmodified here.
        let copy = unsafe { view.to_value() };
        prop_assert_eq!(copy, value);
    }
}
