//! Sample plugin: labels, values and typed helpers.

use std::collections::BTreeMap;

use plugin_abi::{Context, PluginError, Value, export_plugin};

/// `name` from the values, else from the route (`params`), the query or a
/// JSON body; borrowed from the host, never copied.
fn name(ctx: &Context) -> &str {
    ctx.get_str("name")
        .or_else(|| {
            ["params", "query", "json"]
                .iter()
                .find_map(|map| ctx.get_str_in(map, "name"))
        })
        .unwrap_or("world")
}

fn execute(ctx: &mut Context) -> Result<(), PluginError> {
    match ctx.label() {
        // Over HTTP or gRPC the reply is what it sets: {"greeting": "..."}.
        "hello.get" => {
            let greeting = format!("hello, {}", name(ctx));
            ctx.set("greeting", greeting);
            Ok(())
        }
        "hello.sum" => {
            let numbers: Vec<i64> = ctx.get_as("numbers")?;
            ctx.set("sum", numbers.iter().sum::<i64>());
            ctx.set("count", numbers.len() as i64);
            Ok(())
        }
        "hello.echo" => {
            for (key, value) in ctx.entries() {
                ctx.set(&format!("echo.{key}"), value);
            }
            Ok(())
        }
        "hello.describe" => {
            let kinds: Vec<Value> = ctx
                .entries()
                .iter()
                .map(|(k, v)| Value::from(format!("{k}:{}", v.kind())))
                .collect();
            ctx.set("kinds", kinds);
            Ok(())
        }
        // Shapes an HTTP response from the route's `:kind` and the query.
        "hello.respond" => {
            let param = |ctx: &Context, map: &str, key: &str| {
                ctx.get(map)
                    .and_then(|m| m.as_map()?.get(key)?.as_str().map(str::to_owned))
            };
            let kind = param(ctx, "params", "kind").unwrap_or_default();
            let status = param(ctx, "query", "status").and_then(|s| s.parse::<i64>().ok());
            let header = param(ctx, "query", "header");
            match kind.as_str() {
                "text" => ctx.set("response.body", "plain text"),
                "bytes" => ctx.set("response.body", vec![0u8, 159, 146, 150]),
                "json" => ctx.set("response.body", Value::List(vec![1.into(), "two".into()])),
                "none" => {}
                other => return Err(PluginError::new(format!("no response kind {other}"))),
            }
            if let Some(status) = status {
                ctx.set("response.status", status);
            }
            if let Some(value) = header {
                let headers = BTreeMap::from([("x-hello".to_owned(), Value::from(value))]);
                ctx.set("response.headers", Value::Map(headers));
            }
            Ok(())
        }
        // The call-overhead benchmark: two strings in, one out.
        "bench.noop" => {
            let a = ctx.get_str("a").unwrap_or_default();
            let out = a.to_owned();
            let _b = ctx.get_str("b");
            ctx.set("out", out);
            Ok(())
        }
        other => Err(PluginError::new(format!("unknown label {other}"))),
    }
}

export_plugin!(execute);
