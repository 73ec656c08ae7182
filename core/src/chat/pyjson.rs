//! JSON text exactly as Python's `json.dumps(value, ensure_ascii=False)` writes it, which is
//! what the official encoder puts in prompts (tool schemas, non-string tool arguments,
//! response formats) and in parsed tool-call arguments.
//!
//! Differences from `serde_json::to_string`: `", "` and `": "` separators, Python's `repr` of
//! floats (`1e-05`, `1e+16`, `100.0`), and only `"`, `\`, and C0 controls escaped (non-ASCII,
//! including U+2028/U+2029, is written as is). Object keys keep their order, which needs
//! serde_json's `preserve_order` feature (enabled by this crate).
//!
//! Known limit: an integer outside the 64-bit range has already become a float when serde_json
//! parsed it, so it is written as a float where Python would write every digit.

use serde_json::Value;

/// `json.dumps(value, ensure_ascii=False)` of the official encoder's `to_json`.
pub fn to_python_json(value: &Value) -> String {
    let mut out = String::new();
    write_value(&mut out, value);
    out
}

fn write_value(out: &mut String, value: &Value) {
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(true) => out.push_str("true"),
        Value::Bool(false) => out.push_str("false"),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                out.push_str(&i.to_string());
            } else if let Some(u) = n.as_u64() {
                out.push_str(&u.to_string());
            } else {
                out.push_str(&python_float_repr(n.as_f64().unwrap_or(f64::NAN)));
            }
        }
        Value::String(s) => write_str(out, s),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_value(out, item);
            }
            out.push(']');
        }
        Value::Object(map) => {
            out.push('{');
            for (i, (k, v)) in map.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_str(out, k);
                out.push_str(": ");
                write_value(out, v);
            }
            out.push('}');
        }
    }
}

/// A JSON string literal as Python writes it with `ensure_ascii=False`.
pub(crate) fn write_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

/// Python's `repr(float)`: the shortest digits that round-trip, written in positional
/// notation when the decimal exponent is in [-4, 16), otherwise as `d.ddde±XX`.
pub(crate) fn python_float_repr(x: f64) -> String {
    if x.is_nan() {
        return "NaN".into();
    }
    if x.is_infinite() {
        return if x > 0.0 { "Infinity".into() } else { "-Infinity".into() };
    }
    // `{:e}` gives the shortest round-trip digits as `d.ddde<exp>` (e.g. `1.5e-7`, `0e0`).
    let sci = format!("{:e}", x.abs());
    let (mantissa, exp) = sci.split_once('e').unwrap_or((sci.as_str(), "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    let sign = if x.is_sign_negative() { "-" } else { "" };
    // Position of the decimal point relative to the start of `digits`.
    let decpt = exp + 1;
    let n = digits.len() as i32;
    let body = if -4 < decpt && decpt <= 16 {
        if decpt <= 0 {
            format!("0.{}{}", "0".repeat((-decpt) as usize), digits)
        } else if decpt < n {
            format!("{}.{}", &digits[..decpt as usize], &digits[decpt as usize..])
        } else {
            format!("{}{}.0", digits, "0".repeat((decpt - n) as usize))
        }
    } else {
        let mant = if n > 1 { format!("{}.{}", &digits[..1], &digits[1..]) } else { digits.clone() };
        let e = decpt - 1;
        format!("{mant}e{}{:02}", if e < 0 { '-' } else { '+' }, e.abs())
    };
    format!("{sign}{body}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn floats_match_python_repr() {
        for (x, want) in [
            (0.0, "0.0"),
            (-0.0, "-0.0"),
            (1.0, "1.0"),
            (100.0, "100.0"),
            (0.1, "0.1"),
            (1.5, "1.5"),
            (0.0001, "0.0001"),
            (0.00001, "1e-05"),
            (1.5e-7, "1.5e-07"),
            (1e15, "1000000000000000.0"),
            (1e16, "1e+16"),
            (1.2345678901234568e17, "1.2345678901234568e+17"),
            (1e100, "1e+100"),
            (-2.5e-300, "-2.5e-300"),
            (123.456, "123.456"),
            (f64::MAX, "1.7976931348623157e+308"),
            (5e-324, "5e-324"),
        ] {
            assert_eq!(python_float_repr(x), want, "{x:e}");
        }
    }

    #[test]
    fn dumps_like_python() {
        let v: Value =
            serde_json::from_str(r#"{"b": 1, "a": [true, null, 2.50, "x\"\\\n\u0001é"], "c": {}, "d": []}"#).unwrap();
        assert_eq!(to_python_json(&v), r#"{"b": 1, "a": [true, null, 2.5, "x\"\\\n\u0001é"], "c": {}, "d": []}"#);
        assert_eq!(to_python_json(&json!(-7)), "-7");
        assert_eq!(to_python_json(&json!(u64::MAX)), "18446744073709551615");
        assert_eq!(to_python_json(&json!("\u{7f}\u{2028}\u{8}\u{c}\t\r")), "\"\u{7f}\u{2028}\\b\\f\\t\\r\"");
    }
}
