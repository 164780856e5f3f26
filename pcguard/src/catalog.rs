//! The PaperCut port catalog: one entry per documented service, as data
//! (`pcguard/data/catalog.toml`), each with the fragment of the PaperCut
//! document (`docs/papercut-ports.txt`) or of another PaperCut page stored
//! verbatim in the repository (`docs/papercut/*.txt`, see [`DOCUMENTS`]) it
//! comes from.

use std::{
    collections::{BTreeSet, HashSet},
    sync::OnceLock,
};

use serde::{Deserialize, Serialize};

use crate::model::{Cidr, Direction, PortRange, Protocol, first_overlap, format_ports, table};

/// The PaperCut document "What ports does PaperCut use?", verbatim.
pub const DOCUMENT: &str = include_str!("../../docs/papercut-ports.txt");

const CATALOG_TOML: &str = include_str!("../data/catalog.toml");

/// The id of [`DOCUMENT`] (a service's default `document`).
pub const MAIN_DOCUMENT: &str = "ports";

/// Other PaperCut pages the catalog quotes, stored verbatim with a header
/// (`Title:`, `URL:`, `Retrieved:`, `Copy:`, then a `---` line): id -> file.
const DOCUMENT_FILES: [(&str, &str); 5] = [
    ("change-ports", include_str!("../../docs/papercut/change-ports.txt")),
    ("security-options-v14", include_str!("../../docs/papercut/system-security-options-v14.txt")),
    ("site-server-troubleshooting", include_str!("../../docs/papercut/site-server-troubleshooting.txt")),
    ("site-server-overview", include_str!("../../docs/papercut/site-server-technical-overview.txt")),
    ("mobility-print-how-it-works", include_str!("../../docs/papercut/mobility-print-how-it-works.txt")),
];

/// A PaperCut page the catalog quotes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Document {
    pub id: &'static str,
    pub title: &'static str,
    pub url: &'static str,
    /// The date the text was retrieved (`YYYY-MM-DD`).
    pub retrieved: &'static str,
    /// The page's text, verbatim (after the header).
    #[serde(skip)]
    pub text: &'static str,
}

/// Every document the catalog may quote: [`DOCUMENT`] first, then the
/// stored pages. A stored page without its header is a build defect (the
/// unit tests parse them all).
pub fn documents() -> &'static [Document] {
    static DOCS: OnceLock<Vec<Document>> = OnceLock::new();
    DOCS.get_or_init(|| {
        let main = Document {
            id: MAIN_DOCUMENT,
            title: "What ports does PaperCut use? (Firewall Ports used by NG & MF)",
            url: "https://www.papercut.com/kb/Main/FirewallPorts",
            retrieved: "docs/papercut-ports.txt",
            text: DOCUMENT,
        };
        let stored = DOCUMENT_FILES
            .iter()
            .map(|(id, file)| parse_document(id, file).unwrap_or_else(|e| panic!("docs/papercut/{id}: {e}")));
        std::iter::once(main).chain(stored).collect()
    })
}

/// The document with this id.
pub fn document(id: &str) -> Option<&'static Document> {
    documents().iter().find(|d| d.id == id)
}

fn parse_document(id: &'static str, file: &'static str) -> Result<Document, String> {
    let (head, text) = file.split_once("\n---\n").ok_or("no `---` line after the header")?;
    let field = |name: &str| -> Result<&'static str, String> {
        let prefix = format!("{name}: ");
        head.lines().find_map(|l| l.strip_prefix(prefix.as_str())).ok_or(format!("no `{name}:` line"))
    };
    let (title, url, retrieved) = (field("Title")?, field("URL")?, field("Retrieved")?);
    field("Copy")?;
    if !url.starts_with("https://") && !url.starts_with("http://") {
        return Err(format!("URL {url:?} is not an http(s) address"));
    }
    Ok(Document { id, title, url, retrieved, text })
}

/// A further quote of a service, from any document.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Quote {
    pub document: String,
    pub text: String,
}

/// A peer class: a named set of addresses the site config fills in.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PeerClass {
    pub name: String,
    pub description: String,
}

/// One documented service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Service {
    pub id: String,
    pub name: String,
    pub direction: Direction,
    pub protocol: Protocol,
    pub ports: Vec<PortRange>,
    pub peers: Vec<String>,
    /// Site-config feature keys enabling the service (any of them).
    pub features: Vec<String>,
    #[serde(default)]
    pub fqdns: Vec<String>,
    #[serde(default)]
    pub ips: Vec<String>,
    /// The fragment of `document` the service comes from (verbatim).
    #[serde(default)]
    pub source: Option<String>,
    /// The id of the document `source` quotes ([`documents`]); default
    /// [`MAIN_DOCUMENT`].
    #[serde(default = "main_document")]
    pub document: String,
    /// Further quotes (e.g. the page that gives the ports of a connection
    /// another page names).
    #[serde(default)]
    pub also: Vec<Quote>,
    /// Its 9191 / 9192 are the Application Server's ports, which
    /// `[papercut] http_port` / `https_port` move.
    #[serde(default)]
    pub app_server_ports: bool,
    #[serde(default = "default_true")]
    pub from_document: bool,
    #[serde(default)]
    pub always_allow: bool,
    #[serde(default)]
    pub optional_peers: bool,
    #[serde(default)]
    pub note: Option<String>,
}

fn default_true() -> bool {
    true
}

fn main_document() -> String {
    MAIN_DOCUMENT.to_string()
}

impl Service {
    pub fn has_feature(&self, key: &str) -> bool {
        self.features.iter().any(|f| f == key)
    }

    /// The documented IPs as host prefixes (validated when the catalog is
    /// loaded).
    pub fn ip_prefixes(&self) -> Vec<Cidr> {
        self.ips.iter().filter_map(|ip| ip.parse().ok()).collect()
    }

    /// The service brings its own endpoints (cloud FQDNs or IPs), so its
    /// peer class needs no configured CIDR.
    pub fn has_endpoints(&self) -> bool {
        !self.fqdns.is_empty() || !self.ips.is_empty()
    }

    /// Every quote of the service with its document: `source`, then
    /// `also` (validated when the catalog is loaded).
    pub fn quotes(&self) -> Vec<(&'static Document, &str)> {
        let first = self.source.as_deref().map(|s| (self.document.as_str(), s));
        let more = self.also.iter().map(|q| (q.document.as_str(), q.text.as_str()));
        first.into_iter().chain(more).filter_map(|(d, text)| document(d).map(|d| (d, text))).collect()
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Catalog {
    /// Peer classes, in bit order.
    #[serde(rename = "class")]
    pub classes: Vec<PeerClass>,
    /// Services, in priority order.
    #[serde(rename = "service")]
    pub services: Vec<Service>,
}

/// Parses and validates catalog data.
pub fn parse(text: &str) -> Result<Catalog, String> {
    let catalog: Catalog = toml::from_str(text).map_err(|e| e.to_string())?;
    catalog.validate()?;
    Ok(catalog)
}

impl Catalog {
    /// The built-in catalog (parsed and validated once; the data is checked
    /// by unit tests, so a failure here is a build defect).
    pub fn builtin() -> &'static Catalog {
        static CATALOG: OnceLock<Catalog> = OnceLock::new();
        CATALOG.get_or_init(|| parse(CATALOG_TOML).unwrap_or_else(|e| panic!("built-in catalog: {e}")))
    }

    /// The catalog as an aligned text table (`pcguard catalog`).
    pub fn render_table(&self) -> String {
        let rows: Vec<Vec<String>> = self.services.iter().map(table_row).collect();
        let headers = ["ID", "DIR", "PROTO", "PORTS", "PEERS", "FEATURES", "DOC", "ENDPOINTS"];
        table::aligned(&headers, &rows)
    }

    /// The catalog as JSON (`pcguard catalog --format json`): `{"classes":
    /// [...], "services": [...]}`, ports as `"9191"` / `"49152-65535"`.
    pub fn to_json(&self) -> serde_json::Value {
        let services: Vec<serde_json::Value> = self.services.iter().map(service_json).collect();
        serde_json::json!({ "classes": self.classes, "services": services })
    }

    pub fn service(&self, id: &str) -> Option<&Service> {
        self.services.iter().find(|s| s.id == id)
    }

    pub fn class(&self, name: &str) -> Option<&PeerClass> {
        self.classes.iter().find(|c| c.name == name)
    }

    pub fn class_names(&self) -> Vec<&str> {
        self.classes.iter().map(|c| c.name.as_str()).collect()
    }

    /// Every feature key used by a service.
    pub fn feature_keys(&self) -> BTreeSet<&str> {
        self.services.iter().flat_map(|s| s.features.iter().map(String::as_str)).collect()
    }

    /// The values of a namespaced feature (`mfd` -> `brother`, `canon`, ...),
    /// sorted.
    pub fn feature_values(&self, namespace: &str) -> Vec<&str> {
        let prefix = format!("{namespace}:");
        self.feature_keys().into_iter().filter_map(|k| k.strip_prefix(prefix.as_str())).collect()
    }

    /// Services enabled by `key`, in catalog order.
    pub fn services_with_feature<'a>(&'a self, key: &'a str) -> impl Iterator<Item = &'a Service> + 'a {
        self.services.iter().filter(move |s| s.has_feature(key))
    }

    fn validate(&self) -> Result<(), String> {
        let mut ids = HashSet::new();
        for s in &self.services {
            if !ids.insert(s.id.as_str()) {
                return Err(format!("service {}: duplicate id", s.id));
            }
            self.validate_service(s).map_err(|e| format!("service {}: {e}", s.id))?;
        }
        Ok(())
    }

    fn validate_service(&self, s: &Service) -> Result<(), String> {
        if !is_kebab_case(&s.id) {
            return Err("id must be kebab-case".into());
        }
        if s.ports.is_empty() || s.peers.is_empty() || s.features.is_empty() {
            return Err("ports, peers and features must not be empty".into());
        }
        if let Some((a, b)) = first_overlap(&s.ports) {
            return Err(format!("ports {a} and {b} overlap"));
        }
        if let Some(p) = s.peers.iter().find(|p| self.class(p).is_none()) {
            return Err(format!("unknown peer class {p}"));
        }
        if let Some(ip) = s.ips.iter().find(|ip| ip.parse::<Cidr>().is_err()) {
            return Err(format!("invalid ip {ip}"));
        }
        if s.source.is_none() && s.from_document {
            return Err("a service from the document needs its source".into());
        }
        if s.app_server_ports && !s.ports.iter().any(|p| APP_SERVER_PORTS.iter().any(|a| p.contains(*a))) {
            return Err("app_server_ports without 9191 or 9192".into());
        }
        let first = s.source.iter().map(|src| (s.document.as_str(), src.as_str()));
        let more = s.also.iter().map(|q| (q.document.as_str(), q.text.as_str()));
        for (doc, text) in first.chain(more) {
            let d = document(doc).ok_or_else(|| format!("unknown document {doc:?}"))?;
            if !d.text.contains(text) {
                return Err(format!("source is not a verbatim fragment of the document {doc:?}: {text:?}"));
            }
        }
        Ok(())
    }
}

/// The Application Server's ports the manual says can be changed
/// ("Change the Application Server ports"): HTTP, HTTPS.
pub const APP_SERVER_PORTS: [u16; 2] = [9191, 9192];

fn is_kebab_case(id: &str) -> bool {
    !id.is_empty()
        && !id.starts_with('-')
        && !id.ends_with('-')
        && id.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

fn table_row(s: &Service) -> Vec<String> {
    let endpoints: Vec<&str> = s.fqdns.iter().chain(&s.ips).map(String::as_str).collect();
    vec![
        s.id.clone(),
        s.direction.as_str().to_string(),
        s.protocol.as_str().to_string(),
        format_ports(&s.ports),
        s.peers.join(","),
        compact_features(&s.features),
        if s.from_document { "yes" } else { "no" }.to_string(),
        endpoints.join(","),
    ]
}

/// `mfd:toshiba,mfd:toshiba-sdk1` -> `mfd:toshiba|toshiba-sdk1`.
fn compact_features(features: &[String]) -> String {
    let mut groups: Vec<(&str, Vec<&str>)> = Vec::new();
    for f in features {
        let (ns, value) = f.split_once(':').unwrap_or(("", f));
        match groups.iter_mut().find(|(n, _)| *n == ns && !ns.is_empty()) {
            Some((_, values)) => values.push(value),
            None => groups.push((ns, vec![value])),
        }
    }
    let group = |(ns, values): &(&str, Vec<&str>)| match ns.is_empty() {
        true => values.join(","),
        false => format!("{ns}:{}", values.join("|")),
    };
    groups.iter().map(group).collect::<Vec<_>>().join(",")
}

fn service_json(s: &Service) -> serde_json::Value {
    let mut v = serde_json::to_value(s).expect("a catalog service serializes");
    let ports: Vec<String> = s.ports.iter().map(PortRange::to_string).collect();
    v["ports"] = serde_json::json!(ports);
    v
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    /// Numbers in the document that are not ports: an error code
    /// (`0×0000011b`), a version (`version 24`), a model (`Ethernet 241`)
    /// and a year (`August 2024`).
    const NOT_PORTS: [u32; 4] = [0, 24, 241, 2024];

    fn document_numbers() -> BTreeSet<u32> {
        DOCUMENT
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '.'))
            .filter(|t| !t.is_empty() && t.chars().all(|c| c.is_ascii_digit()))
            .map(|t| t.parse().unwrap())
            .collect()
    }

    fn covered(port: u32, proto: Option<Protocol>) -> bool {
        Catalog::builtin().services.iter().any(|s| {
            s.from_document
                && proto.is_none_or(|p| p == s.protocol)
                && s.ports.iter().any(|r| u32::from(r.start) <= port && port <= u32::from(r.end))
        })
    }

    #[test]
    fn builtin_catalog_is_valid() {
        let c = Catalog::builtin();
        assert!(c.services.len() > 90);
        assert_eq!(c.classes.len(), 15);
        // Appended: the earlier classes keep their bits.
        assert_eq!(c.classes.last().unwrap().name, "site_servers");
        assert_eq!(c.classes[13].name, "cloud");
    }

    #[test]
    fn every_port_of_the_document_is_covered() {
        let numbers = document_numbers();
        assert!(numbers.contains(&9191) && numbers.contains(&49152));
        let missing: Vec<u32> =
            numbers.iter().copied().filter(|n| !NOT_PORTS.contains(n) && !covered(*n, None)).collect();
        assert!(missing.is_empty(), "ports of the document without a catalog entry: {missing:?}");
    }

    #[test]
    fn every_udp_port_of_the_document_is_covered_as_udp() {
        for port in [53, 88, 137, 138, 161, 162, 389, 445] {
            assert!(covered(port, Some(Protocol::Udp)), "{port}/udp");
        }
    }

    #[test]
    fn every_source_is_verbatim() {
        for s in &Catalog::builtin().services {
            if let Some(src) = &s.source {
                let doc = document(&s.document).unwrap_or_else(|| panic!("{}: document {}", s.id, s.document));
                assert!(doc.text.contains(src.as_str()), "{}: {src:?}", s.id);
            }
            for q in &s.also {
                assert!(document(&q.document).unwrap().text.contains(q.text.as_str()), "{}: {:?}", s.id, q.text);
            }
            assert_eq!(s.quotes().len(), usize::from(s.source.is_some()) + s.also.len(), "{}", s.id);
            assert!(s.from_document || s.source.is_none() || s.note.is_some() || s.id == "admin-ssh");
        }
    }

    #[test]
    fn stored_pages_have_their_header_and_are_in_the_docs() {
        let docs = documents();
        assert_eq!(docs.len(), DOCUMENT_FILES.len() + 1);
        assert_eq!(docs[0].text, DOCUMENT);
        let catalog_md = include_str!("../../docs/catalog.md");
        for d in &docs[1..] {
            assert!(d.url.starts_with("http"), "{}", d.id);
            assert_eq!(d.retrieved.len(), 10, "{}: retrieval date YYYY-MM-DD", d.id);
            assert!(!d.text.is_empty() && !d.text.starts_with("Title:"), "{}", d.id);
            assert!(catalog_md.contains(d.url), "docs/catalog.md lacks the URL of {}", d.id);
        }
        // Every stored page is quoted by some service.
        for d in &docs[1..] {
            let used = Catalog::builtin().services.iter().any(|s| s.quotes().iter().any(|(q, _)| q.id == d.id));
            assert!(used || d.id == "site-server-overview" || d.id == "security-options-v14", "{} unused", d.id);
        }
        assert!(parse_document("x", "Title: t\nURL: ftp://x\nRetrieved: 2026-01-01\nCopy: c\n---\ntext").is_err());
        assert!(parse_document("x", "Title: t\nURL: https://x\nRetrieved: 2026-01-01\n---\ntext").is_err());
        assert!(parse_document("x", "Title: t\nURL: https://x\nRetrieved: 2026-01-01\nCopy: c\ntext").is_err());
        let d = parse_document("x", "Title: t\nURL: https://x\nRetrieved: 2026-01-01\nCopy: c\n---\ntext").unwrap();
        assert_eq!((d.title, d.url, d.retrieved, d.text), ("t", "https://x", "2026-01-01", "text"));
    }

    #[test]
    fn new_entries_quote_their_pages() {
        let c = Catalog::builtin();
        let mdns = c.service("mobility-print-mdns").unwrap();
        assert_eq!((mdns.protocol, format_ports(&mdns.ports)), (Protocol::Udp, "5353".to_string()));
        assert_eq!(mdns.document, "mobility-print-how-it-works");
        assert!(mdns.quotes()[0].0.url.contains("mobility-print"));
        let site = c.service("site-server-out").unwrap();
        assert_eq!((site.direction, site.peers.clone()), (Direction::Outbound, vec!["site_servers".to_string()]));
        assert!(
            site.quotes().iter().any(|(d, q)| d.id == "site-server-troubleshooting" && q.contains("9191 and 9192"))
        );
        let samba = c.service("samba-smb").unwrap();
        assert!(!samba.from_document && format_ports(&samba.ports) == "445");
        // The moved services: every 9191-9193 inbound of the devices, the
        // web ports and the upstream.
        for id in ["web-http", "web-https", "upstream-http", "hp-inbound", "xerox-inbound"] {
            assert!(c.service(id).unwrap().app_server_ports, "{id}");
        }
        for id in ["device-rpc", "konica-minolta-sha2", "dell-outbound", "universal-print-connector"] {
            assert!(!c.service(id).unwrap().app_server_ports, "{id}");
        }
    }

    #[test]
    fn docs_list_every_service() {
        let doc = include_str!("../../docs/catalog.md");
        for s in &Catalog::builtin().services {
            assert!(doc.contains(&format!("| `{}`", s.id)), "docs/catalog.md lacks {}", s.id);
        }
    }

    #[test]
    fn document_copy_matches_shared_original() {
        let shared = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/papercut-ports.txt");
        match std::fs::read_to_string(&shared) {
            Ok(original) => assert_eq!(original, DOCUMENT, "docs/papercut-ports.txt differs from {shared:?}"),
            Err(_) => eprintln!("skipped: {} not present", shared.display()),
        }
    }

    #[test]
    fn documented_entries_have_expected_shape() {
        let c = Catalog::builtin();
        let check = |id: &str, dir, proto, ports: &str, peer: &str| {
            let s = c.service(id).unwrap_or_else(|| panic!("{id} missing"));
            assert_eq!((s.direction, s.protocol, format_ports(&s.ports)), (dir, proto, ports.to_string()), "{id}");
            assert!(s.peers.iter().any(|p| p == peer), "{id} peers {:?}", s.peers);
        };
        use Direction::*;
        use Protocol::*;
        check("web-http", Inbound, Tcp, "9191", "workstations");
        check("web-https", Inbound, Tcp, "9192", "secondary_servers");
        check("device-rpc", Inbound, Tcp, "9193", "devices");
        check("ges", Outbound, Tcp, "443", "cloud");
        check("ldaps", Outbound, Tcp, "636", "ldap");
        check("hp-device", Outbound, Tcp, "7627", "devices");
        check("toshiba-snmp-trap", Inbound, Udp, "162", "devices");
        check("ad-rpc-dynamic", Outbound, Tcp, "49152-65535", "directory");
        check("db-postgresql", Outbound, Tcp, "5432", "database");
        check("netbios-udp", Inbound, Udp, "137, 138", "workstations");
        assert_eq!(c.service("ges").unwrap().fqdns, vec!["mf.cloud.papercut.com"]);
        assert_eq!(c.service("email-sendgrid").unwrap().ips, vec!["168.245.53.86"]);
        assert!(!c.service("admin-ssh").unwrap().from_document);
        assert!(c.service("admin-ssh").unwrap().always_allow);
    }

    #[test]
    fn feature_values_list_vendors() {
        let vendors = Catalog::builtin().feature_values("mfd");
        for v in ["brother", "hp", "konica-minolta", "toshiba-sdk1", "vcc", "xerox"] {
            assert!(vendors.contains(&v), "{v}");
        }
        assert!(Catalog::builtin().feature_values("database").contains(&"postgresql"));
    }

    #[test]
    fn rejects_invalid_catalog_data() {
        let base = r#"
[[class]]
name = "devices"
description = "d"
[[service]]
id = "x"
name = "x"
direction = "inbound"
protocol = "tcp"
peers = ["devices"]
features = ["f"]
"#;
        let with = |extra: &str| parse(&format!("{base}{extra}"));
        assert!(with("ports = [1]\nsource = \"9191 for HTTP connections\"").is_ok());
        assert!(with("ports = [1]\nsource = \"not in the document\"").unwrap_err().contains("verbatim"));
        assert!(with("ports = [1]").unwrap_err().contains("needs its source"));
        assert!(with("ports = [1, \"1-5\"]\nfrom_document = false").unwrap_err().contains("overlap"));
        assert!(with("ports = [1]\ndocument = \"nope\"\nsource = \"9191\"").unwrap_err().contains("unknown document"));
        let wrong_doc = "ports = [1]\ndocument = \"change-ports\"\nsource = \"9191 for HTTP connections\"";
        assert!(with(wrong_doc).unwrap_err().contains("verbatim fragment of the document \"change-ports\""));
        let also = "ports = [1]\nsource = \"9191 for HTTP connections\"\nalso = [{ document = \"change-ports\", text = \"x y z\" }]";
        assert!(with(also).unwrap_err().contains("x y z"));
        assert!(
            with("ports = [1]\nfrom_document = false\napp_server_ports = true").unwrap_err().contains("9191 or 9192")
        );
        assert!(with("ports = [1]\nfrom_document = false\nbogus = 1").unwrap_err().contains("bogus"));
    }

    #[test]
    fn table_and_json() {
        let c = Catalog::builtin();
        let t = c.render_table();
        assert!(t.starts_with("ID"));
        let line = t.lines().find(|l| l.starts_with("ad-rpc-dynamic ")).unwrap();
        assert!(line.contains("outbound") && line.contains("49152-65535") && line.contains("directory"));
        assert_eq!(t.lines().count(), c.services.len() + 1);
        let j = c.to_json();
        let svc = j["services"].as_array().unwrap();
        assert_eq!(svc.len(), c.services.len());
        let ges = svc.iter().find(|s| s["id"] == "ges").unwrap();
        assert_eq!(ges["ports"], serde_json::json!(["443"]));
        assert_eq!(ges["direction"], "outbound");
        assert!(ges["source"].as_str().unwrap().contains("mf.cloud.papercut.com"));
    }
}
