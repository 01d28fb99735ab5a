//! The process protocol: length-prefixed frames over a Unix stream, with
//! a compact binary encoding of the context's values.
//!
//! A frame is `u32` (little endian) length of what follows, one kind byte,
//! then the kind's fields. Integers are LEB128 varints (signed ones
//! zigzagged), floats 8 bytes little endian, strings and byte strings a
//! varint length then the bytes. A value is a tag byte then its fields:
//! `0` null, `1` false, `2` true, `3` int, `4` float, `5` string,
//! `6` bytes, `7` list (count, items), `8` map (count, key/value pairs).
//!
//! * `PING` (no fields) → `PONG`: protocol version, ABI major and minor,
//!   the runner's pid.
//! * `CALL`: the call's id (unique per process), deadline (nanoseconds
//!   left, `-1` for none), label, count, then key/value pairs: every value
//!   of the context.
//! * `CANCEL`: the id of a call whose caller cancelled it or stopped
//!   waiting; sent on another connection (the call's own is busy), never
//!   answered. The plugin sees `is_cancelled()`.
//! * `REPLY`: status (`0` ok, `1` error, `2` panic), message, the keys the
//!   plugin removed, then the key/value pairs it set, in the order it first
//!   set them: the host applies exactly that, so a context comes back as
//!   an in-process call would have left it.
//!
//! One request at a time per connection; concurrent callers use several
//! connections. The decoder trusts nothing: every length is checked
//! against the bytes left (never used to size an allocation beyond them),
//! strings must be UTF-8, and values nest at most [`MAX_DEPTH`] deep.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};

use crate::{Context, Value};

/// Bumped on any change of the frames or the encoding.
pub(crate) const VERSION: u32 = 1;
/// The largest frame either side accepts (a request carries HTTP bodies of
/// up to 16 MiB).
pub(crate) const MAX_FRAME: usize = 64 * 1024 * 1024;
/// How deep lists and maps may nest.
pub(crate) const MAX_DEPTH: usize = 128;

pub(crate) const PING: u8 = 1;
pub(crate) const PONG: u8 = 2;
pub(crate) const CALL: u8 = 3;
pub(crate) const REPLY: u8 = 4;
pub(crate) const CANCEL: u8 = 5;

/// What a plugin's entry reported, on the wire.
pub(crate) mod status {
    pub(crate) const OK: u8 = 0;
    pub(crate) const ERROR: u8 = 1;
    pub(crate) const PANIC: u8 = 2;
}

/// A frame being built: [`Frame::finish`] fills in the length.
pub(crate) struct Frame(pub(crate) Vec<u8>);

impl Frame {
    /// Starts a frame of `kind` in `buf` (cleared; its capacity is reused).
    pub(crate) fn start(mut buf: Vec<u8>, kind: u8) -> Frame {
        buf.clear();
        buf.extend_from_slice(&[0, 0, 0, 0, kind]);
        Frame(buf)
    }

    pub(crate) fn finish(mut self) -> Vec<u8> {
        let len = u32::try_from(self.0.len() - 4).unwrap_or(u32::MAX);
        self.0[..4].copy_from_slice(&len.to_le_bytes());
        self.0
    }

    pub(crate) fn u8(&mut self, v: u8) {
        self.0.push(v);
    }

    pub(crate) fn varint(&mut self, mut v: u64) {
        while v >= 0x80 {
            self.0.push((v as u8) | 0x80);
            v >>= 7;
        }
        self.0.push(v as u8);
    }

    pub(crate) fn int(&mut self, v: i64) {
        self.varint(((v << 1) ^ (v >> 63)) as u64);
    }

    pub(crate) fn bytes(&mut self, b: &[u8]) {
        self.varint(b.len() as u64);
        self.0.extend_from_slice(b);
    }

    pub(crate) fn str(&mut self, s: &str) {
        self.bytes(s.as_bytes());
    }

    pub(crate) fn value(&mut self, value: &Value) {
        match value {
            Value::Null => self.u8(0),
            Value::Bool(false) => self.u8(1),
            Value::Bool(true) => self.u8(2),
            Value::Int(i) => {
                self.u8(3);
                self.int(*i);
            }
            Value::Float(f) => {
                self.u8(4);
                self.0.extend_from_slice(&f.to_le_bytes());
            }
            Value::String(s) => {
                self.u8(5);
                self.str(s);
            }
            Value::Bytes(b) => {
                self.u8(6);
                self.bytes(b);
            }
            Value::List(items) => {
                self.u8(7);
                self.varint(items.len() as u64);
                for item in items {
                    self.value(item);
                }
            }
            Value::Map(map) => {
                self.u8(8);
                self.varint(map.len() as u64);
                for (k, v) in map {
                    self.str(k);
                    self.value(v);
                }
            }
        }
    }
}

/// Why a frame could not be read.
#[derive(Debug)]
pub(crate) enum Malformed {
    Short,
    Utf8,
    Tag(u8),
    TooDeep,
    Varint,
}

impl std::fmt::Display for Malformed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Malformed::Short => f.write_str("a frame cut short"),
            Malformed::Utf8 => f.write_str("a string that is not UTF-8"),
            Malformed::Tag(t) => write!(f, "an unknown value tag {t}"),
            Malformed::TooDeep => write!(f, "values nested more than {MAX_DEPTH} deep"),
            Malformed::Varint => f.write_str("an overlong varint"),
        }
    }
}

/// Reads the fields of one frame.
pub(crate) struct Fields<'a> {
    buf: &'a [u8],
}

type Parsed<T> = Result<T, Malformed>;

impl<'a> Fields<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Fields<'a> {
        Fields { buf }
    }

    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    fn take(&mut self, n: usize) -> Parsed<&'a [u8]> {
        if n > self.buf.len() {
            return Err(Malformed::Short);
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }

    pub(crate) fn u8(&mut self) -> Parsed<u8> {
        Ok(self.take(1)?[0])
    }

    pub(crate) fn varint(&mut self) -> Parsed<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.u8()?;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(Malformed::Varint)
    }

    pub(crate) fn int(&mut self) -> Parsed<i64> {
        let v = self.varint()?;
        Ok(((v >> 1) as i64) ^ -((v & 1) as i64))
    }

    /// A count of items that each take at least one byte: never more than
    /// the bytes left, so a hostile count cannot size an allocation.
    pub(crate) fn count(&mut self) -> Parsed<usize> {
        let n = self.varint()?;
        usize::try_from(n)
            .ok()
            .filter(|n| *n <= self.buf.len())
            .ok_or(Malformed::Short)
    }

    pub(crate) fn bytes(&mut self) -> Parsed<&'a [u8]> {
        let n = self.count()?;
        self.take(n)
    }

    pub(crate) fn str(&mut self) -> Parsed<&'a str> {
        std::str::from_utf8(self.bytes()?).map_err(|_| Malformed::Utf8)
    }

    pub(crate) fn value(&mut self) -> Parsed<Value> {
        self.value_at(0)
    }

    fn value_at(&mut self, depth: usize) -> Parsed<Value> {
        if depth > MAX_DEPTH {
            return Err(Malformed::TooDeep);
        }
        Ok(match self.u8()? {
            0 => Value::Null,
            1 => Value::Bool(false),
            2 => Value::Bool(true),
            3 => Value::Int(self.int()?),
            4 => {
                let raw: [u8; 8] = self.take(8)?.try_into().map_err(|_| Malformed::Short)?;
                Value::Float(f64::from_le_bytes(raw))
            }
            5 => Value::String(self.str()?.to_owned()),
            6 => Value::Bytes(self.bytes()?.to_vec()),
            7 => {
                let n = self.count()?;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.value_at(depth + 1)?);
                }
                Value::List(items)
            }
            8 => {
                let n = self.count()?;
                let mut map = BTreeMap::new();
                for _ in 0..n {
                    let key = self.str()?.to_owned();
                    map.insert(key, self.value_at(depth + 1)?);
                }
                Value::Map(map)
            }
            tag => return Err(Malformed::Tag(tag)),
        })
    }
}

/// A `CALL` frame for `ctx`, whose deadline (if any) is `left_nanos` away.
pub(crate) fn call(buf: Vec<u8>, id: u64, ctx: &Context, left_nanos: Option<u64>) -> Vec<u8> {
    let mut frame = Frame::start(buf, CALL);
    frame.varint(id);
    frame.int(left_nanos.map_or(-1, |n| i64::try_from(n).unwrap_or(i64::MAX)));
    frame.str(ctx.label());
    frame.varint(ctx.values.len() as u64);
    for (k, v) in &ctx.values {
        frame.str(k);
        frame.value(v);
    }
    frame.finish()
}

/// A `CANCEL` frame for call `id`.
pub(crate) fn cancel(id: u64) -> Vec<u8> {
    let mut frame = Frame::start(Vec::new(), CANCEL);
    frame.varint(id);
    frame.finish()
}

/// A `CALL` frame's fields, as the runner reads them: the call's id and
/// the context to call the plugin with (its deadline set from the
/// nanoseconds left).
pub(crate) fn read_call(fields: &mut Fields<'_>) -> Parsed<(u64, Context)> {
    let id = fields.varint()?;
    let left = fields.int()?;
    let mut ctx = Context::new(fields.str()?);
    if let Ok(left) = u64::try_from(left) {
        ctx = ctx.with_timeout(std::time::Duration::from_nanos(left));
    }
    let n = fields.count()?;
    ctx.values.reserve(n);
    for _ in 0..n {
        let key = compact_str::CompactString::new(fields.str()?);
        let value = fields.value()?;
        ctx.values.insert(key, value);
    }
    Ok((id, ctx))
}

/// Applies a `REPLY` frame's fields to the caller's context; returns the
/// status and message.
pub(crate) fn apply_reply(fields: &mut Fields<'_>, ctx: &mut Context) -> Parsed<(u8, String)> {
    let status = fields.u8()?;
    let message = fields.str()?.to_owned();
    for _ in 0..fields.count()? {
        let key = fields.str()?;
        ctx.values.remove(key);
    }
    for _ in 0..fields.count()? {
        let key = fields.str()?;
        let value = fields.value()?;
        ctx.set_from_plugin(key, value);
    }
    Ok((status, message))
}

/// Reads one frame into `buf` (replacing its content): the kind and the
/// length of the fields, which follow the kind byte in `buf`.
pub(crate) fn read_frame(stream: &mut impl Read, buf: &mut Vec<u8>) -> io::Result<u8> {
    let mut head = [0u8; 4];
    stream.read_exact(&mut head)?;
    let len = frame_len(head)?;
    buf.clear();
    buf.resize(len, 0);
    stream.read_exact(buf)?;
    Ok(buf[0])
}

/// The length a frame's head announces, checked.
pub(crate) fn frame_len(head: [u8; 4]) -> io::Result<usize> {
    let len = u32::from_le_bytes(head) as usize;
    if len == 0 || len > MAX_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("a frame of {len} bytes (at most {MAX_FRAME})"),
        ));
    }
    Ok(len)
}

/// Writes a whole frame.
pub(crate) fn write_frame(stream: &mut impl Write, frame: &[u8]) -> io::Result<()> {
    stream.write_all(frame)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Value {
        Value::Map(BTreeMap::from([
            ("n".to_owned(), Value::Int(-5)),
            ("big".to_owned(), Value::Int(i64::MIN)),
            ("f".to_owned(), Value::Float(1.5)),
            ("s".to_owned(), "text ✓".into()),
            ("b".to_owned(), Value::Bytes(vec![0, 255])),
            (
                "l".to_owned(),
                Value::List(vec![Value::Null, true.into(), false.into()]),
            ),
        ]))
    }

    #[test]
    fn values_round_trip() {
        let mut frame = Frame::start(Vec::new(), CALL);
        frame.value(&sample());
        let bytes = frame.finish();
        let mut fields = Fields::new(&bytes[5..]);
        assert_eq!(fields.value().unwrap(), sample());
        assert!(fields.is_empty());
    }

    #[test]
    fn a_call_and_its_reply_round_trip() {
        let ctx = Context::new("label").with("a", sample()).with("gone", 1);
        let bytes = call(Vec::new(), 7, &ctx, Some(5_000_000));
        assert_eq!(bytes[4], CALL);
        let (id, mut got) = read_call(&mut Fields::new(&bytes[5..])).unwrap();
        assert_eq!(id, 7);
        assert_eq!(got.label(), "label");
        assert_eq!(got.get("a"), Some(&sample()));
        assert!(got.deadline().is_some());
        got.remove("gone");

        let mut reply = Frame::start(Vec::new(), REPLY);
        reply.u8(status::ERROR);
        reply.str("why");
        reply.varint(1);
        reply.str("gone");
        reply.varint(1);
        reply.str("out");
        reply.value(&Value::Int(7));
        let reply = reply.finish();
        let mut host = ctx.clone();
        let (status, message) = apply_reply(&mut Fields::new(&reply[5..]), &mut host).unwrap();
        assert_eq!((status, message.as_str()), (status::ERROR, "why"));
        assert_eq!(host.get("gone"), None);
        assert_eq!(host.get_i64("out"), Some(7));
        assert_eq!(host.written().count(), 1);
    }

    #[test]
    fn hostile_input_is_refused_without_large_allocations() {
        // A list claiming 2^60 items in three bytes.
        let mut fields = Fields::new(&[7, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 0x10]);
        assert!(matches!(fields.value(), Err(Malformed::Short)));
        let deep: Vec<u8> = std::iter::repeat_n([7u8, 1], 200).flatten().collect();
        assert!(matches!(
            Fields::new(&deep).value(),
            Err(Malformed::TooDeep)
        ));
        assert!(matches!(
            Fields::new(&[5, 1, 0xff]).value(),
            Err(Malformed::Utf8)
        ));
        assert!(matches!(Fields::new(&[9]).value(), Err(Malformed::Tag(9))));
        assert!(frame_len(u32::MAX.to_le_bytes()).is_err());
    }
}
