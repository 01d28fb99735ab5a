//! Sample plugin: labels, values and typed helpers.

use plugin_abi::{Context, PluginError, Value, export_plugin};

fn execute(ctx: &mut Context) -> Result<(), PluginError> {
    match ctx.label() {
        "hello.get" => {
            let who = ctx.get_str("name").unwrap_or("world");
            let greeting = format!("hello, {who}");
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
