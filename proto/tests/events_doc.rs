//! `docs/events.md` documents every message, field and enum value of `events.proto` with
//! the proto's own comments: its reference part (from `## Event` on) is generated here from
//! the schema and must equal the page. After changing the schema, regenerate it with
//! `SENSOR_BLESS=1 cargo test -p sensor-proto --test events_doc`.

use std::path::{Path, PathBuf};

use prost_types::{
    DescriptorProto, EnumDescriptorProto, FileDescriptorProto, SourceCodeInfo,
    field_descriptor_proto::{Label, Type},
};

/// The comment before the element at `path` in the file, on one line.
fn comment(info: &SourceCodeInfo, path: &[i32]) -> String {
    info.location
        .iter()
        .find(|l| l.path == path)
        .and_then(|l| l.leading_comments.as_deref())
        .unwrap_or("")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

fn short(type_name: &str) -> &str {
    type_name.rsplit('.').next().unwrap_or(type_name)
}

/// `## NAME`, then the element's own comment as a paragraph when it has one.
fn heading(out: &mut String, name: &str, info: &SourceCodeInfo, path: &[i32]) {
    out.push_str(&format!("## {name}\n\n"));
    let about = comment(info, path);
    if !about.is_empty() {
        out.push_str(&format!("{about}\n\n"));
    }
}

fn message(out: &mut String, m: &DescriptorProto, info: &SourceCodeInfo, path: &[i32]) {
    heading(out, m.name(), info, path);
    out.push_str("| field | type | meaning |\n| --- | --- | --- |\n");
    for (i, f) in m.field.iter().enumerate() {
        let ty = match f.r#type() {
            Type::Message | Type::Enum => short(f.type_name()).to_owned(),
            Type::Double => "double".into(),
            Type::Float => "float".into(),
            Type::Int64 => "int64".into(),
            Type::Uint64 => "uint64".into(),
            Type::Int32 => "int32".into(),
            Type::Fixed64 => "fixed64".into(),
            Type::Fixed32 => "fixed32".into(),
            Type::Bool => "bool".into(),
            Type::String => "string".into(),
            Type::Group => "group".into(),
            Type::Bytes => "bytes".into(),
            Type::Uint32 => "uint32".into(),
            Type::Sfixed32 => "sfixed32".into(),
            Type::Sfixed64 => "sfixed64".into(),
            Type::Sint32 => "sint32".into(),
            Type::Sint64 => "sint64".into(),
        };
        let ty = if f.label() == Label::Repeated {
            format!("repeated {ty}")
        } else {
            ty
        };
        let mut field_path = path.to_vec();
        field_path.extend([2, i as i32]);
        out.push_str(&format!(
            "| `{}` | {ty} | {} |\n",
            f.json_name(),
            comment(info, &field_path)
        ));
    }
    out.push('\n');
}

fn enumeration(out: &mut String, e: &EnumDescriptorProto, info: &SourceCodeInfo, path: &[i32]) {
    heading(out, e.name(), info, path);
    out.push_str("| value | meaning |\n| --- | --- |\n");
    for (i, v) in e.value.iter().enumerate() {
        let mut value_path = path.to_vec();
        value_path.extend([2, i as i32]);
        out.push_str(&format!(
            "| `{}` | {} |\n",
            v.name(),
            comment(info, &value_path)
        ));
    }
    out.push('\n');
}

/// The reference part of the page: messages and enums in the order of the file.
fn render(file: &FileDescriptorProto) -> String {
    let info = file.source_code_info.clone().unwrap_or_default();
    // Messages (4) and enums (5) interleaved as written: by their line in the file.
    let mut items: Vec<(i32, String)> = Vec::new();
    let line = |path: &[i32]| {
        info.location
            .iter()
            .find(|l| l.path == path)
            .and_then(|l| l.span.first().copied())
            .unwrap_or(i32::MAX)
    };
    for (i, m) in file.message_type.iter().enumerate() {
        let path = [4, i as i32];
        let mut out = String::new();
        message(&mut out, m, &info, &path);
        items.push((line(&path), out));
    }
    for (i, e) in file.enum_type.iter().enumerate() {
        let path = [5, i as i32];
        let mut out = String::new();
        enumeration(&mut out, e, &info, &path);
        items.push((line(&path), out));
    }
    items.sort_by_key(|(line, _)| *line);
    let mut out: String = items.into_iter().map(|(_, text)| text).collect();
    out.truncate(out.trim_end().len());
    out.push('\n');
    out
}

#[test]
fn events_md_documents_every_field_of_the_schema() {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let fds = protox::compile(["sensor/v1/events.proto"], [root.join("proto")]).unwrap();
    let file = fds
        .file
        .iter()
        .find(|f| f.name() == "sensor/v1/events.proto")
        .unwrap();
    let generated = render(file);
    let page_path = root.join("../docs/events.md");
    let page = std::fs::read_to_string(&page_path).unwrap();
    let start = page
        .find("\n## Event\n")
        .expect("docs/events.md has a `## Event` section")
        + 1;
    if page[start..] == generated {
        return;
    }
    if std::env::var_os("SENSOR_BLESS").is_some() {
        std::fs::write(&page_path, format!("{}{generated}", &page[..start])).unwrap();
        return;
    }
    let differs = page[start..]
        .lines()
        .zip(generated.lines())
        .find(|(a, b)| a != b)
        .map_or_else(
            || "one is longer".to_owned(),
            |(a, b)| format!("page: {a}\nschema: {b}"),
        );
    panic!(
        "{} is out of date with events.proto (first difference below); regenerate it with \
         SENSOR_BLESS=1 cargo test -p sensor-proto --test events_doc\n{differs}",
        Path::new("docs/events.md").display()
    );
}
