//! How the CLI prints tenants: a readable table by default, proto3 JSON with `-o json`,
//! the same document as YAML with `-o yaml`.

use serde_json::{Map, Value, json};

use crate::model::ProtoConnections;
use crate::model::{Connection, Connections, ProtoRef, Slot, VendorVisitor, json_name};
use crate::proto;

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
    struct Json<'a> {
        msgs: ProtoConnections<'a>,
        out: Map<String, Value>,
    }
    impl VendorVisitor for Json<'_> {
        fn visit<C: Connection>(&mut self, slot: &Slot<C>) {
            let Some(msg) = slot.proto(self.msgs) else {
                return;
            };
            let fields = C::FIELDS
                .iter()
                .map(|f| {
                    let value = match (f.proto)(msg) {
                        ProtoRef::Text(v) => json!(v),
                        ProtoRef::Secret(v) => secret(v),
                    };
                    (json_name(f.name), value)
                })
                .collect::<Map<_, _>>();
            self.out
                .insert(C::VENDOR.as_str().into(), Value::Object(fields));
        }
    }
    let mut json = Json {
        msgs: c,
        out: Map::new(),
    };
    Connections::for_each_vendor(&mut json);
    json.out
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

fn connection_rows(c: ProtoConnections<'_>) -> Vec<(String, String)> {
    struct Rows<'a> {
        msgs: ProtoConnections<'a>,
        out: Vec<(String, String)>,
    }
    impl VendorVisitor for Rows<'_> {
        fn visit<C: Connection>(&mut self, slot: &Slot<C>) {
            let value = slot.proto(self.msgs).map_or("-".into(), |msg| {
                C::FIELDS
                    .iter()
                    .map(|f| {
                        let value = match (f.proto)(msg) {
                            ProtoRef::Text(v) => or_inherited(v),
                            ProtoRef::Secret(v) => fp(v),
                        };
                        format!("{}={value}", f.name)
                    })
                    .collect::<Vec<_>>()
                    .join(" ")
            });
            self.out
                .push((C::VENDOR.as_str().to_ascii_uppercase(), value));
        }
    }
    let mut rows = Rows {
        msgs: c,
        out: Vec::new(),
    };
    Connections::for_each_vendor(&mut rows);
    rows.out
}

/// The vendors a tenant uses, by name.
fn vendors_of(t: &proto::Tenant) -> Vec<&'static str> {
    struct Used<'a> {
        msgs: ProtoConnections<'a>,
        out: Vec<&'static str>,
    }
    impl VendorVisitor for Used<'_> {
        fn visit<C: Connection>(&mut self, slot: &Slot<C>) {
            if slot.proto(self.msgs).is_some() {
                self.out.push(C::VENDOR.as_str());
            }
        }
    }
    let mut used = Used {
        msgs: t.into(),
        out: Vec::new(),
    };
    Connections::for_each_vendor(&mut used);
    used.out
}

fn key_values(rows: Vec<(String, String)>) -> String {
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
        ("ID".into(), t.id.clone()),
        ("DISPLAY NAME".into(), t.display_name.clone()),
    ];
    rows.extend(connection_rows(t.into()));
    rows.push(("ETAG".into(), t.etag.clone()));
    rows.push(("CREATED".into(), ts_text(&t.create_time)));
    rows.push(("UPDATED".into(), ts_text(&t.update_time)));
    key_values(rows)
}

pub fn partner_table(p: &proto::PartnerDefaults) -> String {
    let mut rows = connection_rows(p.into());
    rows.push(("ETAG".into(), p.etag.clone()));
    rows.push(("UPDATED".into(), ts_text(&p.update_time)));
    key_values(rows)
}

pub fn list_table(tenants: &[proto::Tenant]) -> String {
    let mut out = format!(
        "{:<32} {:<24} {:<24} {}\n",
        "ID", "DISPLAY NAME", "VENDORS", "UPDATED"
    );
    for t in tenants {
        let vendors = vendors_of(t);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn fingerprint(fp: &str) -> Option<proto::Secret> {
        Some(proto::Secret {
            value: String::new(),
            fingerprint: fp.into(),
        })
    }

    fn tenant() -> proto::Tenant {
        proto::Tenant {
            id: "acme".into(),
            display_name: "Acme".into(),
            miradore: Some(proto::MiradoreConnection {
                site: "acme".into(),
                api_key: fingerprint("sha256:abc"),
            }),
            m3ter: Some(proto::M3terConnection {
                access_key_id: "AK".into(),
                environment: "staging".into(),
                ..Default::default()
            }),
            etag: "3".into(),
            ..Default::default()
        }
    }

    #[test]
    fn tables_show_every_declared_field_or_inherited() {
        assert_eq!(
            tenant_table(&tenant()),
            "ID            acme\n\
             DISPLAY NAME  Acme\n\
             MIRADORE      site=acme api_key=sha256:abc\n\
             M3TER         access_key_id=AK api_secret=(inherited) org_id=(inherited) environment=staging\n\
             MAILKIT       -\n\
             ETAG          3\n\
             CREATED       -\n\
             UPDATED       -\n"
        );
        let list = list_table(&[tenant()]);
        assert_eq!(
            list.lines()
                .nth(1)
                .map(str::split_whitespace)
                .map(Iterator::collect::<Vec<_>>),
            Some(vec!["acme", "Acme", "miradore,m3ter", "-"])
        );
    }

    #[test]
    fn json_uses_the_proto3_names_and_omits_blanks() {
        let json = tenant_json(&tenant());
        assert_eq!(
            json,
            json!({
                "id": "acme",
                "displayName": "Acme",
                "miradore": {"site": "acme", "apiKey": {"fingerprint": "sha256:abc"}},
                "m3ter": {"accessKeyId": "AK", "environment": "staging"},
                "etag": "3",
            })
        );
    }
}
