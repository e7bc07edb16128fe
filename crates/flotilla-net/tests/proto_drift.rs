//! The hand-written prost types (`flotilla_core::wire`, `flotilla_net::proto`) must match
//! `proto/flotilla.proto` field by field (name, number, type, label) and value by value for the
//! enums, so that a peer built from the .proto file reads the same bytes. Both are read as
//! text; any drift in either fails here with the message and field named.

use std::collections::BTreeMap;
use std::path::Path;

/// Field name → (number, normalised type, label) of one message.
type Fields = BTreeMap<String, (u32, String, String)>;
/// Message name → its fields.
type Messages = BTreeMap<String, Fields>;
/// Enum name → its (normalised value name, number) pairs.
type Enums = BTreeMap<String, Vec<(String, i64)>>;

fn read(rel: &str) -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    std::fs::read_to_string(root.join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// The code of `text` without `//` comments.
fn strip_comments(text: &str) -> String {
    text.lines()
        .map(|l| l.split("//").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Messages and enums of the .proto file.
fn proto_defs() -> (Messages, Enums) {
    let text = strip_comments(&read("proto/flotilla.proto"));
    let enum_names: Vec<String> = text
        .split_whitespace()
        .collect::<Vec<_>>()
        .windows(2)
        .filter(|w| w[0] == "enum")
        .map(|w| w[1].to_string())
        .collect();
    let (mut messages, mut enums) = (BTreeMap::new(), BTreeMap::new());
    let mut rest = text.as_str();
    while let Some(start) = rest.find(['m', 'e']) {
        rest = &rest[start..];
        let kind = if rest.starts_with("message ") {
            "message"
        } else if rest.starts_with("enum ") {
            "enum"
        } else {
            rest = &rest[1..];
            continue;
        };
        let open = rest.find('{').unwrap();
        let close = rest.find('}').unwrap();
        let name = rest[kind.len()..open].trim().to_string();
        let body = &rest[open + 1..close];
        let statements = body.split(';').map(str::trim).filter(|s| !s.is_empty());
        if kind == "enum" {
            let values = statements
                .map(|s| {
                    let (n, v) = s.split_once('=').unwrap();
                    (norm(n.trim()), v.trim().parse().unwrap())
                })
                .collect();
            enums.insert(name, values);
        } else {
            let mut fields = Fields::new();
            for s in statements {
                let (decl, number) = s.split_once('=').unwrap();
                let decl = decl.replace(", ", ",");
                let words: Vec<&str> = decl.split_whitespace().collect();
                let (label, ty, field) = match words[..] {
                    ["repeated", t, f] => ("repeated", t, f),
                    ["optional", t, f] => ("optional", t, f),
                    [t, f] => ("", t, f),
                    _ => panic!("{name}: cannot read `{s}`"),
                };
                let ty = if ty.starts_with("map<") {
                    ty.to_string()
                } else if enum_names.iter().any(|e| e == ty) {
                    format!("enum {ty}")
                } else if ty.chars().next().unwrap().is_uppercase() {
                    "message".to_string()
                } else {
                    ty.to_string()
                };
                let n = number.trim().parse().unwrap();
                fields.insert(field.to_string(), (n, ty, label.to_string()));
            }
            messages.insert(name, fields);
        }
        rest = &rest[close + 1..];
    }
    (messages, enums)
}

/// `DELTA_INDICES` and `DeltaIndices` alike: lower case without underscores.
fn norm(s: &str) -> String {
    s.chars()
        .filter(|c| *c != '_')
        .flat_map(char::to_lowercase)
        .collect()
}

/// Messages and enums of the prost types in a Rust source file.
fn rust_defs(rel: &str, messages: &mut Messages, enums: &mut Enums) {
    let text = strip_comments(&read(rel));
    let lines: Vec<&str> = text.lines().map(str::trim).collect();
    let mut i = 0;
    while i < lines.len() {
        let l = lines[i];
        if let Some(name) = l.strip_prefix("pub struct ") {
            let name = name
                .trim_end_matches(" {")
                .trim_end_matches(" {}")
                .to_string();
            let is_prost = lines[..i]
                .iter()
                .rev()
                .take(3)
                .any(|p| p.contains("prost::Message"));
            let mut fields = Fields::new();
            let mut j = i + 1;
            while is_prost && j < lines.len() && lines[j] != "}" && !l.ends_with("{}") {
                if let Some(attr) = lines[j].strip_prefix("#[prost(") {
                    let attr = attr.trim_end_matches(")]");
                    let field = lines[j + 1]
                        .strip_prefix("pub ")
                        .and_then(|f| f.split(':').next())
                        .unwrap()
                        .to_string();
                    let parts: Vec<&str> = attr.split(", ").collect();
                    let tag = parts
                        .iter()
                        .find_map(|p| p.strip_prefix("tag = \""))
                        .unwrap()
                        .trim_end_matches('"')
                        .parse()
                        .unwrap();
                    let label = if parts.contains(&"repeated") {
                        "repeated"
                    } else if parts.contains(&"optional") {
                        "optional"
                    } else {
                        ""
                    };
                    let ty = match parts[0] {
                        p if p.starts_with("enumeration = ") => {
                            format!(
                                "enum {}",
                                p.trim_start_matches("enumeration = ").trim_matches('"')
                            )
                        }
                        p if p.starts_with("bytes") => "bytes".into(),
                        p if p.starts_with("map = ") => {
                            let kv = attr.split('"').nth(1).unwrap().replace(' ', "");
                            format!("map<{kv}>")
                        }
                        p => p.to_string(),
                    };
                    fields.insert(field, (tag, ty, label.into()));
                    j += 2;
                } else {
                    j += 1;
                }
            }
            if is_prost {
                messages.insert(name, fields);
            }
            i = j;
        } else if let Some(name) = l.strip_prefix("pub enum ") {
            let name = name.trim_end_matches(" {").to_string();
            let is_prost = lines[..i]
                .iter()
                .rev()
                .take(3)
                .any(|p| p.contains("prost::Enumeration"));
            let mut values = Vec::new();
            let mut j = i + 1;
            while j < lines.len() && lines[j] != "}" {
                if let Some((n, v)) = lines[j].trim_end_matches(',').split_once(" = ") {
                    values.push((norm(n), v.parse().unwrap()));
                }
                j += 1;
            }
            if is_prost {
                enums.insert(name, values);
            }
            i = j;
        } else {
            i += 1;
        }
    }
}

#[test]
fn the_prost_types_match_the_proto_file() {
    let (proto_messages, proto_enums) = proto_defs();
    let (mut messages, mut enums) = (BTreeMap::new(), BTreeMap::new());
    rust_defs(
        "crates/flotilla-core/src/wire/mod.rs",
        &mut messages,
        &mut enums,
    );
    rust_defs(
        "crates/flotilla-net/src/proto.rs",
        &mut messages,
        &mut enums,
    );
    assert!(
        proto_messages.len() >= 15 && proto_enums.len() >= 4,
        "{proto_messages:?}"
    );
    assert_eq!(
        messages.keys().collect::<Vec<_>>(),
        proto_messages.keys().collect::<Vec<_>>(),
        "messages"
    );
    assert_eq!(enums, proto_enums, "enums");
    for (name, fields) in &proto_messages {
        let rust = &messages[name];
        for (field, (n, ty, label)) in fields {
            let Some((rn, rty, rlabel)) = rust.get(field) else {
                panic!("{name}.{field} is in the .proto file but not in the Rust type");
            };
            // An embedded message carried as its encoded bytes is the same on the wire.
            let same_type = rty == ty || (ty == "message" && rty == "bytes");
            // prost holds every singular message field as an Option: proto3's presence.
            let same_label = rlabel == label || (ty == "message" && rlabel == "optional");
            assert!(
                rn == n && same_type && same_label,
                "{name}.{field}: .proto says {label} {ty} = {n}, Rust says {rlabel} {rty} = {rn}"
            );
        }
        for field in rust.keys() {
            assert!(
                fields.contains_key(field),
                "{name}.{field} is in the Rust type but not in the .proto file"
            );
        }
    }
}
