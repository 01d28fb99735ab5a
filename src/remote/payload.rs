//! What goes into a call's `Payload` (or JSON `params`) and what its reply
//! does to the context.
//!
//! The context's values go as one JSON object. A reply that is a JSON
//! object sets values back (each key, as if the plugin had set it); any
//! other reply is kept whole as bytes under [`REPLY_KEY`], which the HTTP
//! façade sends as the response body. So an unmodified goplugin plugin,
//! which answers plain bytes, works, and a dynplug-aware one exchanges
//! values. One more rule makes dynplug's own goplugin façade transparent:
//! a context whose only value is `payload` (bytes) sends those bytes as
//! they are.
//!
//! JSON-RPC and Docker plugins get the values as their `params` object
//! (always an object: there is no raw case), and their result sets values
//! back the same way: an object sets each key, anything else (an array, a
//! string, `null`) is kept whole under [`RESULT_KEY`] as a value.

use std::collections::BTreeMap;

use crate::{Context, Value};

/// Where a reply that is not a JSON object goes.
pub const REPLY_KEY: &str = "response.body";

/// Where a JSON-RPC result (or a Docker reply body) that is not a JSON
/// object goes, as a value.
pub const RESULT_KEY: &str = "result";

/// The payload of a call with these values.
pub(crate) fn encode(ctx: &Context) -> Vec<u8> {
    if ctx.values.len() == 1
        && let Some(Value::Bytes(raw)) = ctx.get("payload")
    {
        return raw.clone();
    }
    // Sorted: the same values make the same bytes.
    let values: BTreeMap<&str, &Value> = ctx.values().collect();
    serde_json::to_vec(&values).unwrap_or_else(|_| b"{}".to_vec())
}

/// The values as one JSON object: JSON-RPC's `params`, Docker's body.
pub(crate) fn params(ctx: &Context) -> Vec<u8> {
    let values: BTreeMap<&str, &Value> = ctx.values().collect();
    serde_json::to_vec(&values).unwrap_or_else(|_| b"{}".to_vec())
}

/// Writes a JSON result into the context.
pub(crate) fn apply_json(ctx: &mut Context, result: serde_json::Value) {
    match result {
        serde_json::Value::Object(values) => {
            for (key, value) in values {
                ctx.set_from_plugin(&key, Value::from(value));
            }
        }
        other => ctx.set_from_plugin(RESULT_KEY, Value::from(other)),
    }
}

/// Writes a reply payload into the context.
pub(crate) fn apply(ctx: &mut Context, reply: Vec<u8>) {
    if reply.is_empty() {
        return;
    }
    if reply.first() == Some(&b'{')
        && let Ok(serde_json::Value::Object(values)) = serde_json::from_slice(&reply)
    {
        for (key, value) in values {
            ctx.set_from_plugin(&key, Value::from(value));
        }
        return;
    }
    ctx.set_from_plugin(REPLY_KEY, Value::Bytes(reply));
}

/// Lower-case hex, as the REST protocol carries payloads.
pub(crate) fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    out
}

/// Hex of either case back to bytes; `None` if it is not hex.
pub(crate) fn unhex(text: &str) -> Option<Vec<u8>> {
    let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let bytes = text.as_bytes();
    if !bytes.len().is_multiple_of(2) {
        return None;
    }
    bytes
        .chunks_exact(2)
        .map(|pair| Some(digit(pair[0])? << 4 | digit(pair[1])?))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_round_trip_and_bytes_land_under_one_key() {
        let ctx = Context::new("x").with("name", "Ada").with("n", 3);
        let payload = encode(&ctx);
        assert_eq!(payload, br#"{"n":3,"name":"Ada"}"#);
        let mut back = Context::new("x");
        apply(&mut back, payload);
        assert_eq!(back.get_str("name"), Some("Ada"));
        assert_eq!(back.get_i64("n"), Some(3));
        assert_eq!(back.written().count(), 2);

        let mut plain = Context::new("x");
        apply(&mut plain, b"pong".to_vec());
        assert_eq!(plain.get_bytes(REPLY_KEY), Some(&b"pong"[..]));
        apply(&mut plain, b"[1,2]".to_vec());
        assert_eq!(plain.get_bytes(REPLY_KEY), Some(&b"[1,2]"[..]));

        let raw = Context::new("x").with("payload", Value::Bytes(b"\x00raw".to_vec()));
        assert_eq!(encode(&raw), b"\x00raw");
    }

    #[test]
    fn json_results_set_values_or_one_key() {
        let ctx = Context::new("x").with("payload", Value::Bytes(vec![1]));
        assert_eq!(params(&ctx), br#"{"payload":[1]}"#, "no raw case");
        let mut back = Context::new("x");
        apply_json(&mut back, serde_json::json!({"Groups": null, "n": 1}));
        assert_eq!(back.get("Groups"), Some(&Value::Null));
        assert_eq!(back.written().count(), 2);
        let mut back = Context::new("x");
        apply_json(&mut back, serde_json::json!(["a"]));
        assert_eq!(
            back.get(RESULT_KEY),
            Some(&Value::List(vec![Value::String("a".into())]))
        );
    }

    #[test]
    fn hex_round_trips_and_refuses_non_hex() {
        assert_eq!(hex(b"\x00\xffA"), "00ff41");
        assert_eq!(unhex("00FF41").unwrap(), b"\x00\xffA");
        assert_eq!(unhex("abc"), None);
        assert_eq!(unhex("zz"), None);
        assert_eq!(unhex("").unwrap(), b"");
    }
}
