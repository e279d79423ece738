//! How the CLI prints tenants: a readable table by default, proto3 JSON with `-o json`,
//! the same document as YAML with `-o yaml`.

use serde_json::{Map, Value, json};

use crate::proto;
use crate::wire::ProtoConnections;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    #[default]
    Table,
    Json,
    Yaml,
}

fn ts(t: &Option<prost_types::Timestamp>) -> Value {
    match t {
        Some(t) => {
            let st = std::time::UNIX_EPOCH
                + std::time::Duration::new(
                    u64::try_from(t.seconds).unwrap_or(0),
                    u32::try_from(t.nanos).unwrap_or(0),
                );
            Value::String(humantime::format_rfc3339_millis(st).to_string())
        }
        None => Value::Null,
    }
}

fn secret(s: &Option<proto::Secret>) -> Value {
    match s {
        Some(s) => json!({ "fingerprint": s.fingerprint }),
        None => Value::Null,
    }
}

fn compact(v: Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.into_iter()
                .filter(|(_, v)| !matches!(v, Value::Null) && v != &json!(""))
                .map(|(k, v)| (k, compact(v)))
                .collect::<Map<_, _>>(),
        ),
        other => other,
    }
}

fn connections_json(c: ProtoConnections<'_>) -> Map<String, Value> {
    let ProtoConnections {
        miradore: mir,
        m3ter: m3,
        mailkit: mk,
    } = c;
    let mut m = Map::new();
    if let Some(c) = mir {
        m.insert(
            "miradore".into(),
            json!({"site": c.site, "apiKey": secret(&c.api_key)}),
        );
    }
    if let Some(c) = m3 {
        m.insert(
            "m3ter".into(),
            json!({"accessKeyId": c.access_key_id, "apiSecret": secret(&c.api_secret),
                   "orgId": c.org_id, "environment": c.environment}),
        );
    }
    if let Some(c) = mk {
        m.insert(
            "mailkit".into(),
            json!({"clientId": c.client_id, "clientMd5": secret(&c.client_md5)}),
        );
    }
    m
}

/// The proto3 JSON mapping of a tenant (defaults omitted), which `apply -f` reads back.
pub fn tenant_json(t: &proto::Tenant) -> Value {
    let mut m = Map::new();
    m.insert("id".into(), json!(t.id));
    m.insert("displayName".into(), json!(t.display_name));
    m.extend(connections_json(t.into()));
    m.insert("etag".into(), json!(t.etag));
    m.insert("createTime".into(), ts(&t.create_time));
    m.insert("updateTime".into(), ts(&t.update_time));
    compact(Value::Object(m))
}

pub fn partner_json(p: &proto::PartnerDefaults) -> Value {
    let mut m = connections_json(p.into());
    m.insert("etag".into(), json!(p.etag));
    m.insert("updateTime".into(), ts(&p.update_time));
    compact(Value::Object(m))
}

fn fp(s: &Option<proto::Secret>) -> &str {
    s.as_ref()
        .map(|s| s.fingerprint.as_str())
        .unwrap_or("(inherited)")
}

fn or_inherited(s: &str) -> &str {
    if s.is_empty() { "(inherited)" } else { s }
}

fn connection_rows(c: ProtoConnections<'_>) -> Vec<(&'static str, String)> {
    let ProtoConnections {
        miradore: mir,
        m3ter: m3,
        mailkit: mk,
    } = c;
    vec![
        (
            "MIRADORE",
            mir.as_ref().map_or("-".into(), |c| {
                format!("site={} api_key={}", or_inherited(&c.site), fp(&c.api_key))
            }),
        ),
        (
            "M3TER",
            m3.as_ref().map_or("-".into(), |c| {
                format!(
                    "access_key_id={} api_secret={} org_id={} environment={}",
                    or_inherited(&c.access_key_id),
                    fp(&c.api_secret),
                    or_inherited(&c.org_id),
                    or_inherited(&c.environment)
                )
            }),
        ),
        (
            "MAILKIT",
            mk.as_ref().map_or("-".into(), |c| {
                format!(
                    "client_id={} client_md5={}",
                    or_inherited(&c.client_id),
                    fp(&c.client_md5)
                )
            }),
        ),
    ]
}

fn key_values(rows: Vec<(&str, String)>) -> String {
    rows.into_iter()
        .map(|(k, v)| format!("{k:<14}{v}\n"))
        .collect()
}

fn ts_text(t: &Option<prost_types::Timestamp>) -> String {
    match ts(t) {
        Value::String(s) => s,
        _ => "-".into(),
    }
}

pub fn tenant_table(t: &proto::Tenant) -> String {
    let mut rows = vec![
        ("ID", t.id.clone()),
        ("DISPLAY NAME", t.display_name.clone()),
    ];
    rows.extend(connection_rows(t.into()));
    rows.push(("ETAG", t.etag.clone()));
    rows.push(("CREATED", ts_text(&t.create_time)));
    rows.push(("UPDATED", ts_text(&t.update_time)));
    key_values(rows)
}

pub fn partner_table(p: &proto::PartnerDefaults) -> String {
    let mut rows = connection_rows(p.into());
    rows.push(("ETAG", p.etag.clone()));
    rows.push(("UPDATED", ts_text(&p.update_time)));
    key_values(rows)
}

pub fn list_table(tenants: &[proto::Tenant]) -> String {
    let mut out = format!(
        "{:<32} {:<24} {:<24} {}\n",
        "ID", "DISPLAY NAME", "VENDORS", "UPDATED"
    );
    for t in tenants {
        let vendors: Vec<&str> = [
            (t.miradore.is_some(), "miradore"),
            (t.m3ter.is_some(), "m3ter"),
            (t.mailkit.is_some(), "mailkit"),
        ]
        .into_iter()
        .filter_map(|(on, name)| on.then_some(name))
        .collect();
        out.push_str(&format!(
            "{:<32} {:<24} {:<24} {}\n",
            t.id,
            t.display_name,
            if vendors.is_empty() {
                "-".to_owned()
            } else {
                vendors.join(",")
            },
            ts_text(&t.update_time)
        ));
    }
    out
}
